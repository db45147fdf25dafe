"""Time study inference stage by stage on the sample study (CPU unless a GPU is there); prints a table.

From the repository root: ``python bundle/scripts/benchmark_inference.py [--repeats 3] [--study <dicom dir>]``.
Each repeat runs the bundle's inference workflow in this process (Python start-up and imports are
excluded, as they are once per command); the first repeat also loads deepbet and warms up the network.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import the bundle's ``scripts`` package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from monai.bundle import ConfigWorkflow  # noqa: E402
from scripts.sample_study import write_sample_study  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "inference.json"


def run_once(study: Path, out: Path, **overrides) -> dict:
    start = time.perf_counter()
    workflow = ConfigWorkflow(config_file=str(CONFIG), workflow_type="infer", study_dir=str(study),
                              output_dir=str(out), logging_file=False, **overrides)  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    timings = json.loads((out / "report.json").read_text())["timings"]
    return {**timings, "total_s": time.perf_counter() - start}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--study", type=Path, help="DICOM study folder (default: a fresh sample study)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        study = args.study or write_sample_study(Path(tmp) / "sample")["dicom"]
        runs = [run_once(study, Path(tmp) / f"out{r}") for r in range(args.repeats)]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nstudy inference, {device}, {args.repeats} runs (first includes model loading)")
    print(f"{'stage':<30}{'first s':>10}{'median of rest s':>18}")
    for stage in runs[0]:
        rest = [r[stage] for r in runs[1:]] or [runs[0][stage]]
        print(f"{stage:<30}{runs[0][stage]:>10.2f}{statistics.median(rest):>18.2f}")


if __name__ == "__main__":
    main()
