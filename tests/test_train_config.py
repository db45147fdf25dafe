"""The bundle's training configs run for real on a tiny generated cohort."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO, TINY_TRAINING
from monai.bundle import ConfigParser, ConfigWorkflow
from scripts import physics

TRAIN = str(CONFIGS / "train.json")
META = str(CONFIGS / "metadata.json")


def _workflow(config_file, cohort, tmp_path, **overrides):
    return ConfigWorkflow(
        config_file=config_file,
        meta_file=META,
        workflow_type="train",
        dataset_dir=str(cohort),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "runs"),
        **{**TINY_TRAINING, **overrides},
    )


def _run(workflow):
    workflow.initialize()
    assert workflow.check_properties() in (None, [])  # the properties MONAI requires of a train workflow
    workflow.run()
    workflow.finalize()


def test_preprocessing_pipeline_runs_from_json(tiny_cohort):
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"dataset_dir": str(tiny_cohort), **TINY_TRAINING})
    datalist = parser.get_parsed_content("train#datalist")
    samples = parser.get_parsed_content("train#preprocessing")(datalist[0])
    assert len(samples) == TINY_TRAINING["slices_per_volume"]
    for s in samples:
        assert s["image"].shape == (3, 64, 64) and s["image"].dtype == torch.float32
        assert s["label"].shape == (4, 64, 64)  # T1, T2, PD targets + brain mask
        assert s["mask"].shape == (1, 64, 64) and s["mask"].sum() > 0
        assert torch.equal(s["label"][3:], s["mask"])
        # every slice holds brain: normalised images are ~1 at most in the mask, targets on fixed scales
        inside = s["mask"][0] > 0
        assert 0 < s["image"][:, inside].max() <= 1.5
        t1_ms = s["label"][0][inside] * physics.MAP_SCALE[0]
        assert 500 < t1_ms.median() < 5000
        protocol = s["params"].numpy() * np.array(physics.PARAMETER_SCALE)
        assert physics.protocol_violations(protocol) == []


def test_validation_pipeline_uses_fixed_protocol_on_whole_volumes(tiny_cohort):
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"dataset_dir": str(tiny_cohort), **TINY_TRAINING})
    entry = parser.get_parsed_content("validate#datalist")[0]
    first = parser.get_parsed_content("validate#preprocessing")(entry)
    second = parser.get_parsed_content("validate#preprocessing")(entry)
    assert first["image"].shape == (3, 56, 64, 24)
    assert torch.equal(first["image"], second["image"])  # same protocol every epoch
    np.testing.assert_allclose(first["params"].numpy() * physics.PARAMETER_SCALE, entry["params"], rtol=1e-6)


def test_train_one_epoch_then_resume(tiny_cohort, tmp_path):
    workflow = _workflow(TRAIN, tiny_cohort, tmp_path, epochs=1)
    _run(workflow)
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_epoch=1.pt", "model.pt"]
    best = torch.load(models / "model.pt", weights_only=True)  # the network's plain state dict (zoo layout)
    assert set(best) == set(workflow.parser.get_parsed_content("network").state_dict())

    # a best score that no later epoch can beat (score = -MPE sum <= 0): the resumed run must keep model.pt
    state = torch.load(models / "checkpoint_epoch=1.pt", weights_only=False)
    state["checkpointer"]["_saved"] = [(0.0, "model.pt")]
    torch.save(state, models / "checkpoint_epoch=1.pt")
    resumed = _workflow(TRAIN, tiny_cohort, tmp_path, epochs=2)
    _run(resumed)
    kept = torch.load(models / "model.pt", weights_only=True)
    for name, value in best.items():
        torch.testing.assert_close(kept[name], value)
    assert resumed.parser.get_parsed_content("train#trainer").state.epoch == 2
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_epoch=2.pt", "model.pt"]
    with open(tmp_path / "runs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # epoch 1 was not trained again
    assert float(rows[1]["seconds"]) > float(rows[0]["seconds"])  # the clock goes on across the resume
    assert all(np.isfinite(float(r["val_mpe_sum"])) and float(r["val_mpe_sum"]) > 0 for r in rows)
    # every validated network is kept for model selection on clinical-like studies (scripts/select_model.py)
    snapshots = tmp_path / "runs" / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == ["model_epoch=1.pt", "model_epoch=2.pt"]
    assert set(torch.load(snapshots / "model_epoch=2.pt", weights_only=True)) == set(best)


def test_own_maps_without_fractions_train_as_they_are(tiny_cohort, tmp_path):
    """A user's datalist has maps and masks but no tissue fractions: the documented override loads the maps."""
    datalist = json.loads((tiny_cohort / "datalist.json").read_text())
    for entry in datalist["training"]:
        del entry["fractions"]
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    workflow = _workflow(TRAIN, tiny_cohort, tmp_path, epochs=1, datalist=str(tmp_path / "datalist.json"))
    workflow.parser["train#preprocessing#transforms#0"] = "@preprocessing#load"
    _run(workflow)
    assert (tmp_path / "models" / "model.pt").exists()


def test_fine_tuning_starts_from_given_weights(tiny_cohort, tmp_path):
    first = _workflow(TRAIN, tiny_cohort, tmp_path / "first", epochs=2)
    _run(first)
    # the evaluator's best (what its log reports) is the lowest MPE sum, the epoch model.pt was saved at
    with open(tmp_path / "first" / "runs" / "metrics.csv") as f:
        scores = {int(r["epoch"]): float(r["val_mpe_sum"]) for r in csv.DictReader(f)}
    evaluator = first.parser.get_parsed_content("validate#evaluator").state
    assert len(set(scores.values())) == 2
    assert (evaluator.best_metric_epoch, evaluator.best_metric) == min(scores.items(), key=lambda item: item[1])
    start = tmp_path / "first" / "models" / "model.pt"
    tuned = _workflow(TRAIN, tiny_cohort, tmp_path / "tuned", epochs=1, learning_rate=0.0, init_weights=str(start))
    _run(tuned)  # a zero learning rate keeps the weights it started from
    weights = torch.load(start, weights_only=True)
    for name, value in tuned.parser.get_parsed_content("network").state_dict().items():
        torch.testing.assert_close(value, weights[name])


@pytest.mark.parametrize("baseline", ["train_unet.json", "train_pgan.json"])
def test_baselines_train_one_epoch(baseline, tiny_cohort, tmp_path):
    workflow = _workflow([TRAIN, str(CONFIGS / baseline)], tiny_cohort, tmp_path, epochs=1)
    _run(workflow)
    network = workflow.parser.get_parsed_content("network")
    assert network.embed_parameters == (baseline != "train_unet.json")
    assert (tmp_path / "models" / "model.pt").exists()


@pytest.mark.slow
def test_multi_gpu_config_runs_two_gloo_processes(tiny_cohort, tmp_path):
    overrides = [f"--{k}={json.dumps(v)}" for k, v in TINY_TRAINING.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "training",
           "--config_file", json.dumps([TRAIN, str(CONFIGS / "multi_gpu_train.json")]),
           "--meta_file", META, "--dataset_dir", str(tiny_cohort), "--ckpt_dir", str(tmp_path / "models"),
           "--output_dir", str(tmp_path / "runs"), "--epochs", "1", "--volumes_per_batch", "1", *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["checkpoint_epoch=1.pt", "model.pt"]
    with open(tmp_path / "runs" / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 1  # rank 0 alone writes
