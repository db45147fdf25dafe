"""Summarise training runs from their ``metrics.csv``: a markdown table and a learning-curve figure.

From the repository root:
``python bundle/scripts/training_summary.py bundle/runs/cpu bundle/runs/cpu_unet --names PDPE-Net U-Net
--out bundle/docs/training``  writes ``training.md`` and ``training.png``.
"""

from __future__ import annotations

import argparse
import csv
import shlex
from pathlib import Path

MAPS = ("T1", "T2", "PD")


def read_history(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def best_epoch(history: list[dict]) -> dict:
    """The validation round the checkpoint keeps: lowest sum of the per-map MPE in the brain mask."""
    return min(history, key=lambda r: r["val_mpe_sum"])


def summary_rows(names: list[str], histories: list[list[dict]]) -> list[str]:
    header = ("| run | epochs | hours | best epoch | " + " | ".join(f"MPE {m} (%)" for m in MAPS) + " | "
              + " | ".join(f"PSNR {m} (dB)" for m in MAPS) + " |")  # fmt: skip
    rows = [header, "|" + "---|" * (4 + 2 * len(MAPS))]
    for name, history in zip(names, histories, strict=True):
        best, last = best_epoch(history), history[-1]
        mpe = " | ".join(f"{100 * best[f'val_mpe_{m}']:.1f}" for m in MAPS)
        psnr = " | ".join(f"{best[f'val_psnr_{m}']:.2f}" for m in MAPS)
        rows.append(f"| {name} | {int(last['epoch'])} | {last['seconds'] / 3600:.2f} | {int(best['epoch'])} | "
                    f"{mpe} | {psnr} |")  # fmt: skip
    return rows


def plot(names: list[str], histories: list[list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(MAPS), figsize=(13, 7), constrained_layout=True, sharex=True)
    for name, history in zip(names, histories, strict=True):
        epochs = [r["epoch"] for r in history]
        for column, m in enumerate(MAPS):
            axes[0, column].plot(epochs, [100 * r[f"val_mpe_{m}"] for r in history], marker=".", label=name)
            axes[1, column].plot(epochs, [r[f"val_psnr_{m}"] for r in history], marker=".", label=name)
            axes[0, column].set_title(f"validation MPE {m} (%, lower is better)")
            axes[1, column].set_title(f"validation PSNR {m} (dB)")
            axes[1, column].set_xlabel("epoch")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output_dir of each training run")
    parser.add_argument("--names", nargs="+", help="display names (default: folder names)")
    parser.add_argument("--out", type=Path, required=True, help="output prefix, e.g. bundle/docs/training")
    args = parser.parse_args(argv)
    names = args.names or [run.name for run in args.runs]
    histories = [read_history(run) for run in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = "\n".join(summary_rows(names, histories))
    command = shlex.join(["python", "bundle/scripts/training_summary.py", *map(str, args.runs), "--names", *names,
                          "--out", str(args.out)])  # fmt: skip
    args.out.with_suffix(".md").write_text(
        "Validation MPE and PSNR in the brain mask (best epoch: lowest MPE sum, the checkpoint's key metric), from "
        f"`{command}`:\n\n{table}\n\n![learning curves]({args.out.name}.png)\n"
    )
    plot(names, histories, args.out.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
