import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scripts import physics
from scripts.transforms import (
    BrainMaskd,
    ClipPercentiled,
    GrowMaskd,
    MaskedMaxNormalized,
    NormalizeParametersd,
    PhysicsRefined,
    RandMaskJitterd,
    RandRicianNoiseSNRd,
    RandSliceProfiled,
    RandTissueValuesd,
    ResynthesisResiduald,
    ScaleMapsd,
    SynthesizeWeightedd,
    smoothed_moves,
)


def _maps(shape=(1, 24, 20, 6), seed=0):
    """Channel-first T1/T2/PD maps (ms, ms, p.u.) with a box-shaped brain mask and zero background."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.float32)
    mask[:, 4:20, 3:17, 1:5] = 1
    t1 = rng.uniform(700, 4800, shape).astype(np.float32) * mask
    t2 = rng.uniform(65, 2200, shape).astype(np.float32) * mask
    pd = rng.uniform(65, 100, shape).astype(np.float32) * mask
    affine = torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0]))
    return {k: MetaTensor(v, affine=affine) for k, v in {"T1": t1, "T2": t2, "PD": pd, "mask": mask}.items()}


def test_clip_percentiles_use_only_in_mask_voxels():
    mask = torch.zeros(1, 10, 10)
    mask[0, :, :5] = 1
    img = torch.zeros(1, 10, 10)
    img[0, :, :5] = torch.arange(50, dtype=torch.float32).reshape(10, 5)  # in mask: 0..49
    img[0, :, 5:] = 1000.0  # outliers outside the mask must not move the percentiles
    out = ClipPercentiled("img", lower=10, upper=90)({"img": img, "mask": mask})["img"]
    low, high = np.percentile(np.arange(50), [10, 90])
    assert (low, high) == (4.9, 44.1)
    assert out[0, :, :5].min().item() == pytest.approx(low) and out[0, :, :5].max().item() == pytest.approx(high)
    np.testing.assert_allclose(out[0, :, 5:].numpy(), high, rtol=1e-6)  # clipped like the rest
    assert out.shape == img.shape and out.dtype == torch.float32


def test_clip_keeps_metadata_and_refuses_empty_mask():
    d = _maps()
    out = ClipPercentiled(["T1", "T2"])(d)
    assert isinstance(out["T1"], MetaTensor) and torch.equal(out["T1"].affine, d["T1"].affine)
    with pytest.raises(ValueError, match="mask is empty"):
        ClipPercentiled("T1")({"T1": d["T1"], "mask": torch.zeros_like(d["mask"])})


def test_synthesis_with_fixed_protocol_equals_physics():
    d = _maps()
    protocol = [[500.0, 15.0, 0.0], [4000.0, 100.0, 0.0], [9000.0, 120.0, 2500.0]]
    out = SynthesizeWeightedd()({**d, "params": protocol})
    for series, (tr, te, ti) in zip(physics.SERIES, protocol, strict=True):
        expected = physics.signal(d["PD"].numpy(), d["T1"].numpy(), d["T2"].numpy(), tr, te, ti)
        np.testing.assert_allclose(out[series].numpy(), expected, rtol=1e-5, atol=1e-4)  # float32 near FLAIR nulls
        assert out[series].shape == (1, 24, 20, 6) and out[series].dtype == torch.float32
        assert torch.equal(out[series].affine, d["T1"].affine)
        assert torch.all(out[series][d["mask"] == 0] == 0)
    assert torch.equal(out["params"], torch.tensor(protocol))


def test_synthesis_samples_in_range_records_and_is_seeded():
    d = _maps()
    draws = []
    for seed in (1, 1, 2):
        t = SynthesizeWeightedd()
        t.set_random_state(seed)
        out = t(dict(d))
        params = out["params"].numpy()
        assert params.shape == (3, 3)
        assert physics.protocol_violations(params) == []
        np.testing.assert_allclose(out["T1w"].numpy(), physics.signal(d["PD"].numpy(), d["T1"].numpy(),
                                   d["T2"].numpy(), *params[0]), rtol=1e-5)  # fmt: skip
        draws.append(params)
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.allclose(draws[0], draws[2])
    narrow = {s: {p: (10.0, 10.0) if p != "TI" else (0.0, 0.0) for p in physics.SEQUENCE_PARAMETERS}
              for s in physics.SERIES}  # fmt: skip
    params = SynthesizeWeightedd(ranges=narrow)(dict(d))["params"]
    assert torch.equal(params[:, :2], torch.full((3, 2), 10.0))


def test_log_uniform_protocols_draw_as_many_per_factor_at_the_short_end():
    """T1w TR in 200-1200 ms: below 300 ms a tenth of uniform draws, log(1.5) / log(6) = 23 % of log-uniform ones;
    the same seed gives the same draws either way, inside the ranges, and no inversion where TI is 0."""
    draws = {}
    for log_uniform in (False, True):
        t = SynthesizeWeightedd(log_uniform=log_uniform)
        t.set_random_state(0)
        draws[log_uniform] = np.array([(t.randomize(), t.protocol)[1] for _ in range(4000)])
        assert all(physics.protocol_violations(p) == [] for p in draws[log_uniform][:200])
    short_tr = {k: np.mean(v[:, 0, 0] < 300.0) for k, v in draws.items()}
    assert short_tr[False] == pytest.approx(0.1, abs=0.015) and short_tr[True] == pytest.approx(0.226, abs=0.02)
    assert np.all(draws[True][:, :2, 2] == 0) and np.all(draws[True][:, 2, 2] >= 1500.0)
    # each log-uniform draw is the same seed's uniform draw mapped onto the log range
    fraction = (draws[False][:, 0, 0] - 200.0) / 1000.0
    np.testing.assert_allclose(draws[True][:, 0, 0], 200.0 * 6.0**fraction, rtol=1e-9)


def test_rician_noise_has_requested_snr():
    img = torch.full((1, 64, 64, 16), 100.0)
    mask = torch.ones_like(img)
    t = RandRicianNoiseSNRd("img", snr_range=(50.0, 50.0))
    t.set_random_state(0)
    noisy = t({"img": img, "mask": mask})["img"]
    # at SNR 50 the Rician bias is negligible: the magnitude's spread equals sigma = 100 / 50
    assert noisy.std().item() == pytest.approx(2.0, rel=0.02)
    assert noisy.mean().item() == pytest.approx(100.0, rel=0.001)
    # pure-noise background is Rayleigh with mean sigma * sqrt(pi / 2), never negative
    background = t({"img": torch.zeros_like(img), "mask": mask, "ref": img})["img"]
    assert torch.all(background >= 0)
    t2 = RandRicianNoiseSNRd("img", snr_range=(50.0, 50.0))
    t2.set_random_state(0)
    assert torch.equal(t2({"img": img, "mask": mask})["img"], noisy)


def test_masked_max_norm_gives_one_in_mask():
    d = _maps()
    d["T1"][0, 0, 0, 0] = 1e6  # outside the mask: must not be the reference
    out = MaskedMaxNormalized(["T1", "PD"])(d)
    for key in ("T1", "PD"):
        assert out[key][d["mask"] > 0].max().item() == pytest.approx(1.0)
    assert out["T1"][0, 0, 0, 0].item() > 1.0
    with pytest.raises(ValueError, match="no positive signal"):
        MaskedMaxNormalized("T1")({"T1": torch.zeros(1, 4, 4), "mask": torch.ones(1, 4, 4)})


def test_map_and_parameter_scaling():
    maps = torch.tensor([5000.0, 250.0, 50.0]).reshape(3, 1, 1).expand(3, 2, 2)
    scaled = ScaleMapsd("label")({"label": maps})["label"]
    np.testing.assert_allclose(scaled[:, 0, 0].numpy(), [1.0, 0.1, 0.5])
    back = ScaleMapsd("label", inverse=True)({"label": scaled})["label"]
    np.testing.assert_allclose(back.numpy(), maps.numpy(), rtol=1e-6)
    params = NormalizeParametersd("params")({"params": [[500.0, 10.0, 0.0]] * 3})["params"]
    assert params.dtype == torch.float32
    np.testing.assert_allclose(params[0].numpy(), [0.05, 0.05, 0.0], rtol=1e-6)


def test_brain_mask_from_user_file_and_skull_stripped_input_is_detected(tmp_path):
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    brain = np.zeros((20, 16, 8), np.float32)
    brain[5:15, 4:12, 2:6] = 1
    nib.save(nib.Nifti1Image(brain, affine), tmp_path / "mask.nii.gz")
    head = MetaTensor(torch.full((1, 20, 16, 8), 50.0), affine=torch.as_tensor(affine))
    out = BrainMaskd("T1w", mask_file=str(tmp_path / "mask.nii.gz"))({"T1w": head})
    assert torch.equal(out["mask"][0] > 0, torch.from_numpy(brain > 0))
    assert out["mask_info"] == f"user mask {tmp_path / 'mask.nii.gz'}"
    stripped = MetaTensor(head * torch.from_numpy(brain), affine=head.affine)
    info = BrainMaskd("T1w", mask_file=str(tmp_path / "mask.nii.gz"))({"T1w": stripped})["mask_info"]
    assert "looks skull-stripped already (0.0 % of its signal outside)" in info


def test_resynthesis_residual_vanishes_for_maps_that_explain_the_inputs():
    d = _maps(shape=(1, 24, 20, 6))
    protocol = torch.tensor([[500.0, 15.0, 0.0], [4000.0, 100.0, 0.0], [9000.0, 120.0, 2500.0]])
    maps = torch.cat([d["T1"], d["T2"], d["PD"]])
    images = torch.stack([physics.signal(d["PD"][0], d["T1"][0], d["T2"][0], *row.tolist()) for row in protocol])
    images = images * torch.tensor([3.0, 0.5, 7.0]).reshape(3, 1, 1, 1)  # any receiver gain per series
    data = {"pred": physics.scale_maps(maps), "image": images, "mask": d["mask"],
            "params": physics.normalize_parameters(protocol)}  # fmt: skip
    residual = ResynthesisResiduald()(data)["residual"]
    inside = d["mask"][0] > 0
    assert residual.shape == (3, 24, 20, 6)
    assert residual[:, inside].abs().max() < 1e-3 * images[:, inside].abs().max()
    wrong = {**data, "pred": physics.scale_maps(maps * torch.tensor([1.5, 1.0, 1.0]).reshape(3, 1, 1, 1))}
    t1w_error = ResynthesisResiduald()(wrong)["residual"][0][inside].abs().mean() / images[0][inside].mean()
    assert t1w_error > 0.02  # a T1 map 50 % too long no longer explains the T1w image (2.5 % here)


def test_tissue_values_are_redrawn_and_mixed_as_water():
    from scripts.phantom import TISSUE_RANGES

    fractions = np.zeros((7, 6, 4, 2), np.float32)
    fractions[3, :3] = 1.0  # pure WM
    fractions[1, 3:5] = 1.0  # pure CSF
    fractions[2, 5, :2], fractions[3, 5, :2] = 0.5, 0.5  # GM/WM partial volume
    fractions[0, 5, 2:] = 1.0  # empty space
    data = {"fractions": MetaTensor(torch.from_numpy(fractions), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))}
    remix = RandTissueValuesd()
    first = remix.set_random_state(0)(data)
    second = remix(data)
    assert np.array_equal(first["mask"][0].numpy(), (fractions[0] < 0.5).astype(np.float32))
    for name, (low, high) in zip(physics.MAPS, TISSUE_RANGES[3], strict=True):
        wm = first[name][0, :3].numpy()
        assert low <= wm.min() and wm.max() <= high  # texture stays inside the tissue's range
        assert first[name][0, 5, 2:].abs().max() == 0  # no tissue, no signal
    assert abs(float(first["T1"][0, :3].mean()) - float(second["T1"][0, :3].mean())) > 1.0  # a new draw each call


def test_partial_volume_mixes_water_not_numbers():
    from scripts.phantom import labels_of, mix

    fractions = np.zeros((7, 1), np.float32)
    fractions[2], fractions[3] = 0.5, 0.5
    values = {2: np.array([1400.0, 100.0, 80.0]), 3: np.array([800.0, 70.0, 70.0])}
    maps = mix(fractions, values, np.ones((3, 1), np.float32), labels_of(fractions))
    water = 0.5 * 80 + 0.5 * 70
    assert maps["PD"][0] == pytest.approx(water)
    assert maps["T1"][0] == pytest.approx(water / (0.5 * 80 / 1400 + 0.5 * 70 / 800))
    assert maps["T2"][0] == pytest.approx(water / (0.5 * 80 / 100 + 0.5 * 70 / 70))


def _refinement_case(
    seed=0,
    values=((800.0, 75.0, 70.0), (1400.0, 100.0, 82.0), (4000.0, 1500.0, 98.0)),
    slabs=(8, 8, 4),
    noise=0.1,
):
    """True maps of WM/GM/CSF slabs (``values``, ``slabs`` of each along the first axis, 20 in all), their
    gain-scaled images (Gaussian ``noise``, counts; little by default), a prior with 10 % random T1 errors."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values)
    tissue = np.repeat(np.arange(len(slabs)), slabs)  # slabs along the first axis: neighbours share a tissue
    truth = np.broadcast_to(values[tissue].T[:, :, None, None], (3, 20, 10, 10)).astype(np.float32)
    protocol = np.array([[550.0, 10.0, 0.0], [5000.0, 100.0, 0.0], [9000.0, 120.0, 2500.0]])
    gains = np.array([20.0, 15.0, 30.0])
    images = {f"{s}_grid": torch.from_numpy(g * physics.signal(truth[2], truth[0], truth[1], *row)[None]
                                            + rng.normal(0, noise, (1, *truth.shape[1:]))).float()
              for s, g, row in zip(physics.SERIES, gains, protocol, strict=True)}  # fmt: skip
    prior = truth.copy()
    prior[0] *= np.exp(rng.normal(0.0, 0.1, truth.shape[1:]))
    data = {"pred": torch.from_numpy(prior), "brain_mask": torch.ones(1, 20, 10, 10),
            "params": torch.from_numpy(physics.normalize_parameters(protocol)), **images}  # fmt: skip
    return data, truth


def test_physics_refinement_recovers_tissue_t1_from_a_perturbed_prior():
    data, truth = _refinement_case()
    out = PhysicsRefined()(data)
    tissue = truth[0] < 2000
    before = np.abs(data["pred"][0].numpy()[tissue] / truth[0][tissue] - 1)
    after = np.abs(out["pred"][0].numpy()[tissue] / truth[0][tissue] - 1)
    assert before.mean() > 0.07 and after.mean() < 0.01
    assert out["refinement"]["gains_per_pu"] == pytest.approx([20.0, 15.0, 30.0], rel=0.05)
    # the 10 % T1 errors leave 6-9 % residuals in T1w and FLAIR; the refined maps explain the images to the noise
    residual = out["refinement"]["residual_pct"]
    assert residual["network"]["T1w"] > 5.0 and residual["network"]["FLAIR"] > 5.0
    assert max(residual["refined"].values()) < 0.1
    off = PhysicsRefined(enabled=False)(data)
    assert off["refinement"] == {"enabled": False} and torch.equal(off["pred"], data["pred"])


def test_physics_refinement_stops_csf_whose_t2w_signal_no_t2_explains_at_the_ceiling_and_reports_it():
    """CSF's T2w signal 30 % above what its values give (as under a T2w gain 30 % off for it): no T2 explains it, so
    the fit stops at its ceiling, free water's 2500 ms (5000 ms before), and the report gives the share of brain
    voxels left there: the CSF slabs, 4 of 20. WM and GM keep their values."""
    data, truth = _refinement_case()
    csf = truth[0] > 2000
    data["T2w_grid"][0][torch.from_numpy(csf)] *= 1.3
    out = PhysicsRefined(prior_width=(0.1, 0.1, 0.03))(data)
    assert out["pred"][1].numpy()[csf] == pytest.approx(2500.0)
    assert np.abs(out["pred"].numpy()[:, ~csf] / truth[:, ~csf] - 1).max() < 0.01
    assert out["refinement"]["at_fit_ceiling_pct"] == {"T1": 0.0, "T2": 20.0}


def test_level_correction_takes_each_level_from_the_images_and_the_detail_from_the_network():
    """A network prior with GM's T1 8 % low and WM's PD 5 % high, and a fit under the right gains that is
    right on average but 10 % noisy per voxel: each level's values come from the fit, the voxels' from the prior."""
    from scripts.calibration import level_corrected

    rng = np.random.default_rng(0)
    tissue = np.repeat([0, 1], 20000)  # WM, GM
    truth = np.array([[800.0, 1400.0], [75.0, 100.0], [70.0, 82.0]])[:, tissue]
    truth *= 1 + 0.03 * np.sin(np.arange(tissue.size) / 50.0)  # detail within a tissue, which the prior has
    prior = truth * np.array([[1.0, 0.92], [1.0, 1.0], [1.05, 1.0]])[:, tissue]
    fitted = truth * np.exp(rng.normal(0.0, 0.1, truth.shape))
    corrected = level_corrected(prior, fitted)
    for level in (0, 1):
        error = corrected[:, tissue == level] / truth[:, tissue == level] - 1
        assert np.abs(error.mean(axis=1)).max() < 0.01  # the prior was off by 8 % and 5 %
        assert error.std(axis=1).max() < 0.01  # the fit's 10 % noise stays out
    assert level_corrected(prior, prior) == pytest.approx(prior)


def test_level_correction_gives_wm_read_as_gm_less_of_gms_move():
    """The network reads GM (1300 ms) 8 % low, at 1200, and some WM (800 ms) there too, one voxel in ten of those
    at 1200; the images (5 % noise) put each where it is. Read at the network's T1 alone that WM took GM's move
    (+7.5 %, to about 1290 ms); read between the network and the images (about 980 ms) it takes less than half of
    it, while GM keeps its move and the WM read right its own (none)."""
    from scripts.calibration import level_corrected

    rng = np.random.default_rng(1)
    tissue = np.repeat([0, 1, 2], [18000, 2000, 18000])  # WM read right, WM read GM-like, GM
    truth = np.array([[800.0, 800.0, 1300.0], [75.0, 75.0, 100.0], [70.0, 70.0, 82.0]])[:, tissue]
    prior = truth * np.array([[1.0, 1.5, 12 / 13], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])[:, tissue]
    fitted = truth * np.exp(rng.normal(0.0, 0.05, truth.shape))
    move = level_corrected(prior, fitted)[0] / prior[0] - 1
    gm_move = 13 / 12 - 1
    assert np.median(move[tissue == 2]) == pytest.approx(gm_move, abs=0.01)
    assert abs(np.median(move[tissue == 0])) < 0.005
    assert 0.0 < np.median(move[tissue == 1]) < gm_move / 2


def test_level_correction_leaves_csf_where_the_network_put_it():
    """The fit reads CSF (4000 ms) 15 % high in T1 and 7 % in PD, as a one-compartment fit of CSF mixed with its
    neighbours' slabs does even without noise, and GM 8 % above the network: GM takes its move, CSF none."""
    from scripts.calibration import CSF_LEVEL_T1_MS, level_corrected

    tissue = np.repeat([0, 1, 2], [16000, 16000, 8000])  # WM, GM, CSF
    prior = np.array([[800.0, 1300.0, 4000.0], [75.0, 100.0, 1500.0], [70.0, 82.0, 97.0]])[:, tissue]
    fitted = prior * np.array([[1.0, 1.08, 1.15], [1.0, 1.0, 1.0], [1.0, 1.0, 1.07]])[:, tissue]
    corrected = level_corrected(prior, fitted)
    assert corrected[:, tissue == 2] == pytest.approx(prior[:, tissue == 2])
    assert corrected[0, tissue == 1] == pytest.approx(1.08 * prior[0, tissue == 1])
    # with the ceiling above CSF its level takes the fit's bias
    assert level_corrected(prior, fitted, csf_t1_ms=5000.0)[0, tissue == 2] == pytest.approx(1.15 * 4000.0)
    assert prior[0, tissue == 1].max() < CSF_LEVEL_T1_MS < prior[0, tissue == 2].min()


def test_calibration_recovers_gains_the_network_got_wrong():
    """A prior that explains the images exactly, but under a T2w gain 12 % high and a FLAIR gain 8 % low (no
    residual, WM T1 far off): the refinement alone keeps that calibration; with WM, GM and the ventricles' core
    held to the tissue prior (values in the middle of their ranges) the gains and the maps come back."""
    from scripts.phantom import TISSUE_RANGES

    data, truth = _refinement_case(values=[[np.mean(r) for r in TISSUE_RANGES[t]] for t in (3, 2, 1)])
    protocol = physics.normalize_parameters(data["params"].numpy(), inverse=True)
    images = np.stack([data[f"{s}_grid"][0].numpy().reshape(-1) for s in physics.SERIES]).astype(np.float64)
    wrong = np.array([20.0, 15.0 * 1.12, 30.0 * 0.92])
    data["pred"] = torch.from_numpy(physics.fit_maps(images, protocol, wrong).reshape(truth.shape).astype(np.float32))
    wm = truth[0] == truth[0].min()

    def wm_t1_bias(out):
        return 100 * (out["pred"][0].numpy()[wm].mean() / truth[0][wm].mean() - 1)

    plain, calibrated = PhysicsRefined()(data), PhysicsRefined(calibrate=True)(data)
    assert abs(wm_t1_bias(plain)) > 15 and "calibration" not in plain["refinement"]
    assert abs(wm_t1_bias(calibrated)) < 3
    assert calibrated["refinement"]["gains_per_pu"] == pytest.approx([20.0, 15.0, 30.0], rel=0.03)
    # what the tissue prior leaves open, reported per map and tissue: the truth lies in it, WM T1 several % either way
    span = calibrated["refinement"]["calibration_span_pct"]
    truth_against_given = -100 * wm_t1_bias(calibrated) / (100 + wm_t1_bias(calibrated))
    assert span["T1"]["WM"][0] < min(-5.0, truth_against_given) and span["T1"]["WM"][1] > max(5.0, truth_against_given)
    assert all(low <= 0 <= high for tissues in span.values() for low, high in tissues.values())
    # a protocol outside the training ranges keeps the network's gains, and says why
    guarded = PhysicsRefined(calibrate=True, ranges=_ranges_without_the_case_flair_ti())(data)
    assert guarded["refinement"]["calibration"] is None and "outside" in guarded["refinement"]["calibration_note"]
    assert "calibration_span_pct" not in guarded["refinement"]
    assert guarded["refinement"]["gains_per_pu"] == plain["refinement"]["gains_per_pu"]
    assert wm_t1_bias(guarded) == pytest.approx(wm_t1_bias(plain))


def test_scalp_fat_signals_keep_the_series_ratios_through_bias_field_and_air():
    """A block of brain inside a 5 mm-thick fat shell 6 mm beyond it, under a bias field of +-20 % and with a third of
    the fat voxels half air: the sampled signals have the fat's T2w/T1w and FLAIR/T1w ratios to 0.5 %."""
    from scripts.calibration import scalp_signals

    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.arange(40.0),) * 3, indexing="ij")
    box = np.maximum.reduce([np.abs(x - 19.5), np.abs(y - 19.5), np.abs(z - 19.5)])  # distance from the centre, mm
    brain = box <= 9
    fat = (box >= 16) & (box < 21)  # 6-11 mm beyond the brain (voxel centres)
    water = np.where(fat, np.where(rng.random(fat.shape) < 1 / 3, 0.5, 1.0), 0.0)
    protocol = np.array([[500.0, 14.0, 0.0], [4200.0, 105.0, 0.0], [9500.0, 140.0, 2375.0]])
    expected = physics.synthesize(np.array([380.0, 115.0, 90.0]), protocol)
    bias = np.exp(0.2 * np.sin(x / 13) * np.cos(y / 17))
    volumes = expected[:, None, None, None] * water * bias + rng.normal(0, 0.05, (3, *x.shape)).clip(0)
    volumes[:, brain] = 30.0  # the brain is left out however bright
    signals = scalp_signals(volumes, brain, (1.0, 1.0, 1.0))
    assert signals[1:] / signals[0] == pytest.approx(expected[1:] / expected[0], rel=0.005)
    assert scalp_signals(volumes * ~fat, brain, (1.0, 1.0, 1.0)) is None  # no scalp in the field of view


def _scalp_fat_case(values: float, noise: float = 0.1):
    """``_refinement_case`` of scalp fat, an air gap, then WM, GM and CSF (slabs of 3, 4, 5, 4, 4) at ``values``
    of each of their ranges (0: lowest, 1: highest, 0.5: the middle), inside a brain mask that leaves the fat and
    the air out (the fat lies 5-7 mm beyond it)."""
    from scripts.phantom import TISSUE_RANGES

    tissues = [[lo + values * (hi - lo) for lo, hi in TISSUE_RANGES[t]] for t in (3, 2, 1)]
    fat, air = (380.0, 115.0, 90.0), (1000.0, 100.0, 0.0)
    data, truth = _refinement_case(values=[fat, air, *tissues], slabs=(3, 4, 5, 4, 4), noise=noise)
    data["brain_mask"] = torch.zeros(1, 20, 10, 10)
    data["brain_mask"][:, 7:] = 1
    return data, truth


def _ranges_without_the_case_flair_ti() -> dict:
    """The training ranges with FLAIR's TI range below ``_refinement_case``'s 2500 ms: its protocol out of range."""
    ranges = {s: dict(r) for s, r in physics.PROTOCOL_RANGES.items()}
    ranges["FLAIR"]["TI"] = (1500.0, 2000.0)
    return ranges


def test_scalp_fat_pins_gains_the_brain_tissues_leave_open():
    """WM, GM and CSF at the top of their ranges under a network whose T2w gain is 12 % high and FLAIR gain 8 % low,
    with scalp fat beyond an air gap: the brain's tissues alone put the prior's middle guess on WM (T1 several % low,
    in a span over 10 % wide); held with the fat WM's T1 comes back within 2 % and the span narrows, also under a
    protocol outside the training ranges, where the brain's tissues alone do not calibrate."""
    data, truth = _scalp_fat_case(values=1)
    protocol = physics.normalize_parameters(data["params"].numpy(), inverse=True)
    images = np.stack([data[f"{s}_grid"][0].numpy().reshape(-1) for s in physics.SERIES]).astype(np.float64)
    wrong = np.array([20.0, 15.0 * 1.12, 30.0 * 0.92])
    data["pred"] = torch.from_numpy(physics.fit_maps(images, protocol, wrong).reshape(truth.shape).astype(np.float32))
    wm = np.zeros(truth.shape[1:], dtype=bool)
    wm[7:12] = True

    def wm_t1_bias(out):
        return 100 * (out["pred"][0].numpy()[wm].mean() / truth[0][wm].mean() - 1)

    brain_only = PhysicsRefined(calibrate=True)(data)
    with_fat = PhysicsRefined(calibrate=True, scalp_fat=True)(data)
    low, high = brain_only["refinement"]["calibration_span_pct"]["T1"]["WM"]
    assert wm_t1_bias(brain_only) < -4 and high - low > 10
    assert brain_only["refinement"]["calibration_references"] == ["WM", "GM", "CSF"]
    assert with_fat["refinement"]["calibration_references"] == ["WM", "GM", "CSF", "scalp fat"]
    assert abs(wm_t1_bias(with_fat)) < 2
    low_fat, high_fat = with_fat["refinement"]["calibration_span_pct"]["T1"]["WM"]
    assert high_fat - low_fat < (high - low) / 5  # -9.4..+5.5 % without the fat, -0.6..+0.6 % with it
    # under a protocol outside the training ranges the fat still calibrates
    ranges = _ranges_without_the_case_flair_ti()
    outside = PhysicsRefined(calibrate=True, scalp_fat=True, ranges=ranges)(data)
    assert outside["refinement"]["calibration_references"] == ["WM", "GM", "CSF", "scalp fat"]
    assert outside["refinement"]["gains_per_pu"] == with_fat["refinement"]["gains_per_pu"]
    assert abs(wm_t1_bias(outside)) < 2
    # fat that no gains reconcile with the brain (T1 1000 ms: not fat) leaves the brain's tissues to calibrate alone
    data["T1w_grid"][:, :3] *= 0.6
    unlike = PhysicsRefined(calibrate=True, scalp_fat=True)(data)
    assert unlike["refinement"]["calibration_references"] == ["WM", "GM", "CSF"]
    assert "together" in unlike["refinement"]["calibration_fat_note"]
    assert unlike["refinement"]["gains_per_pu"] == pytest.approx(brain_only["refinement"]["gains_per_pu"])
    # ... but not outside the training ranges, where the brain's samples are the least reliable: the network's gains
    unheld = PhysicsRefined(calibrate=True, scalp_fat=True, ranges=ranges)(data)
    assert unheld["refinement"]["calibration"] is None and "no scalp fat" in unheld["refinement"]["calibration_note"]
    assert unheld["refinement"]["gains_per_pu"] == pytest.approx(PhysicsRefined()(data)["refinement"]["gains_per_pu"])


def test_out_of_range_refinement_keeps_the_network_t2_contrast_and_its_own_prior_width():
    """A network whose WM T2 reads 8 % high and GM T2 8 % low (no gains explain both), at WM SNR 14-28: in range
    the level correction takes the WM/GM T2 contrast back to the images' (within 3 %); under a protocol outside the
    training ranges T2 is not level-corrected and, held by the out-of-range prior width, keeps the network's
    contrast (within 2 %), while the calibration still runs on the fat."""
    data, truth = _scalp_fat_case(values=0.5, noise=20.0)
    data["pred"][1, 7:12] *= 1.08
    data["pred"][1, 12:16] /= 1.08
    wm, gm = (np.arange(20) >= 7) & (np.arange(20) < 12), (np.arange(20) >= 12) & (np.arange(20) < 16)

    def t2_contrast(maps):
        return float(maps[1, wm].mean() / maps[1, gm].mean())

    network, true = t2_contrast(data["pred"].numpy()), t2_contrast(truth)
    refine = PhysicsRefined(calibrate=True, scalp_fat=True, prior_width=(0.1, 0.3, 0.03),
                            out_of_range_prior_width=(0.1, 0.01, 0.03))  # fmt: skip
    inside = refine(data)
    refine.ranges = _ranges_without_the_case_flair_ti()
    outside = refine(data)
    assert network / true == pytest.approx(1.08**2, rel=1e-3)
    assert t2_contrast(inside["pred"].numpy()) == pytest.approx(true, rel=0.03)
    assert t2_contrast(outside["pred"].numpy()) == pytest.approx(network, rel=0.02)
    assert inside["refinement"]["prior_width_log"] == [0.1, 0.3, 0.03]
    assert outside["refinement"]["prior_width_log"] == [0.1, 0.01, 0.03]
    assert outside["refinement"]["calibration_references"] == ["WM", "GM", "CSF", "scalp fat"]
    assert outside["refinement"]["calibration_note"] == "protocol outside the training ranges: T2 not level-corrected"
    assert "calibration_note" not in inside["refinement"]


def test_fat_held_calibration_widens_the_brain_ranges_for_a_tissue_past_their_edge():
    """Exact signals of a head whose WM T1 lies 4 % above the prior's range (true values can sit at its edge, and the
    network's T1 percentiles sample WM a few % off): no gains explain WM, GM, CSF and the scalp's fat inside their
    ranges together; 2.5 % wider brain ranges do not either, 5 % do, and their guess puts WM T1 within 1 % and the
    gain ratios within 3 %, where the brain's tissues alone read the T2w gain 8 % high."""
    from scripts import calibration
    from scripts.phantom import TISSUE_RANGES

    values = {t: np.array([np.mean(r) for r in TISSUE_RANGES[t]]) for t in (1, 2, 6)}
    values[3] = np.array([1.04 * TISSUE_RANGES[3][0][1], 85.0, 70.0])
    params = np.array([[550.0, 10.0, 0.0], [5000.0, 100.0, 0.0], [9000.0, 120.0, 2500.0]])
    signals = {t: physics.synthesize(v, params) for t, v in values.items()}
    assert calibration.plausible_explanations(signals, params, (2, 3, 1, 6)) is None
    assert calibration.plausible_explanations(signals, params, (2, 3, 1, 6), widening=0.025) is None
    explained, widening = calibration.fat_held_explanations(signals, params)
    assert widening == 0.05
    factors = calibration.prior_gain_factors(explained)
    assert factors[1:] / factors[0] == pytest.approx([1.0, 1.0], abs=0.03)
    assert calibration.tissue_value_span(explained)[0][0, 0] == pytest.approx(values[3][0], rel=0.01)
    brain_only = calibration.prior_gain_factors(calibration.plausible_explanations(signals, params))
    assert brain_only[1] / brain_only[0] > 1.07
    # fat no widening reconciles with the brain: the largest widening tried comes back with nothing
    signals[6] = physics.synthesize(np.array([1000.0, 100.0, 90.0]), params)
    assert calibration.fat_held_explanations(signals, params) == (None, calibration.BRAIN_WIDENING[-1])


def test_a_rim_beyond_the_brain_mask_is_fitted_without_moving_the_calibration():
    """Three slabs of scalp fat (T1 380 ms, below WM's) outside the brain mask, under a network that got the T2w and
    FLAIR gains wrong: refined on the grown mask with the brain mask as ``brain_key``, the brain's maps and gains are
    exactly those of the brain alone and the fat is fitted to its values, also with T2w and FLAIR acquired on slabs
    of their own (the partial-volume model reacquires the brain's edge against the rim's measured signal); let into
    the calibration, the fat takes the low-T1 percentiles that sample WM and the gains come out wrong."""
    from scripts.phantom import TISSUE_RANGES

    fat = (380.0, 110.0, 90.0)
    middles = [[np.mean(r) for r in TISSUE_RANGES[t]] for t in (3, 2, 1)]
    data, truth = _refinement_case(values=[fat, *middles], slabs=(3, 5, 8, 4))
    protocol = physics.normalize_parameters(data["params"].numpy(), inverse=True)
    images = np.stack([data[f"{s}_grid"][0].numpy().reshape(-1) for s in physics.SERIES]).astype(np.float64)
    wrong = np.array([20.0, 15.0 * 1.12, 30.0 * 0.92])
    data["pred"] = torch.from_numpy(physics.fit_maps(images, protocol, wrong).reshape(truth.shape).astype(np.float32))
    brain = torch.ones(1, 20, 10, 10)
    brain[:, :3] = 0
    data.update(brain_mask=brain, maps_mask=torch.ones(1, 20, 10, 10))
    grown = PhysicsRefined(mask_key="maps_mask", brain_key="brain_mask", calibrate=True)(data)
    alone = PhysicsRefined(mask_key="brain_mask", calibrate=True)(data)
    mixed = PhysicsRefined(mask_key="maps_mask", calibrate=True)(data)
    inside = brain[0] > 0
    assert torch.allclose(grown["pred"][:, inside], alone["pred"][:, inside], rtol=1e-6)
    assert grown["refinement"]["gains_per_pu"] == pytest.approx(alone["refinement"]["gains_per_pu"], rel=1e-9)
    assert grown["refinement"]["gains_per_pu"] == pytest.approx([20.0, 15.0, 30.0], rel=0.03)
    assert torch.all(alone["pred"][:, ~inside] == data["pred"][:, ~inside])  # outside its mask: not refined

    def rim_error(maps):  # the fat's largest error over the maps
        return np.abs(maps[:, ~inside].numpy() / np.array(fat)[:, None] - 1).max()

    assert rim_error(data["pred"]) > 0.15 and rim_error(grown["pred"]) < 0.06  # the gains' 3 % make the rest
    assert mixed["refinement"]["gains_per_pu"] != pytest.approx([20.0, 15.0, 30.0], rel=0.03)
    # the partial-volume correction reacquires the brain against its measured rim, not the network's signal there
    shifted = torch.eye(4, dtype=torch.float64)
    shifted[0, 3] = 0.5
    for s in ("T2w", "FLAIR"):
        data[f"{s}_acquired"] = MetaTensor(torch.zeros(1, 20, 10, 10), affine=shifted, meta={"slice_thickness": 1.0})
    grown, alone = (
        PhysicsRefined(mask_key=k, brain_key="brain_mask", calibrate=True, partial_volume=True)(data)
        for k in ("maps_mask", "brain_mask")
    )
    assert grown["refinement"]["partial_volume_pct"]["T2w"] > 0.1
    assert torch.allclose(grown["pred"][:, inside], alone["pred"][:, inside], rtol=1e-6)


def test_grow_mask_adds_face_neighbours_per_voxel_of_margin_and_says_so():
    mask = MetaTensor(torch.zeros(1, 7, 7, 7), affine=torch.diag(torch.tensor([2.0, 2.0, 5.0, 1.0])))
    mask[0, 3, 3, 3] = 1
    data = {"brain_mask": mask, "mask_info": "deepbet"}
    one, two = (GrowMaskd("brain_mask", "maps_mask", margin)(data) for margin in (1, 2))
    assert int(one["maps_mask"].sum()) == 7 and int(two["maps_mask"].sum()) == 25  # an octahedron of radius 1, 2
    assert torch.equal(one["brain_mask"], mask) and torch.equal(one["maps_mask"].affine, mask.affine)
    assert one["mask_info"] == "deepbet; maps delivered on it grown by 1 voxel (6 voxels more)"
    assert torch.equal(GrowMaskd("brain_mask", "maps_mask", 0)(data)["maps_mask"], mask)
    with pytest.raises(ValueError, match="margin"):
        GrowMaskd("brain_mask", "maps_mask", -1)


def test_mask_jitter_normalises_inside_a_grown_or_shrunk_mask_and_keeps_the_true_one():
    mask = torch.zeros(1, 12, 12, 12)
    mask[:, 3:9, 3:9, 3:9] = 1  # 216 voxels; one voxel of dilation (6-connected) gives 216 + 6*36 = 432
    seen = []

    def record(d):
        seen.append(int(d["mask"].sum()))
        return d

    jitter = RandMaskJitterd(record, max_radius=1, prob=1.0)
    sizes = set()
    for seed in range(8):
        jitter.set_random_state(seed)
        out = jitter({"mask": mask, "x": torch.ones(1, 12, 12, 12)})
        assert torch.equal(out["mask"], mask)  # the loss and targets keep the true mask
        sizes.add(seen[-1])
    assert sizes == {64, 432}  # eroded to 4^3 or dilated by one voxel, both directions drawn
    RandMaskJitterd(record, prob=0.0)({"mask": mask})
    assert seen[-1] == 216


def test_slice_profile_box_weights():
    assert RandSliceProfiled.profile(0.7).tolist() == [1.0]
    assert np.allclose(RandSliceProfiled.profile(5 / 3), [0.2, 0.6, 0.2])  # 5 mm slice over 3 mm voxels
    assert np.allclose(RandSliceProfiled.profile(3.0), [1 / 3] * 3)


def test_interpolated_profile_reads_two_slices_of_the_series_own_grid():
    """Slices 2 voxels thick every 2.5, one centred 1 voxel on: 0.6 of it ([0, 2]: 1/4, 1/2, 1/4 over voxels
    0..2) and 0.4 of the one before ([-2.5, -0.5]: voxels -2 and -1 half each)."""
    weights = RandSliceProfiled.interpolated_profile(2.0, 2.5, 1.0)
    assert np.allclose(weights, [0.2, 0.2, 0.15, 0.3, 0.15])
    on_a_slice = RandSliceProfiled.interpolated_profile(2.0, 2.5, 0.0)
    assert np.allclose(on_a_slice, [0, 0, 0.25, 0.5, 0.25, 0, 0])
    assert np.allclose(RandSliceProfiled.profile(1.0, centre=0.5), [0.0, 0.5, 0.5])


def test_series_off_the_reference_grid_get_slices_of_their_own():
    """With a reference series, the maps and the reference take its centred profile and every other series
    its own slices read by interpolation: an impulse comes back as each one's own weights."""
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    impulse = np.zeros((1, 1, 1, 15), np.float32)
    impulse[..., 7] = 1.0
    maps = {
        k: MetaTensor(torch.full((1, 1, 1, 15), v), affine=affine) for k, v in zip(physics.MAPS, (900.0, 80.0, 70.0))
    }
    d = {**maps, **{k: MetaTensor(torch.from_numpy(impulse), affine=affine) for k in physics.SERIES}}
    t = RandSliceProfiled(physics.SERIES, thickness_range=(4.0, 6.0), prob=1.0, reference_key="T1w")
    t.set_random_state(3)
    out = t(d)
    assert set(t.own_slices) == {"T2w", "FLAIR"}
    reference = RandSliceProfiled.profile(t.thickness / 2.0)
    n = len(reference) // 2
    assert np.allclose(out["T1w"][0, 0, 0, 7 - n : 8 + n].numpy()[::-1], reference)  # centred, symmetric
    for key, (thickness, spacing, offset) in t.own_slices.items():
        weights = RandSliceProfiled.interpolated_profile(thickness / 2, spacing / 2, offset / 2)
        m = len(weights) // 2
        # voxel i reads the impulse at 7 with the weight for offset 7 - i
        assert np.allclose(out[key][0, 0, 0, 7 - m : 8 + m].numpy()[::-1], weights, atol=1e-6)
        assert not np.allclose(out[key].numpy(), out["T1w"].numpy())
    assert np.allclose(out["T1"][0, 0, 0, 7].item(), 900.0)  # uniform maps stay uniform
    with pytest.raises(ValueError, match="reference_key"):
        RandSliceProfiled(physics.SERIES, reference_key="PDw")


def test_thick_slices_mix_signals_and_water_weighted_rates():
    """A 6 mm slice over a WM/CSF boundary of 3 mm voxels: the image is the mean of the two tissues'
    signals (not the signal of the mixed maps), the maps mix as water-weighted rates."""
    wm, csf = (800.0, 80.0, 70.0), (4000.0, 2000.0, 100.0)
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    maps = np.zeros((3, 1, 1, 1, 6), np.float32)
    for c in range(3):
        maps[c, ..., 1:3], maps[c, ..., 3:5] = wm[c], csf[c]
    d = {k: MetaTensor(torch.from_numpy(maps[c]), affine=affine) for c, k in enumerate(physics.MAPS)}
    tr, te = 2500.0, 90.0
    d["T2w"] = MetaTensor(physics.signal(d["PD"], d["T1"], d["T2"], tr, te), affine=affine)
    t = RandSliceProfiled("T2w", thickness_range=(6.0, 6.0), prob=1.0)
    out = t(d)
    s_wm, s_csf = (physics.signal(v[2], v[0], v[1], tr, te) for v in (wm, csf))
    # voxel 2 sees half of voxel 1 (WM), all of 2 (WM), half of 3 (CSF): weights 1/4, 1/2, 1/4
    assert out["T2w"][0, 0, 0, 2].item() == pytest.approx(0.75 * s_wm + 0.25 * s_csf, rel=1e-5)
    water = 0.75 * wm[2] + 0.25 * csf[2]
    assert out["PD"][0, 0, 0, 2].item() == pytest.approx(water, rel=1e-5)
    for c, name in enumerate(("T1", "T2")):
        rate = 0.75 * wm[2] / wm[c] + 0.25 * csf[2] / csf[c]
        assert out[name][0, 0, 0, 2].item() == pytest.approx(water / rate, rel=1e-5)
    mixed_maps_signal = physics.signal(water, out["T1"][0, 0, 0, 2].item(), out["T2"][0, 0, 0, 2].item(), tr, te)
    assert abs(mixed_maps_signal / out["T2w"][0, 0, 0, 2].item() - 1) > 0.05  # the point of the transform
    assert out["T1"][0, 0, 0, 0].item() == 0.0 and out["T1"][0, 0, 0, 5].item() == 0.0  # background stays 0
    assert out["T2w"][0, 0, 0, 0].item() == pytest.approx(0.25 * s_wm, rel=1e-5)  # signal spills into it
    unchanged = RandSliceProfiled("T2w", thickness_range=(2.0, 2.9), prob=1.0)(d)
    assert torch.equal(torch.as_tensor(unchanged["T1"]), torch.as_tensor(d["T1"]))


def test_water_fraction_reads_bone_in_a_voxel_as_less_water_not_longer_t1():
    """WM voxels with 40 % bone (no signal) under the bundle's prior widths: held to the network's PD, the fit
    explains the missing signal with T1 and T2; with the water fraction PD falls to the water there and T1, T2
    stay the tissue's. Whole voxels keep their maps."""
    data, truth = _refinement_case(noise=5.0)  # WM SNR 50 (T1w) to 30 (FLAIR)
    surface = np.zeros(truth.shape[1:], bool)
    surface[:2] = True  # two WM slabs
    for s in physics.SERIES:
        data[f"{s}_grid"][0][torch.from_numpy(surface)] *= 0.6
    data["pred"] = torch.from_numpy(truth.copy())
    widths = (0.1, 0.3, 0.03)
    held, read = (PhysicsRefined(prior_width=widths, water_fraction=w)(data)["pred"].numpy() for w in (False, True))
    error = {name: np.abs(maps[:, surface] / truth[:, surface] - 1).mean(axis=1) for name, maps in
             (("held", held), ("read", read))}  # fmt: skip
    assert error["held"][0] > 0.2 and error["held"][2] < 0.7 * 0.45  # T1 off, PD hardly lowered
    np.testing.assert_array_less(error["read"][:2], 0.02)
    assert read[2, surface].mean() == pytest.approx(0.6 * truth[2, surface].mean(), rel=0.03)
    np.testing.assert_allclose(read[:, ~surface], held[:, ~surface], rtol=0.01)


def test_smoothing_the_moves_averages_the_fits_noise_and_keeps_the_priors_edges():
    """WM / GM / CSF slabs at WM SNR 30-50 under the bundle's prior widths, the network's maps right: each voxel's
    fit moves by the images' noise; averaged over 1 mm the moves shrink, while the WM/GM step, which the
    prior holds, stays as sharp as the truth's. A map given no width is left as fitted."""
    data, truth = _refinement_case(noise=5.0)
    data["pred"] = torch.from_numpy(truth.copy())
    widths = (0.1, 0.3, 0.03)
    raw, smooth, some = (PhysicsRefined(prior_width=widths, smoothing_mm=mm)(data)
                         for mm in ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1.0, 0.0, 1.0)))  # fmt: skip
    assert smooth["refinement"]["smoothing_mm"] == [1.0, 1.0, 1.0]
    tissue = truth[0] < 2000
    error = {name: np.abs(out["pred"].numpy()[:, tissue] / truth[:, tissue] - 1).mean(axis=1)
             for name, out in (("raw", raw), ("smooth", smooth))}  # fmt: skip
    assert error["raw"][0] > 0.01  # measured 1.3 % T1, 0.8 % T2, 0.9 % PD; smoothed 0.2 % each
    np.testing.assert_array_less(error["smooth"], 0.4 * error["raw"])
    for slab in (7, 8):  # the last WM and the first GM slab, beside the step
        np.testing.assert_allclose(smooth["pred"].numpy()[:, slab].mean(axis=(1, 2)), truth[:, slab, 0, 0], rtol=0.01)
    assert torch.equal(some["pred"][1], raw["pred"][1]) and torch.equal(some["pred"][0], smooth["pred"][0])
    # a move common to every voxel stays exactly that at the mask's edge: only voxels inside are averaged
    inside = np.zeros((6, 6, 3), bool)
    inside[1:5, 1:4] = True
    prior = np.full((3, inside.sum()), 100.0)
    sigma = np.ones((3, 3))
    np.testing.assert_allclose(smoothed_moves(1.1 * prior, prior, inside, sigma), 1.1 * prior)
    # every voxel fitted at the T1 ceiling, one from a far lower prior: its large move, averaged into its
    # neighbours' small ones, would take them past the ceiling (to 5425 ms before the clip)
    prior[0] = 4500.0
    prior[0, 0] = 2000.0
    fitted = prior.copy()
    fitted[0] = physics.FIT_BOUNDS["T1"][1]
    smoothed = smoothed_moves(fitted, prior, inside, sigma)
    assert smoothed[0].max() == physics.FIT_BOUNDS["T1"][1] and smoothed[0, 0] < 4000.0
