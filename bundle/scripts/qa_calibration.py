"""Physics-QA calibration: the QA numbers of clean studies and of deliberately broken copies of them.

Each study is read as the pipeline reads it (T1w/T2w/FLAIR selected by ``scripts.study``) and written as
BIDS NIfTI with JSON sidecars, once clean and once per damage in ``DAMAGES``; every copy is mapped by the
inference config (``--refine false``: the QA describes the network's maps, before any refinement) and
its ``report.json`` gives, per series, the whole-volume residual and the worst slice's residual relative to
its neighbours'. The thresholds in ``scripts/qa.py`` should pass every clean study and flag every
broken one; the table says which do. From the repository root (about 40 s per copy on 2 CPU cores)::

    python bundle/scripts/qa_calibration.py bundle/eval/clinical/studies/{philips-1,philips-2,siemens-1,ge-1} \\
        --work /tmp/qa_calibration --out bundle/docs/qa_calibration.md
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import the bundle's ``scripts`` package instead of this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import nibabel as nib  # noqa: E402
from monai.bundle import ConfigWorkflow  # noqa: E402
from scripts import physics, qa  # noqa: E402
from scripts.study import load_study  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1]


def _zero_slice(name: str):
    def damage(series: dict) -> None:
        volume = series[name]["volume"]
        volume[:, :, volume.shape[2] // 2] = 0

    return damage


def _scale_tr(name: str, factor: float):
    def damage(series: dict) -> None:
        series[name]["tr"] *= factor

    return damage


def _swap_images(first: str, second: str):
    def damage(series: dict) -> None:
        for key in ("volume", "affine"):
            series[first][key], series[second][key] = series[second][key], series[first][key]

    return damage


#: The broken copies: what a user's study can get wrong without the reader noticing.
DAMAGES = {
    "FLAIR middle slice zeroed": _zero_slice("FLAIR"),
    "T2w middle slice zeroed": _zero_slice("T2w"),
    "T2w TR halved in the header": _scale_tr("T2w", 0.5),
    "T2w TR doubled in the header": _scale_tr("T2w", 2.0),
    "T2w and FLAIR images swapped": _swap_images("T2w", "FLAIR"),
}


def write_bids(series: dict, folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, one in series.items():
        nib.save(nib.Nifti1Image(one["volume"], one["affine"]), folder / f"sub-01_{name}.nii.gz")
        sidecar = {"RepetitionTime": one["tr"] / 1000, "EchoTime": one["te"] / 1000, "InversionTime": one["ti"] / 1000}
        (folder / f"sub-01_{name}.json").write_text(json.dumps(sidecar))


def run_inference(study: Path, out: Path, checkpoint: Path) -> dict:
    workflow = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "inference.json"), workflow_type="infer",
                              study_dir=str(study), output_dir=str(out), overwrite=True, refine=False,
                              ckpt_path=str(checkpoint))  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return json.loads((out / "report.json").read_text())


def measure(study: Path, work: Path, checkpoint: Path) -> list[dict]:
    """One row per copy (clean, then each damage): QA numbers and whether the thresholds flag it."""
    chosen, _, _ = load_study(study / "dicom" if (study / "dicom").is_dir() else study)
    rows = []
    for variant, damage in {"clean": None, **DAMAGES}.items():
        series = {name: {"volume": s.volume.copy(), "affine": s.affine, "tr": s.tr, "te": s.te, "ti": s.ti}
                  for name, s in chosen.items()}  # fmt: skip
        if damage:
            damage(series)
        folder = work / study.name / variant.replace(" ", "_")
        shutil.rmtree(folder, ignore_errors=True)
        write_bids(series, folder / "bids")
        report = run_inference(folder / "bids", folder / "maps", checkpoint)
        flagged = [w.split(":")[0] + (" slice" if "slice(s)" in w else "") for w in report["warnings"]
                   if "re-synthesised" in w]  # fmt: skip
        row = {"study": study.name, "variant": variant, "flagged": flagged}
        for name in physics.SERIES:
            entry = report["qa"][name]
            row[f"{name}_residual_pct"] = 100 * entry["relative_mean_abs_residual"]
            row[f"{name}_worst_slice_ratio"] = entry["worst_slice"]["ratio_to_neighbours"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> list[str]:
    head = ["study", "copy", *(f"{s} residual %" for s in physics.SERIES),
            *(f"{s} worst slice / neighbours" for s in physics.SERIES), "flagged"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["study"], row["variant"], *(f"{row[f'{s}_residual_pct']:.1f}" for s in physics.SERIES),
                 *(f"{row[f'{s}_worst_slice_ratio']:.2f}" for s in physics.SERIES),
                 ", ".join(row["flagged"]) or "-"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", type=Path, help="study folders (DICOM, or with a dicom/ subfolder)")
    parser.add_argument("--work", required=True, type=Path, help="folder for the copies and their maps")
    parser.add_argument("--checkpoint", type=Path, default=BUNDLE / "models" / "model.pt")
    parser.add_argument("--out", type=Path, help="markdown file for the table (and a .json of the rows beside it)")
    args = parser.parse_args(argv)
    rows = [row for study in args.studies for row in measure(study, args.work, args.checkpoint)]
    thresholds = ", ".join(f"{s} {100 * t:.0f} %" for s, t in qa.SERIES_THRESHOLDS.items())
    lines = [
        f"Physics-QA thresholds (scripts/qa.py): whole volume {thresholds}; slice {qa.SLICE_RATIO_THRESHOLD:g} x "
        f"the mean of its two neighbours (slices with at least {100 * qa.MIN_SLICE_BRAIN:.0f} % of the largest brain "
        "area).",
        "",
        *table(rows),
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
