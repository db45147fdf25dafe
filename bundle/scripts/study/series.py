"""One input series as the rest of the bundle sees it, whether it came from DICOM or from BIDS NIfTI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from .errors import StudyError


@dataclass(eq=False)
class Series:
    """An image series with its geometry and sequence parameters.

    ``volume`` is loaded on first access (a study may hold thousands of images that are never used) and
    is float32, indexed ``[i, j, k]`` = (column, row, slice) so that ``affine`` (4x4, RAS+ world in mm,
    nibabel's convention) maps voxel indices to the world exactly as ``nibabel.load`` of the same
    volume written as NIfTI would. Slices are ordered by position along the slice normal
    (row cosine x column cosine), so ``affine`` has a positive determinant for DICOM input.

    ``tr``, ``te``, ``ti`` are in ms; ``ti`` is 0 for a series without inversion recovery (DICOM leaves
    InversionTime out there). A series that cannot serve as input keeps ``problem`` (why, naming the file
    and tag) instead of raising at read time, so that an unrelated broken series (a 3-plane
    localizer, a derived map without TR) does not stop the study; selecting it, or reading its
    ``volume``, raises :class:`StudyError` with that cause. When ``problem`` is None, ``tr``, ``te``,
    ``ti``, ``affine`` and ``shape`` are set.

    ``datasets`` are the header-only (no PixelData) pydicom datasets of ``files`` in slice order: one
    per classic MR image, one per Enhanced MR file; they are what a derived DICOM object (e.g. a
    highdicom Parametric Map) references. Empty for NIfTI input, where ``files`` is ``[nifti, sidecar]``,
    ``uid`` is the sidecar's SeriesInstanceUID or else the NIfTI path, and ``frame_of_reference_uid`` /
    ``study_instance_uid`` come from the sidecar when present.
    """

    uid: str
    number: int | None
    description: str
    modality: str
    files: list[Path] = field(repr=False)
    # set by the reader once the series proved usable (see ``problem``)
    tr: float | None = None
    te: float | None = None
    ti: float | None = None
    affine: np.ndarray | None = field(default=None, repr=False)
    shape: tuple[int, int, int] | None = None
    #: SliceThickness (mm): the slab each slice averages over (wider than nothing, narrower than the slice step
    #: where there are gaps); None where the source does not say.
    slice_thickness: float | None = None
    frame_of_reference_uid: str | None = None
    study_instance_uid: str | None = None
    patient_id: str | None = None
    datasets: list[Dataset] = field(default_factory=list, repr=False)
    #: For DICOM, the source of each slice k of ``volume``: (file, 0-based frame in that file).
    slice_sources: list[tuple[Path, int]] = field(default_factory=list, repr=False)
    #: Unreadable files in its folder that no header rules out as its missing edge slices (nothing states its
    #: slice count); selection weighs them against the other series' coverage.
    unreadable_nearby: list[str] = field(default_factory=list, repr=False)
    #: Class declared by the source itself (BIDS suffix), trusted over TR/TE/TI; None for DICOM.
    declared_class: str | None = None
    image_type: tuple[str, ...] = ()
    #: ContrastBolusAgent (0018,0010): non-empty means post-contrast, which selection avoids.
    contrast_agent: str = ""
    problem: str | None = None
    loader: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    _volume: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def label(self) -> str:
        """Short human name for messages: ``series 3 't1_tse_tra'``."""
        number = "" if self.number is None else f" {self.number}"
        return f"series{number} '{self.description}'"

    @property
    def protocol(self) -> str:
        """``TR 500 ms, TE 10 ms, TI 0 ms`` (missing values as ``?``)."""
        values = {"TR": self.tr, "TE": self.te, "TI": self.ti}
        return ", ".join(f"{name} {'?' if v is None else f'{v:g}'} ms" for name, v in values.items())

    @property
    def volume(self) -> np.ndarray:
        """Voxel values (float32, rescale applied); raises StudyError if unusable, all zero or not finite."""
        if self._volume is None:
            if self.problem is not None:
                raise StudyError(f"{self.label} cannot be used: {self.problem}")
            volume = self.loader()
            where = f"{self.label} ({self.files[0]}{' ...' if len(self.files) > 1 else ''})"
            bad = np.count_nonzero(~np.isfinite(volume))
            if bad:
                raise StudyError(
                    f"{where}: {bad} of {volume.size} voxels are NaN or infinite; the maps would be undefined "
                    "there. Replace them (e.g. by 0) or export the series again."
                )
            if not volume.any():
                raise StudyError(f"{where}: the image is all zero; the series holds no signal.")
            self._volume = volume
        return self._volume
