"""Study inference end to end: DICOM (and BIDS) in, maps, DICOM Parametric Maps, QA and report out."""

import json
import math
import shutil
import subprocess
import sys

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO
from monai.bundle import ConfigParser, ConfigWorkflow
from scipy import ndimage
from scripts import physics
from scripts.sample_study import write_sample_study

INFERENCE = str(CONFIGS / "inference.json")
#: A network that answers T1 = 1000 ms, T2 = 500 ms and PD = 20 p.u. everywhere: the head's weights are
#: zeroed and its biases set to softplus^-1 of these values on the network's fixed scales.
CONSTANT_MAPS = (1000.0, 500.0, 20.0)
TINY_NETWORK = {"spatial_size": [64, 64], "network_pixdim": [4.0, 4.0, 0.0], "network_def#channels": [8, 16, 32],
                "network_def#embed_dim": 8}  # fmt: skip


def _softplus_inverse(y: float) -> float:
    return math.log(math.expm1(y))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_study(tmp_path_factory.mktemp("sample"), seed=0, voxel_size=(2.0, 2.0, 6.0))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Training-config override for a tiny network, and a checkpoint of it that predicts CONSTANT_MAPS."""
    folder = tmp_path_factory.mktemp("model")
    tiny = folder / "tiny.json"
    tiny.write_text(json.dumps(TINY_NETWORK))
    parser = ConfigParser(ConfigParser.load_config_files([CONFIGS / "train.json", tiny]))
    network = parser.get_parsed_content("network_def")
    state = network.state_dict()
    state["head.0.conv.weight"].zero_()
    state["head.0.conv.bias"][:] = torch.tensor(
        [_softplus_inverse(v / s) for v, s in zip(CONSTANT_MAPS, physics.MAP_SCALE, strict=True)]
    )
    checkpoint = folder / "model.pt"
    torch.save(state, checkpoint)  # a plain state dict, as training saves it and the model zoo expects
    return {"training_configs": ["train.json", str(tiny)], "ckpt_path": str(checkpoint)}


def _infer(study_dir, output_dir, model, refine=False, **overrides):
    """Run inference in-process; the constant-map network is tested without the physics refinement by default."""
    workflow = ConfigWorkflow(config_file=INFERENCE, workflow_type="infer", study_dir=str(study_dir),
                              output_dir=str(output_dir), refine=refine, **model, **overrides)  # fmt: skip
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    workflow.run()
    workflow.finalize()
    return json.loads((output_dir / "report.json").read_text())


def test_dicom_study_gives_maps_in_physical_units_on_the_t1w_grid(sample, model, tmp_path):
    out = tmp_path / "maps"
    truth_mask = sample["truth"] / "mask.nii.gz"
    report = _infer(sample["dicom"], out, model, mask=str(truth_mask))
    truth = nib.load(truth_mask)
    mask = truth.get_fdata() > 0
    delivered = ndimage.binary_dilation(mask)  # the maps reach one voxel beyond the brain mask (maps_margin)
    for name, expected in zip(physics.MAPS, CONSTANT_MAPS, strict=True):
        image = nib.load(out / f"{name}_map.nii.gz")
        np.testing.assert_allclose(image.affine, truth.affine, atol=1e-4)
        values = image.get_fdata()
        assert values.shape == truth.shape
        np.testing.assert_allclose(values[delivered], expected, rtol=1e-3)  # ms, ms, p.u. after scaling back
        assert np.all(values[~delivered] == 0)
    assert np.array_equal(nib.load(out / "mask.nii.gz").get_fdata() > 0, mask)

    protocol = json.loads((sample["truth"] / "protocol.json").read_text())["params"]
    used = {i["used_as"]: [i["TR_ms"], i["TE_ms"], i["TI_ms"]] for i in report["inputs"]}
    assert [used[s] for s in physics.SERIES] == protocol
    assert all(w.split(":")[0] in physics.SERIES and "re-synthesised" in w for w in report["warnings"])  # QA only
    assert report["brain_mask"].startswith("user mask") and report["physics_refinement"] == {"enabled": False}
    assert report["brain_mask"].endswith(f"grown by 1 voxel ({(delivered & ~mask).sum()} voxels more)")
    assert set(report["qa"]) == set(physics.SERIES) and set(report["timings"]) >= {"read_study_s", "write_s"}
    assert (out / "qa.png").stat().st_size > 10_000
    assert all((out / "qa" / f"residual_{s}.nii.gz").exists() for s in physics.SERIES)
    assert not (tmp_path / ".maps.partial").exists()

    t1w_uid = next(i["series_instance_uid"] for i in report["inputs"] if i["used_as"] == "T1w")
    for name, expected in zip(physics.MAPS, CONSTANT_MAPS, strict=True):
        pm = hd.imread(out / "dicom" / f"{name}_map.dcm")
        assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == t1w_uid
        assert pm.SeriesInstanceUID != t1w_uid
        mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == ("ms" if name != "PD" else "%")
        values = pm.get_volume().array
        assert values.max() == pytest.approx(expected, rel=1e-3) and values.min() == 0


def test_deepbet_masks_the_sample_head(sample, model, tmp_path):
    report = _infer(sample["dicom"], tmp_path / "maps", model)
    assert report["brain_mask"].startswith("deepbet; maps delivered on it grown by 1 voxel")
    truth = nib.load(sample["truth"] / "mask.nii.gz").get_fdata() > 0
    predicted = nib.load(tmp_path / "maps" / "mask.nii.gz").get_fdata() > 0
    dice = 2 * (truth & predicted).sum() / (truth.sum() + predicted.sum())
    assert dice > 0.9, f"deepbet Dice {dice:.3f} on the sample head"


def test_bids_input_and_protocol_outside_training_ranges(sample, model, tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    protocol = json.loads((sample["truth"] / "protocol.json").read_text())["params"]
    truth = {k: nib.load(sample["truth"] / f"{k}.nii.gz") for k in ("T1", "T2", "PD")}
    maps = {k: v.get_fdata().astype(np.float32) for k, v in truth.items()}
    for series, (tr, te, ti) in zip(physics.SERIES, protocol, strict=True):
        signal = physics.signal(maps["PD"], maps["T1"], maps["T2"], tr, te, ti) + 1.0
        nib.save(nib.Nifti1Image(signal, truth["T1"].affine), bids / f"sub-01_{series}.nii.gz")
        sidecar = {"RepetitionTime": tr / 1000, "EchoTime": te / 1000} | ({"InversionTime": ti / 1000} if ti else {})
        (bids / f"sub-01_{series}.json").write_text(json.dumps(sidecar))
    # a model trained on narrower ranges: the training config that made it says so
    narrow = {**physics.PROTOCOL_RANGES, "T1w": {"TR": [200, 1200], "TE": [2, 8], "TI": [0, 0]}}
    (tmp_path / "narrow.json").write_text(json.dumps({"protocol_ranges": narrow}))
    configs = {**model, "training_configs": [*model["training_configs"], str(tmp_path / "narrow.json")]}
    report = _infer(bids, tmp_path / "maps", configs, mask=str(sample["truth"] / "mask.nii.gz"))
    assert "T1w TE = 10 ms is outside the training range [2, 8] ms" in report["warnings"][0]
    assert report["dicom"].startswith("not written")
    assert report["model"]["training_protocol_ranges_ms"]["T1w"]["TE"] == [2, 8]
    t1 = nib.load(tmp_path / "maps" / "T1_map.nii.gz").get_fdata()
    np.testing.assert_allclose(t1[nib.load(sample["truth"] / "mask.nii.gz").get_fdata() > 0], 1000.0, rtol=1e-3)


def _cli(study_dir, output_dir, *extra):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", INFERENCE,
           "--study_dir", str(study_dir), "--output_dir", str(output_dir), *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _assert_clean_failure(done, output_dir, *fragments):
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("pdpe-qmri error:"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in message
    assert not (output_dir.parent / f".{output_dir.name}.partial").exists()


def test_cli_bad_inputs_fail_with_one_clear_paragraph(sample, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    done = _cli(empty, out)
    _assert_clean_failure(done, out, str(empty), "empty")
    assert not out.exists()

    partial = tmp_path / "no_flair"
    shutil.copytree(sample["dicom"], partial)
    for folder in partial.rglob("*DARK-FLUID*"):
        shutil.rmtree(folder)
    done = _cli(partial, out)
    _assert_clean_failure(done, out, "FLAIR", "t1_tse_tra", "t2_tse_tra")
    assert not out.exists()

    out.mkdir()
    (out / "T1_map.nii.gz").write_text("earlier result")
    for refusal in ([], ["--overwrite", "true"]):  # not this tool's output: refused even with --overwrite
        done = _cli(sample["dicom"], out, *refusal)
        _assert_clean_failure(done, out, str(out), "not a previous output")
        assert (out / "T1_map.nii.gz").read_text() == "earlier result"


def test_output_folder_never_holds_or_deletes_inputs(sample, model, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(sample["dicom"], study)
    (tmp_path / "notes.txt").write_text("mine")
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    for out in (study, tmp_path, study / "maps"):  # the study itself, a folder above it, a folder inside it
        with pytest.raises(SystemExit, match="is, contains or lies inside the input"):
            _infer(study, out, model, overwrite=True)
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "T1_map.nii.gz").write_text("someone else's")
    with pytest.raises(SystemExit, match="not a previous output of pdpe-qmri"):
        _infer(study, unrelated, model, overwrite=True)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file() and unrelated not in p.parents) == files

    out = tmp_path / "maps"
    (tmp_path / ".maps.partial").mkdir()  # left by a killed run
    first = _infer(study, out, model, mask=str(sample["truth"] / "mask.nii.gz"))
    assert first["software"]["name"] == "pdpe-qmri" and first["software"]["packages"]["torch"] == torch.__version__
    assert any(".maps.partial" in w and "interrupted" in w for w in first["warnings"])
    with pytest.raises(SystemExit, match="--overwrite true"):
        _infer(study, out, model)
    second = _infer(study, out, model, overwrite=True, mask=str(sample["truth"] / "mask.nii.gz"))
    assert not any("interrupted" in w for w in second["warnings"])
    (out / "notes.txt").write_text("added by the user")
    with pytest.raises(SystemExit, match="notes.txt"):
        _infer(study, out, model, overwrite=True)
    assert (out / "notes.txt").exists() and (out / "report.json").exists()


def test_unwritable_output_folder_fails_before_any_work(sample, model, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="cannot write the output folder"):
        _infer(sample["dicom"], blocker / "maps", model)


def test_refinement_moves_the_maps_towards_the_images(sample, model, tmp_path):
    """From constant maps (T2 500 ms everywhere), refinement against the images gives tissue-like contrast."""
    report = _infer(sample["dicom"], tmp_path / "maps", model, refine="true", mask=str(sample["truth"] / "mask.nii.gz"))
    assert report["physics_refinement"]["enabled"] and len(report["physics_refinement"]["gains_per_pu"]) == 3
    bundle_widths = json.loads((CONFIGS / "inference.json").read_text())["refine_prior_width"]
    assert report["physics_refinement"]["prior_width_log"] == bundle_widths
    # partial volume across series geometries is modelled by default; the T1w grid is the fit's own
    refinement = report["physics_refinement"]
    assert refinement["partial_volume"] and refinement["partial_volume_pct"]["T1w"] == 0
    assert 0 <= refinement["water_fraction"]["lowered_pct"] <= 100  # on by default, and reported
    labels = nib.load(sample["truth"] / "labels.nii.gz").get_fdata()
    t1 = nib.load(tmp_path / "maps" / "T1_map.nii.gz").get_fdata()
    assert np.median(t1[labels == 2]) > 1.1 * np.median(t1[labels == 3])  # GM T1 above WM T1 again


def test_report_names_skipped_files_and_automatic_choices(sample, model, tmp_path):
    import pydicom

    study = tmp_path / "study"
    shutil.copytree(sample["dicom"], study)
    (study / "junk.dcm").write_bytes(bytes(128) + b"DICM" + bytes(range(256)) * 4)  # a DICOM of no series
    t1w = next(p for p in study.rglob("*") if p.is_dir() and p.name.startswith("T1_TSE"))
    repeat = t1w.parent / "T1_REPEAT"
    shutil.copytree(t1w, repeat)
    for path in repeat.iterdir():
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber = ds.SeriesInstanceUID + ".9", 9
        ds.SOPInstanceUID += ".9"
        ds.save_as(path)
    report = _infer(study, tmp_path / "maps", model, mask=str(sample["truth"] / "mask.nii.gz"))
    assert any(w.startswith("1 file(s) could not be read as an image of any series") and "junk.dcm" in w
               for w in report["warnings"])  # fmt: skip
    assert any(w.startswith("automatic choice: T1w") and "--t1w_series" in w for w in report["warnings"])


def test_a_zeroed_slice_is_named_in_the_report(sample, model, tmp_path):
    import pydicom

    mask = str(sample["truth"] / "mask.nii.gz")
    clean = _infer(sample["dicom"], tmp_path / "clean", model, mask=mask)
    assert not any("slice" in w for w in clean["warnings"])
    study = tmp_path / "study"
    shutil.copytree(sample["dicom"], study)
    (flair,) = [p for p in study.rglob("*") if p.is_file() and "DARK-FLUID" in str(p)]
    ds = pydicom.dcmread(flair)
    frames = ds.pixel_array
    k = frames.shape[0] // 2
    frames[k] = 0
    ds.PixelData = frames.tobytes()
    ds.save_as(flair)
    report = _infer(study, tmp_path / "maps", model, mask=mask)
    assert f"FLAIR slice {k + 1} of {frames.shape[0]} is empty or constant." in report["warnings"]
    # the physics QA finds it too (the FLAIR shares the T1w grid's slices), and the QA figure shows it
    shown = report["qa_figure"]["shows"]
    assert (shown["series"], shown["slice"]) == ("FLAIR", k + 1) and shown["ratio_to_neighbours"] > 2
    assert any(w.startswith(f"FLAIR: re-synthesised from the maps, slice(s) {k + 1} (") for w in report["warnings"])
