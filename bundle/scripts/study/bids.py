"""MR series from NIfTI files with BIDS JSON sidecars (e.g. dcm2niix output or a BIDS ``anat/`` folder).

A NIfTI file is a series when a sidecar of the same name (``.json``) sits next to it; other NIfTI files
(masks, derivatives) are ignored. Times in the sidecar are in seconds (BIDS) and become ms here; the BIDS
suffix ``_T1w``, ``_T2w`` or ``_FLAIR`` declares the class.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import LOG, StudyError
from .series import Series

_SUFFIX = re.compile(r"_(T1w|T2w|FLAIR)$")
#: A time above this many seconds is not a clinical T1w/T2w/FLAIR (TR <= 20 s, TE <= 1 s, TI <= 10 s): it was
#: almost surely written in ms, against the BIDS convention.
_MAX_SECONDS = {"RepetitionTime": 20.0, "EchoTime": 1.0, "InversionTime": 10.0}


def nifti_stem(path: Path) -> str:
    """``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``."""
    return re.sub(r"\.nii(\.gz)?$", "", path.name)


def read_bids_series(paths: list[Path]) -> list[Series]:
    """One Series per NIfTI file in ``paths`` that has a JSON sidecar."""
    series = []
    for path in paths:
        sidecar = path.with_name(nifti_stem(path) + ".json")
        if sidecar.is_file():
            series.append(_read(path, sidecar))
        else:
            LOG.info("Ignored %s: no JSON sidecar %s", path, sidecar.name)
    return series


def _read(path: Path, sidecar: Path) -> Series:
    stem = nifti_stem(path)
    suffix = _SUFFIX.search(stem)
    series = Series(
        uid=str(path),
        number=None,
        description=stem,
        modality="MR",
        files=[path, sidecar],
        declared_class=suffix and suffix.group(1),
    )
    try:
        meta = json.loads(sidecar.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        series.problem = f"{sidecar}: unreadable JSON sidecar ({err})."
        return series
    series.uid = str(meta.get("SeriesInstanceUID") or path)
    series.number = meta.get("SeriesNumber") if isinstance(meta.get("SeriesNumber"), int) else None
    series.description = str(meta.get("SeriesDescription") or stem)
    series.frame_of_reference_uid = meta.get("FrameOfReferenceUID")
    series.study_instance_uid = meta.get("StudyInstanceUID")
    series.image_type = tuple(meta.get("ImageType") or ())
    series.contrast_agent = str(meta.get("ContrastBolusAgent") or "")
    try:
        inversion = "IR" in str(meta.get("ScanningSequence", ""))
        series.tr = _milliseconds(meta, "RepetitionTime", sidecar)
        series.te = _milliseconds(meta, "EchoTime", sidecar)
        series.ti = _milliseconds(meta, "InversionTime", sidecar, required=inversion) or 0.0
        image = nib.load(path)
        if len(image.shape) != 3 and not (len(image.shape) == 4 and image.shape[3] == 1):
            raise StudyError(f"{path}: a {len(image.shape)}D image of shape {image.shape}; expected one 3D volume.")
    except StudyError as err:
        series.problem = str(err)
        return series
    except Exception as err:  # noqa: BLE001 - nibabel raises many types on corrupt files
        series.problem = f"{path}: unreadable NIfTI ({err})."
        return series
    series.affine = image.affine
    series.shape = tuple(int(n) for n in image.shape[:3])
    thickness = meta.get("SliceThickness")  # mm, as dcm2niix writes it
    if isinstance(thickness, (int, float)) and not isinstance(thickness, bool) and thickness > 0:
        series.slice_thickness = float(thickness)
    series.loader = partial(_load, image, path)
    return series


def _milliseconds(meta: dict, key: str, sidecar: Path, required: bool = True) -> float | None:
    value = meta.get(key)
    if value is None:
        if required:
            raise StudyError(f"{sidecar}: '{key}' (seconds) is missing.")
        return None
    if isinstance(value, list) and len(value) == 1:  # some converters write single values as lists
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < np.inf:
        raise StudyError(f"{sidecar}: '{key}' = {value!r} is not a non-negative number (seconds).")
    if value > _MAX_SECONDS[key]:
        raise StudyError(
            f"{sidecar}: '{key}' = {value} s is physically implausible for this sequence (above "
            f"{_MAX_SECONDS[key]:g} s); BIDS sidecars give times in seconds, so it was probably written in ms "
            f"({value} ms = {value / 1000:g} s): correct the sidecar."
        )
    return float(value) * 1000.0


def _load(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    try:
        return np.asarray(image.get_fdata(dtype=np.float32)).reshape(image.shape[:3])
    except Exception as err:  # noqa: BLE001 - truncated or corrupt image data
        raise StudyError(f"{path}: image data cannot be read ({err}).") from None
