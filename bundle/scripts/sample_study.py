"""Sample DICOM study with ground truth: the held-out phantom head as a scanner would export it.

A new user runs inference on ``<out>/dicom`` and compares the maps with ``<out>/truth``. Choices:

- Subject: the cohort's held-out head subject "sub-head00" (same seed derivation, skull and scalp), drawn
  directly at the study's voxel size, 1 x 1 x 5 mm (a clinical 2D TSE): the cohort's 3 mm subject would
  need resampling. Same anatomy and tissue values as the cohort's; the random fields (texture,
  deformation) are drawn on the coarser grid, so voxel values differ in detail.
- T1w grid (the truth grid): axial, square 256 x 256 mm field of view (the phantom's 224 mm are
  zero-padded left and right), voxels stored as DICOM displays them (columns to the patient's left, rows
  to posterior: ImageOrientationPatient 1\\0\\0\\0\\1\\0), a slab of contiguous slices covering the brain
  (33 slices for seed 0). T2w has the same grid; FLAIR has a rectangular field of view (224 x 256, the
  phase field of view cut to 87.5 % left-right, as is common), so the pipeline has to resample it.
- Protocol (ms), a clinical 3 T protocol inside ``physics.PROTOCOL_RANGES``: T1w TSE TR 550 / TE 10, T2w
  TSE TR 5000 / TE 100, FLAIR (TIRM) TR 9000 / TE 120 / TI 2500 (nulls T1 ~4200 ms, i.e. CSF).
- Images: ``physics.signal`` of the true maps, times one smooth receive-coil bias field shared by the
  three series (MONAI's Legendre field, degree 3, coefficients within +-0.05: about +-10 % over the head),
  plus Rician noise at an SNR of 40 in the brain (the training convention: mean brain signal over the
  noise sigma), then stored as Siemens stores weighted images: integers (12 bits) at RescaleSlope 1,
  after a fixed receiver gain of ``RECEIVER_GAIN`` counts per p.u.
- Storage: T1w and T2w as classic MR Image Storage, FLAIR as one Enhanced MR multi-frame file, in
  nested folders without extensions (``dicom/<study>/<series>/IM_0001``); one Study, one Frame of Reference.
- Truth on the T1w grid: T1, T2 (ms), PD (p.u.), mask and labels as NIfTI, and ``protocol.json``.
- Deterministic: a seed gives the same DICOM and NIfTI bytes (fixed UIDs, dates and noise).

Run from ``bundle/``: ``python -m scripts.sample_study --out ../sample``, or from the repository root:
``python bundle/scripts/sample_study.py --out sample``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import the bundle's ``scripts`` package instead of this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import NamedTuple  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.transforms import Compose, RandBiasFieldd  # noqa: E402
from scripts import physics  # noqa: E402
from scripts.phantom import FOV_MM, make_subject, subject_rng, write_subject  # noqa: E402
from scripts.study import Study, write_classic_mr_series, write_enhanced_mr_series  # noqa: E402
from scripts.transforms import RandRicianNoiseSNRd  # noqa: E402

DEFAULT_VOXEL_SIZE = (1.0, 1.0, 5.0)
SNR = 40.0
#: Stored integer per p.u. of signal: brightest head voxels (T2w CSF, ~70 p.u.) stay well inside 12 bits.
RECEIVER_GAIN = 20.0
_BIAS_COEFFICIENTS = (-0.05, 0.05)


class Acquisition(NamedTuple):
    number: int
    description: str
    tr: float
    te: float
    ti: float


#: The sample study's series, in ``physics.SERIES`` order; TR/TE/TI in ms.
ACQUISITIONS = {
    "T1w": Acquisition(2, "t1_tse_tra", 550.0, 10.0, 0.0),
    "T2w": Acquisition(3, "t2_tse_tra", 5000.0, 100.0, 0.0),
    "FLAIR": Acquisition(4, "t2_tirm_tra_dark-fluid", 9000.0, 120.0, 2500.0),
}


def write_sample_study(
    out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False, voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE
) -> dict[str, Path]:
    """Write the sample study into ``out_dir``; return ``{"dicom": folder, "truth": folder}``.

    Refuses a non-empty ``out_dir`` unless ``overwrite``, which replaces only its ``dicom`` and ``truth``
    folders. ``voxel_size`` (mm) other than the default makes a smaller study, e.g. for tests.
    """
    out = Path(out_dir)
    paths = {"dicom": out / "dicom", "truth": out / "truth"}
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace its sample study")
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)

    subject = _scanner_grid(make_subject(subject_rng(seed, "head", 0), voxel_size=voxel_size, head=True))
    images = _weighted_images(subject, seed)
    flair_columns = _flair_columns(subject["mask"].shape[0], voxel_size)

    study = Study(seed=f"pdpe-qmri sample study, seed {seed}", patient_id=f"PDPE-{seed:04d}")
    study_dir = paths["dicom"] / f"{study.patient_name.replace('^', '_')}_{study.study_date}"
    for name, acquisition in ACQUISITIONS.items():
        series_dir = study_dir / f"{acquisition.description.upper()}_{acquisition.number:04d}"
        volume, affine = images[name], subject["affine"]
        options = {
            "study": study,
            "series_number": acquisition.number,
            "series_description": acquisition.description,
            "tr": acquisition.tr,
            "te": acquisition.te,
            "ti": acquisition.ti,
            "slope": 1.0,
        }
        if name == "FLAIR":
            affine = affine @ nib.affines.from_matvec(np.eye(3), [flair_columns.start, 0, 0])
            written = [write_enhanced_mr_series(volume[flair_columns], affine, series_dir, **options)]
        else:
            written = write_classic_mr_series(volume, affine, series_dir, **options)
        for k, path in enumerate(written, start=1):
            path.rename(series_dir / f"IM_{k:04d}")

    write_subject(subject, paths["truth"])
    protocol = {
        "description": "TR, TE, TI in ms of the sample study's series; 'params' rows in physics.SERIES order",
        "seed": seed,
        "snr": SNR,
        "series": {name: acquisition._asdict() for name, acquisition in ACQUISITIONS.items()},
        "params": [[a.tr, a.te, a.ti] for a in ACQUISITIONS.values()],
    }
    (paths["truth"] / "protocol.json").write_text(json.dumps(protocol, indent=2) + "\n")
    return paths


def _scanner_grid(subject: dict) -> dict:
    """The subject on the T1w grid: voxels in DICOM display order, square field of view, slab over the brain."""
    to_dicom = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(subject["affine"]), nib.orientations.axcodes2ornt("LPS")
    )
    images = {
        key: nib.Nifti1Image(subject[key], subject["affine"]).as_reoriented(to_dicom)
        for key in (*physics.MAPS, "mask", "labels")
    }
    brain_slices = np.flatnonzero(np.asarray(images["mask"].dataobj).any(axis=(0, 1)))
    slab = slice(brain_slices[0], brain_slices[-1] + 1)
    columns, rows = images["mask"].shape[:2]
    spacing = nib.affines.voxel_sizes(subject["affine"])
    pad = round(rows * spacing[1] / spacing[0]) - columns
    before = pad // 2
    grid = {
        key: np.pad(np.asarray(image.dataobj)[:, :, slab], ((before, pad - before), (0, 0), (0, 0)))
        for key, image in images.items()
    }
    grid["affine"] = images["mask"].slicer[:, :, slab].affine @ nib.affines.from_matvec(np.eye(3), [-before, 0, 0])
    return grid


def _flair_columns(columns: int, voxel_size: Sequence[float]) -> slice:
    """Columns of the T1w grid inside the FLAIR's rectangular field of view (the phantom's 224 mm)."""
    kept = round(FOV_MM[0] / voxel_size[0])
    start = (columns - kept) // 2
    return slice(start, start + kept)


def _weighted_images(subject: dict, seed: int) -> dict[str, np.ndarray]:
    """T1w, T2w and FLAIR (stored counts) of the study's protocol, with bias field and Rician noise."""
    t1, t2, pd = (subject[name] for name in physics.MAPS)
    data = {
        name: torch.from_numpy(physics.signal(pd, t1, t2, a.tr, a.te, a.ti))[None] for name, a in ACQUISITIONS.items()
    }
    data["mask"] = torch.from_numpy(subject["mask"])[None]
    degrade = Compose(
        [
            RandBiasFieldd(physics.SERIES, degree=3, coeff_range=_BIAS_COEFFICIENTS, prob=1.0),
            RandRicianNoiseSNRd(physics.SERIES, mask_key="mask", snr_range=(SNR, SNR)),
        ]
    ).set_random_state(seed)
    return {name: RECEIVER_GAIN * np.asarray(image[0]) for name, image in degrade(data).items() if name != "mask"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for dicom/ and truth/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace the sample study in a non-empty --out")
    args = parser.parse_args(argv)
    try:
        paths = write_sample_study(args.out, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as err:
        parser.error(str(err))
    print(f"DICOM study: {paths['dicom']}\nground truth: {paths['truth']}")


if __name__ == "__main__":
    main()
