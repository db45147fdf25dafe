"""Study reader, selection and DICOM writer: round trips, classification, BIDS input and every bad input."""

import json
import logging
import shutil

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.spatial.transform import Rotation
from scripts.study import (
    Study,
    StudyError,
    classify,
    description_hint,
    identity_mismatches,
    load_study,
    protocol_class,
    read_study,
    select_series,
    write_classic_mr_series,
    write_enhanced_mr_series,
)
from scripts.study.dicom import LPS_TO_RAS

SHAPE = (16, 12, 5)  # columns, rows, slices
PROTOCOLS = {"T1w": (500.0, 10.0, 0.0), "T2w": (5000.0, 100.0, 0.0), "FLAIR": (9000.0, 120.0, 2500.0)}


def oblique_affine(spacing=(0.9, 1.1, 3.0), angles=(10.0, -20.0, 30.0), origin=(-10.0, 20.0, -5.0)):
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def image(seed=0, shape=SHAPE):
    """A smooth positive image with texture: any transposition or slice swap changes it."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return 100 + 40 * i + 7 * j + 300 * k + np.random.default_rng(seed).uniform(0, 30, shape)


def quantum(volume):
    """Largest error of the writer's default 12-bit scaling: half a RescaleSlope (plus float32 rounding)."""
    return volume.max() / 4095 / 2 + 1e-3


def write_study(root, study=None, affine=None, classic_flair=False):
    """T1w, T2w (classic MR) and FLAIR (Enhanced MR) of one study; returns {class: path(s)}."""
    study, affine = study or Study(), oblique_affine() if affine is None else affine
    paths = {}
    for number, (name, (tr, te, ti)) in enumerate(PROTOCOLS.items(), start=2):
        writer = write_enhanced_mr_series if name == "FLAIR" and not classic_flair else write_classic_mr_series
        description = {"T1w": "t1_tse_tra", "T2w": "t2_tse_tra", "FLAIR": "t2_tirm_tra_dark-fluid"}[name]
        paths[name] = writer(
            image(number), affine, root / name, study=study, series_number=number, series_description=description,
            tr=tr, te=te, ti=ti,
        )  # fmt: skip
    return paths


def edit(path, **changes):
    """Rewrite a DICOM file with attributes set (or deleted, for None)."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def corrupt_value(path, keyword, garbage: bytes):
    """Overwrite an element's value bytes in place (same length), as a damaged file would carry them."""
    data = bytearray(path.read_bytes())
    tag = pydicom.datadict.tag_for_keyword(keyword)
    start = data.find((tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little"))
    length = int.from_bytes(data[start + 6 : start + 8], "little")
    data[start + 8 : start + 8 + length] = garbage.ljust(length)[:length]
    path.write_bytes(bytes(data))


def raises(path, *fragments, overrides=None):
    """load_study fails with a StudyError whose message holds every fragment; return the message."""
    with pytest.raises(StudyError) as caught:
        load_study(path, overrides)
    message = str(caught.value)
    for fragment in fragments:
        assert str(fragment) in message
    return message


# --- round trips -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [oblique_affine(), np.diag([0.8, 0.8, 4.0, 1.0])], ids=["oblique", "axial"])
def test_classic_round_trip_matches_written_affine_and_nibabel(tmp_path, affine):
    volume = image()
    write_classic_mr_series(volume, affine, tmp_path / "dcm", study=Study(), series_number=7,
                            series_description="t1", tr=500, te=10, slice_thickness=3.0)  # fmt: skip
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), tmp_path / "same.nii.gz")
    nifti = nib.load(tmp_path / "same.nii.gz")

    (series,) = read_study(tmp_path / "dcm")
    assert (series.tr, series.te, series.ti) == (500.0, 10.0, 0.0)
    assert series.number == 7 and series.shape == SHAPE and series.problem is None
    assert series.slice_thickness == 3.0  # SliceThickness, not the slice spacing (SpacingBetweenSlices)
    np.testing.assert_allclose(series.affine, affine, atol=1e-6)
    np.testing.assert_allclose(series.affine, nifti.affine, atol=1e-5)
    slope = float(series.datasets[0].RescaleSlope)
    assert 0 < slope < volume.max() / 4000  # 12-bit scaling of the peak
    assert np.abs(series.volume - nifti.get_fdata()).max() <= slope / 2 + 1e-3
    # header-only source datasets in slice order, for a derived object to reference later
    positions = [ds.ImagePositionPatient for ds in series.datasets]
    np.testing.assert_allclose(positions, [(LPS_TO_RAS @ affine @ [0, 0, k, 1])[:3] for k in range(5)], atol=1e-6)
    assert all("PixelData" not in ds for ds in series.datasets)


def test_classic_oblique_agrees_with_itk_gdcm(tmp_path):
    itk = pytest.importorskip("itk")
    write_classic_mr_series(
        image(), oblique_affine(), tmp_path, study=Study(), series_number=2, series_description="t1", tr=500, te=10
    )
    (series,) = read_study(tmp_path)
    reference = itk.imread(itk.GDCMSeriesFileNames.New(Directory=str(tmp_path)).GetInputFileNames(), itk.F)
    lps = np.eye(4)
    lps[:3, :3] = itk.array_from_matrix(reference.GetDirection()) * np.array(reference.GetSpacing())
    lps[:3, 3] = reference.GetOrigin()
    np.testing.assert_allclose(series.affine, LPS_TO_RAS @ lps, atol=1e-6)
    np.testing.assert_array_equal(series.volume, itk.array_from_image(reference).transpose(2, 1, 0))


def test_negative_determinant_reads_back_slice_reversed_in_the_same_world(tmp_path):
    affine = np.diag([-0.9, 1.1, 3.0, 1.0])  # LAS: slices written against the row x column normal
    volume = image()
    write_classic_mr_series(
        volume, affine, tmp_path, study=Study(), series_number=1, series_description="t1", tr=500, te=10
    )
    (series,) = read_study(tmp_path)
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, SHAPE[2] - 1
    np.testing.assert_allclose(series.affine, affine @ flip, atol=1e-6)
    assert np.linalg.det(series.affine) > 0
    np.testing.assert_allclose(series.volume[:, :, ::-1], volume, atol=quantum(volume))


def test_enhanced_flair_reads_back_ti_and_agrees_with_highdicom(tmp_path):
    affine, volume = oblique_affine(), image()
    path = write_enhanced_mr_series(
        volume, affine, tmp_path, study=Study(), series_number=4, series_description="flair", tr=9000, te=120, ti=2500
    )
    (series,) = read_study(tmp_path)
    assert (series.tr, series.te, series.ti) == (9000.0, 120.0, 2500.0)
    assert series.files == [path] and series.datasets[0].NumberOfFrames == SHAPE[2]
    assert series.slice_sources == [(path, k) for k in range(SHAPE[2])]
    np.testing.assert_allclose(series.affine, affine, atol=1e-6)
    assert np.abs(series.volume - volume).max() <= quantum(volume)
    # highdicom's own reading of the functional groups puts the same values at the same world points
    reference = hd.imread(path).get_volume()
    index = np.argwhere(np.ones(SHAPE, bool))
    world = LPS_TO_RAS @ series.affine @ np.c_[index, np.ones(len(index))].T
    other = np.rint(np.linalg.inv(reference.affine) @ world)[:3].astype(int)
    np.testing.assert_allclose(reference.array[tuple(other)], series.volume[tuple(index.T)], rtol=1e-6)


def test_writer_is_deterministic_and_studies_share_identity(tmp_path):
    a = write_study(tmp_path / "a")
    b = write_study(tmp_path / "b")
    assert a["T1w"][2].read_bytes() == b["T1w"][2].read_bytes()
    assert a["FLAIR"].read_bytes() == b["FLAIR"].read_bytes()
    series = read_study(tmp_path / "a")
    assert len({s.study_instance_uid for s in series}) == 1 and len({s.frame_of_reference_uid for s in series}) == 1
    assert len({s.uid for s in series}) == 3
    other = write_classic_mr_series(
        image(), np.eye(4), tmp_path / "c", study=Study(seed="other"), series_number=2, series_description="t1",
        tr=500, te=10,
    )  # fmt: skip
    assert pydicom.dcmread(other[0]).StudyInstanceUID != series[0].study_instance_uid


def test_classic_map_with_units_keeps_values_and_is_not_an_input(tmp_path):
    t1 = image() * 3  # ms
    (path, *_) = write_classic_mr_series(
        t1, np.eye(4), tmp_path, study=Study(), series_number=9, series_description="T1 map", tr=None, te=None,
        units="ms", image_type=("DERIVED", "PRIMARY", "T1 MAP"), bits_stored=16, slope=1.0,
    )  # fmt: skip
    mapping = pydicom.dcmread(path).RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "ms"
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, np.rint(t1[:, :, 0]).T)  # unscaled integers
    (series,) = read_study(tmp_path)
    assert "RepetitionTime (0018,0080) is missing" in series.problem


# --- classification and selection -----------------------------------------------------------------------------


def test_classification_and_selection_among_decoys(tmp_path, caplog):
    study, affine = Study(), oblique_affine()
    paths = write_study(tmp_path, study, affine)

    def decoy(number, description, tr, te, ti=0.0, slices=SHAPE[2]):
        return write_classic_mr_series(
            image(number, SHAPE[:2] + (slices,)), affine, tmp_path / f"decoy{number}", study=study,
            series_number=number, series_description=description, tr=tr, te=te, ti=ti,
        )  # fmt: skip

    decoy(1, "localizer", 8.6, 4.0, slices=3)
    decoy(5, "pd_tse_tra", 3000, 12)
    for path in decoy(6, "t1_tse_tra_post", 500, 10):  # would win on series number, but is post-contrast
        edit(path, ContrastBolusAgent="Gadobutrol")
    decoy(8, "t2_tse_tra_fast", 4500, 90, slices=3)  # fewer slices
    decoy(9, "stir_tra", 4000, 60, ti=150)
    decoy(10, "sequence_x", 3000, 40)  # protocol in between, no hint
    decoy(11, "t2_tse_cor", 3000, 40, slices=4)  # protocol in between, description decides
    series = read_study(tmp_path)
    classes = {s.number: classify(s) for s in series}
    assert classes == {
        1: None, 2: "T1w", 3: "T2w", 4: "FLAIR", 5: None, 6: "T1w", 8: "T2w", 9: None, 10: None, 11: "T2w"
    }  # fmt: skip

    with caplog.at_level(logging.INFO, logger="scripts.study"):
        chosen, reasons = select_series(series)
    assert {name: s.number for name, s in chosen.items()} == {"T1w": 2, "T2w": 3, "FLAIR": 4}
    assert "pre-contrast" in reasons[0] and "'t1_tse_tra_post'" in reasons[0]
    assert "chosen over series 11 't2_tse_cor', series 8 't2_tse_tra_fast' because it has more slices" in reasons[1]
    assert reasons[2].endswith("is the only candidate")
    assert reasons[0] in caplog.text
    assert chosen["T1w"].files == sorted(paths["T1w"])


@pytest.mark.parametrize(
    "description, expected",
    [
        ("t2_tirm_tra_dark-fluid", "FLAIR"),
        ("AX T2 FLAIR", "FLAIR"),
        ("t2_tse_tra", "T2w"),
        ("t2star_gre", None),
        ("T2* GRE", None),
        ("t1_mprage_sag", "T1w"),
        ("sub-01_T1w", "T1w"),
        ("DWI b1000", None),
    ],
)
def test_description_hint(description, expected):
    assert description_hint(description) == expected


@pytest.mark.parametrize(
    "tr, te, ti, expected",
    [
        (500, 10, 0, "T1w"),
        (1500, 30, 0, "T1w"),
        (3000, 15, 0, "PDw"),
        (5000, 100, 0, "T2w"),
        (3000, 40, 0, None),
        (9000, 120, 2500, "FLAIR"),
        (2300, 3, 900, "T1w"),  # MPRAGE
        (4000, 60, 150, None),  # STIR
    ],
)
def test_protocol_class(tr, te, ti, expected):
    assert protocol_class(tr, te, ti) == expected


def test_selection_criteria_in_order(tmp_path):
    study = Study()
    candidates = {  # number: description, slices, image type; all with a T2w protocol
        3: ("t2_tse", 5, "ORIGINAL"),
        4: ("t2_tse", 3, "ORIGINAL"),
        5: ("t2_tse", 5, "ORIGINAL"),
        6: ("sequence", 5, "ORIGINAL"),
        7: ("t2_tse", 5, "DERIVED"),
        1: ("t1_se", 5, "ORIGINAL"),  # 1 and 2 stand in for T1w and FLAIR
        2: ("t1_se_b", 5, "ORIGINAL"),
    }
    for number, (description, slices, kind) in candidates.items():
        write_classic_mr_series(
            image(number, (8, 8, slices)), np.eye(4), tmp_path, study=study, series_number=number,
            series_description=description, tr=500 if number < 3 else 5000, te=10 if number < 3 else 100,
            image_type=(kind, "PRIMARY", "M", "ND"),
        )  # fmt: skip
    series = read_study(tmp_path)
    assert [classify(s) for s in series] == ["T1w"] * 2 + ["T2w"] * 5
    cases = {
        (3, 4, 5, 6, 7): (5, "higher SeriesNumber"),
        (3, 4, 6, 7): (3, "more slices"),
        (3, 7): (3, "ORIGINAL"),
        (6, 7): (7, "description agrees"),
    }
    for numbers, (expected, why) in cases.items():
        pool = [s for s in series if s.number in (1, 2, *numbers)]
        chosen, reasons = select_series(pool, {"T1w": 1, "FLAIR": 2})
        assert chosen["T2w"].number == expected and why in reasons[1], reasons[1]


def test_overrides_by_number_and_uid(tmp_path, caplog):
    study, affine = Study(), oblique_affine()
    write_study(tmp_path, study, affine)
    write_classic_mr_series(
        image(6), affine, tmp_path / "t1b", study=study, series_number=6, series_description="t1_se_other",
        tr=600, te=12,
    )  # fmt: skip
    series = read_study(tmp_path)
    t1b = next(s for s in series if s.number == 6)
    for value in (6, "6", t1b.uid):
        chosen, reasons = select_series(series, {"T1w": value, "T2w": None})
        assert chosen["T1w"] is t1b and "chosen by the user" in reasons[0]
    with caplog.at_level(logging.WARNING, logger="scripts.study"):
        chosen, _ = select_series(series, {"T2w": 2})  # a T1w protocol chosen as T2w
    assert chosen["T2w"].number == 2 and "protocol suggests T1w" in caplog.text
    with pytest.raises(StudyError, match=r"matches no series.*series 6 't1_se_other'"):
        select_series(series, {"FLAIR": 99})
    with pytest.raises(StudyError, match="chosen as both T1w and T2w"):
        select_series(series, {"T1w": 2, "T2w": 2})
    with pytest.raises(ValueError, match="unknown series class"):
        select_series(series, {"PD": 2})


# --- BIDS ------------------------------------------------------------------------------------------------------


def write_bids(root, seconds=None, volume=None):
    root.mkdir(parents=True, exist_ok=True)
    seconds = seconds or {name: tuple(v / 1000 for v in values) for name, values in PROTOCOLS.items()}
    for number, (name, (tr, te, ti)) in enumerate(seconds.items(), start=1):
        data = image(number) if volume is None else volume
        nib.save(nib.Nifti1Image(data.astype(np.float32), oblique_affine()), root / f"sub-01_{name}.nii.gz")
        sidecar = {"RepetitionTime": tr, "EchoTime": te, "SeriesNumber": number, "Modality": "MR", "SliceThickness": 4}
        if ti:
            sidecar["InversionTime"] = ti
        (root / f"sub-01_{name}.json").write_text(json.dumps(sidecar))
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), oblique_affine()), root / "mask.nii.gz")  # no sidecar


def test_bids_folder_gives_the_same_series(tmp_path, caplog):
    write_bids(tmp_path / "anat")
    (tmp_path / "README").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="scripts.study"):
        chosen, reasons, series = load_study(tmp_path)
    assert caplog.text == ""  # short text files (sidecars, README) are no damaged DICOM files
    assert len(series) == 3  # the mask has no sidecar
    for name, (tr, te, ti) in PROTOCOLS.items():
        assert (chosen[name].tr, chosen[name].te, chosen[name].ti) == pytest.approx((tr, te, ti))
        assert chosen[name].files[0].name == f"sub-01_{name}.nii.gz"
    np.testing.assert_allclose(chosen["T2w"].affine, oblique_affine(), atol=1e-6)
    np.testing.assert_allclose(chosen["T2w"].volume, image(2), rtol=1e-6)
    assert chosen["T2w"].slice_thickness == 4.0  # the sidecar's SliceThickness (mm)
    # the suffix is trusted over the protocol: the user said so
    swapped = {"T1w": (5.0, 0.1, 0.0), "T2w": (0.5, 0.01, 0.0), "FLAIR": (9.0, 0.12, 2.5)}
    write_bids(tmp_path / "swapped", swapped)
    chosen, _, _ = load_study(tmp_path / "swapped")
    assert chosen["T1w"].tr == 5000.0


def test_bids_times_in_ms_and_nan_images_are_refused(tmp_path):
    write_bids(tmp_path / "ms", {"T1w": (500, 10, 0), "T2w": (5.0, 0.1, 0), "FLAIR": (9.0, 0.12, 2.5)})
    raises(tmp_path / "ms", "sub-01_T1w.json", "'RepetitionTime' = 500 s is physically implausible", "in ms")
    write_bids(tmp_path / "tr45", {"T1w": (0.5, 0.01, 0), "T2w": (45, 0.1, 0), "FLAIR": (9.0, 0.12, 2.5)})
    raises(tmp_path / "tr45", "sub-01_T2w.json", "'RepetitionTime' = 45 s", "above 20 s")
    write_bids(tmp_path / "te", {"T1w": (0.5, 0.01, 0), "T2w": (5.0, 0.1, 0), "FLAIR": (9.0, 1.2, 2.5)})
    raises(tmp_path / "te", "sub-01_FLAIR.json", "'EchoTime' = 1.2 s", "above 1 s", "1.2 ms = 0.0012 s")
    volume = image()
    volume[3, 4, 2] = np.nan
    write_bids(tmp_path / "nan", volume=volume)
    raises(tmp_path / "nan", "sub-01_T1w.nii.gz", "1 of 960 voxels are NaN")


# --- bad input -------------------------------------------------------------------------------------------------


def test_empty_folder_and_no_dicom(tmp_path):
    raises(tmp_path / "missing", "no such folder")
    (tmp_path / "empty").mkdir()
    raises(tmp_path / "empty", "the folder is empty")
    (tmp_path / "junk" / "deep").mkdir(parents=True)
    (tmp_path / "junk" / "deep" / "notes.txt").write_text("hello")
    (tmp_path / "junk" / "IM0001").write_bytes(b"\x00" * 300)
    raises(tmp_path / "junk", "no DICOM files", "among its 2 file(s), e.g.", "IM0001")


def test_missing_series_lists_what_was_found(tmp_path):
    paths = write_study(tmp_path)
    shutil.rmtree(paths["FLAIR"].parent)
    message = raises(tmp_path, "Required series missing: FLAIR", "'t1_tse_tra' (TR 500 ms, TE 10 ms, TI 0 ms) -> T1w")
    assert "'t2_tse_tra' (TR 5000 ms, TE 100 ms, TI 0 ms) -> T2w" in message


def test_missing_tr_names_file_and_tag(tmp_path):
    paths = write_study(tmp_path)
    for path in paths["T1w"]:
        edit(path, RepetitionTime=None)
    raises(tmp_path, "Required series missing: T1w", "RepetitionTime (0018,0080) is missing", paths["T1w"][0].name)
    # the user pointing at it gets the same cause
    raises(tmp_path, "RepetitionTime (0018,0080)", paths["T1w"][0], overrides={"T1w": 2})


def test_non_numeric_te_names_file_and_tag(tmp_path):
    paths = write_study(tmp_path)
    corrupt_value(paths["T2w"][3], "EchoTime", b"1OO")
    raises(tmp_path, "EchoTime (0018,0081)", "'1OO", paths["T2w"][3].name)


def test_missing_inversion_time_on_ir_series(tmp_path):
    paths = write_study(tmp_path / "classic", classic_flair=True)
    edit(paths["FLAIR"][0], InversionTime=None)
    raises(tmp_path / "classic", "InversionTime (0018,0082) is missing", paths["FLAIR"][0].name)
    paths = write_study(tmp_path / "enhanced")
    ds = pydicom.dcmread(paths["FLAIR"])
    del ds.SharedFunctionalGroupsSequence[0].MRModifierSequence[0].InversionTimes
    pydicom.dcmwrite(paths["FLAIR"], ds, enforce_file_format=True)
    raises(tmp_path / "enhanced", "InversionTimes (0018,9079)", "MRModifierSequence (0018,9115)", paths["FLAIR"].name)


def test_non_mr_modality(tmp_path, caplog):
    paths = write_study(tmp_path)
    for path in [*paths["T1w"], *paths["T2w"], paths["FLAIR"]]:
        edit(path, Modality="CT")
    raises(tmp_path, "Modality (0008,0060) = 'CT'", "not MR", paths["FLAIR"].name)
    for path in [*paths["T1w"], paths["FLAIR"]]:
        edit(path, Modality="MR")
    with caplog.at_level(logging.WARNING, logger="scripts.study"):
        raises(tmp_path, "Required series missing: T2w")
    assert "another modality than MR" in caplog.text and "Modality (0008,0060) = 'CT'" in caplog.text


def test_a_broken_file_of_a_series_is_an_error_naming_it(tmp_path):
    paths = write_study(tmp_path)
    last = paths["T1w"][-1]
    original = last.read_bytes()
    last.write_bytes(original[:-100])  # the edge slice: no gap betrays it, so it must not vanish silently
    raises(tmp_path, "T1w", str(last), "PixelData (7FE0,0010) holds", "promise")
    last.write_bytes(original)
    edit(last, Rows=6)  # the header says half the rows that the pixel data hold
    raises(tmp_path, str(last), "PixelData (7FE0,0010) holds 384 bytes", "Rows (0028,0010)", "promise 192")


def test_series_of_two_patients_need_an_explicit_override(tmp_path):
    paths = write_study(tmp_path)
    for path in paths["T2w"]:
        edit(path, PatientID="SOMEONE-ELSE")
    raises(tmp_path, "different patients", "PatientID (0010,0020) differs", "SOMEONE-ELSE", "--allow_mixed_study")
    chosen, _, _ = load_study(tmp_path, allow_mixed=True)
    (mismatch,) = identity_mismatches(chosen)  # one attribute differs: the StudyInstanceUID is shared
    assert mismatch.startswith("PatientID (0010,0020) differs") and "T2w series 3" in mismatch


def test_multi_valued_timing_must_agree(tmp_path):
    paths = write_study(tmp_path)
    for path in paths["T1w"]:
        edit(path, RepetitionTime=["500", "500"])
    assert load_study(tmp_path)[0]["T1w"].tr == 500.0
    edit(paths["T1w"][0], RepetitionTime=["500", "230"])
    raises(tmp_path, str(paths["T1w"][0]), "RepetitionTime (0018,0080)", "different values")


def test_inconsistent_orientation_and_spacing(tmp_path):
    paths = write_study(tmp_path, affine=np.diag([0.9, 1.1, 3.0, 1.0]))
    edit(paths["T1w"][1], ImageOrientationPatient=[1, 0, 0, 0, 0.8, 0.6])
    raises(tmp_path, "inconsistent slice orientation", "ImageOrientationPatient (0020,0037)", paths["T1w"][1].name)
    edit(paths["T1w"][1], ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    edit(paths["T2w"][3], ImagePositionPatient=[0, 0, 10.0])  # 4 mm after the previous slice, 2 mm before the next
    raises(tmp_path, "inconsistent slice spacing", "are 4 mm apart", "other slices are 3 mm", paths["T2w"][3].name)


def test_different_frame_of_reference(tmp_path):
    paths = write_study(tmp_path)
    ds = pydicom.dcmread(paths["FLAIR"])
    ds.FrameOfReferenceUID = "1.2.3.4"
    pydicom.dcmwrite(paths["FLAIR"], ds, enforce_file_format=True)
    raises(tmp_path, "do not share a Frame of Reference", "FrameOfReferenceUID (0020,0052)", "1.2.3.4", "FLAIR")


def test_all_zero_image(tmp_path):
    paths = write_study(tmp_path)
    write_classic_mr_series(
        np.zeros(SHAPE), oblique_affine(), paths["T2w"][0].parent, study=Study(), series_number=3,
        series_description="t2_tse_tra", tr=5000, te=100,
    )  # fmt: skip
    raises(tmp_path, "series 3 't2_tse_tra'", "all zero")


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_unreadable_and_duplicate_files_are_skipped(tmp_path, caplog):
    paths = write_study(tmp_path)
    (tmp_path / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 64)
    shutil.copytree(paths["T1w"][0].parent, tmp_path / "copy of T1w")
    with caplog.at_level(logging.WARNING, logger="scripts.study"):
        chosen, _, series = load_study(tmp_path)
    assert len(series) == 3 and chosen["T1w"].shape == SHAPE
    assert "broken.dcm: unreadable" in caplog.text
