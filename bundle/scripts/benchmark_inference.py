"""Wall time of study inference as a user gets it, this checkout against a previous revision, in one run.

From the repository root: ``python bundle/scripts/benchmark_inference.py [--study <dicom dir>] [--repeats 2]
[--batch 4] [--baseline c73943b]``. Every run is the README's command in a fresh process (start-up, imports
and config parsing included), the two versions alternating so that both see the same machine; the stages come
from each run's ``report.json``, "start-up" is the rest of the wall time. Then the batch mode maps ``--batch``
copies of the study in one command, against the previous way (one command per study). The previous version is
``git archive``'d from ``--baseline`` into a temporary folder. Also printed: the largest difference between the
two versions' maps in the brain mask. Without ``--study`` a fresh sample study (33 slices) is used.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import the bundle's ``scripts`` package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scripts.sample_study import write_sample_study  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STAGES = ("read_study_s", "preprocess_s", "of_which_brain_mask_s", "inference_and_postprocess_s", "write_s")


def checkout(revision: str, folder: Path) -> Path:
    """The repository at ``revision``, extracted into ``folder``."""
    archive = subprocess.run(["git", "archive", revision], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def command(root: Path, entry: str, configs: list[str], output: Path, **options) -> float:
    """Run ``python -m monai.bundle run <entry>`` of the checkout ``root``; returns its wall time (s)."""
    configs = json.dumps([str(root / "bundle" / "configs" / c) for c in configs])
    cmd = [sys.executable, "-m", "monai.bundle", "run", entry, "--config_file", configs, "--output_dir", str(output)]
    cmd += [arg for key, value in options.items() for arg in (f"--{key}", str(value))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds


def single(root: Path, study: Path, output: Path) -> dict:
    wall = command(root, "inference", ["inference.json"], output, study_dir=study)
    timings = json.loads((output / "report.json").read_text())["timings"]
    stages = {k: timings[k] for k in STAGES}
    stages["start_up_s"] = wall - sum(v for k, v in stages.items() if k != "of_which_brain_mask_s")
    return {**stages, "total_s": wall}


def max_difference(a: Path, b: Path) -> dict:
    """Largest relative difference per map between two outputs, in the brain mask of ``a``."""
    mask = nib.load(a / "mask.nii.gz").get_fdata() > 0
    same_mask = bool(np.array_equal(mask, nib.load(b / "mask.nii.gz").get_fdata() > 0))
    diff = {"same_mask": same_mask}
    for name in ("T1", "T2", "PD"):
        x, y = (nib.load(p / f"{name}_map.nii.gz").get_fdata()[mask] for p in (a, b))
        diff[name] = float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-6)))
    return diff


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, help="DICOM study folder (default: a fresh sample study)")
    parser.add_argument("--repeats", type=int, default=2, help="single-study runs per version")
    parser.add_argument("--batch", type=int, default=4, help="copies of the study in the batch comparison (0: none)")
    parser.add_argument("--baseline", default="c73943b", help="git revision of the previous version")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study = args.study.resolve() if args.study else write_sample_study(tmp / "sample")["dicom"]
        versions = {"previous": checkout(args.baseline, tmp / "previous"), "this": REPO}
        runs = {name: [] for name in versions}
        for r in range(args.repeats):
            for name, root in versions.items():
                runs[name].append(single(root, study, tmp / f"{name}{r}"))
        difference = max_difference(tmp / "this0", tmp / "previous0")

        batch = {}
        if args.batch:
            studies = tmp / "studies"
            for k in range(args.batch):
                shutil.copytree(study, studies / f"study{k}")
            start = time.perf_counter()
            for k in range(args.batch):
                single(versions["previous"], studies / f"study{k}", tmp / "previous_batch" / f"study{k}")
            batch["previous"] = time.perf_counter() - start
            batch["this"] = command(REPO, "batch", ["inference.json", "batch.json"], tmp / "this_batch",
                                    studies_dir=studies)  # fmt: skip

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    cpu = platform.processor() or platform.machine()
    machine = f"{device}, {os.cpu_count()} cores ({cpu}), torch {torch.__version__}"
    print(f"\n{machine}; study {study.name}; previous = {args.baseline}; median of {args.repeats} runs (s)")
    print(f"{'stage':<30}{'previous':>10}{'this':>10}{'ratio':>8}")
    for stage in runs["this"][0]:
        old, new = (statistics.median(r[stage] for r in runs[name]) for name in ("previous", "this"))
        print(f"{stage:<30}{old:>10.2f}{new:>10.2f}{old / max(new, 1e-9):>8.2f}")
    per_hour = [3600 / statistics.median(r["total_s"] for r in runs[name]) for name in ("previous", "this")]
    print(f"{'studies per hour, one by one':<30}{per_hour[0]:>10.0f}{per_hour[1]:>10.0f}")
    if batch:
        print(f"{f'batch of {args.batch}: studies per hour':<30}{3600 * args.batch / batch['previous']:>10.0f}"
              f"{3600 * args.batch / batch['this']:>10.0f}{batch['previous'] / batch['this']:>8.2f}"
              "   (previous: one command per study)")  # fmt: skip
    print(
        "maps, this against previous: largest relative difference in the brain mask "
        + ", ".join(f"{k} {v:.1e}" for k, v in difference.items() if k != "same_mask")
        + f"; same brain mask: {difference['same_mask']}"
    )


if __name__ == "__main__":
    main()
