"""Damaged studies: random byte flips and truncations never escape as anything but StudyError nor lose a slice
silently; unreadable end slices, headers that contradict the pixel data and series mixing patients are named."""

import logging
import shutil

import numpy as np
import pytest
from scripts.study import Study, StudyError, load_study, write_classic_mr_series
from scripts.study.errors import tag_label
from test_study import SHAPE, edit, image, oblique_affine, raises, write_study

CASES = 30
#: pydicom warns about the damage it reads past; the reader's own verdict is what is tested
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    write_study(root)
    return root


def damage(path, rng):
    """Flip a few bytes (mostly in the header, where parsing can go wrong) and/or truncate the file."""
    data = bytearray(path.read_bytes())
    if rng.random() < 0.7:
        header = min(len(data), 3000)
        for _ in range(rng.integers(1, 12)):
            at = rng.integers(0, header if rng.random() < 0.8 else len(data))
            data[at] ^= 1 << int(rng.integers(0, 8))
    if rng.random() < 0.4:
        data = data[: rng.integers(0, len(data))]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", range(CASES))
def test_damaged_study_raises_only_study_error(template, tmp_path, case):
    rng = np.random.default_rng(case)
    study = tmp_path / "study"
    shutil.copytree(template, study)
    files = sorted(p for p in study.rglob("*") if p.is_file())
    for index in rng.choice(len(files), size=int(rng.integers(1, 3)), replace=False):
        damage(files[index], rng)
    try:
        chosen, _, _ = load_study(study)
    except StudyError as err:
        assert str(err)
        return
    assert set(chosen) == {"T1w", "T2w", "FLAIR"}
    # no slice lost silently: a damaged file is an error, or it was not one of the chosen series' slices
    assert all(np.isfinite(s.volume).all() and s.volume.shape == SHAPE for s in chosen.values())


@pytest.mark.parametrize("case", range(12))
def test_end_slice_cut_anywhere_is_an_error_naming_it(template, tmp_path, case):
    """No gap betrays a lost first or last slice: wherever its file is cut, the reader must name it."""
    rng = np.random.default_rng(1000 + case)
    study = tmp_path / "study"
    shutil.copytree(template, study)
    files = sorted((study / str(rng.choice(["T1w", "T2w"]))).iterdir())
    path = files[int(rng.choice([0, -1]))]
    data = path.read_bytes()
    path.write_bytes(data[: int(rng.integers(0, len(data)))])
    raises(study, str(path))


# --- damage at the ends of a stack, inconsistent headers, mixed identities ---------------------------------------


def _garbage(path):
    """The DICOM marker and then noise: not even the SeriesInstanceUID can be read."""
    path.write_bytes(bytes(128) + b"DICM" + bytes(range(256)) * 2)


def _cut_in_header(path):
    path.write_bytes(path.read_bytes()[:300])


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_garbage, _cut_in_header, _empty], ids=["garbage", "cut in header", "empty"])
@pytest.mark.parametrize("end", [0, -1], ids=["first", "last"])
def test_unreadable_end_slice_is_missing_from_the_stated_count(template, tmp_path, damage, end):
    study = tmp_path / "study"
    shutil.copytree(template, study)
    path = sorted((study / "T1w").iterdir())[end]
    damage(path)
    raises(study, "T1w", "1 slice(s) missing: 4 images found where ImagesInAcquisition (0020,1002) = 5", str(path))


def test_unreadable_file_beside_a_complete_series_is_only_a_warning(template, tmp_path, caplog):
    study = tmp_path / "study"
    shutil.copytree(template, study)
    _garbage(study / "T1w" / "junk.dcm")
    with caplog.at_level(logging.WARNING, logger="scripts.study"):
        chosen, _, _ = load_study(study)
    assert chosen["T1w"].shape == SHAPE  # ImagesInAcquisition says the five slices are all there
    assert "1 file(s) could not be read as an image of any series" in caplog.text and "junk.dcm" in caplog.text


def test_without_a_stated_count_a_like_series_reveals_the_lost_end_slice(tmp_path):
    paths = write_study(tmp_path)
    for path in paths["T1w"]:
        edit(path, ImagesInAcquisition=None)
    _garbage(paths["T1w"][-1])
    beyond = "the T2w (series 3 't2_tse_tra') reaches 3.0 mm beyond its last slice"
    raises(tmp_path, "T1w series 2 't1_tse_tra'", str(paths["T1w"][-1]), "Its 4 slices of 3 mm cover 12.0 mm", beyond,
           "end slice is probably missing")  # fmt: skip


def test_without_a_stated_count_and_no_like_series_the_suspect_is_a_warning(tmp_path, caplog):
    write_study(tmp_path)
    # the T1w rewritten with thicker slices (same UIDs and files): no other series has its slice step
    paths = write_classic_mr_series(image(2), oblique_affine(spacing=(0.9, 1.1, 3.5)), tmp_path / "T1w", study=Study(),
                                    series_number=2, series_description="t1_tse_tra", tr=500, te=10)  # fmt: skip
    for path in paths:
        edit(path, ImagesInAcquisition=None)
    _garbage(paths[0])
    with caplog.at_level(logging.WARNING, logger="scripts.study"):
        chosen, _, _ = load_study(tmp_path)
    assert chosen["T1w"].shape[2] == 4
    assert (
        f"could be its slices, and no ImagesInAcquisition (0020,1002) states its slice count: {paths[0]}" in caplog.text
    )
    assert "no series of the same slice orientation and step reaches beyond it" in caplog.text


@pytest.mark.parametrize("keyword, value", [("Rows", 6), ("Columns", 8), ("BitsAllocated", 8)])
def test_header_inconsistent_with_the_pixel_data_of_an_end_slice(template, tmp_path, keyword, value):
    study = tmp_path / "study"
    shutil.copytree(template, study)
    path = sorted((study / "T2w").iterdir())[-1]
    edit(path, **{keyword: value})
    raises(study, "T2w", str(path), "PixelData (7FE0,0010) holds 384 bytes", tag_label(keyword))


def test_enhanced_file_cut_short_or_miscounted_is_named(template, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(template, study)
    (path,) = (study / "FLAIR").iterdir()
    original = path.read_bytes()
    path.write_bytes(original[:-100])  # the last frame's pixels end early
    raises(study, "FLAIR", str(path), "PixelData (7FE0,0010) holds 1820 bytes", "promise 1920")
    path.write_bytes(original)
    edit(path, NumberOfFrames=4)
    raises(study, "FLAIR", str(path), "PerFrameFunctionalGroupsSequence (5200,9230) has 5 items",
           "NumberOfFrames (0028,0008) = 4")  # fmt: skip


@pytest.mark.parametrize("keyword", ["PatientID", "StudyInstanceUID", "FrameOfReferenceUID"])
def test_a_series_mixing_patients_or_studies_names_the_odd_file(template, tmp_path, keyword):
    study = tmp_path / "study"
    shutil.copytree(template, study)
    path = sorted((study / "T1w").iterdir())[-1]
    edit(path, **{keyword: "1.2.3.4"})
    raises(study, "T1w", f"its files disagree on {tag_label(keyword)}", f"'1.2.3.4' in {path}")
