"""Physics QA: per-series thresholds, and slices judged against their neighbours, on residuals of known size."""

import numpy as np
import pytest
from scripts.qa import MIN_SLICE_BRAIN, SERIES_THRESHOLDS, physics_qa

SERIES = ("T1w", "T2w", "FLAIR")
SLICES = 12


LEVELS = (0.04, 0.10, 0.12)


def study(levels=LEVELS):
    """Unit images in a brain of slices 1-10 (0-based), residuals of +-level per series growing 3-fold towards
    its ends as the model's systematic error does (2.11 x level on average): each slice's residual is at most
    1.08 times its neighbours' mean."""
    mask = np.zeros((8, 8, SLICES), bool)
    mask[2:6, 2:6, 1:11] = True
    trend = 1 + 2 * np.abs(np.arange(SLICES) - 5.5) / 4.5
    signs = np.where(np.random.default_rng(0).random((3, 8, 8, SLICES)) < 0.5, -1.0, 1.0)
    residuals = signs * np.asarray(levels)[:, None, None, None] * trend
    images = np.ones((3, 8, 8, SLICES))
    return residuals, images, mask, trend


def test_smooth_residual_passes_and_the_worst_slice_is_named():
    residuals, images, mask, trend = study()
    qa = physics_qa(residuals, images, mask, SERIES)
    assert qa["warnings"] == []
    for name, level in zip(SERIES, LEVELS, strict=True):
        entry = qa["series"][name]
        assert entry["relative_mean_abs_residual"] == pytest.approx(level * trend[1:11].mean())
        assert entry["threshold"] == SERIES_THRESHOLDS[name]
        # an end slice of the brain stands in for its neighbour without brain: 3 / ((3 + 2.56) / 2)
        assert entry["worst_slice"]["ratio_to_neighbours"] == pytest.approx(1.08, abs=0.005)
        assert entry["worst_slice"]["slice"] in (2, 11)


def test_a_slice_out_of_line_with_its_neighbours_is_flagged_and_shown():
    residuals, images, mask, trend = study()
    residuals[2, :, :, 6] *= 2  # FLAIR slice 7 (1-based), in the middle of the brain
    qa = physics_qa(residuals, images, mask, SERIES)
    ratio = 2 * trend[6] / ((trend[5] + trend[7]) / 2)
    assert ratio == pytest.approx(1.69, abs=0.005)
    (warning,) = qa["warnings"]
    assert warning.startswith("FLAIR: re-synthesised from the maps, slice(s) 7 (1.69 x) of 12 of the T1w grid")
    assert qa["worst_slice"] == {"series": "FLAIR", "slice": 7, "ratio_to_neighbours": pytest.approx(ratio),
                                 "relative_mean_abs_residual": pytest.approx(2 * LEVELS[2] * trend[6])}  # fmt: skip


def test_series_residual_above_its_own_threshold_warns():
    residuals, images, mask, _ = study(levels=(*LEVELS[:2], 0.2))
    qa = physics_qa(residuals, images, mask, SERIES)
    (warning,) = qa["warnings"]  # FLAIR: 2.11 x 0.2 = 42 % of its signal
    assert warning.startswith("FLAIR: re-synthesised from the maps with its own TR/TE/TI, it differs from the input by")
    assert f"by 42.2 % of its mean brain signal (threshold {100 * SERIES_THRESHOLDS['FLAIR']:.0f} %)" in warning
    # after the physics refinement the residuals are the network's maps'; the warning says so, with the delivered ones'
    (refined,) = physics_qa(residuals, images, mask, SERIES, {"T1w": 3.0, "T2w": 2.0, "FLAIR": 1.5})["warnings"]
    assert refined.startswith("FLAIR: re-synthesised from the network's maps with its own TR/TE/TI")
    assert "the network's maps do not explain this series well (the maps delivered after the physics refinement: " \
           "1.5 % on the T1w grid); check its TR/TE/TI" in refined  # fmt: skip


def test_slices_with_little_brain_are_not_judged():
    residuals, images, mask, _ = study()
    mask[2:6, 2:6, 1] = False
    mask[2, 2, 1] = True  # one voxel of brain in slice 2: far below MIN_SLICE_BRAIN of the largest slice
    assert 1 / 16 < MIN_SLICE_BRAIN
    residuals[0, :, :, 1] *= 10
    qa = physics_qa(residuals, images, mask, SERIES)
    assert qa["warnings"] == [] and qa["series"]["T1w"]["worst_slice"]["slice"] != 2
