"""Clinical-like studies and their evaluation: acquisitions read back as written, metrics with known answers."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scripts import clinical_eval, physics
from scripts.clinical_studies import ACQUISITION_FACTORS, PROTOCOLS, acquire_study
from scripts.study import load_study

PHILIPS = np.array([[229.69, 2.3, 0.0], [2364.65, 90.0, 0.0], [7000.0, 120.0, 2250.0]])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One coarse (4 mm anatomy) Philips-like study."""
    return acquire_study(tmp_path_factory.mktemp("clinical"), {"philips": PROTOCOLS["philips"]}, seed=1,
                         fine_voxel=4.0)[0]  # fmt: skip


def _signal(maps, protocol_row):
    """Signal of (T1, T2, PD) maps stacked in ``physics.MAPS`` order."""
    return physics.signal(maps[2], maps[0], maps[1], *protocol_row)


def test_fit_recovers_noise_free_tissue_values():
    wm, gm, lesion = (800.0, 75.0, 70.0), (1400.0, 100.0, 82.0), (2000.0, 250.0, 88.0)
    t1, t2, pd = np.array([wm, gm, lesion]).T
    gains = np.array([12.0, 3.0, 0.4])
    images = np.stack([g * physics.signal(pd, t1, t2, *row) for g, row in zip(gains, PHILIPS, strict=True)])
    fitted = physics.fit_maps(images, PHILIPS, gains)
    np.testing.assert_allclose(fitted, np.stack([t1, t2, pd]), rtol=1e-6)


def test_study_reads_back_as_acquired(study):
    acquisition = json.loads((study / "truth" / "acquisition.json").read_text())
    chosen, _, every = load_study(study / "dicom")
    assert len(every) == 4 and "localizer" in [s.description for s in every]  # the scout is read, never chosen
    for name, row in zip(physics.SERIES, PHILIPS, strict=True):
        series = chosen[name]
        assert [series.tr, series.te, series.ti] == pytest.approx(row)
        assert list(series.volume.shape) == acquisition["series"][name]["shape"]
        assert series.slice_thickness == pytest.approx(acquisition["series"][name]["slice_thickness_mm"])
        np.testing.assert_allclose(series.affine, acquisition["series"][name]["affine"], atol=1e-3)
    assert chosen["T1w"].affine[2, 2] < np.linalg.norm(chosen["T1w"].affine[:3, 2])  # oblique slices
    assert chosen["T1w"].volume.shape != chosen["FLAIR"].volume.shape  # a matrix of its own per series
    truth, labels = clinical_eval._truth(study)
    assert truth.shape[1:] == chosen["T1w"].volume.shape
    # stored values = gain x bias field x signal of the truth (+ noise): the recorded gain is the scanner's
    brain = labels == 3
    expected = acquisition["series"]["T1w"]["gain_counts_per_pu"] * _signal(truth, PHILIPS[0])
    assert np.median(chosen["T1w"].volume[brain] / expected[brain]) == pytest.approx(1.0, abs=0.2)


def test_noise_free_copy_is_the_same_acquisition_without_its_noise(study, tmp_path):
    """Same head, grids and gains; outside the head the noisy study holds Rician noise, the copy exact zeros; the
    brain's signal differs by about the noise the acquisition record states (WM SNR 20-60)."""
    (clean,) = acquire_study(tmp_path, {"philips": PROTOCOLS["philips"]}, seed=1, fine_voxel=4.0, without=("noise",))
    noisy_record, clean_record = (json.loads((s / "truth" / "acquisition.json").read_text()) for s in (study, clean))
    noisy, _, _ = load_study(study / "dicom")
    quiet, _, _ = load_study(clean / "dicom")
    for name in physics.SERIES:
        assert clean_record["series"][name]["affine"] == noisy_record["series"][name]["affine"]
        gain = noisy_record["series"][name]["gain_counts_per_pu"]
        assert clean_record["series"][name]["gain_counts_per_pu"] == pytest.approx(gain)
        outside = quiet[name].volume == 0
        assert outside.mean() > 0.2 and np.abs(noisy[name].volume[outside]).mean() > 0
        inside = quiet[name].volume > np.percentile(quiet[name].volume, 75)
        relative = np.std(noisy[name].volume[inside] - quiet[name].volume[inside]) / quiet[name].volume[inside].mean()
        assert 0.005 < relative < 0.1
    np.testing.assert_array_equal(nib.load(clean / "truth" / "T1.nii.gz").get_fdata(),
                                  nib.load(study / "truth" / "T1.nii.gz").get_fdata())  # fmt: skip


def test_acquisition_without_its_geometry_bias_and_noise(study, tmp_path):
    """Each factor left out does what it says; the head, tilt draw and protocol stay those of the full study."""
    (plain,) = acquire_study(tmp_path, {"philips": PROTOCOLS["philips"]}, seed=1, fine_voxel=4.0,
                             without=ACQUISITION_FACTORS)  # fmt: skip
    record = json.loads((plain / "truth" / "acquisition.json").read_text())
    assert record["without"] == sorted(ACQUISITION_FACTORS)
    series, _, _ = load_study(plain / "dicom")
    t1w = series["T1w"]
    for name in ("T2w", "FLAIR"):  # on the T1w's grid
        assert series[name].volume.shape == t1w.volume.shape
        np.testing.assert_allclose(series[name].affine, t1w.affine, atol=1e-3)
    np.testing.assert_allclose(np.abs(t1w.affine[:3, :3]) > 1e-6, np.eye(3, dtype=bool))  # true axial
    assert t1w.slice_thickness == pytest.approx(6.0)  # 3 mm contiguous, scaled with the coarse anatomy as 4-5 mm are
    assert np.linalg.norm(t1w.affine[:3, 2]) == pytest.approx(6.0, abs=1e-3)
    # no bias field and no noise: pure WM reads gain x signal of its true values
    truth, labels = clinical_eval._truth(plain)
    wm = ndimage.binary_erosion(labels == 3)
    gain = record["series"]["T1w"]["gain_counts_per_pu"]
    ratio = t1w.volume[wm] / (gain * _signal(truth, PHILIPS[0])[wm])
    full, _, _ = load_study(study / "dicom")
    full_truth, full_labels = clinical_eval._truth(study)
    full_wm = ndimage.binary_erosion(full_labels == 3)
    full_gain = json.loads((study / "truth" / "acquisition.json").read_text())["series"]["T1w"]["gain_counts_per_pu"]
    full_ratio = full["T1w"].volume[full_wm] / (full_gain * _signal(full_truth, PHILIPS[0])[full_wm])
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01)
    assert np.std(ratio) < np.std(full_ratio) / 3


def test_scores_of_the_truth_and_of_a_known_error(study):
    truth, labels = clinical_eval._truth(study)
    perfect = clinical_eval.score(truth, truth, labels)
    for name in physics.MAPS:
        assert perfect[name]["WM_bias"] == 0 and perfect[name]["mpe"] == 0 and perfect[name]["psnr"] == np.inf
        assert perfect[name]["ssim"] == pytest.approx(1.0)
    off = clinical_eval.score(truth * np.array([1.1, 1.0, 0.95], dtype=np.float32)[:, None, None, None], truth, labels)
    assert off["T1"]["WM_bias"] == pytest.approx(10.0, abs=1e-3) and off["T1"]["mpe"] == pytest.approx(10.0, abs=1e-3)
    assert off["PD"]["GM_bias"] == pytest.approx(-5.0, abs=1e-3) and off["T2"]["mpe"] == 0
    assert off["T1"]["mpe_water_free_left_out"] == pytest.approx(10.0, abs=1e-3)
    # the brain tissue's T2 where the slab takes in bone (the truth mixes bone's water in) counts in MPE only
    bone = np.isin(labels, (2, 3)) & (truth[2] < clinical_eval.LOWEST_BRAIN_PD)
    assert bone.sum() > 10
    tissue_t2 = truth.copy()
    tissue_t2[1, bone] *= 3.0
    read = clinical_eval.score(tissue_t2, truth, labels)["T2"]
    assert read["mpe"] == pytest.approx(200.0 * bone.sum() / np.isin(labels, (2, 3)).sum(), rel=1e-4)
    assert read["mpe_water_free_left_out"] == 0
    # where PSNR's squared error lies: per tissue (they partition the brain), and in voxels left unmapped (0)
    shares = [off["T1"][f"sse_{roi}_pct"] for roi in ("WM", "GM", "CSF", "lesion")]
    assert sum(shares) == pytest.approx(100.0) and off["T1"]["sse_unmapped_pct"] == 0
    assert off["T1"]["psnr_mapped"] == pytest.approx(off["T1"]["psnr"], abs=1e-6)
    holes = truth * np.float32(1.1)
    holes[:, labels == 1] = 0  # CSF outside a brain mask of its own
    budget = clinical_eval.score(holes, truth, labels)["T1"]
    assert budget["sse_unmapped_pct"] == pytest.approx(budget["sse_CSF_pct"]) and budget["sse_CSF_pct"] > 90
    assert budget["psnr_mapped"] == pytest.approx(off["T1"]["psnr"] - 10 * np.log10(1 - shares[2] / 100), abs=1e-4)


def test_oracle_fit_on_noise_free_images_has_no_bias(study):
    truth, labels = clinical_eval._truth(study)
    brain = np.isin(labels, (1, 2, 3, 4))
    gains = np.array([5.0, 9.0, 2.0])
    images = np.stack([g * _signal(truth, row) for g, row in zip(gains, PHILIPS, strict=True)])
    fitted = np.zeros_like(truth)
    fitted[:, brain] = physics.fit_maps(images[:, brain], PHILIPS, gains)
    figures = clinical_eval.score(fitted, truth, labels)
    for name in physics.MAPS:
        assert abs(figures[name]["WM_bias"]) < 0.01 and abs(figures[name]["GM_bias"]) < 0.01
        assert figures[name]["mpe"] < 0.01


def test_fits_are_reused_only_under_the_same_bounds(study, tmp_path, monkeypatch):
    _, labels = clinical_eval._truth(study)
    mask = labels == 3
    fits = []
    monkeypatch.setattr(physics, "fit_maps", lambda *a, **k: fits.append(1) or np.full((3, mask.sum()), 500.0))
    cache = tmp_path / "oracle_fit.npz"
    first, _ = clinical_eval.fitted_maps(study, mask, True, cache)
    again, _ = clinical_eval.fitted_maps(study, mask, True, cache)
    assert len(fits) == 1 and np.array_equal(first, again)
    monkeypatch.setitem(physics.FIT_BOUNDS, "T2", (5.0, 5000.0))
    clinical_eval.fitted_maps(study, mask, True, cache)
    assert len(fits) == 2


def test_network_grid_round_trip_keeps_constants_and_blurs_edges(study):
    """The reference 'truth via network grid': back on the T1w grid exactly, partial volume at tissue edges."""
    truth, labels = clinical_eval._truth(study)
    wm_gm = np.isin(labels, (2, 3))
    constant, _ = clinical_eval.network_grid_truth(study, np.ones_like(truth))
    np.testing.assert_allclose(constant[:, wm_gm], 1.0, atol=1e-5)
    figures = clinical_eval.score(clinical_eval.network_grid_truth(study, truth)[0], truth, labels)
    assert 0.5 < figures["T1"]["mpe"] < 3.0 and abs(figures["T1"]["WM_bias"]) < 2.0  # measured 1.15 %, +0.7 %


def test_verdict_names_met_and_missed_targets():
    rows = [{"study": "a", "method": "m", "map": name, "WM_bias": bias, "GM_bias": 0.5, "mpe": 4.0, "psnr": 31.0}
            for name, bias in zip(physics.MAPS, (1.0, -4.0, 2.0), strict=True)]  # fmt: skip
    lines = clinical_eval.verdict(rows, "m", {"a"}, set())
    assert "bias +1.0 % (target ±3 %: met)" in lines[0] and "bias -4.0 % (target ±3 %: not met)" in lines[1]
    assert "PSNR 31.0 dB (target 30 dB: met)" in lines[2]


def test_span_table_says_where_the_truth_lies_against_the_reported_span():
    """WM delivered at 1100 ms with the truth at 1000 (truth -9.1 % of it) inside a span of -20..+20; GM delivered
    at 1300 with the truth at 1400 (+7.7 %) outside -5..+5; a run without spans (no calibration) is left out."""
    span = {"span_WM_low": -20.0, "span_WM_high": 20.0, "span_GM_low": -5.0, "span_GM_high": 5.0}
    rows = [{"method": "m", "study": "a", "map": "T1", "WM_true": 1000.0, "WM_pred": 1100.0, "GM_true": 1400.0,
             "GM_pred": 1300.0, **span},
            {"method": "m", "study": "oor", "map": "T1", "WM_true": 1.0, "WM_pred": 1.0, "GM_true": 1.0,
             "GM_pred": 1.0}]  # fmt: skip
    lines, inside = clinical_eval.span_table(rows, {"a", "oor"}, "m")
    assert inside == "1 of 2" and len(lines) == 3
    assert lines[2] == "| a | T1 | -20.0 .. +20.0 | -9.1 | -5.0 .. +5.0 | +7.7 (outside) |"


def test_ideal_observer_table_sets_the_pipeline_beside_what_the_tissue_prior_allows(study, monkeypatch):
    """On the coarse test study no explanation keeps its (partial-volume) ventricles in CSF's range: no guess. With
    every tissue in the middle of its range the ideal observer's guess is shown with the span that holds it."""
    from scripts import gain_ambiguity
    from scripts.phantom import TISSUE_RANGES

    rows = [{"method": "m", "study": study.name, "map": name, "WM_bias": -4.2, "GM_bias": 1.0} for name in physics.MAPS]
    lines = clinical_eval.ideal_observer_table(rows, [study], "m")
    assert len(lines) == 2 + len(physics.MAPS) and lines[2] == f"| {study.name} | T1 | -4.2 / +1.0 | – |"
    values = {t: np.array([np.mean(r) for r in TISSUE_RANGES[t]]) for t in (1, 2, 3)}
    params = np.array([PROTOCOLS["philips"].timing[s] for s in physics.SERIES])
    monkeypatch.setattr(gain_ambiguity, "tissue_values", lambda _: (values, params))
    ideal = gain_ambiguity.prior_calibration(values, params, gain_ambiguity.WITH_CSF)
    low, high = ideal["T1_WM"]
    assert low < ideal["T1_WM_guess"] < high and abs(ideal["T1_WM_guess"]) < 5
    line = clinical_eval.ideal_observer_table(rows, [study], "m")[2]
    assert f"| -4.2 / +1.0 | {ideal['T1_WM_guess']:+.1f} [{low:+.0f}..{high:+.0f}] / " in line


def test_invariance_table_ends_with_the_ideal_observers_spread():
    """Two protocols: the pipeline's WM T1 means 1000 and 1030 spread 3.0 %; the ideal observer's guesses +5.0 and
    +7.1 % spread (1.071 - 1.050) / 1.0605 = 2.0 %; a protocol where nothing is plausible leaves its rows out."""
    rows = [{"method": "m", "study": s, "map": name, "WM_pred": wm, "GM_pred": 1300.0, "WM_bias": 0.0, "GM_bias": 0.0}
            for s, wm in (("a", 1000.0), ("b", 1030.0)) for name in physics.MAPS]  # fmt: skip
    guess = {f"{name}_{roi}_guess": 0.0 for name in physics.MAPS for roi in ("WM", "GM")}
    ideal = [{"plausible": 5, **guess, "T1_WM_guess": g} for g in (5.0, 7.1)]
    lines = clinical_eval.invariance_table(rows, ["m"], ideal)
    assert len(lines) == 2 + 2 * len(physics.MAPS)
    assert lines[2].startswith("| m | T1 | 1000 / 1030 | 3.0 |")
    ideal_t1 = f"| {clinical_eval.IDEAL} | T1 | – | 2.0 | – | 0.0 | +6.0 [+5.0, +7.1] | +0.0 [+0.0, +0.0] |"
    assert lines[2 + len(physics.MAPS)] == ideal_t1
    assert len(clinical_eval.invariance_table(rows, ["m"], [ideal[0], {"plausible": 0}])) == 2 + len(physics.MAPS)


def test_more_validation_heads_are_other_heads_and_ranked_with_the_twelve(tmp_path, monkeypatch):
    """``--more-heads`` ranks on the twelve in-range validation heads and twelve more, each with a name and seed
    no other study has; not with ``--out-of-range``."""
    from scripts import clinical_studies, select_model

    studies = (clinical_studies.EVALUATION_STUDIES + clinical_studies.VALIDATION_STUDIES
               + clinical_studies.VALIDATION_MORE + clinical_studies.VALIDATION_OUT_OF_RANGE)  # fmt: skip
    names, _, seeds = zip(*studies, strict=True)
    assert len(set(names)) == len(set(seeds)) == len(studies) and clinical_studies.INVARIANCE_SEED not in seeds
    assert {p for _, p, _ in clinical_studies.VALIDATION_MORE} == {"philips", "siemens", "ge"}

    class RankedError(Exception):
        pass

    def recording_rank(*args):
        raise RankedError(args[11])  # the heads

    monkeypatch.setattr(select_model, "rank", recording_rank)
    with pytest.raises(RankedError) as ranked:
        select_model.main(["a.pt", "--more-heads", "--work", str(tmp_path)])
    assert ranked.value.args[0] == clinical_studies.VALIDATION_STUDIES + clinical_studies.VALIDATION_MORE
    with pytest.raises(SystemExit):
        select_model.main(["a.pt", "--more-heads", "--out-of-range"])


def test_model_selection_ranks_by_roi_bias_and_mpe(tmp_path, monkeypatch):
    """Candidates ranked on validation studies by mean(|WM|, |GM| bias) + MPE: 2 % high everywhere scores 4."""
    from scripts import select_model

    acquire_study(tmp_path / "studies", {"val-philips": PROTOCOLS["philips"]}, seed=1, fine_voxel=4.0)
    monkeypatch.setattr(select_model, "VALIDATION_STUDIES", (("val-philips", "philips", 1),))
    factor = {("a.pt", None): 1.10, ("b.pt", None): 1.02, ("a.pt", (0.1, 0.3, 0.03)): 0.99}

    def fake_network_maps(name, checkpoint, overlay, refine, study, out, flags=None):
        prior_width = tuple(json.loads(flags["refine_prior_width"])) if "refine_prior_width" in flags else None
        scale = 1.0 if flags["refine_calibrate"] else 1.1
        scale *= 1.0 if flags["refine_partial_volume"] else 0.95
        scale *= 1.0 if flags["refine_water_fraction"] else 0.97
        return clinical_eval._truth(study)[0] * factor[name, prior_width] * scale, {}

    monkeypatch.setattr(select_model, "network_maps", fake_network_maps)
    monkeypatch.chdir(tmp_path)
    rows = select_model.rank(["a.pt", "b.pt"], tmp_path)
    assert [r["checkpoint"] for r in rows] == ["b.pt", "a.pt"]
    assert rows[0]["error"] == pytest.approx(4.0, abs=1e-3) and rows[1]["error"] == pytest.approx(20.0, abs=1e-3)
    assert rows[1]["T1_WM_bias"] == pytest.approx(10.0, abs=1e-3) and rows[1]["PD_mpe"] == pytest.approx(10.0, abs=1e-3)
    assert rows[1]["error_val-philips"] == pytest.approx(20.0, abs=1e-3) and rows[1]["vs_best"] == pytest.approx(16.0)
    # PSNR in the true brain mask: errors of 2 % against 10 % of the same truth, 20 log10(5) dB apart
    assert rows[0]["T2_psnr"] - rows[1]["T2_psnr"] == pytest.approx(20 * np.log10(5), abs=1e-4)
    # refinement prior widths are candidates too: one row per checkpoint and width
    rows = select_model.rank(["a.pt"], tmp_path, prior_widths=(None, (0.1, 0.3, 0.03)))
    assert [r["prior_width"] for r in rows] == ["0.1,0.3,0.03", "bundle's"] and rows[0]["error"] == pytest.approx(2.0)
    assert rows[0]["T1_WM_bias"] == pytest.approx(-1.0, abs=1e-3) and rows[0]["T1_WM_abs_bias"] == pytest.approx(1.0)
    # with and without the per-study gain calibration: one row each
    rows = select_model.rank(["b.pt"], tmp_path, calibrations=(False, True))
    assert [r["prior_width"] for r in rows] == ["bundle's", "bundle's, no calibration"]
    assert rows[1]["error"] == pytest.approx(2 * 12.2, abs=1e-3)  # 1.02 x 1.1: 12.2 % bias and MPE
    # and without the partial-volume model: its own label (and maps folder)
    (row,) = select_model.rank(["b.pt"], tmp_path, partial_volumes=(False,))
    assert row["prior_width"] == "bundle's, no partial volume" and row["error"] == pytest.approx(2 * 3.1, abs=1e-3)
    (row,) = select_model.rank(["b.pt"], tmp_path, water_fractions=(False,))  # 1.02 x 0.97: 1.06 % low
    assert row["prior_width"] == "bundle's, no water fraction" and row["error"] == pytest.approx(2 * 1.06, abs=1e-3)
    # a candidate's own overlay (path:overlay) replaces --overlay for it alone
    overlays = {}

    def recording_network_maps(name, checkpoint, overlay, *args):
        overlays[name] = overlay
        return fake_network_maps(name, checkpoint, overlay, *args)

    monkeypatch.setattr(select_model, "network_maps", recording_network_maps)
    rows = select_model.rank(["a.pt", "b.pt:train_paper.json"], tmp_path, overlay="train_unet.json")
    assert overlays == {"a.pt": "train_unet.json", "b.pt": "train_paper.json"}
    assert [r["checkpoint"] for r in rows] == ["b.pt:train_paper.json", "a.pt"]


def test_gain_ratio_errors_against_the_true_receiver_gains(tmp_path):
    from scripts.select_model import gain_ratio_errors

    (tmp_path / "truth").mkdir()
    true = {"T1w": 200.0, "T2w": 50.0, "FLAIR": 8.0}
    acquisition = {"series": {s: {"gain_counts_per_pu": g} for s, g in true.items()}}
    (tmp_path / "truth" / "acquisition.json").write_text(json.dumps(acquisition))
    report = {"physics_refinement": {"gains_per_pu": [2.0, 0.5 * 1.1, 0.08 * 0.95]}}  # a common factor is no error
    assert gain_ratio_errors(report, tmp_path) == pytest.approx([10.0, 5.0])
    assert np.isnan(gain_ratio_errors({"physics_refinement": {"enabled": False}}, tmp_path)).all()


def test_model_selection_reuses_only_maps_of_the_same_weights(tmp_path, monkeypatch):
    """--reuse scores maps left by an earlier run of these weights (report.json's SHA-256) and maps the rest."""
    from scripts import select_model
    from scripts.outputs import file_sha256

    acquire_study(tmp_path / "studies", {"val-philips": PROTOCOLS["philips"]}, seed=1, fine_voxel=4.0)
    monkeypatch.setattr(select_model, "VALIDATION_STUDIES", (("val-philips", "philips", 1),))
    monkeypatch.chdir(tmp_path)
    truth = clinical_eval._truth(tmp_path / "studies" / "val-philips")[0]
    bundle = json.loads((clinical_eval.BUNDLE / "configs" / "inference.json").read_text())
    widths, smoothing = bundle["refine_prior_width"], bundle["refine_smoothing_mm"]
    for name, content in (("a.pt", b"weights a"), ("b.pt", b"weights b")):
        Path(name).write_bytes(content)
        out = tmp_path / "maps" / name / "val-philips"
        out.mkdir(parents=True)
        for m, values in zip(physics.MAPS, truth * 1.02, strict=True):
            nib.save(nib.Nifti1Image(values, np.eye(4)), out / f"{m}_map.nii.gz")
        report = {"model": {"checkpoint_sha256": file_sha256(name)},
                  "physics_refinement": {"enabled": True, "prior_width_log": widths, "calibration": None,
                                         "partial_volume": True, "water_fraction": {}, "scalp_fat": True,
                                         "smoothing_mm": smoothing}}  # fmt: skip
        (out / "report.json").write_text(json.dumps(report))
    Path("b.pt").write_bytes(b"weights b, retrained")  # its maps are stale now
    mapped = []

    def fake_network_maps(name, checkpoint, overlay, refine, study, out, flags=None):
        mapped.append(name)
        folders.append(out.relative_to(tmp_path).as_posix())
        flags_seen.append(flags)
        return truth * 1.10, {}

    folders, flags_seen = [], []

    monkeypatch.setattr(select_model, "network_maps", fake_network_maps)
    rows = select_model.rank(["a.pt", "b.pt"], tmp_path, reuse=True)
    assert mapped == ["b.pt"]
    assert [(r["checkpoint"], round(r["error"], 3)) for r in rows] == [("a.pt", 4.0), ("b.pt", 20.0)]
    # the same weights built with another overlay are other maps
    select_model.rank(["a.pt:train_unet.json"], tmp_path, reuse=True)
    assert mapped == ["b.pt", "a.pt"]
    # the network's own maps live apart from the refined ones of the same weights
    select_model.rank(["a.pt"], tmp_path, refine=False, reuse=True)
    assert folders[-1] == "maps/a.pt_network/val-philips" and (tmp_path / "maps/a.pt/val-philips/report.json").exists()
    # noise-free copies of the heads are other studies with maps of their own
    acquire_study(tmp_path / "studies_without_noise", {"val-philips": PROTOCOLS["philips"]}, 1, 4.0, ("noise",))
    select_model.rank(["a.pt"], tmp_path, reuse=True, without=("noise",))
    assert folders[-1] == "maps_without_noise/a.pt/val-philips"
    # inside the true brain mask: the pipeline's --mask, maps of their own
    select_model.rank(["a.pt"], tmp_path, reuse=True, true_mask=True)
    assert folders[-1] == "maps/a.pt_true_mask/val-philips"
    assert flags_seen[-1]["mask"] == tmp_path / "studies" / "val-philips" / "truth" / "mask.nii.gz"
    # another smoothing of the refinement's moves: maps of their own, made with that flag
    rows = select_model.rank(["a.pt"], tmp_path, reuse=True, smoothings=((0.0, 0.0, 0.0),))
    assert folders[-1] == "maps/a.pt_s0_0_0/val-philips" and rows[0]["prior_width"] == "bundle's, smoothing 0,0,0 mm"
    assert json.loads(flags_seen[-1]["refine_smoothing_mm"]) == [0, 0, 0]
    # the calibration without the scalp's fat: maps of their own, made with that flag
    rows = select_model.rank(["a.pt"], tmp_path, reuse=True, scalp_fats=(False,))
    assert folders[-1] == "maps/a.pt_no_scalp_fat/val-philips" and flags_seen[-1]["refine_scalp_fat"] is False
    assert rows[0]["prior_width"] == "bundle's, no scalp fat"
    # without a calibration the fat takes part in nothing: no suffix of its own
    select_model.rank(["a.pt"], tmp_path, reuse=True, calibrations=(False,), scalp_fats=(False,))
    assert folders[-1] == "maps/a.pt_no_calibration/val-philips"
    # ranked for out-of-range heads, the bundle's widths are the out-of-range ones: a.pt's maps, made with the
    # in-range widths, are not theirs; a candidate width sets refine_out_of_range_prior_width
    out_of_range = "refine_out_of_range_prior_width"
    assert bundle[out_of_range] != widths
    before = len(mapped)
    select_model.rank(["a.pt"], tmp_path, reuse=True, width_key=out_of_range)
    assert mapped[before:] == ["a.pt"] and folders[-1] == "maps/a.pt/val-philips"
    select_model.rank(["a.pt"], tmp_path, prior_widths=((0.1, 0.2, 0.03),), width_key=out_of_range)
    assert json.loads(flags_seen[-1][out_of_range]) == [0.1, 0.2, 0.03] and "refine_prior_width" not in flags_seen[-1]


def test_other_gains_explain_the_images_exactly_with_other_maps(study):
    """The gain ambiguity: 10 % on the T2w gain leaves no residual but moves WM T1; a common factor is PD only."""
    from scripts import gain_ambiguity

    rows = gain_ambiguity.explanations(study, factors=((1, 1, 1), (1, 1.1, 1), (1.1, 1.1, 1.1)), voxels=3000)
    assert all(r["residual_pct"] < 0.05 for r in rows)
    assert abs(rows[0]["T1_WM_bias"]) < 0.1 and abs(rows[0]["PD_GM_bias"]) < 0.1
    assert rows[1]["T1_WM_bias"] < -10  # the images cannot tell this head from one with a much shorter WM T1
    assert rows[2]["PD_WM_bias"] == pytest.approx(100 * (1 / 1.1 - 1), abs=0.05) and abs(rows[2]["T1_WM_bias"]) < 0.1


def test_tissue_prior_narrows_the_explanations_to_a_best_guess():
    """Exact tissue values at the middle of their ranges: the truth is one plausible explanation of several; the
    prior's best guess lies in their span, near the truth; a prior on pure CSF too rules explanations out, and one on
    the scalp's fat more."""
    from scripts import gain_ambiguity
    from scripts.phantom import TISSUE_RANGES

    values = {t: np.array([np.mean(r) for r in TISSUE_RANGES[t]]) for t in (1, 2, 3)}
    params = np.array([PROTOCOLS["philips"].timing[s] for s in physics.SERIES])
    ratios = np.exp(np.linspace(-0.3, 0.3, 31))  # 1 included
    wm_gm = gain_ambiguity.prior_calibration(values, params, (2, 3), ratios)
    assert wm_gm["truth_plausible"] and 10 <= wm_gm["plausible"] < 31**2 / 4
    low, high = wm_gm["T1_WM"]
    assert low < -5 and high > 5 and abs(wm_gm["T1_WM_guess"]) < 5  # a 10 %-wide span, centred on the truth
    with_csf = gain_ambiguity.prior_calibration(values, params, (1, 2, 3), ratios)
    assert with_csf["truth_plausible"] and 1 <= with_csf["plausible"] < wm_gm["plausible"]
    assert with_csf["T1_WM"][1] - with_csf["T1_WM"][0] < high - low
    # the scalp's fat (T1 and T2 held, its PD not) narrows them further
    values[6] = np.array([np.mean(r) for r in TISSUE_RANGES[6]])
    with_fat = gain_ambiguity.prior_calibration(values, params, (1, 2, 3, 6), ratios)
    assert with_fat["truth_plausible"] and 1 <= with_fat["plausible"] < with_csf["plausible"]
    assert with_fat["T1_WM"][1] - with_fat["T1_WM"][0] < (with_csf["T1_WM"][1] - with_csf["T1_WM"][0]) / 2


def test_error_budget_places_the_squared_error_by_tissue_boundary_and_unmapped_voxels():
    """WM (label 3) in columns 1-3 of each slice, GM (2) in 4-6: an error of 10 in GM's column beside WM (6 voxels a
    slice), and one WM voxel inside WM left unmapped (0 where the truth is 100)."""
    labels = np.zeros((8, 8, 2), np.uint8)
    labels[1:7, 1:4], labels[1:7, 4:7] = 3, 2
    truth = np.where(labels > 0, 100.0, 0.0)
    pred = truth.copy()
    pred[1:7, 4] += 10.0  # 12 GM voxels at the boundary, 100 each in squared error
    pred[3, 2, 0] = 0.0  # unmapped WM away from any boundary: 10000
    boundary = clinical_eval.tissue_boundary(labels)
    assert boundary[1:7, 3:5].all() and not boundary[2:6, 2].any()
    budget = clinical_eval.error_budget(pred, truth, labels)
    total = 12 * 100 + 10000
    assert budget["sse_GM_pct"] == pytest.approx(100 * 1200 / total)
    assert budget["sse_WM_pct"] == budget["sse_unmapped_pct"] == pytest.approx(100 * 10000 / total)
    assert budget["sse_boundary_pct"] == pytest.approx(100 * 1200 / total)
    assert budget["psnr_mapped"] == pytest.approx(-10 * np.log10(1200 / 100**2 / (labels > 0).sum()))
    # the same error in voxels with bone in their slab: their share, and the PSNR with them right
    water_free = np.zeros(labels.shape, bool)
    water_free[1:7, 4, 0] = True  # half of the GM boundary voxels
    budget = clinical_eval.error_budget(pred, truth, labels, water_free)
    assert budget["sse_water_free_pct"] == pytest.approx(100 * 600 / total)
    assert budget["psnr_water_free_right"] == pytest.approx(-10 * np.log10((total - 600) / 100**2 / (labels > 0).sum()))
