"""Quantitative maps as DICOM Parametric Maps (highdicom) that belong to the study of their source series.

Choices:

- Float32 pixel data (Float Pixel Data, the Parametric Map IOD's own encoding) with an identity Real World
  Value Mapping: the stored values are the map values, exactly as in the NIfTI output, with no integer
  range to choose or clip to (an implausible prediction of 20 000 ms stays visible as such). The price is
  that a few older viewers display integer maps only.
- Units and meaning are in the Real World Value Mapping: T1 and T2 in ms (UCUM ``ms``, quantity DCM T1 /
  T2), PD in percent (UCUM ``%``, quantity DCM Proton Density; free water = 100 %).
- The map references the source series (per frame, source slice by source slice) and shares its
  patient, study and Frame of Reference; its own UIDs are derived from the source SeriesInstanceUID and
  the quantity, so running inference twice on one study gives the same UIDs.
- The display window is fixed per quantity to the range a physicist reads brain maps in, independent of
  outliers in one map.
"""

from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from .series import Series

#: quantity -> (unit, quantity concept, explanation, display range)
_QUANTITIES = {
    "T1": (codes.UCUM.Millisecond, codes.DCM.T1, "T1 relaxation time", (0.0, 3000.0)),
    "T2": (codes.UCUM.Millisecond, codes.DCM.T2, "T2 relaxation time", (0.0, 200.0)),
    "PD": (codes.UCUM.Percent, codes.DCM.ProtonDensity, "proton density, free water = 100", (0.0, 100.0)),
}
_MANUFACTURER = "pdpe-qmri"
_MODEL_NAME = "PDPE-Net"
_DEVICE_SERIAL_NUMBER = "0001"


def write_parametric_map(
    values: np.ndarray,
    source: Series,
    out_path: str | os.PathLike,
    *,
    quantity: str,
    series_number: int,
    series_description: str,
    software_version: str,
    recognizable_visual_features: bool = False,
) -> Path:
    """Write ``values`` (indexed like ``source.volume``) as one Parametric Map file at ``out_path``.

    ``quantity`` is ``"T1"``, ``"T2"`` (ms) or ``"PD"`` (p.u. = %). ``recognizable_visual_features``
    should be True when the map has values outside the brain (a face could be rendered from it).
    Raises ValueError for a source without DICOM datasets (BIDS/NIfTI input), an unknown quantity, a
    shape that differs from the source's, or non-finite values.
    """
    if quantity not in _QUANTITIES:
        raise ValueError(f"quantity must be one of {sorted(_QUANTITIES)}, got {quantity!r}")
    if not source.datasets:
        raise ValueError(
            f"{source.label} has no DICOM headers (NIfTI/BIDS input): a DICOM Parametric Map needs a DICOM source "
            "series to reference."
        )
    values = np.asarray(values, dtype=np.float32)
    if values.shape != source.shape:
        raise ValueError(f"{quantity} map has shape {values.shape} but {source.label} has {source.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{quantity} map has NaN or infinite values; a Parametric Map's value range must be finite")
    unit, concept, explanation, (low, high) = _QUANTITIES[quantity]
    frames, source_images = _frames_in_source_order(values, source)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=f"{quantity} ({unit.value})",
        lut_explanation=f"{explanation} ({unit.meaning})",
        unit=unit,
        value_range=(float(values.min()), float(values.max())),
        slope=1.0,
        intercept=0.0,
        quantity_definition=concept,
    )

    def uid(*parts: str) -> str:
        return generate_uid(entropy_srcs=[source.uid, quantity, *parts])

    pm = hd.pm.ParametricMap(
        source_images=source_images,
        pixel_array=frames,
        series_instance_uid=uid("series"),
        series_number=series_number,
        sop_instance_uid=uid("instance"),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        manufacturer_model_name=_MODEL_NAME,
        software_versions=software_version,
        device_serial_number=_DEVICE_SERIAL_NUMBER,
        contains_recognizable_visual_features=recognizable_visual_features,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=(low + high) / 2,
                window_width=high - low,
                window_explanation=f"{quantity} {low:g}-{high:g} {unit.value}",
            )
        ],
        content_label=f"{quantity}_MAP",
        content_description=series_description[:64],
        series_description=series_description,
    )
    # Frame Anatomy (a brain model's maps): without it the General Series module would need Laterality
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [CodedConcept("12738006", "SCT", "Brain")]
    anatomy.FrameLaterality = "U"
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    # highdicom draws a random dimension organisation UID; derive it too, so that reruns differ only in dates
    organisation = uid("dimension organisation")
    for item in (*pm.DimensionOrganizationSequence, *pm.DimensionIndexSequence):
        item.DimensionOrganizationUID = organisation
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pm.save_as(out, enforce_file_format=True)
    return out


def _frames_in_source_order(values: np.ndarray, source: Series) -> tuple[np.ndarray, list]:
    """Frames (n, rows, columns) ordered like the source images' frames, and those images.

    highdicom takes each frame's position from the source frame of the same index: a classic series has one
    dataset per slice in slice order; an Enhanced MR file keeps its own frame order (``slice_sources``).
    """
    slices = np.ascontiguousarray(values.transpose(2, 1, 0))  # (k, j, i) = (slice, row, column)
    if len(source.datasets) == values.shape[2]:
        return slices, source.datasets
    files = {path for path, _ in source.slice_sources}
    if len(source.datasets) != 1 or len(files) != 1:
        raise ValueError(
            f"{source.label}: {len(source.datasets)} files for {values.shape[2]} slices; expected one file per "
            "slice (classic MR) or one multi-frame file (Enhanced MR)"
        )
    frames = np.empty_like(slices)
    frames[[frame for _, frame in source.slice_sources]] = slices
    return frames, source.datasets
