"""Many studies in one command: one output folder per study, a failed study skipped, a summary; torchrun shards."""

import csv
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import CONFIGS, REPO
from monai.bundle import ConfigWorkflow
from test_inference import _infer, model, sample  # noqa: F401 (fixtures)

BATCH = [str(CONFIGS / "inference.json"), str(CONFIGS / "batch.json")]


def test_batch_passes_every_mapping_option_to_each_study():
    """Each refinement switch, the maps' margin and the mixed-study override given to ``run batch`` reach every
    study's workflow (a switch missing here would silently map every study with the default)."""
    inference = json.loads((CONFIGS / "inference.json").read_text())
    overrides = json.loads((CONFIGS / "batch.json").read_text())["batch_runner"]["overrides"]
    options = [k for k in inference if k.startswith("refine")] + ["maps_margin", "allow_mixed_study"]
    assert len(options) >= 6 and {k: overrides.get(k) for k in options} == {k: f"@{k}" for k in options}


@pytest.fixture(scope="module")
def studies(sample, tmp_path_factory):  # noqa: F811
    """Two copies of the sample study and a folder with no study in it."""
    root = tmp_path_factory.mktemp("studies")
    for name in ("a", "b"):
        shutil.copytree(sample["dicom"], root / name)
    (root / "broken").mkdir()
    (root / "broken" / "notes.txt").write_text("not a study")
    return root


def _summary(folder):
    with open(folder / "summary.csv") as f:
        return {row["study"]: row for row in csv.DictReader(f)}


def _batch(studies_dir, output_dir, model, **overrides):  # noqa: F811
    workflow = ConfigWorkflow(config_file=BATCH, workflow_type="infer", run_id="batch", studies_dir=str(studies_dir),
                              output_dir=str(output_dir), **model, **overrides)  # fmt: skip
    workflow.initialize()
    workflow.run()


def test_batch_maps_each_study_as_a_single_run_does_and_skips_a_failed_one(studies, sample, model, tmp_path):  # noqa: F811
    out = tmp_path / "maps"
    mask = str(sample["truth"] / "mask.nii.gz")  # every study is a copy of the sample: its mask, no deepbet
    _batch(studies, out, model, refine=False, **{"batch_runner#overrides#mask": mask})
    summary = _summary(out)
    assert [summary[s]["status"] for s in ("a", "b", "broken")] == ["ok", "ok", "failed"]
    assert "no DICOM files" in summary["broken"]["message"] and not (out / "broken").exists()
    assert int(summary["a"]["warnings"]) == len(json.loads((out / "a" / "report.json").read_text())["warnings"])
    single = tmp_path / "single"
    _infer(sample["dicom"], single, model, mask=mask)
    for name in ("T1", "T2", "PD", "mask"):
        expected = nib.load(single / f"{name}{'' if name == 'mask' else '_map'}.nii.gz").get_fdata()
        for study in ("a", "b"):
            got = nib.load(out / study / f"{name}{'' if name == 'mask' else '_map'}.nii.gz").get_fdata()
            np.testing.assert_array_equal(got, expected)

    with pytest.raises(SystemExit, match="--overwrite true"):  # a second batch into the same folder
        _batch(studies, out, model)
    with pytest.raises(SystemExit, match="lies inside the input"):
        _batch(studies, studies / "maps", model)


@pytest.mark.slow
def test_torchrun_shards_the_studies_over_two_gloo_processes(studies, model, tmp_path):  # noqa: F811
    listing = tmp_path / "studies.txt"
    listing.write_text(f"# two studies\n{studies / 'a'}\n{studies / 'b'}\n")
    overrides = [f"--{k}={json.dumps(v)}" for k, v in model.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "batch", "--config_file",
           json.dumps([*BATCH, str(CONFIGS / "multi_gpu_batch.json")]), "--studies_list", str(listing),
           "--output_dir", str(tmp_path / "maps"), *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = _summary(tmp_path / "maps")
    assert sorted(summary) == ["a", "b"] and all(row["status"] == "ok" for row in summary.values())
    assert done.stdout.count("2 of 2 studies mapped") == 1  # rank 0 alone reports, for both ranks' studies
    logs = [line for line in done.stdout.splitlines() if "Wrote" in line]
    assert len(logs) == 2 and all((tmp_path / "maps" / s / "report.json").exists() for s in ("a", "b"))
