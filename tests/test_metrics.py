import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from scipy.ndimage import gaussian_filter
from scripts.metrics import (
    MaskedMapMetric,
    masked_mae,
    masked_mpe,
    masked_psnr,
    masked_ssim,
    normalized_squared_error,
    roi_means,
    split_target_mask,
)
from skimage.metrics import structural_similarity

METRIC_FNS = (masked_psnr, masked_ssim, masked_mae, masked_mpe)


def _smooth(shape, seed, scale):
    """A smooth positive random image (like a map with tissue structure), float64 numpy."""
    noise = np.random.default_rng(seed).random(shape)
    return scale * (0.2 + gaussian_filter(noise, 2.0) + 0.05 * noise)


def _disk_mask(size=32, radius=10):
    yy, xx = np.mgrid[:size, :size] - size / 2
    return torch.from_numpy((yy**2 + xx**2 <= radius**2)[None, None]).float()


def _pair(seed=0, size=32):
    ref = torch.from_numpy(np.stack([_smooth((size, size), seed + c, s) for c, s in enumerate((3000, 200, 80))]))
    pred = ref * torch.from_numpy(1 + 0.1 * (np.random.default_rng(seed + 9).random(ref.shape) - 0.5))
    return pred[None], ref[None]


def test_psnr_hand_computed():
    ref = torch.zeros(1, 2, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    ref[..., 4:12, 4:12] = 5.0
    ref[..., 6, 6] = 10.0  # in-mask maximum
    ref[..., 0, 0] = 50.0  # outside: must not act as max(ref)
    pred = ref + torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    # 10 log10(10^2 / 1^2) = 20 dB and 10 log10(10^2 / 2^2) = 13.979 dB
    torch.testing.assert_close(masked_psnr(pred, ref, mask), torch.tensor([[20.0, 10 * math.log10(25)]]))


def test_mae_mpe_hand_computed():
    mask = torch.tensor([[[1, 1, 1, 1, 1, 0]]]).float()
    ref = torch.tensor([[[2.0, 4.0, 5.0, 10.0, 0.0, 100.0]]])
    pred = torch.tensor([[[3.0, 4.0, 4.0, 10.0, 1.0, 0.0]]])
    # scaled by the in-mask max 10: |errors| = 0.1, 0, 0.1, 0, 0.1 over 5 voxels
    assert masked_mae(pred, ref, mask).item() == pytest.approx(0.06)
    # the zero-reference voxel is left out: (1/2 + 0 + 1/5 + 0) / 4
    assert masked_mpe(pred, ref, mask).item() == pytest.approx(0.175)
    # eps is relative to the reference max: 0.25 leaves out the 2 (0.2 of max), keeping (0 + 1/5 + 0) / 3
    assert masked_mpe(pred, ref, mask, eps=0.25).item() == pytest.approx(0.2 / 3)


def test_nse_hand_computed():
    mask = torch.tensor([[[1, 1, 1, 1, 0]]]).float()
    ref = torch.tensor([[[2.0, 5.0, 10.0, 0.0, 7.0]]])
    pred = torch.tensor([[[3.0, 4.0, 10.0, 3.0, 1.0]]])
    # scaled: 100 * 0.1^2 / 0.2 = 5 %, 100 * 0.1^2 / 0.5 = 2 %; zero reference and outside the mask give 0
    torch.testing.assert_close(normalized_squared_error(pred, ref, mask), torch.tensor([[[5.0, 2.0, 0.0, 0.0, 0.0]]]))


def test_roi_means_hand_computed():
    labels = torch.tensor([[[[0, 1, 1], [2, 2, 3]]]])
    maps = torch.stack([torch.tensor([[9.0, 1, 3], [4, 6, 8]]), torch.tensor([[9.0, 10, 20], [30, 50, 70]])])[None]
    means = roi_means(maps, labels)
    torch.testing.assert_close(means["CSF"], torch.tensor([[2.0, 15.0]]))
    torch.testing.assert_close(means["GM"], torch.tensor([[5.0, 40.0]]))
    torch.testing.assert_close(means["WM"], torch.tensor([[8.0, 70.0]]))
    assert torch.isnan(means["lesion"]).all()
    assert list(roi_means(maps, labels, {3: "white matter"})) == ["white matter"]


@pytest.mark.parametrize("fn", [*METRIC_FNS, normalized_squared_error])
def test_voxels_outside_mask_change_nothing(fn):
    pred, ref = _pair()
    mask = _disk_mask()
    outside = mask.expand_as(ref) == 0
    noisy_pred = torch.where(outside, 1e4 * torch.rand_like(pred), pred)
    noisy_ref = torch.where(outside, 1e4 * torch.rand_like(ref), ref)
    base = fn(pred, ref, mask)
    assert torch.isfinite(base).all()
    torch.testing.assert_close(fn(noisy_pred, noisy_ref, mask), base)


def test_ssim_identical_is_one():
    _, ref = _pair()
    torch.testing.assert_close(masked_ssim(ref, ref, _disk_mask()), torch.ones(1, 3))


def _skimage_ssim(pred, ref, data_range):
    return structural_similarity(
        pred, ref, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range, full=True
    )


@pytest.mark.parametrize("shape", [(40, 36), (20, 18, 16)])
def test_ssim_matches_skimage(shape):
    ref = _smooth(shape, 1, 3000.0)
    pred = ref + 400 * (np.random.default_rng(2).random(shape) - 0.5)  # white noise

    def ours(mask):
        return masked_ssim(*(torch.from_numpy(a)[None, None] for a in (pred, ref, mask))).item()

    # A full mask reaches the image edge; like skimage's mean SSIM we average only the valid windows' centres.
    expected = _skimage_ssim(pred, ref, ref.max())[0]
    assert 0.3 < expected < 0.99  # a non-trivial comparison
    assert ours(np.ones(shape)) == pytest.approx(expected, abs=1e-4)

    # An off-centre mask: skimage's SSIM map of the skull-stripped maps, averaged over the mask inside the valid part.
    mask = np.zeros(shape)
    mask[(slice(2, -4), slice(7, None), *[slice(None)] * (len(shape) - 2))] = 1
    ssim_map = _skimage_ssim(pred * mask, ref * mask, ref[mask > 0].max())[1]
    valid = np.zeros(shape, bool)
    valid[tuple(slice(5, n - 5) for n in shape)] = True
    assert ours(mask) == pytest.approx(ssim_map[valid & (mask > 0)].mean(), abs=1e-4)


def test_empty_mask_and_zero_reference_give_nan():
    pred, ref = _pair()
    pred, ref = pred.repeat(3, 1, 1, 1), ref.repeat(3, 1, 1, 1)
    ref[2] = 0  # no positive reference value in the mask
    mask = _disk_mask().repeat(3, 1, 1, 1)
    mask[1] = 0
    for fn in METRIC_FNS:
        values = fn(pred, ref, mask)
        assert torch.isfinite(values[0]).all(), fn.__name__
        assert torch.isnan(values[1:]).all(), fn.__name__
    assert normalized_squared_error(pred, ref, mask)[1:].eq(0).all()


def test_metric_class_accumulates_and_reduces():
    (p1, r1), (p2, r2), (p3, r3) = (_pair(seed) for seed in (0, 10, 20))
    mask = _disk_mask()
    batches = [(torch.cat([p1, p2]), torch.cat([r1, r2])), (p3, r3)]
    per_sample = torch.cat([masked_psnr(p, r, mask.expand(len(p), -1, -1, -1)) for p, r in batches])  # (3, 3)

    by_map = MaskedMapMetric("psnr", channel=1)
    key = MaskedMapMetric("psnr", channel_reduction="sum")
    for p, r in batches:
        target = torch.cat([r, mask.expand(len(p), -1, -1, -1)], dim=1)
        by_map(p, target)
        key(p, target)
    assert by_map.get_buffer().shape == (3, 1)
    assert by_map.aggregate().item() == pytest.approx(per_sample[:, 1].mean().item(), rel=1e-6)
    # PSNR(T1) + PSNR(T2) + PSNR(PD), each averaged over the samples
    assert key.aggregate().item() == pytest.approx(per_sample.mean(0).sum().item(), rel=1e-6)
    assert 25 < key.aggregate().item() / 3 < 45

    # a sample with an empty mask is NaN and left out of the mean
    skip = MaskedMapMetric("mae", reduction="mean_batch")
    skip(torch.cat([p1, p2]), torch.cat([torch.cat([r1, r2]), torch.cat([mask, 0 * mask])], dim=1))
    torch.testing.assert_close(skip.aggregate(), masked_mae(p1, r1, mask)[0].float())


def test_target_without_mask_channel_uses_every_voxel():
    pred, ref = _pair()
    metric = MaskedMapMetric("ssim", reduction="none")
    torch.testing.assert_close(metric(pred, ref), masked_ssim(pred, ref, torch.ones(1, 1, 32, 32)))
    with pytest.raises(ValueError, match="extra"):
        split_target_mask(pred, torch.cat([ref, ref], dim=1))


def test_ignite_handler_from_bundle_config():
    pred, ref = _pair()
    mask = _disk_mask()
    target = torch.cat([ref, mask], dim=1)[0]
    parser = ConfigParser(
        {
            "handler": {
                "_target_": "IgniteMetricHandler",
                "metric_fn": {
                    "_target_": "scripts.metrics.MaskedMapMetric",
                    "metric": "psnr",
                    "channel_reduction": "sum",
                },
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            }
        }
    )
    # a decollated evaluator output: a list of channel-first sample dicts, two iterations
    engine = Engine(lambda e, b: [{"pred": pred[0] * b, "label": target}])
    parser.get_parsed_content("handler").attach(engine, name="sum_psnr")
    engine.run([1.0, 1.05], max_epochs=1)
    expected = (masked_psnr(pred, ref, mask).sum() + masked_psnr(pred * 1.05, ref, mask).sum()) / 2
    assert engine.state.metrics["sum_psnr"] == pytest.approx(expected.item(), rel=1e-6)
