"""The sample DICOM study: what the reader sees, agreement with its ground truth, determinism, refusals."""

import hashlib
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import BUNDLE, REPO, TINY_VOXEL_SIZE
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage
from scripts import physics
from scripts.phantom import make_subject, subject_rng
from scripts.sample_study import ACQUISITIONS, DEFAULT_VOXEL_SIZE, RECEIVER_GAIN, SNR, main, write_sample_study
from scripts.study import load_study


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The real sample study (default grid, seed 0) and its series as the pipeline loads them."""
    out = tmp_path_factory.mktemp("sample")
    paths = write_sample_study(out)
    chosen, _, series = load_study(paths["dicom"])
    return out, paths, chosen, series


def truth(paths, key):
    return nib.load(paths["truth"] / f"{key}.nii.gz")


def digests(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_reader_finds_three_series_with_the_protocol_of_protocol_json(sample):
    _, paths, chosen, series = sample
    protocol = json.loads((paths["truth"] / "protocol.json").read_text())
    assert physics.protocol_violations(protocol["params"]) == []
    assert len(series) == 3 and len({s.study_instance_uid for s in series}) == 1
    assert len({s.frame_of_reference_uid for s in series}) == 1
    for name, one in chosen.items():
        expected = protocol["series"][name]
        assert (one.tr, one.te, one.ti) == (expected["tr"], expected["te"], expected["ti"])
        assert (one.number, one.description) == (expected["number"], expected["description"])
        assert all(not p.suffix and p.name.startswith("IM_") for p in one.files)
        assert {p.parent.parent for p in one.files} == {next(paths["dicom"].iterdir())}
    assert [d.SOPClassUID for d in chosen["T1w"].datasets] == [MRImageStorage] * chosen["T1w"].shape[2]
    assert [d.SOPClassUID for d in chosen["FLAIR"].datasets] == [EnhancedMRImageStorage]


def test_grid_is_axial_256_square_with_the_truth_affine_and_a_narrower_flair(sample):
    _, paths, chosen, _ = sample
    t1w, flair = chosen["T1w"], chosen["FLAIR"]
    reference = truth(paths, "T1")
    assert t1w.shape == chosen["T2w"].shape == reference.shape
    assert t1w.shape[:2] == (256, 256) and 28 <= t1w.shape[2] <= 36
    np.testing.assert_allclose(t1w.affine, reference.affine, atol=1e-4)
    np.testing.assert_allclose(chosen["T2w"].affine, reference.affine, atol=1e-4)
    assert [float(v) for v in t1w.datasets[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    # every slice with brain is in the slab
    mask = np.asarray(truth(paths, "mask").dataobj)
    assert mask[:, :, 0].any() and mask[:, :, -1].any()
    # FLAIR: same slices and voxels, 224 of the 256 columns (index offset 16 through the affines)
    offset = np.linalg.inv(t1w.affine) @ flair.affine
    np.testing.assert_allclose(offset, np.eye(4) + np.eye(4, k=3) * 16, atol=1e-4)
    assert flair.shape == (224, 256, t1w.shape[2])


def test_truth_is_the_cohorts_held_out_head_subject_in_world_space(sample):
    _, paths, _, _ = sample
    rng = subject_rng(0, "head", 0)  # "sub-head00"
    subject = make_subject(rng, voxel_size=DEFAULT_VOXEL_SIZE, head=True)
    index_map = np.linalg.inv(subject["affine"]) @ truth(paths, "T1").affine  # truth voxel -> phantom voxel
    np.testing.assert_allclose(index_map, np.round(index_map), atol=1e-6)
    voxels = np.indices(truth(paths, "T1").shape).reshape(3, -1)
    source = np.round(index_map[:3, :3] @ voxels + index_map[:3, 3:]).astype(int)
    inside = np.all((source >= 0) & (source < np.array(subject["mask"].shape)[:, None]), axis=0)
    for key in ("T1", "T2", "PD", "labels"):
        data = np.asarray(truth(paths, key).dataobj).reshape(-1)
        np.testing.assert_array_equal(data[inside], subject[key][tuple(source[:, inside])])
        assert not data[~inside].any()
    assert np.asarray(truth(paths, "mask").dataobj).sum() == subject["mask"].sum()  # the slab holds the whole brain


def test_images_are_the_signal_equation_of_the_truth_with_noise_at_the_stated_snr(sample):
    _, paths, chosen, _ = sample
    t1, t2, pd = (truth(paths, key).get_fdata(dtype=np.float32) for key in physics.MAPS)
    labels = np.asarray(truth(paths, "labels").dataobj)
    mask = np.asarray(truth(paths, "mask").dataobj) > 0
    for name, one in chosen.items():
        a = ACQUISITIONS[name]
        clean = RECEIVER_GAIN * physics.signal(pd, t1, t2, a.tr, a.te, a.ti)
        columns = slice(16, 240) if name == "FLAIR" else slice(None)
        image, clean, head, brain = one.volume, clean[columns], labels[columns] > 0, mask[columns]
        assert np.array_equal(image, np.round(image)) and image.max() < 4096  # 12-bit integers at slope 1
        assert np.corrcoef(image[head], clean[head])[0, 1] > 0.97
        ratio = np.median(image[brain]) / np.median(clean[brain])
        assert 0.85 < ratio < 1.15  # mild bias field
        sigma = image[~head].mean() / np.sqrt(np.pi / 2)  # Rician noise on zero signal
        assert image[brain].mean() / sigma == pytest.approx(SNR, rel=0.1)


def test_same_seed_gives_the_same_bytes(sample, tmp_path, capsys):
    out, *_ = sample
    main(["--out", str(tmp_path / "again"), "--seed", "0"])
    assert "DICOM study" in capsys.readouterr().out
    again = digests(tmp_path / "again")
    assert again and again == digests(out)


def test_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_sample_study(tmp_path)
    # the same from the repository root, running the file (not the package)
    run = subprocess.run(
        [sys.executable, str(BUNDLE / "scripts" / "sample_study.py"), "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2 and "is not empty" in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_only_the_sample_study(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    stale = tmp_path / "dicom" / "old" / "IM_0001"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    paths = write_sample_study(tmp_path, seed=1, overwrite=True, voxel_size=TINY_VOXEL_SIZE)
    assert not stale.exists() and (tmp_path / "notes.txt").read_text() == "mine"
    chosen, _, series = load_study(paths["dicom"])
    assert len(series) == 3 and chosen["T1w"].shape[:2] == (64, 64)
    assert pydicom.dcmread(chosen["T1w"].files[0]).PatientID == "PDPE-0001"
