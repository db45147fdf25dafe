"""Synthetic MR inputs: a volume with a known affine written as a realistic DICOM series, classic or Enhanced.

Used for the sample study (weighted images, ground-truth maps) and for tests. Choices, scanner-like:

- Pixel data are unsigned 16-bit integers with BitsStored 12 (signed when the volume has negative values)
  and one RescaleSlope per series (intercept 0) that maps the largest magnitude to the top of the stored
  range, so stored values compare across slices and the reader recovers the volume to within slope / 2
  (as Philips and GE do). ``slope=1`` stores the rounded values unscaled (as Siemens do for weighted
  images); classic files then still carry RescaleSlope 1 / RescaleIntercept 0.
- Geometry: the affine is RAS+ with voxel ``[i, j, k]`` = (column, row, slice), nibabel's view; it becomes
  PixelSpacing, ImageOrientationPatient and one ImagePositionPatient per slice (LPS+). Readers order
  slices along row x column cosines, so an affine with a negative determinant reads back with its slice
  axis reversed (same voxels in the world, another index order). Classic images state the slice count in
  ImagesInAcquisition, as Siemens, GE and Philips classic MR images do (the reader checks it).
- UIDs come from :class:`Study` (``pydicom.uid.generate_uid`` with entropy sources), so the same study,
  series number and slice always get the same UID, and series written with one Study share its patient,
  StudyInstanceUID and FrameOfReferenceUID. Dates and times are fixed by the Study too: same inputs, same
  bytes.
- Protocol attributes (ScanningSequence SE or SE\\IR, SequenceVariant, sequence name, echo train, contrast)
  follow TR/TE/TI as a turbo spin echo (TI > 0: inversion recovery) at 3 T.
- ``units`` (a UCUM code such as ``'ms'`` or ``'%'``) adds a Real World Value Mapping (highdicom), as
  scanners do for quantitative maps.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom import dcmwrite
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from .dicom import LPS_TO_RAS
from .select import protocol_class

FIELD_STRENGTH_T = 3.0
_LARMOR_MHZ_PER_T = 42.577478
_EQUIPMENT = {
    "Manufacturer": "pdpe-qmri",
    "ManufacturerModelName": "Synthetic 3T",
    "DeviceSerialNumber": "0001",
    "SoftwareVersions": "pdpe-qmri sample writer",
    "InstitutionName": "pdpe-qmri",
    "StationName": "PDPE-SIM",
}
_CONTRAST = {"T1w": "T1", "T2w": "T2", "FLAIR": "FLUID_ATTENUATED", "PDw": "PROTON_DENSITY", None: "UNKNOWN"}
_UNIT_MEANINGS = {"ms": "millisecond", "s": "second", "%": "percent", "1": "no units"}


@dataclass(frozen=True)
class Study:
    """Patient, study and frame-of-reference identity shared by every series written with it."""

    seed: str = "pdpe-qmri sample study"
    patient_name: str = "PHANTOM^PDPE"
    patient_id: str = "PDPE-0001"
    patient_birth_date: str = "19800101"
    patient_sex: str = "O"
    study_description: str = "PDPE-Net sample study"
    study_id: str = "1"
    accession_number: str = "PDPE0001"
    study_date: str = "20240115"
    study_time: str = "090000"

    def uid(self, *parts: object) -> str:
        """A UID determined by the seed and ``parts`` (pydicom's root, SHA-512 of the entropy sources)."""
        return generate_uid(entropy_srcs=[self.seed, *map(str, parts)])

    @property
    def study_instance_uid(self) -> str:
        return self.uid("study")

    @property
    def frame_of_reference_uid(self) -> str:
        return self.uid("frame of reference")

    def series_datetime(self, series_number: int) -> datetime:
        """Series start: study start plus five minutes per series."""
        start = datetime.strptime(self.study_date + self.study_time, "%Y%m%d%H%M%S")
        return start + timedelta(minutes=5 * series_number)


def write_classic_mr_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    study: Study,
    series_number: int,
    series_description: str,
    tr: float | None,
    te: float | None,
    ti: float = 0.0,
    units: str | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    bits_stored: int = 12,
    slope: float | None = None,
    slice_thickness: float | None = None,
) -> list[Path]:
    """Write one MR Image Storage file per slice into ``out_dir``; return their paths in slice order.

    ``volume`` is (columns, rows, slices) in the voxel order of ``affine`` (RAS, mm); ``tr``/``te``/``ti``
    in ms (``None`` for a derived map without a protocol of its own); see the module notes for scaling.
    ``slice_thickness`` (mm) is what each slice averaged over; None: the slice spacing (no gap).
    """
    stored, slope = _quantise(volume, bits_stored, slope)
    geometry = _Geometry(affine, volume.shape)
    base = _series_dataset(
        MRImageStorage, study, series_number, series_description, tr, te, ti, stored, slope, bits_stored
    )
    base.ImageType = list(image_type)
    base.update(_sequence_attributes(ti, volume.shape))
    base.RepetitionTime, base.EchoTime = _ds(tr), _ds(te)
    if ti > 0:
        base.InversionTime = _ds(ti)
    base.update(_plane(geometry))
    base.SliceThickness, base.SpacingBetweenSlices = _ds(slice_thickness or geometry.spacing), _ds(geometry.spacing)
    base.RescaleIntercept, base.RescaleSlope = "0", _ds(slope)
    base.update(_window(stored, slope))
    base.AcquisitionDate, base.AcquisitionTime = base.SeriesDate, base.SeriesTime
    base.ImagesInAcquisition = volume.shape[2]
    if units:
        base.RealWorldValueMappingSequence = [_real_world_mapping(units, series_description, stored, slope)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(volume.shape[2]):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = study.uid("instance", series_number, k)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = _ds(geometry.positions[k])
        ds.SliceLocation = _ds(geometry.positions[k] @ geometry.normal)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        paths.append(_write(out / f"MR{series_number:03d}_{k + 1:04d}.dcm", ds))
    return paths


def write_enhanced_mr_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    study: Study,
    series_number: int,
    series_description: str,
    tr: float,
    te: float,
    ti: float = 0.0,
    bits_stored: int = 12,
    slope: float | None = None,
    slice_thickness: float | None = None,
) -> Path:
    """Write one Enhanced MR Image Storage file (one frame per slice) into ``out_dir``; return its path.

    An acquired (ORIGINAL) image; arguments as for :func:`write_classic_mr_series`. Pixel measures, plane
    orientation, MR timing, MR modifier (inversion recovery and InversionTimes), pixel value transformation
    and the other mandatory MR functional groups are shared; plane position, frame content and MR echo are
    per frame (both places occur in scanner files, and readers must look in both).
    """
    stored, slope = _quantise(volume, bits_stored, slope)
    geometry = _Geometry(affine, volume.shape)
    ds = _series_dataset(
        EnhancedMRImageStorage, study, series_number, series_description, tr, te, ti, stored, slope, bits_stored
    )
    ds.SOPInstanceUID = study.uid("instance", series_number, "enhanced")
    ds.InstanceNumber = 1
    ds.NumberOfFrames = volume.shape[2]
    if tr is None or te is None:
        raise ValueError("an Enhanced MR acquisition needs TR and TE; write derived maps as classic MR")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    contrast = _CONTRAST[protocol_class(tr, te, ti)]
    description = {
        "PixelPresentation": "MONOCHROME",
        "VolumetricProperties": "VOLUME",
        "VolumeBasedCalculationTechnique": "NONE",
        "ComplexImageComponent": "MAGNITUDE",
        "AcquisitionContrast": contrast,
    }
    ds.update(description)
    started = study.series_datetime(series_number)
    ds.update(
        {
            "AcquisitionNumber": 1,
            "AcquisitionDateTime": started.strftime("%Y%m%d%H%M%S"),
            "AcquisitionDuration": 120.0,
            "ContentQualification": "PRODUCT",
            "ResonantNucleus": "1H",
            "KSpaceFiltering": "NONE",
            "ApplicableSafetyStandardAgency": "IEC",
            "BurnedInAnnotation": "NO",
            "LossyImageCompression": "00",
            "PresentationLUTShape": "IDENTITY",
            "AcquisitionContextSequence": [],
            **_pulse_sequence(ti > 0),
        }
    )
    dimension_uid = study.uid("dimensions", series_number)
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=dimension_uid)]
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = [
        _item(
            DimensionIndexPointer=tag_for_keyword(keyword),
            FunctionalGroupPointer=tag_for_keyword("FrameContentSequence"),
            DimensionOrganizationUID=dimension_uid,
            DimensionDescriptionLabel=label,
        )
        for keyword, label in (("StackID", "Stack ID"), ("InStackPositionNumber", "In-Stack Position Number"))
    ]
    plane = _plane(geometry)
    sequence = _sequence_attributes(ti, volume.shape)
    inversion = {"InversionRecovery": "YES", "InversionTimes": [float(ti)]} if ti > 0 else {"InversionRecovery": "NO"}
    shared = _item(
        FrameAnatomySequence=[
            _item(AnatomicRegionSequence=[CodedConcept("12738006", "SCT", "Brain")], FrameLaterality="U")
        ],
        PixelMeasuresSequence=[
            _item(
                PixelSpacing=plane["PixelSpacing"],
                SliceThickness=_ds(slice_thickness or geometry.spacing),
                SpacingBetweenSlices=_ds(geometry.spacing),
            )
        ],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=plane["ImageOrientationPatient"])],
        MRImageFrameTypeSequence=[_item(FrameType=ds.ImageType, **description)],
        MRTimingAndRelatedParametersSequence=[
            _item(
                RepetitionTime=float(tr),
                FlipAngle=sequence["FlipAngle"],
                EchoTrainLength=sequence["EchoTrainLength"],
                RFEchoTrainLength=sequence["EchoTrainLength"],
                GradientEchoTrainLength=0,
                SpecificAbsorptionRateSequence=[
                    _item(SpecificAbsorptionRateDefinition="IEC_HEAD", SpecificAbsorptionRateValue=0.8)
                ],
                OperatingModeSequence=[
                    _item(OperatingModeType=kind, OperatingMode="IEC_NORMAL")
                    for kind in ("STATIC FIELD", "RF", "GRADIENT")
                ],
            )
        ],
        MRFOVGeometrySequence=[
            _item(
                InPlanePhaseEncodingDirection="COLUMN",
                MRAcquisitionFrequencyEncodingSteps=volume.shape[0],
                MRAcquisitionPhaseEncodingStepsInPlane=volume.shape[1],
                PercentSampling=100.0,
                PercentPhaseFieldOfView=100.0,
            )
        ],
        MRModifierSequence=[
            _item(
                **inversion,
                FlowCompensation="NONE",
                T2Preparation="NO",
                SpectrallySelectedExcitation="NONE",
                SpatialPresaturation="NONE",
                PartialFourier="NO",
                ParallelAcquisition="NO",
            )
        ],
        MRImagingModifierSequence=[
            _item(
                MagnetizationTransfer="NONE",
                BloodSignalNulling="NO",
                Tagging="NONE",
                TransmitterFrequency=sequence["ImagingFrequency"],
                PixelBandwidth=sequence["PixelBandwidth"],
            )
        ],
        MRReceiveCoilSequence=[
            _item(
                ReceiveCoilName=sequence["ReceiveCoilName"],
                ReceiveCoilManufacturerName=_EQUIPMENT["Manufacturer"],
                ReceiveCoilType="VOLUME",
                QuadratureReceiveCoil="YES",
            )
        ],
        MRTransmitCoilSequence=[
            _item(
                TransmitCoilName=sequence["TransmitCoilName"],
                TransmitCoilManufacturerName=_EQUIPMENT["Manufacturer"],
                TransmitCoilType="BODY",
            )
        ],
        MRAveragesSequence=[_item(NumberOfAverages=sequence["NumberOfAverages"])],
        PixelValueTransformationSequence=[_item(RescaleIntercept="0", RescaleSlope=_ds(slope), RescaleType="US")],
        FrameVOILUTSequence=[_item(**_window(stored, slope))],
    )
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [
        _item(
            FrameContentSequence=[
                _item(
                    FrameAcquisitionNumber=1,
                    FrameReferenceDateTime=ds.AcquisitionDateTime,
                    FrameAcquisitionDateTime=ds.AcquisitionDateTime,
                    FrameAcquisitionDuration=ds.AcquisitionDuration,
                    StackID="1",
                    InStackPositionNumber=k + 1,
                    DimensionIndexValues=[1, k + 1],
                )
            ],
            PlanePositionSequence=[_item(ImagePositionPatient=_ds(geometry.positions[k]))],
            MREchoSequence=[_item(EffectiveEchoTime=float(te))],
        )
        for k in range(volume.shape[2])
    ]
    ds.PixelData = np.ascontiguousarray(stored.transpose(2, 1, 0)).tobytes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _write(out / f"EMR{series_number:03d}.dcm", ds)


class _Geometry:
    """DICOM plane geometry (LPS) of a RAS affine with voxel order (column, row, slice)."""

    def __init__(self, affine: np.ndarray, shape: tuple[int, ...]):
        if len(shape) != 3:
            raise ValueError(f"expected a 3D volume (columns, rows, slices), got shape {shape}")
        lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)
        self.column_spacing, self.row_spacing = np.linalg.norm(lps[:3, :2], axis=0)
        self.row_cosines = lps[:3, 0] / self.column_spacing  # direction of increasing column index
        self.column_cosines = lps[:3, 1] / self.row_spacing  # direction of increasing row index
        if abs(self.row_cosines @ self.column_cosines) > 1e-6:
            raise ValueError("the affine's in-plane axes are not orthogonal; DICOM cannot represent that")
        self.normal = np.cross(self.row_cosines, self.column_cosines)
        self.spacing = float(np.linalg.norm(lps[:3, 2]))
        self.positions = lps[:3, 3] + np.arange(shape[2])[:, None] * lps[:3, 2]


def _quantise(volume: np.ndarray, bits_stored: int, slope: float | None) -> tuple[np.ndarray, float]:
    """Scanner-like integers and the RescaleSlope (a DS-representable number) that maps them back."""
    volume = np.asarray(volume, dtype=float)
    if not np.all(np.isfinite(volume)):
        raise ValueError("the volume has NaN or infinite values, which DICOM integers cannot store")
    signed = bool(volume.min() < 0)
    top = 2 ** (bits_stored - signed) - 1
    if slope is None:
        peak = float(np.abs(volume).max())
        slope = peak / top if peak > 0 else 1.0
    slope = float(format_number_as_ds(float(slope)))
    stored = np.rint(volume / slope)
    if np.abs(stored).max() > top:
        raise ValueError(f"values up to {np.abs(volume).max():g} exceed {bits_stored} bits at slope {slope:g}")
    return stored.astype(np.int16 if signed else np.uint16), slope


def _ds(value):
    """Decimal String value(s), formatted to fit DICOM's 16 characters."""
    if value is None:
        return None
    if np.ndim(value):
        return [format_number_as_ds(float(v)) for v in value]
    return format_number_as_ds(float(value))


def _item(**attributes) -> Dataset:
    ds = Dataset()
    ds.update(attributes)
    return ds


def _series_dataset(
    sop_class: str,
    study: Study,
    series_number: int,
    description: str,
    tr: float | None,
    te: float | None,
    ti: float,
    stored: np.ndarray,
    slope: float,
    bits_stored: int,
) -> Dataset:
    """Attributes shared by every image of the series: patient, study, series, equipment, pixel format."""
    if tr is None or te is None:
        if tr is not te:
            raise ValueError("give both TR and TE, or neither (a derived map)")
    elif tr <= 0 or te < 0 or ti < 0:
        raise ValueError(f"implausible protocol: TR {tr}, TE {te}, TI {ti} ms")
    started = study.series_datetime(series_number)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.update(
        {
            "SpecificCharacterSet": "ISO_IR 100",
            "SOPClassUID": sop_class,
            "InstanceCreationDate": study.study_date,
            "InstanceCreationTime": study.study_time,
            "PatientName": study.patient_name,
            "PatientID": study.patient_id,
            "PatientBirthDate": study.patient_birth_date,
            "PatientSex": study.patient_sex,
            "StudyInstanceUID": study.study_instance_uid,
            "StudyDate": study.study_date,
            "StudyTime": study.study_time,
            "StudyID": study.study_id,
            "AccessionNumber": study.accession_number,
            "StudyDescription": study.study_description,
            "ReferringPhysicianName": "",
            "Modality": "MR",
            "SeriesInstanceUID": study.uid("series", series_number),
            "SeriesNumber": series_number,
            "SeriesDescription": description,
            "ProtocolName": description,
            "SeriesDate": started.strftime("%Y%m%d"),
            "SeriesTime": started.strftime("%H%M%S"),
            "ContentDate": started.strftime("%Y%m%d"),
            "ContentTime": started.strftime("%H%M%S"),
            "BodyPartExamined": "BRAIN",
            "PatientPosition": "HFS",
            "FrameOfReferenceUID": study.frame_of_reference_uid,
            "PositionReferenceIndicator": "",
            **_EQUIPMENT,
            "MagneticFieldStrength": FIELD_STRENGTH_T,
            "SamplesPerPixel": 1,
            "PhotometricInterpretation": "MONOCHROME2",
            "Rows": stored.shape[1],
            "Columns": stored.shape[0],
            "BitsAllocated": 16,
            "BitsStored": bits_stored,
            "HighBit": bits_stored - 1,
            "PixelRepresentation": int(stored.dtype == np.int16),
        }
    )
    return ds


def _sequence_attributes(ti: float, shape: tuple[int, ...]) -> dict:
    """Classic MR Image module attributes of a 2D turbo spin echo (inversion recovery when TI > 0) at 3 T."""
    inversion = ti > 0
    return {
        "ScanningSequence": ["SE", "IR"] if inversion else "SE",
        "SequenceVariant": ["SK", "SP", "MP"] if inversion else ["SK", "SP"],
        "ScanOptions": "IR" if inversion else "",
        "MRAcquisitionType": "2D",
        "SequenceName": "*tir2d1_16" if inversion else "*tse2d1_15",
        "AngioFlag": "N",
        "EchoTrainLength": 16 if inversion else 15,
        "EchoNumbers": 1,
        "NumberOfAverages": 1.0,
        "ImagingFrequency": round(FIELD_STRENGTH_T * _LARMOR_MHZ_PER_T, 6),
        "ImagedNucleus": "1H",
        "NumberOfPhaseEncodingSteps": shape[1],
        "PercentSampling": 100.0,
        "PercentPhaseFieldOfView": 100.0,
        "PixelBandwidth": 220.0,
        "ReceiveCoilName": "Head_32",
        "TransmitCoilName": "Body",
        "AcquisitionMatrix": [0, shape[0], shape[1], 0],
        "InPlanePhaseEncodingDirection": "COL",
        "FlipAngle": 150.0,
        "VariableFlipAngleFlag": "N",
    }


def _pulse_sequence(inversion: bool) -> dict:
    """Enhanced MR Pulse Sequence module of the same 2D turbo spin echo."""
    return {
        "PulseSequenceName": "tir2d1_16" if inversion else "tse2d1_15",
        "MRAcquisitionType": "2D",
        "EchoPulseSequence": "SPIN",
        "MultipleSpinEcho": "YES",
        "MultiPlanarExcitation": "YES",
        "PhaseContrast": "NO",
        "TimeOfFlightContrast": "NO",
        "SteadyStatePulseSequence": "NONE",
        "EchoPlanarPulseSequence": "NO",
        "SaturationRecovery": "NO",
        "SpectrallySelectedSuppression": "NONE",
        "OversamplingPhase": "NONE",
        "GeometryOfKSpaceTraversal": "RECTILINEAR",
        "RectilinearPhaseEncodeReordering": "LINEAR",
        "SegmentedKSpaceTraversal": "PARTIAL",
        "NumberOfKSpaceTrajectories": 1,
    }


def _window(stored: np.ndarray, slope: float) -> dict:
    """VOI window spanning the stored values, in rescaled units."""
    low, high = float(stored.min()) * slope, float(stored.max()) * slope
    return {"WindowCenter": _ds((low + high) / 2), "WindowWidth": _ds(max(high - low, slope))}


def _plane(geometry: _Geometry) -> dict:
    return {
        "PixelSpacing": _ds([geometry.row_spacing, geometry.column_spacing]),
        "ImageOrientationPatient": _ds(np.concatenate([geometry.row_cosines, geometry.column_cosines])),
    }


def _real_world_mapping(units: str, description: str, stored: np.ndarray, slope: float) -> Dataset:
    unit = Code(units, "UCUM", _UNIT_MEANINGS.get(units, units))
    value_range = (int(stored.min()), int(stored.max()))
    return hd.pm.RealWorldValueMapping(units, description[:64], unit, value_range, slope=slope, intercept=0.0)


def _write(path: Path, ds: Dataset) -> Path:
    dcmwrite(path, ds, enforce_file_format=True)
    return path
