"""Partial volume across series geometries: a series acquired on its own slices, fitted on the T1w grid."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scripts import physics
from scripts.partial_volume import corrected_images, reacquired, slab_means, water_fraction

PHILIPS = np.array([[229.69, 2.3, 0.0], [2364.65, 90.0, 0.0], [7000.0, 120.0, 2250.0]])
GRID = np.diag([1.0, 1.0, 5.0, 1.0])  # 1 x 1 mm in-plane, 5 mm slices
SHAPE = (12, 12, 12)


def _series(shift_mm: float, thickness: float) -> MetaTensor:
    """A series on 5 mm slices shifted ``shift_mm`` along the slice axis: each slice straddles two T1w slices."""
    affine = GRID.copy()
    affine[2, 3] = shift_mm
    return MetaTensor(torch.zeros((1, *SHAPE)), affine=torch.as_tensor(affine), meta={"slice_thickness": thickness})


def _layers() -> np.ndarray:
    """(T1, T2, PD) maps on the T1w grid: WM below slice 6, CSF above, constant across each slab."""
    maps = np.empty((3, *SHAPE))
    maps[:, :, :, :6] = np.array([800.0, 75.0, 70.0])[:, None, None, None]
    maps[:, :, :, 6:] = np.array([4000.0, 2000.0, 100.0])[:, None, None, None]
    return maps


def test_slab_mean_of_a_ramp_is_its_centre_value():
    ramp = np.broadcast_to(np.arange(12.0), SHAPE).copy()  # linear along the T1w grid's slice axis
    acquired = slab_means(ramp, GRID, _series(2.5, 5.0).affine.numpy(), SHAPE, 5.0)
    np.testing.assert_allclose(acquired[4:8, 4:8, 2:10], ramp[4:8, 4:8, 2:10] + 0.5, atol=1e-5)  # 2.5 mm = 0.5 slice
    # constant across each T1w slab: a slab straddling slices 5 and 6 halfway takes 3/7 and 4/7 of their values
    stepped = slab_means(ramp, GRID, _series(2.5, 5.0).affine.numpy(), SHAPE, 5.0, constant_axis=2)
    assert stepped[6, 6, 5] == np.float32((3 * 5 + 4 * 6) / 7)


def test_correction_removes_the_mixing_of_signals_across_slabs():
    """T2w and FLAIR acquired half a slice off the T1w grid mix WM and CSF signals at the boundary; the fit of
    the raw images reads the WM slab next to CSF far off, the corrected images give it back."""
    truth = _layers()
    inside = np.ones(SHAPE, dtype=bool)
    signals = physics.synthesize(truth.reshape(3, -1), PHILIPS).reshape(3, *SHAPE)
    series = [None, _series(2.5, 5.0), _series(-2.0, 4.0)]
    images = np.stack([signals[0], *(reacquired(signals[s], GRID, series[s]) for s in (1, 2))])
    boundary = (slice(3, 9), slice(3, 9), 5)  # the WM slab under the CSF
    raw = physics.fit_maps(images[:, inside], PHILIPS, np.ones(3)).reshape(3, *SHAPE)
    assert abs(raw[1][boundary].mean() / 75.0 - 1) > 0.1  # WM T2 read from signals mixed with CSF: -14 %
    # the move is exact where the predicted signals are right, and scales with their error elsewhere
    exact = corrected_images(images, signals[:, inside], inside, GRID, series)
    fitted = physics.fit_maps(exact, PHILIPS, np.ones(3)).reshape(3, *SHAPE)
    np.testing.assert_allclose(fitted[:, 3:9, 3:9, 1:11], truth[:, 3:9, 3:9, 1:11], rtol=1e-3)
    off = corrected_images(images, 1.1 * signals[:, inside], inside, GRID, series)
    raw_error = np.abs(images[:, inside] - signals[:, inside]).max(axis=1)
    np.testing.assert_allclose(np.abs(off - signals[:, inside]).max(axis=1), 0.1 * raw_error, rtol=1e-3, atol=1e-6)


def test_a_series_on_the_t1w_grid_is_left_as_it_is():
    images = np.random.default_rng(0).uniform(1, 2, (3, *SHAPE))
    inside = np.zeros(SHAPE, dtype=bool)
    inside[2:10, 2:10, 2:10] = True
    same = MetaTensor(torch.zeros((1, *SHAPE)), affine=torch.as_tensor(GRID), meta={"slice_thickness": 5.0})
    out = corrected_images(images, np.zeros((3, inside.sum())), inside, GRID, [None, same, same])
    np.testing.assert_array_equal(out, images[:, inside])


def test_the_slabs_are_along_the_coarsest_axis_of_the_grid():
    """A grid stored with its 5 mm slices along the first axis (e.g. sagittal NIfTI), a step from 0 to 1 between
    its slices 5 and 6, a series of 5 mm slices 2.4 mm off: the series' slab over the step holds 3 of 7 profile
    samples in slice 6 (constant across slabs; linear it would read 0.5), and resampling back mixes neighbours."""
    grid = np.diag([5.0, 1.0, 1.0, 1.0])
    series_affine = np.array([[0.0, 0.0, 5.0, 2.4], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0, 0, 0, 1.0]])
    series = MetaTensor(torch.zeros((1, *SHAPE)), affine=torch.as_tensor(series_affine), meta={"slice_thickness": 5.0})
    step = np.zeros(SHAPE)
    step[6:] = 1.0
    back = reacquired(step, grid, series)[:, 6, 6]
    np.testing.assert_allclose(back[5], 0.52 * 3 / 7, atol=1e-5)  # x = 25 mm: 0.52 of the slab at 27.4 mm
    np.testing.assert_allclose(back[6], 0.48 * 3 / 7 + 0.52, atol=1e-5)  # x = 30 mm: between 27.4 and 32.4 mm


def test_water_fraction_reads_only_a_deficit_common_to_every_series():
    """Tissue that gives no signal (bone) lowers every series alike: 40 % of it reads 0.6, noise and a map error
    that lowers one series (too long a T2) read whole, and so does an excess (fat)."""
    rng = np.random.default_rng(0)
    maps = np.repeat(np.array([[800.0, 75.0, 70.0], [1400.0, 100.0, 82.0]]), 500, axis=0).T
    predicted = physics.synthesize(maps, PHILIPS)
    images = predicted * rng.normal(1.0, 0.03, predicted.shape)
    images[:, :100] *= 0.6  # bone in every series
    images[1, 100:200] *= 0.6  # T2w only
    images[:, 200:300] *= 1.3  # fat
    fraction = water_fraction(images, predicted)
    assert np.median(fraction[:100]) == pytest.approx(0.6, abs=0.03) and fraction[:100].max() < 0.7
    assert fraction[100:].min() > 0.9 and np.median(fraction[100:]) > 0.99
