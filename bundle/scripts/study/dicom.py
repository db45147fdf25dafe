"""MR series from DICOM files: classic MR Image Storage (one file per slice) and Enhanced MR Image Storage.

Files are read once in full, to catch truncated pixel data early, and kept header-only; pixels are decoded
again only for the series a caller actually uses. Problems are sorted by what they break:

- a file that does not parse, or whose pixel data do not fit its header, makes its series unusable when
  its header still names the series; a file that names no series is listed in one warning, and is suspected
  of being a missing slice of the series in its folder: the slice count that classic MR images state
  (ImagesInAcquisition) must then be met, and where none is stated, selection compares the series'
  coverage with the other series' (``select._check_coverage``);
- a missing or non-numeric TR/TE/TI, position or orientation, or an irregular slice stack, makes the whole
  series unusable (``Series.problem``), which raises only if that series is selected;
- images of another modality are skipped with a warning (a study may carry a CT or a screenshot).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, EnhancedMRImageStorage, MediaStorageDirectoryStorage, MRImageStorage

from .errors import LOG, StudyError, tag_label
from .series import Series

#: DICOM patient coordinates are LPS+, nibabel's affines RAS+.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_MR_IMAGES = (MRImageStorage, EnhancedMRImageStorage)
#: Image orientation cosines equal to this are the same orientation (scanners round them to ~6 digits).
_ORIENTATION_TOL = 1e-3
#: Consecutive slice steps may differ by this fraction of the step plus this many mm (IPP rounding).
_SPACING_RTOL, _SPACING_ATOL = 0.01, 0.01


@dataclass
class _Frame:
    """One 2D image of a series: a classic MR file, or one frame of an Enhanced MR file."""

    path: Path
    index: int  # frame in the file's pixel data (0 for a classic file)
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient: row cosines, column cosines
    spacing: np.ndarray  # PixelSpacing: between rows, between columns (mm)
    shape: tuple[int, int]  # Rows, Columns
    timing: tuple[float, float, float]  # TR, TE, TI (ms)
    rescale: tuple[float, float]  # slope, intercept
    thickness: float | None  # SpacingBetweenSlices or SliceThickness: the step of a single-slice series
    slab: float | None  # SliceThickness: the width each slice averages over


def read_dicom_series(paths: list[Path], stubs: list[Path] = ()) -> tuple[list[Series], list[str]]:
    """Group DICOM files into MR series; also return one note per skipped file (for a 'nothing found' error).

    ``stubs`` are files too short to hold the DICOM marker: in a series' folder, they may be its truncated slices.
    """
    non_mr: list[str] = []
    other: list[str] = []  # DICOM objects that are not images (a DICOMDIR, a report)
    unattributed = [(path, f"{path}: {path.stat().st_size} bytes, too short for DICOM (truncated?)") for path in stubs]
    damaged: dict[Path, str] = {}  # unusable images whose header names their series
    groups: dict[str, dict[str, tuple[Path, Dataset]]] = defaultdict(dict)
    for path in paths:
        try:
            ds, damage = _read_header(path)
            sop_class, modality = UID(str(ds.get("SOPClassUID", ""))), str(ds.get("Modality", ""))
            if modality in ("MR", "") and sop_class in _MR_IMAGES:
                series_uid, instance = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        except Exception as err:  # noqa: BLE001 - pydicom raises many types on corrupt input; each is "unreadable"
            unattributed.append((path, f"{path}: unreadable ({err})"))
            continue
        if modality not in ("MR", ""):
            non_mr.append(f"{path}: {tag_label('Modality')} = '{modality}' ({sop_class.name or sop_class}), not MR")
            continue
        if sop_class not in _MR_IMAGES:
            LOG.debug("Skipped %s: %s is not an MR image", path, sop_class.name or sop_class)
            other.append(f"{path}: {sop_class.name or sop_class or 'no SOPClassUID'}, not an MR image")
            continue
        if damage:
            damaged[path] = f"{path}: unreadable ({damage})"
        known = groups[series_uid].get(instance)
        if known is not None and (damage or known[0] not in damaged):  # a good copy wins over a damaged one
            LOG.info("Skipped %s: duplicate of %s", path, known[0])
            continue
        groups[series_uid][instance] = (path, ds)
    if non_mr:
        LOG.warning("Skipped %d image(s) of another modality than MR, e.g. %s", len(non_mr), non_mr[0])
    if unattributed:
        LOG.warning(
            "%d file(s) could not be read as an image of any series (a damaged file may be a missing slice): %s",
            len(unattributed),
            "; ".join(note for _, note in unattributed),
        )
    series = []
    for uid, items in groups.items():
        folders = {path.parent for path, _ in items.values()}
        nearby = [note for path, note in unattributed if path.parent in folders]
        unusable = [damaged[path] for path, _ in items.values() if path in damaged]
        series.append(_build_series(uid, list(items.values()), unusable, nearby))
    return series, non_mr + [note for _, note in unattributed] + list(damaged.values()) + other


def _read_header(path: Path) -> tuple[Dataset, str | None]:
    """Read the whole file and keep the header only; also say what makes its pixel data unusable, if anything.

    A header that still names its series makes the file a problem of that series, not a skipped file.
    """
    ds = dcmread(path)
    # every DICOM object but a DICOMDIR starts with its SOP class and instance: without them, the file is cut short
    if ds.file_meta.get("MediaStorageSOPClassUID") != MediaStorageDirectoryStorage:
        for keyword in ("SOPClassUID", "SOPInstanceUID"):
            if not ds.get(keyword):
                raise ValueError(f"no {tag_label(keyword)} in the data set; cut short, or not a DICOM object")
    damage = None
    if "PixelData" not in ds and ds.get("SOPClassUID") in _MR_IMAGES:
        damage = "no pixel data"
    if "PixelData" in ds:
        syntax = ds.file_meta.get("TransferSyntaxUID")
        expected = None if syntax is None or syntax.is_compressed else get_expected_length(ds)
        # the value may carry one byte of padding to an even length
        if expected is not None and not expected <= len(ds.PixelData) <= expected + 1:
            damage = (
                f"{tag_label('PixelData')} holds {len(ds.PixelData)} bytes where {tag_label('Rows')} = "
                f"{ds.Rows}, {tag_label('Columns')} = {ds.Columns}, {tag_label('BitsAllocated')} = "
                f"{ds.BitsAllocated}, samples and frames promise {expected}"
            )
        del ds.PixelData
    return ds, damage


def _build_series(uid: str, items: list[tuple[Path, Dataset]], dropped: list[str], nearby: list[str]) -> Series:
    """``dropped``: its own files that cannot be used; ``nearby``: unattributed unreadable files in its folders."""
    items.sort(key=lambda item: str(item[0]))
    path, ds = items[0]
    number = _optional(ds, "SeriesNumber", int)
    series = Series(
        uid=uid,
        number=number,
        description=_optional(ds, "SeriesDescription", str) or "",
        modality="MR",
        files=[p for p, _ in items],
        frame_of_reference_uid=_optional(ds, "FrameOfReferenceUID", str),
        study_instance_uid=_optional(ds, "StudyInstanceUID", str),
        patient_id=_optional(ds, "PatientID", str),
        datasets=[d for _, d in items],
        image_type=tuple(_optional(ds, "ImageType", lambda v: [str(x) for x in v] if _is_multi(v) else [str(v)]) or ()),
        contrast_agent=_optional(ds, "ContrastBolusAgent", str) or "",
    )
    try:
        _check_identity(items)
        frames = [frame for p, d in items for frame in _frames(d, p)]
        series.tr, series.te, series.ti = _common_timing(frames)
        if dropped:  # a file of this series (by its header) that cannot be used: never a silent gap
            raise StudyError(f"{len(dropped)} of its files cannot be used: {'; '.join(dropped)}.")
        frames, series.affine = _geometry(frames)
        series.slice_thickness = frames[0].slab
        series.unreadable_nearby = [] if _check_count(items, len(frames)) else nearby
    except StudyError as err:
        series.problem = str(err)
        if nearby:
            series.problem += f" Unreadable file(s) in its folder, perhaps some of its slices: {'; '.join(nearby)}."
        LOG.info("%s cannot be used: %s", series.label, series.problem)
        return series
    first_slice: dict[Path, int] = {}
    for k, frame in enumerate(frames):
        first_slice.setdefault(frame.path, k)
    by_path = dict(items)
    series.files = sorted(by_path, key=first_slice.__getitem__)
    series.datasets = [by_path[p] for p in series.files]
    series.shape = (frames[0].shape[1], frames[0].shape[0], len(frames))
    series.slice_sources = [(frame.path, frame.index) for frame in frames]
    series.loader = partial(_load_volume, frames)
    return series


def _check_identity(items: list[tuple[Path, Dataset]]) -> None:
    """The files of one series belong to one patient, study and frame of reference (a merge can mix them)."""
    for keyword in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
        values = {}
        for path, ds in items:
            values.setdefault(_optional(ds, keyword, str), path)
        if len(values) > 1:
            listed = "; ".join(f"{value!r} in {path}" for value, path in values.items())
            raise StudyError(
                f"its files disagree on {tag_label(keyword)}: {listed}; files of another patient, study or "
                "session cannot be slices of this volume."
            )


def _check_count(items: list[tuple[Path, Dataset]], found: int) -> bool:
    """Whether the files state how many slices the series has; StudyError when fewer were found.

    One Enhanced MR file holds all its frames (NumberOfFrames is checked when reading it). Classic MR images
    state ImagesInAcquisition; an acquisition split into several series (e.g. the echoes of a dual-echo
    sequence) states the images of all of them, a whole multiple (of two or more slices) of each series'
    slices, which is no missing slice; more slices than stated means the tag counts something else, and it says nothing.
    """
    if len(items) == 1 and items[0][1].SOPClassUID == EnhancedMRImageStorage:
        return True
    stated = {_optional(ds, "ImagesInAcquisition", int) for _, ds in items} - {None}
    if not stated:
        return False
    expected = max(stated)
    if expected < found:
        LOG.info("%d images found where ImagesInAcquisition = %d: not a count of this series' slices", found, expected)
        return False
    if found > 1 and expected % found == 0:
        return True
    path = next(p for p, ds in items if _optional(ds, "ImagesInAcquisition", int) == expected)
    raise StudyError(
        f"{expected - found} slice(s) missing: {found} images found where {tag_label('ImagesInAcquisition')} = "
        f"{expected} ({path}); the maps would lack them (at an edge, no gap would show); "
        "export the series again."
    )


def _is_multi(value) -> bool:
    return isinstance(value, (list, tuple, MultiValue))


def _optional(ds: Dataset, keyword: str, convert):
    """A descriptive attribute, or None when absent or undecodable (never worth failing a series for)."""
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else convert(value)
    except Exception:  # noqa: BLE001 - corrupt descriptive values only lose the description
        return None


def _value(ds: Dataset, keyword: str, where: str):
    """Value of ``keyword``, None when absent or empty; StudyError naming file and tag when undecodable."""
    try:
        value = ds[keyword].value if keyword in ds else None
    except Exception as err:  # noqa: BLE001 - pydicom's conversion errors vary with the corruption
        raise StudyError(f"{where}: {tag_label(keyword)} cannot be decoded ({err}).") from None
    return None if value is None or (hasattr(value, "__len__") and len(value) == 0) else value


def _numbers(ds: Dataset, keyword: str, where: str, count: int = 1, required: bool = True) -> np.ndarray | None:
    """The first ``count`` numbers of a numeric attribute; StudyError if missing (when required) or not numeric."""
    value = _value(ds, keyword, where)
    if value is None:
        if required:
            raise StudyError(f"{where}: {tag_label(keyword)} is missing or empty.")
        return None
    values = list(value) if _is_multi(value) else [value]
    try:
        numbers = np.array([float(v) for v in values[:count]], dtype=float)
    except (TypeError, ValueError):
        raise StudyError(f"{where}: {tag_label(keyword)} = {value!r} is not a number.") from None
    if len(numbers) < count or not np.all(np.isfinite(numbers)):
        raise StudyError(f"{where}: {tag_label(keyword)} = {value!r} is not {count} finite number(s).")
    return numbers


def _number(ds: Dataset, keyword: str, where: str, required: bool = True, default: float | None = None) -> float | None:
    """A single number; a multi-valued attribute is accepted only when all its values agree."""
    value = _value(ds, keyword, where)
    if _is_multi(value) and len(value) > 1:
        values = _numbers(ds, keyword, where, count=len(value))
        if np.ptp(values) > 1e-6 * max(1.0, float(np.abs(values).max())):
            raise StudyError(f"{where}: {tag_label(keyword)} = {value!r} holds different values; which one applies?")
    numbers = _numbers(ds, keyword, where, required=required)
    return default if numbers is None else float(numbers[0])


def _frames(ds: Dataset, path: Path) -> list[_Frame]:
    rows, columns = (int(_number(ds, k, str(path))) for k in ("Rows", "Columns"))
    if ds.SOPClassUID == EnhancedMRImageStorage:
        return _enhanced_frames(ds, path, (rows, columns))
    where = str(path)
    inversion = "IR" in str(_optional(ds, "ScanningSequence", str) or "")
    ti = _number(ds, "InversionTime", where, required=inversion, default=0.0)
    timing = (_number(ds, "RepetitionTime", where), _number(ds, "EchoTime", where), ti)
    slab = _number(ds, "SliceThickness", where, False)
    thickness = _number(ds, "SpacingBetweenSlices", where, False) or slab
    frame = _Frame(
        path=path,
        index=0,
        position=_numbers(ds, "ImagePositionPatient", where, 3),
        orientation=_numbers(ds, "ImageOrientationPatient", where, 6),
        spacing=_numbers(ds, "PixelSpacing", where, 2),
        shape=(rows, columns),
        timing=timing,
        rescale=(
            _number(ds, "RescaleSlope", where, False, default=1.0),
            _number(ds, "RescaleIntercept", where, False, default=0.0),
        ),
        thickness=thickness,
        slab=slab,
    )
    return [frame]


def _enhanced_frames(ds: Dataset, path: Path, shape: tuple[int, int]) -> list[_Frame]:
    """Frames of an Enhanced MR file: each attribute from the frame's functional group, else the shared one."""
    count = int(_number(ds, "NumberOfFrames", str(path)))
    shared = _value(ds, "SharedFunctionalGroupsSequence", str(path)) or [Dataset()]
    per_frame = _value(ds, "PerFrameFunctionalGroupsSequence", str(path)) or []
    if len(per_frame) != count:
        raise StudyError(
            f"{path}: {tag_label('PerFrameFunctionalGroupsSequence')} has {len(per_frame)} items for "
            f"{tag_label('NumberOfFrames')} = {count}."
        )

    frames = []
    for index, own in enumerate(per_frame):

        def macro(keyword: str, index=index, own=own) -> tuple[Dataset, str]:
            """The functional group item ``keyword`` of this frame and where it was found, for messages."""
            for groups, name in ((own, f"PerFrameFunctionalGroupsSequence item {index + 1}"), (shared[0], "Shared")):
                items = _value(groups, keyword, str(path))
                if items:
                    return items[0], f"{path} ({name} > {tag_label(keyword)})"
            return Dataset(), f"{path} (frame {index + 1}, no {tag_label(keyword)})"

        timing_item, timing_where = macro("MRTimingAndRelatedParametersSequence")
        echo_item, echo_where = macro("MREchoSequence")
        modifier, modifier_where = macro("MRModifierSequence")
        inversion = str(_value(modifier, "InversionRecovery", modifier_where) or "").upper() == "YES"
        ti = _number(modifier, "InversionTimes", modifier_where, required=inversion) if inversion else 0.0
        position, position_where = macro("PlanePositionSequence")
        orientation, orientation_where = macro("PlaneOrientationSequence")
        measures, measures_where = macro("PixelMeasuresSequence")
        transform, transform_where = macro("PixelValueTransformationSequence")
        slab = _number(measures, "SliceThickness", measures_where, False)
        thickness = _number(measures, "SpacingBetweenSlices", measures_where, False) or slab
        frames.append(
            _Frame(
                path=path,
                index=index,
                position=_numbers(position, "ImagePositionPatient", position_where, 3),
                orientation=_numbers(orientation, "ImageOrientationPatient", orientation_where, 6),
                spacing=_numbers(measures, "PixelSpacing", measures_where, 2),
                shape=shape,
                timing=(
                    _number(timing_item, "RepetitionTime", timing_where),
                    _number(echo_item, "EffectiveEchoTime", echo_where),
                    ti,
                ),
                rescale=(
                    _number(transform, "RescaleSlope", transform_where, False, default=1.0),
                    _number(transform, "RescaleIntercept", transform_where, False, default=0.0),
                ),
                thickness=thickness,
                slab=slab,
            )
        )
    return frames


def _common_timing(frames: list[_Frame]) -> tuple[float, float, float]:
    """TR, TE, TI shared by all frames: a series mixing echoes or inversions is not one weighted image."""
    timing = np.array([frame.timing for frame in frames])
    for column, name in enumerate(("TR", "TE", "TI")):
        values = timing[:, column]
        differs = np.abs(values - values[0]) > 1e-3 * max(1.0, np.abs(values).max())
        if differs.any():
            k = int(np.argmax(differs))
            raise StudyError(
                f"{name} varies within the series ({values[0]:g} ms in {frames[0].path}, {values[k]:g} ms in "
                f"{frames[k].path}): several echoes or inversion times in one series are not a single weighted image."
            )
    tr, te, ti = (float(v) for v in timing[0])
    if tr <= 0 or te < 0 or ti < 0:
        raise StudyError(f"{frames[0].path}: implausible TR {tr:g} ms, TE {te:g} ms, TI {ti:g} ms.")
    return tr, te, ti


def _geometry(frames: list[_Frame]) -> tuple[list[_Frame], np.ndarray]:
    """Check that the frames form one regular stack; return them in slice order and the RAS affine."""
    first = frames[0]
    for frame in frames[1:]:
        if not np.allclose(frame.orientation, first.orientation, atol=_ORIENTATION_TOL):
            raise StudyError(
                f"inconsistent slice orientation: {tag_label('ImageOrientationPatient')} is "
                f"{_fmt(frame.orientation)} in {frame.path} but {_fmt(first.orientation)} in {first.path}."
            )
        if not np.allclose(frame.spacing, first.spacing, rtol=1e-3) or frame.shape != first.shape:
            raise StudyError(
                f"inconsistent pixel grid: {frame.path} has {frame.shape[0]}x{frame.shape[1]} pixels of "
                f"{_fmt(frame.spacing)} mm ({tag_label('PixelSpacing')}), {first.path} "
                f"{first.shape[0]}x{first.shape[1]} of {_fmt(first.spacing)} mm."
            )
    row, column = first.orientation[:3], first.orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(column) - 1) > 0.01 or abs(row @ column) > 0.01:
        raise StudyError(
            f"{first.path}: {tag_label('ImageOrientationPatient')} = {_fmt(first.orientation)} is not two "
            "orthogonal unit vectors."
        )
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    normal = np.cross(row, column)
    frames = sorted(frames, key=lambda f: f.position @ normal)
    positions = np.array([f.position for f in frames])
    if len(frames) == 1:
        step = normal * (first.thickness or 1.0)
    else:
        steps = np.diff(positions, axis=0)
        distances = steps @ normal
        if np.any(distances < 1e-3):
            k = int(np.argmax(distances < 1e-3))
            raise StudyError(
                f"{frames[k].path} and {frames[k + 1].path} share one slice position "
                f"({tag_label('ImagePositionPatient')} = {_fmt(frames[k].position)}): the series holds several "
                "images per slice (echoes, phases or repeats), not one volume."
            )
        # the mean step; it need not be along the normal (a sheared stack is regular too, the affine keeps it)
        step = (positions[-1] - positions[0]) / (len(frames) - 1)
        deviation = np.linalg.norm(steps - step, axis=1)
        if np.any(deviation > _SPACING_RTOL * np.linalg.norm(step) + _SPACING_ATOL):
            k = int(np.argmax(deviation))
            median = float(np.median(distances))
            kind = (
                f"are {distances[k]:.4g} mm apart along the slice normal where the other slices are {median:.4g} mm"
                if abs(distances[k] - median) > _SPACING_RTOL * median + _SPACING_ATOL
                else f"are shifted in-plane by {np.linalg.norm(steps[k] - distances[k] * normal):.4g} mm"
            )
            raise StudyError(
                f"inconsistent slice spacing: {frames[k].path} and {frames[k + 1].path} "
                f"({tag_label('ImagePositionPatient')} {_fmt(positions[k])} and {_fmt(positions[k + 1])}) {kind}; "
                "a slice is missing or the series is not one regular stack."
            )
    spacing_row, spacing_column = first.spacing
    lps = np.eye(4)
    lps[:3, :3] = np.column_stack([row * spacing_column, column * spacing_row, step])
    lps[:3, 3] = positions[0]
    return frames, LPS_TO_RAS @ lps


def _fmt(values: np.ndarray) -> str:
    return "\\".join(f"{v:.6g}" for v in values)


def _load_volume(frames: list[_Frame]) -> np.ndarray:
    """Decode the frames' pixels into a (column, row, slice) float32 volume with the rescale applied."""
    rows, columns = frames[0].shape
    volume = np.empty((columns, rows, len(frames)), np.float32)
    path, pixels = None, None
    for k, frame in enumerate(frames):
        if frame.path != path:
            path = frame.path
            try:
                pixels = dcmread(path).pixel_array.reshape(-1, rows, columns)
            except Exception as err:  # noqa: BLE001 - decoders raise many types on corrupt or unsupported data
                raise StudyError(f"{path}: pixel data cannot be decoded ({err}).") from None
        slope, intercept = frame.rescale
        volume[:, :, k] = pixels[frame.index].T * slope + intercept
    return volume
