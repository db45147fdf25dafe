"""DICOM Parametric Maps of T1/T2/PD on classic and Enhanced MR sources: values, geometry, references, units."""

import json
import shutil
import subprocess

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import ParametricMapStorage
from scipy.spatial.transform import Rotation
from scripts.phantom import TISSUE_RANGES
from scripts.physics import MAPS
from scripts.study import Study, read_study, write_classic_mr_series, write_enhanced_mr_series, write_parametric_map

SHAPE = (16, 12, 5)  # columns, rows, slices
#: quantity -> (UCUM unit, DCM quantity code)
EXPECTED = {"T1": ("ms", "113063"), "T2": ("ms", "113065"), "PD": ("%", "113058")}


def source_affine():
    """Oblique, anisotropic, and with the slice axis against the slice normal: the reader reverses the slices,
    so an Enhanced MR file's frame order is the opposite of the volume's slice order."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", (10.0, -20.0, 30.0), degrees=True).as_matrix() @ np.diag([0.9, 1.1, -3])
    affine[:3, 3] = (-10.0, 20.0, -5.0)
    return affine


@pytest.fixture(scope="module", params=["classic", "enhanced"])
def source(request, tmp_path_factory):
    """The T1w source series, read back by the study reader."""
    root = tmp_path_factory.mktemp(request.param)
    writer = write_classic_mr_series if request.param == "classic" else write_enhanced_mr_series
    image = np.random.default_rng(0).uniform(100, 1000, SHAPE)
    writer(image, source_affine(), root, study=Study(), series_number=2, series_description="t1_tse_tra", tr=500, te=10)
    (series,) = read_study(root)
    assert len(series.datasets) == (SHAPE[2] if request.param == "classic" else 1)
    return series


def map_values(quantity, shape=SHAPE):
    """Values spanning the quantity's tissue range, plus a zero and an outlier no integer window would keep."""
    low, high = np.array([r[MAPS.index(quantity)] for r in TISSUE_RANGES.values()]).T
    values = np.random.default_rng(MAPS.index(quantity)).uniform(low.min(), high.max(), shape).astype(np.float32)
    values[0, 0, 0], values[-1, -1, -1] = 0.0, 20 * high.max()
    return values


def write(source, path, quantity="T1"):
    values = map_values(quantity)
    path = write_parametric_map(
        values, source, path, quantity=quantity, series_number=100 + MAPS.index(quantity),
        series_description=f"PDPE-Net {quantity} map", software_version="test 1.0",
    )  # fmt: skip
    return values, path


@pytest.mark.parametrize("quantity", MAPS)
def test_values_and_geometry_read_back_with_highdicom(source, tmp_path, quantity):
    values, path = write(source, tmp_path / "pm.dcm", quantity)
    volume = hd.imread(path).get_volume()  # highdicom sorts the frames itself
    read = nib.as_closest_canonical(volume.to_nibabel())
    expected = nib.as_closest_canonical(nib.Nifti1Image(values, source.affine))
    np.testing.assert_allclose(read.affine, expected.affine, atol=1e-4)
    np.testing.assert_array_equal(read.get_fdata(dtype=np.float32), expected.get_fdata(dtype=np.float32))


@pytest.mark.parametrize("quantity", MAPS)
def test_references_units_and_frames_read_back_with_pydicom(source, tmp_path, quantity):
    values, path = write(source, tmp_path / "pm.dcm", quantity)
    ds = pydicom.dcmread(path)
    t1w = source.datasets[0]
    assert ds.SOPClassUID == ParametricMapStorage and "FloatPixelData" in ds
    assert ds.StudyInstanceUID == t1w.StudyInstanceUID and ds.PatientID == t1w.PatientID
    assert ds.FrameOfReferenceUID == t1w.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != source.uid and ds.SeriesNumber == 100 + MAPS.index(quantity)
    assert [s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence] == [source.uid]
    assert ds.ContentLabel == f"{quantity}_MAP"

    shared = ds.SharedFunctionalGroupsSequence[0]
    (mapping,) = shared.RealWorldValueMappingSequence
    unit, concept = EXPECTED[quantity]
    (units,) = mapping.MeasurementUnitsCodeSequence
    assert (units.CodeValue, units.CodingSchemeDesignator) == (unit, "UCUM")
    assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == concept
    assert (mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept) == (1.0, 0.0)

    # The window shows grey and white matter between its edges; the outlier is stored, not clipped.
    window = shared.FrameVOILUTSequence[0]
    low, high = window.WindowCenter - window.WindowWidth / 2, window.WindowCenter + window.WindowWidth / 2
    tissue = np.array([TISSUE_RANGES[label][MAPS.index(quantity)] for label in (2, 3)])
    assert low <= tissue.min() and tissue.max() <= high
    pixels = ds.pixel_array
    assert pixels.max() == values.max() > high

    # Each frame holds the slice of the source frame it references (an Enhanced source's frames run backwards).
    slice_of = {(path.name, frame + 1): k for k, (path, frame) in enumerate(source.slice_sources)}
    name_of = {d.SOPInstanceUID: p.name for d, p in zip(source.datasets, source.files, strict=True)}
    seen = []
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        (reference,) = frame.DerivationImageSequence[0].SourceImageSequence
        k = slice_of[(name_of[reference.ReferencedSOPInstanceUID], int(reference.get("ReferencedFrameNumber", 1)))]
        np.testing.assert_array_equal(pixels[f], values[:, :, k].T)
        seen.append(k)
    assert sorted(seen) == list(range(SHAPE[2]))


def test_uids_are_derived_from_the_source_and_quantity(source, tmp_path):
    uids = {}
    for name, quantity in (("a", "T1"), ("b", "T1"), ("c", "T2")):
        ds = pydicom.dcmread(write(source, tmp_path / f"{name}.dcm", quantity)[1])
        uids[name] = (
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID,
            ds.DimensionOrganizationSequence[0].DimensionOrganizationUID,
        )
    assert uids["a"] == uids["b"]
    assert not set(uids["a"]) & set(uids["c"])


def test_refuses_a_nifti_source_a_wrong_shape_and_an_unknown_quantity(source, tmp_path):
    image = nib.Nifti1Image(np.ones(SHAPE, dtype=np.float32), source_affine())
    nib.save(image, tmp_path / "sub-01_T1w.nii.gz")
    (tmp_path / "sub-01_T1w.json").write_text(json.dumps({"RepetitionTime": 0.5, "EchoTime": 0.01}))
    (bids,) = read_study(tmp_path)
    with pytest.raises(ValueError, match="no DICOM headers"):
        write_parametric_map(
            map_values("T1"), bids, tmp_path / "pm.dcm", quantity="T1", series_number=100,
            series_description="T1 map", software_version="1",
        )  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        write_parametric_map(
            map_values("T1", (16, 12, 4)), source, tmp_path / "pm.dcm", quantity="T1", series_number=100,
            series_description="T1 map", software_version="1",
        )  # fmt: skip
    with pytest.raises(ValueError, match="quantity"):
        write_parametric_map(
            map_values("T1"), source, tmp_path / "pm.dcm", quantity="R1", series_number=100,
            series_description="R1 map", software_version="1",
        )  # fmt: skip
    assert not (tmp_path / "pm.dcm").exists()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy is not installed")
@pytest.mark.parametrize("quantity", MAPS)
def test_dciodvfy_finds_no_errors(source, tmp_path, quantity):
    _, path = write(source, tmp_path / "pm.dcm", quantity)
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    assert "ParametricMap" in report.stderr + report.stdout
    assert "Error" not in report.stderr + report.stdout
