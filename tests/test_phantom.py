"""Phantom cohort: determinism, physical ranges, labels/mask consistency, geometry and the datalist."""

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from scipy import ndimage
from scripts import phantom
from scripts.physics import MAPS, SERIES, protocol_violations

COARSE = (4.0, 4.0, 8.0)
FILE_KEYS = (*MAPS, "mask", "labels")


def _cli(out, *extra):
    phantom.main(["--out", str(out), "--voxel-size", *map(str, COARSE), "--family-size", "1", *extra])
    return out / "datalist.json"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return _cli(tmp_path_factory.mktemp("cohort"), "--subjects", "3", "--seed", "0")


@pytest.fixture(scope="module")
def datalist(cohort):
    return json.loads(cohort.read_text())


@pytest.fixture(scope="module")
def subject():
    """A finer grid than the cohort's, so that every tissue has pure voxels."""
    return phantom.make_subject(np.random.default_rng(1), voxel_size=(2.0, 2.0, 4.0), lesions=True, head=True)


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.*")}


def _load(cohort, entry, key):
    return np.asanyarray(nib.load(cohort.parent / entry[key]).dataobj)


def test_make_subject_is_deterministic_per_seed():
    a, b, c = (phantom.make_subject(np.random.default_rng(s), voxel_size=COARSE) for s in (7, 7, 8))
    for key in (*FILE_KEYS, "affine", "fractions"):
        np.testing.assert_array_equal(a[key], b[key])
    wm_a, wm_c = a["labels"] == 3, c["labels"] == 3
    dice = 2 * np.sum(wm_a & wm_c) / (wm_a.sum() + wm_c.sum())
    assert dice < 0.95 and not np.array_equal(a["T1"], c["T1"])


def test_cohort_bytes_depend_on_seed_only(cohort, tmp_path):
    reference = _hashes(cohort.parent)
    assert _hashes(_cli(tmp_path / "same", "--subjects", "3", "--seed", "0").parent) == reference
    # A larger cohort keeps every subject of the smaller one byte for byte (one RNG stream per subject).
    larger = _hashes(_cli(tmp_path / "larger", "--subjects", "4", "--seed", "0").parent)
    assert {k: v for k, v in larger.items() if k in reference and k != "datalist.json"} == {
        k: v for k, v in reference.items() if k != "datalist.json"
    }
    other = _hashes(_cli(tmp_path / "other", "--subjects", "3", "--seed", "1").parent)
    assert other["sub-000/T1.nii.gz"] != reference["sub-000/T1.nii.gz"]
    assert other["sub-lesion00/labels.nii.gz"] != reference["sub-lesion00/labels.nii.gz"]
    assert other["sub-shepplogan00/T1.nii.gz"] == reference["sub-shepplogan00/T1.nii.gz"]  # seed-free anatomy
    with pytest.raises(FileExistsError):
        _cli(tmp_path / "same", "--subjects", "3")


def test_pure_tissue_values_lie_in_their_ranges(subject):
    np.testing.assert_allclose(subject["fractions"].sum(axis=0), 1.0, atol=1e-5)
    # <= 0.1 % of another tissue moves a value by at most 0.1 % of the largest value of that map.
    tolerance = 0.002 * np.array(list(phantom.TISSUE_RANGES.values())).max(axis=(0, 2))
    for label, ranges in phantom.TISSUE_RANGES.items():
        pure = (subject["labels"] == label) & (subject["fractions"][label] >= 0.999)
        assert pure.sum() >= 10, phantom.LABEL_NAMES[label]
        for name, (low, high), tol in zip(MAPS, ranges, tolerance, strict=True):
            values = subject[name][pure]
            assert low - tol <= values.min() and values.max() <= high + tol, (phantom.LABEL_NAMES[label], name)
            assert values.std() > 0  # texture and mixing, not a constant


def test_partial_volume_stays_between_the_tissues_present(subject):
    """Mixed voxels: T1/T2 between the extreme ranges of their tissues, PD at most the largest tissue PD."""
    tissue = subject["labels"] > 0
    present = subject["fractions"][1:, tissue] > 0
    for i, name in enumerate(MAPS):
        bounds = np.array([phantom.TISSUE_RANGES[label][i] for label in range(1, 7)])
        low = np.where(present, bounds[:, :1], np.inf).min(axis=0)
        high = np.where(present, bounds[:, 1:], -np.inf).max(axis=0)
        if name == "PD":  # empty space in the voxel holds no water
            low = low * (1.0 - subject["fractions"][0, tissue])
        values = subject[name][tissue]
        assert np.all(values >= low * (1 - 1e-4)) and np.all(values <= high * (1 + 1e-4)), name


def test_labels_mask_and_background(subject, cohort, datalist):
    subjects = [subject, phantom.shepp_logan_subject(voxel_size=COARSE, head=True)]
    subjects += [{key: _load(cohort, entry, key) for key in FILE_KEYS} for entry in datalist["test"]]
    for s in subjects:
        labels = s["labels"]
        assert labels.dtype == np.uint8 and s["mask"].dtype == np.uint8 and labels.max() <= 6
        np.testing.assert_array_equal(s["mask"], np.isin(labels, (1, 2, 3, 4)))
        for name in MAPS:
            assert s[name].dtype == np.float32
            assert np.all(s[name][labels == 0] == 0) and np.all(s[name][labels > 0] > 0), name
        assert s["mask"].sum() > 1000


def test_geometry_is_axial_ras_with_the_requested_voxels(cohort, datalist):
    for entry in [*datalist["training"], *datalist["test"]]:
        images = [nib.load(cohort.parent / entry[key]) for key in FILE_KEYS]
        for image in images:
            assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
            np.testing.assert_allclose(image.header.get_zooms(), COARSE)
            np.testing.assert_allclose(image.get_qform(), image.get_sform())
            assert image.header.get_xyzt_units()[0] == "mm" and max(image.shape[:2]) <= phantom.MAX_IN_PLANE
            np.testing.assert_allclose(image.affine, images[0].affine)
            assert image.shape == images[0].shape
        assert images[0].header.get_intent()[2] == "T1 ms"
    brain = nib.load(cohort.parent / datalist["training"][0]["mask"])
    centre = brain.affine @ [*np.argwhere(np.asanyarray(brain.dataobj)).mean(axis=0), 1]
    np.testing.assert_allclose(centre[:3], phantom.BRAIN_CENTER_MM, atol=15)  # brain where MNI152 puts it
    assert phantom.output_grid()[0] == (224, 256, 64)
    with pytest.raises(ValueError, match="in-plane"):
        phantom.output_grid((0.5, 0.5, 3.0))


def test_datalist_splits_are_disjoint_and_loadable(cohort, datalist):
    subjects = {}
    for key in ("training", "validation", "test"):
        entries = load_decathlon_datalist(cohort, data_list_key=key, base_dir=cohort.parent)
        assert all((cohort.parent / e[f]).is_file() for e in datalist[key] for f in FILE_KEYS)
        assert all(e["T1"].endswith(f"{e['subject']}/T1.nii.gz") for e in entries)
        subjects[key] = {e["subject"] for e in datalist[key]}
    assert len(subjects["training"]) == len(subjects["validation"]) == 1
    assert not (
        subjects["training"] & subjects["validation"]
        or subjects["test"] & (subjects["training"] | subjects["validation"])
    )
    assert {e["family"] for e in datalist["test"]} == set(phantom.FAMILIES)
    assert not any("family" in e or "params" in e for e in datalist["training"])
    # validation subjects carry one fixed in-range protocol each, so validation does not vary by epoch
    assert all(protocol_violations(e["params"]) == [] for e in datalist["validation"])
    assert datalist["seed"] == 0 and datalist["voxel_size"] == list(COARSE)


def test_lesions_only_in_the_lesion_family(cohort, datalist):
    for entry in datalist["training"] + datalist["validation"] + datalist["test"]:
        if entry.get("family") != "shepp_logan":  # its "tumor" ellipsoids are lesions by design
            has_lesion = (_load(cohort, entry, "labels") == 4).any()
            assert has_lesion == (entry.get("family") == "lesion"), entry["subject"]


def test_protocol_family_is_outside_every_training_range(datalist):
    entries = [e for e in datalist["test"] if e["family"] == "protocol"]
    assert entries and all("params" not in e for e in datalist["test"] if e["family"] != "protocol")
    for entry in entries:
        problems = protocol_violations(entry["params"])
        assert np.shape(entry["params"]) == (3, 3)
        assert all(any(p.startswith(f"{series} ") for p in problems) for series in SERIES), problems


def test_head_subject_has_skull_inside_scalp_around_the_brain(cohort, datalist):
    head_entries = [e for e in datalist["test"] if e["family"] == "head"]
    assert len(head_entries) == 1
    labels = _load(cohort, head_entries[0], "labels")
    mask = _load(cohort, head_entries[0], "mask").astype(bool)
    depth = ndimage.distance_transform_edt(~mask, sampling=COARSE)
    skull, scalp = depth[labels == 5], depth[labels == 6]
    assert skull.size > 100 and scalp.size > 100 and not mask[labels >= 5].any()
    assert np.median(skull) < np.median(scalp)
    shell = ndimage.binary_dilation(mask, iterations=2) & ~mask  # the head encloses the brain
    assert np.isin(labels[shell], (5, 6)).mean() > 0.8
    for entry in datalist["training"]:
        assert _load(cohort, entry, "labels").max() <= 4


def test_shepp_logan_subject_in_physical_units():
    s = phantom.shepp_logan_subject(voxel_size=COARSE)
    labels = s["labels"]
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}  # head removed by default
    expected = {1: (4200.0, 1990.0, 98.0), 2: (1295.3, 100.0, 74.5), 3: (887.0, 80.0, 61.7)}
    for label, values in expected.items():  # phantominator's seconds / fractions, in ms / p.u.
        for name, value in zip(MAPS, values, strict=True):
            np.testing.assert_allclose(s[name][labels == label], value, rtol=1e-3)
    assert nib.aff2axcodes(s["affine"]) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(s["affine"])[:3]), COARSE)
    assert 0.1 < s["mask"].mean() < 0.6
    head = phantom.shepp_logan_subject(voxel_size=COARSE, head=True)
    assert {5, 6} <= set(np.unique(head["labels"]))
    np.testing.assert_array_equal(head["mask"], s["mask"])


def test_fractions_file_gives_back_the_subjects_tissue_fractions(cohort, datalist):
    entry = datalist["training"][0]
    stored = nib.load(cohort.parent / entry["fractions"])
    fractions = np.moveaxis(stored.get_fdata(dtype=np.float32), -1, 0)
    assert fractions.shape == (len(phantom.LABEL_NAMES), *_load(cohort, entry, "mask").shape)
    np.testing.assert_allclose(stored.affine, nib.load(cohort.parent / entry["mask"]).affine)
    np.testing.assert_allclose(fractions.sum(axis=0), 1.0, atol=4 / 255)  # 8-bit storage
    labels = phantom.labels_of(fractions)
    assert (labels == _load(cohort, entry, "labels")).mean() > 0.99  # same anatomy, up to 8-bit rounding at 0.5
    assert all("fractions" not in e for e in datalist["test"] if e["family"] == "shepp_logan")
