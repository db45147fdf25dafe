"""Markdown table of ``evaluate.json`` results (the ``metrics.csv`` each evaluation writes), in the style of
the paper's Table 2: PSNR, SSIM, MAE and MPE per map, one row per model and data set.

From the repository root: ``python bundle/scripts/evaluation_table.py "PDPE-Net, validation=bundle/eval/pdpe_validation"
"U-Net, validation=bundle/eval/unet_validation" [--out bundle/docs/evaluation.md]``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

MAPS = ("T1", "T2", "PD")
METRICS = {
    "psnr": ("PSNR (dB)", "{:.2f}"),
    "ssim": ("SSIM", "{:.3f}"),
    "mae": ("MAE", "{:.4f}"),
    "mpe": ("MPE", "{:.3f}"),
}


def read_metrics(folder: Path) -> dict[str, float]:
    with (folder / "metrics.csv").open() as f:
        return {name: float(value) for name, value in csv.reader(f)}


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    columns = [(f"{m}_{k}", f"{label} {k}", fmt) for m, (label, fmt) in METRICS.items() for k in MAPS]
    lines = ["| model, data | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]  # fmt: skip
    for name, metrics in rows:
        lines.append(f"| {name} | " + " | ".join(fmt.format(metrics[key]) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="'<row name>=<evaluation output_dir>'")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    rows = [(name, read_metrics(Path(folder))) for name, folder in (run.rsplit("=", 1) for run in args.runs)]
    text = table(rows)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
