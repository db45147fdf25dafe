"""The model zoo's verification of a bundle folder, offline: the steps of its ``ci/verify_bundle.py`` (full mode).

    python release/verify.py <unpacked bundle folder, e.g. /tmp/x/pdpe_qmri>

Steps, in the zoo's order: required files; large files present with the hash ``large_files.yml`` states;
version listed in the changelog; ``verify_metadata`` against the zoo schema kept in this folder (its URL cannot
be reached offline); ``verify_net_in_out``;
``ckpt_export`` and loading of the TorchScript models. Then what a user of the zoo does: ``monai.bundle.load``
from another folder must return the network with the shipped weights, and the TorchScript model must give the
eager network's output. As in the zoo, the bundle folder is put first on ``sys.path`` (its custom code).
``check_properties`` needs data, so the zoo-style unit test (``unit_tests/test_pdpe_qmri.py``) runs it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml
from monai.apps.utils import check_hash
from monai.bundle import ConfigParser, ckpt_export, load, verify_metadata, verify_net_in_out

SCHEMA = Path(__file__).resolve().parent / "meta_schema_20240725.json"
REQUIRED = ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json")


def _step(name: str) -> None:
    print(f"ok: {name}", flush=True)


def verify(bundle: Path) -> None:
    bundle = bundle.resolve()
    sys.path.insert(0, str(bundle))
    configs, meta = bundle / "configs", str(bundle / "configs" / "metadata.json")
    missing = [f for f in REQUIRED if not (bundle / f).is_file()]
    if missing:
        raise SystemExit(f"missing files: {missing}")
    _step("required files")

    for entry in yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]:
        if not check_hash(str(bundle / entry["path"]), entry["hash_val"], entry["hash_type"]):
            raise SystemExit(f"{entry['path']}: its {entry['hash_type']} differs from large_files.yml")
    _step("large files match large_files.yml")

    metadata = json.loads(Path(meta).read_text())
    if metadata["version"] not in metadata["changelog"]:
        raise SystemExit(f"version {metadata['version']} is missing from the changelog")
    _step("version and changelog")

    verify_metadata(meta_file=meta, filepath=str(SCHEMA))
    _step("verify_metadata (zoo schema 20240725)")

    inference = str(configs / "inference.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=inference, bundle_root=str(bundle))
    _step("verify_net_in_out")

    exported = bundle / "models" / "verify_model.ts"
    ckpt_export(net_id="network_def", filepath=str(exported), ckpt_file=str(bundle / "models" / "model.pt"),
                meta_file=meta, config_file=inference, bundle_root=str(bundle))  # fmt: skip
    scripted = [torch.jit.load(str(path)) for path in (exported, bundle / "models" / "model.ts")]
    exported.unlink()
    _step("ckpt_export and torch.jit.load of models/model.ts")

    shipped = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    for workflow_type in ("train", "inference"):
        network = load(bundle.name, bundle_dir=str(bundle.parent), workflow_type=workflow_type, device="cpu")
        loaded = network.state_dict()
        if set(loaded) != set(shipped) or any(not torch.equal(loaded[k], shipped[k]) for k in shipped):
            raise SystemExit(f"monai.bundle.load (workflow_type={workflow_type}) did not return the shipped weights")
    _step("monai.bundle.load returns the shipped weights")

    parser = ConfigParser()
    parser.read_config(inference)
    parser.read_meta(meta)
    parser["bundle_root"] = str(bundle)
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(shipped)
    eager.eval()
    images = torch.rand(2, 3, *parser["_meta_"]["network_data_format"]["inputs"]["image"]["spatial_shape"])
    with torch.no_grad():
        reference = eager(images)
        for model in scripted:
            torch.testing.assert_close(model(images), reference, rtol=1e-5, atol=1e-6)
    _step("TorchScript output equals the eager network's")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    verify(Path(sys.argv[1]))
