"""The model-zoo release: the zip, unpacked alone outside the repository, passes the zoo's checks and maps alike."""

import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO
from monai.bundle import ConfigParser

sys.path.insert(0, str(REPO / "release"))
from build import build  # noqa: E402
from scripts.sample_study import write_sample_study  # noqa: E402


def _run(command, cwd, **env):
    """A subprocess with only the installed packages importable: no PYTHONPATH, the repository not on the path."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env
    done = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _maps(folder):
    return {m: nib.load(folder / f"{m}_map.nii.gz").get_fdata() for m in ("T1", "T2", "PD")}


@pytest.mark.slow
def test_release_zip_passes_the_zoo_checks_and_maps_like_the_repository(tmp_path):
    archive = build(tmp_path / "dist")
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "zoo")
    bundle = tmp_path / "zoo" / "pdpe_qmri"
    required = ["configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts", "LICENSE",
                "custom_nets/pdpenet.py", "scripts/inference.py", "docs/README.md", "large_files.yml"]  # fmt: skip
    assert {f"pdpe_qmri/{name}" for name in required} <= names
    assert not any("__pycache__" in n or n.split("/")[1] in ("data", "runs", "eval") for n in names)

    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = "import importlib.util as u; print(u.find_spec('scripts'), u.find_spec('custom_nets'))"
    probe = _run([sys.executable, "-c", probe], work)
    assert probe.stdout.split() == ["None", "None"]  # the project's own packages are not importable
    steps = _run([sys.executable, str(REPO / "release" / "verify.py"), str(bundle)], work).stdout
    assert "ok: TorchScript output equals the eager network's" in steps, steps  # the last step
    _run([sys.executable, "-m", "unittest", "test_pdpe_qmri"], REPO / "release" / "unit_tests", BUNDLE_ROOT=str(bundle))

    study = write_sample_study(tmp_path / "sample", seed=0, voxel_size=(2.0, 2.0, 6.0))["dicom"]

    def infer(config_file, out, cwd):
        command = ["run", "inference", "--config_file", config_file, "--study_dir", str(study), "--output_dir", out]
        _run([sys.executable, "-m", "monai.bundle", *command], cwd)

    infer(str(REPO / "bundle" / "configs" / "inference.json"), str(tmp_path / "repo"), REPO)
    infer(str(bundle / "configs" / "inference.json"), str(tmp_path / "zip"), work)
    infer(f"['{bundle}/configs/inference.json','{bundle}/configs/inference_ts.json']", str(tmp_path / "ts"), work)
    repo, unzipped, ts = _maps(tmp_path / "repo"), _maps(tmp_path / "zip"), _maps(tmp_path / "ts")
    for name in repo:
        np.testing.assert_array_equal(unzipped[name], repo[name])
        np.testing.assert_allclose(ts[name], repo[name], rtol=1e-4, atol=1e-3)  # TorchScript: same maps to float noise


def test_configs_are_formatted_as_the_zoo_hook_wants():
    """pretty-format-json --no-sort-keys --indent=4, and a final newline (end-of-file-fixer)."""
    for path in sorted((REPO / "bundle" / "configs").glob("*.json")):
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=4) + "\n", f"{path.name} is not formatted"


def test_metadata_describes_the_shipped_model():
    metadata = json.loads((REPO / "bundle" / "configs" / "metadata.json").read_text())
    parser = ConfigParser(ConfigParser.load_config_files([REPO / "bundle" / "configs" / "train.json"]))
    image = metadata["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == parser["spatial_size"]
    assert metadata["network_data_format"]["outputs"]["pred"]["spatial_shape"] == parser["spatial_size"]
    shipped = torch.load(REPO / "bundle" / "models" / "model.pt", weights_only=True)
    network = parser.get_parsed_content("network_def")
    assert {k: v.shape for k, v in network.state_dict().items()} == {k: v.shape for k, v in shipped.items()}
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    required = {re.split(r"[<>=!~ ]", d)[0] for d in dependencies} - {"torch", "monai", "numpy"}
    assert set(metadata["required_packages_version"]) == required  # every runtime dependency, pinned
    assert metadata["version"] in metadata["changelog"]
