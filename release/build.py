"""Build the model-zoo release of the bundle: ``dist/pdpe_qmri-<version>.zip`` and its ``large_files.yml``.

The zip holds the zoo layout, rooted at ``pdpe_qmri/``: ``configs/ docs/ models/ scripts/ custom_nets/ LICENSE``
and ``large_files.yml``. ``models/model.ts`` is exported here from ``models/model.pt`` with MONAI's own
``ckpt_export``, so the TorchScript model always matches the shipped weights. The zoo keeps files over 1 MB
out of its git repository: ``large_files.yml`` names each model file with a download URL and its SHA-256, and
the zoo's CI fetches them from there (a file already present with the right hash is not fetched again).
The URL is a placeholder (``--url-base``): upload the two model files of the zip there when releasing.

    python release/build.py [--out dist] [--url-base https://.../v<version>]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
NAME = "pdpe_qmri"
#: What the released bundle carries; everything else under bundle/ (data, runs, eval, local checkpoints) stays.
CONTENT = ("configs", "docs", "scripts", "custom_nets", "LICENSE", "models/model.pt")
MODEL_FILES = ("models/model.pt", "models/model.ts")
URL_BASE = "https://github.com/pdpe-qmri/pdpe-qmri/releases/download/v{version}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "model.ts"))
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def export_torchscript(bundle: Path) -> None:
    """``models/model.ts`` from ``models/model.pt`` with ``monai.bundle ckpt_export``, run from the bundle root."""
    command = [sys.executable, "-m", "monai.bundle", "ckpt_export", "--net_id", "network_def",
               "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
               "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]  # fmt: skip
    subprocess.run(command, cwd=bundle, check=True, capture_output=True, text=True)


def large_files_yml(bundle: Path, url_base: str) -> str:
    lines = ["large_files:"]
    for name in MODEL_FILES:
        lines += [f'- path: "{name}"', f'  url: "{url_base}/{Path(name).name}"',
                  f'  hash_val: "{sha256(bundle / name)}"', '  hash_type: "sha256"']  # fmt: skip
    return "\n".join(lines) + "\n"


def build(out: Path, url_base: str | None = None) -> Path:
    """Write ``<out>/pdpe_qmri-<version>.zip``; returns its path."""
    version = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"{NAME}-{version}.zip"
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / NAME
        for item in CONTENT:
            _copy(BUNDLE / item, staged / item)
        export_torchscript(staged)
        (staged / "large_files.yml").write_text(large_files_yml(staged, url_base or URL_BASE.format(version=version)))
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(staged.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(staged.parent))
    return archive


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="folder for the zip (default: dist/)")
    parser.add_argument("--url-base", help="where the model files will be downloadable (default: a placeholder)")
    args = parser.parse_args(argv)
    archive = build(args.out, args.url_base)
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    print(f"{archive} ({archive.stat().st_size / 1e6:.1f} MB, {len(names)} files)")
    for name in names:
        print(f"  {name}")


if __name__ == "__main__":
    main()
