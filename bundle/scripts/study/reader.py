"""Entry points: read every series of a study folder, and read + select + load the three inputs."""

from __future__ import annotations

import os
from pathlib import Path

from pydicom.misc import is_dicom

from .bids import read_bids_series
from .dicom import read_dicom_series
from .errors import LOG, StudyError
from .select import select_series
from .series import Series

_NIFTI = (".nii", ".nii.gz")
_DICOM_MARKER_END = 132


def read_study(path: str | os.PathLike) -> list[Series]:
    """All MR series under ``path`` (a folder, walked recursively, or one file), ordered by SeriesNumber.

    DICOM files are recognised by content (the ``DICM`` marker), whatever their names; other files are
    skipped silently, except empty or binary ones too short for the marker (a cut-off slice?), which are
    reported with the unreadable DICOM files. NIfTI files with a JSON sidecar are read as BIDS series.
    Raises StudyError when the folder is missing or empty or holds no MR image series; problems of single
    series are kept in ``Series.problem`` (see :class:`Series`).
    """
    root = Path(path)
    if not root.exists():
        raise StudyError(f"{root}: no such folder.")
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    if not files:
        raise StudyError(
            f"{root}: the folder is empty; expected the DICOM files of an MR study (any names, nested folders) "
            "or NIfTI files with BIDS JSON sidecars."
        )
    niftis = [p for p in files if p.name.endswith(_NIFTI)]
    others = [p for p in files if not p.name.endswith(_NIFTI)]
    marked = {p: _is_dicom(p) for p in others}
    dicoms = [p for p in others if marked[p]]
    stubs = [p for p in others if not marked[p] and _is_stub(p)]
    series, skipped = read_dicom_series(dicoms, stubs)
    series += read_bids_series(niftis)
    if not series:
        if not dicoms:
            raise StudyError(
                f"{root}: no DICOM files (nor NIfTI files with JSON sidecars) among its {len(files)} file(s), "
                f"e.g. {files[0]}."
            )
        raise StudyError(
            f"{root}: none of its {len(dicoms)} DICOM file(s) is a readable MR image: "
            f"{'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}."
        )
    series.sort(key=lambda s: (s.number is None, s.number or 0, s.uid))
    LOG.info("Read %d series from %s (%d DICOM files skipped)", len(series), root, len(skipped))
    return series


def _is_stub(path: Path) -> bool:
    """Empty, or binary and shorter than the DICOM marker (byte 132): perhaps a slice cut off in copying.

    Short text files (a BIDS sidecar, a README) are not: they never were DICOM.
    """
    try:
        data = path.read_bytes()[:_DICOM_MARKER_END]
    except OSError:
        return False
    return len(data) < _DICOM_MARKER_END and (not data or b"\0" in data)


def _is_dicom(path: Path) -> bool:
    try:
        return is_dicom(path)
    except OSError as err:
        LOG.warning("Skipped %s: %s", path, err)
        return False


def load_study(
    path: str | os.PathLike, overrides: dict[str, str | int | None] | None = None, allow_mixed: bool = False
) -> tuple[dict[str, Series], list[str], list[Series]]:
    """Read the study, select the T1w/T2w/FLAIR series and load their volumes.

    Returns ``(chosen, reasons, all_series)``: the class -> Series choice, one reason per class, and every
    series read (for the report). Every bad input surfaces here as StudyError, before any output is written.
    """
    series = read_study(path)
    chosen, reasons = select_series(series, overrides, allow_mixed)
    for one in chosen.values():
        one.volume  # noqa: B018 - decode now, so pixel, all-zero and NaN errors come before any work
    return chosen, reasons, series
