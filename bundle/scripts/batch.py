"""Many studies in one command (``configs/batch.json``): the single-study workflow once per study, the model
and deepbet loaded once, one failed study reported and skipped, a summary table at the end.

Under ``torchrun`` (``configs/multi_gpu_batch.json``) each rank maps its share of the studies
(``monai.data.partition_dataset``) and rank 0 writes the summary of all of them.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import torch.distributed as dist
from monai.bundle import ConfigWorkflow
from monai.data import partition_dataset
from scripts.inference import fail, flag
from scripts.outputs import refuse_overlap
from tqdm import tqdm

LOG = logging.getLogger("scripts.batch")
#: The table written into the batch's output folder, one row per study.
SUMMARY = "summary.csv"
COLUMNS = ("study", "status", "seconds", "warnings", "message")


def find_studies(studies_dir: str | None = None, studies_list: str | None = None) -> list[Path]:
    """Every non-hidden subfolder of ``studies_dir``, or the folders of ``studies_list`` (one per line, ``#``
    comments; relative paths from the list's folder), as absolute paths."""
    if bool(studies_dir) == bool(studies_list):
        fail("pass either --studies_dir <folder of study folders> or --studies_list <file of study folders>.")
    if studies_dir:
        root = Path(studies_dir).resolve()
        if not root.is_dir():
            fail(f"--studies_dir {root} is not a folder.")
        studies = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    else:
        listing = Path(studies_list).resolve()
        try:
            lines = listing.read_text().splitlines()
        except OSError as err:
            fail(f"cannot read --studies_list {listing}: {err.strerror or err}.")
        entries = [line.strip() for line in lines]
        studies = [(listing.parent / e).resolve() for e in entries if e and not e.startswith("#")]
        if missing := [str(p) for p in studies if not p.is_dir()]:
            fail(f"{listing} names folders that do not exist: {', '.join(missing[:5])}.")
    if not studies:
        fail(f"no study folders in {studies_dir or studies_list}.")
    names = [p.name for p in studies]
    if clashes := sorted({n for n in names if names.count(n) > 1}):
        fail(f"several studies are named {', '.join(clashes)}; their output folders would clash. Rename them.")
    return studies


class StudyBatch:
    """Runs the single-study workflow (``config_files``) on each study into ``output_dir/<study folder name>``.

    Args:
        output_dir: folder of the per-study output folders and of ``summary.csv``.
        config_files: the single-study configs (``inference.json``).
        overrides: passed to every study's workflow; the shared, already built ``network`` among them.
        studies_dir, studies_list: where the studies are (see ``find_studies``).
        overwrite: replace earlier outputs of this tool (each study folder is checked as in a single run).
        rank, world_size: this process's share of the studies under ``torchrun``.
    """

    def __init__(
        self,
        output_dir: str | None,
        config_files: list[str],
        overrides: dict,
        studies_dir: str | None = None,
        studies_list: str | None = None,
        overwrite: bool | str = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not output_dir:
            fail("no output folder given: pass --output_dir <folder>.")
        self.studies = find_studies(studies_dir, studies_list)
        self.output = Path(output_dir).resolve()
        inputs = [p.resolve() for p in (*self.studies, *([Path(studies_dir)] if studies_dir else []))]
        refuse_overlap(self.output, inputs, "the studies")
        if (self.output / SUMMARY).exists() and not flag(overwrite, "--overwrite"):
            fail(f"{self.output / SUMMARY} exists; pass --overwrite true to replace it and earlier study outputs.")
        # every study's output folder is checked against all the studies, not only its own
        self.overrides = {**overrides, "overwrite": overwrite, "output#inputs": [str(p) for p in inputs]}
        self.config_files, self.rank, self.world_size = config_files, rank, world_size

    def run(self) -> list[dict]:
        """Map this rank's studies; returns (and on rank 0 prints and writes) the summary of all studies."""
        start = time.perf_counter()
        mine = partition_dataset(self.studies, num_partitions=self.world_size, even_divisible=False)[self.rank]
        rows = []
        progress = tqdm(mine, desc="studies", unit="study", disable=None)
        for study in progress:
            rows.append(self._map(study))
            progress.set_postfix_str(f"{study.name}: {rows[-1]['status']}")
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        rows.sort(key=lambda row: row["study"])
        if self.rank == 0:
            self._summarise(rows, time.perf_counter() - start)
        return rows

    def _map(self, study: Path) -> dict:
        start = time.perf_counter()
        out = self.output / study.name
        row = {"study": study.name, "status": "ok", "warnings": 0, "message": ""}
        try:
            workflow = ConfigWorkflow(config_file=self.config_files, workflow_type="infer", study_dir=str(study),
                                      output_dir=str(out), **self.overrides)  # fmt: skip
            workflow.initialize()
            workflow.run()
            workflow.finalize()
            warnings = json.loads((out / "report.json").read_text())["warnings"]
            row.update(warnings=len(warnings), message=warnings[0] if warnings else "")
        except (Exception, SystemExit) as err:  # the single-study run ends a bad study with SystemExit
            row.update(status="failed", message=str(err).removeprefix("pdpe-qmri error: "))
            LOG.error("%s failed: %s", study, row["message"])
        row["seconds"] = round(time.perf_counter() - start, 2)
        return row

    def _summarise(self, rows: list[dict], seconds: float) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        with open(self.output / SUMMARY, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        done = sum(row["status"] == "ok" for row in rows)
        lines = [f"{'study':<24}{'status':<8}{'seconds':>9}{'warnings':>10}  first warning or error"]
        lines += [f"{r['study']:<24}{r['status']:<8}{r['seconds']:>9.1f}{r['warnings']:>10}  {r['message'][:100]}"
                  for r in rows]  # fmt: skip
        lines.append(f"{done} of {len(rows)} studies mapped in {seconds:.1f} s on {self.world_size} process(es): "
                     f"{3600 * done / seconds:.0f} studies per hour; table in {self.output / SUMMARY}")  # fmt: skip
        print("\n".join(lines), flush=True)
