"""Partial volume across series geometries: how a 2D multi-slice series sees signals held on another grid.

The physics refinement fits each voxel of the T1w grid to the three images there, but T2w and FLAIR were acquired
on grids of their own (other slice positions, thickness and gaps, matrix, a few degrees of tilt) and resampled
onto it: each of their values mixes the *signals* of a slab that straddles T1w slices, where the T1w grid's maps
mix tissue *values*. Fitted as if acquired on the T1w grid, WM next to GM and CSF reads long T2 and high PD, and
every tissue's level moves with its neighbours'. The forward model here: a series' value is the mean of the
signal over its slice profile (``SLICE_PROFILE``), the signal on the T1w grid being constant across each T1w
slab (a slab's value is what that slice averaged) and linear in-plane; then the series is resampled back onto the
T1w grid as the pipeline resamples it (bilinear).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ResampleToMatch
from scipy import ndimage

SLICE_PROFILE = np.linspace(-3, 3, 7) / 7  # sample offsets across a slice, in units of its thickness
#: Prior share of voxels that hold tissue giving no signal (``water_fraction``): the brain's surface on 4-5 mm slices.
PARTIAL_SHARE = 0.05


def slab_means(
    volume: np.ndarray,
    affine: np.ndarray,
    grid_affine: np.ndarray,
    grid_shape: tuple[int, int, int],
    thickness: float,
    order: int = 1,
    constant_axis: int | None = None,
) -> np.ndarray:
    """``volume`` (voxel-to-world ``affine``) as a series on another grid (``grid_affine``, ``grid_shape``,
    slices along its third axis) acquires it: the mean over each voxel's slice profile, ``thickness`` mm wide.
    ``order`` 0 takes the value at the voxel's centre (labels); ``constant_axis`` is an axis along which
    ``volume`` is constant voxel by voxel (a multi-slice grid's slice axis) instead of linear."""
    to_volume = np.linalg.inv(affine) @ grid_affine
    index = np.indices(grid_shape, dtype=np.float32).reshape(3, -1)
    normal = to_volume[:3, 2] / np.linalg.norm(grid_affine[:3, 2]) * thickness
    centres = to_volume[:3, :3] @ index + to_volume[:3, 3:4]
    offsets = SLICE_PROFILE if order else [0.0]
    total = np.zeros(index.shape[1], dtype=np.float32)
    for t in offsets:
        at = centres + t * normal[:, None]
        if constant_axis is not None:
            at[constant_axis] = np.round(at[constant_axis])
        total += ndimage.map_coordinates(volume, at, order=order, mode="constant")
    return (total / len(offsets)).reshape(grid_shape)


def reacquired(volume: np.ndarray, affine: np.ndarray, series: MetaTensor) -> np.ndarray:
    """``volume`` on a grid (``affine``; constant across its coarsest axis' voxels, a multi-slice grid's slabs) as
    ``series`` (its own grid, ``slice_thickness`` in its meta, else its slice spacing) acquires it, resampled back
    onto that grid."""
    series_affine = np.asarray(series.affine, dtype=np.float64)
    thickness = float(series.meta.get("slice_thickness") or 0.0) or float(np.linalg.norm(series_affine[:3, 2]))
    grid_shape = tuple(series.shape[1:])
    slab_axis = int(np.argmax(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)))
    acquired = slab_means(volume.astype(np.float32), affine, series_affine, grid_shape, thickness, 1, slab_axis)
    back = ResampleToMatch(mode="bilinear", padding_mode="zeros")(
        MetaTensor(torch.from_numpy(acquired)[None], affine=torch.as_tensor(series_affine)),
        MetaTensor(torch.zeros((1, *volume.shape)), affine=torch.as_tensor(affine, dtype=torch.float64)),
    )
    return back[0].numpy()


def corrected_images(
    images: np.ndarray, predicted: np.ndarray, inside: np.ndarray, affine: np.ndarray, acquired: list
) -> np.ndarray:
    """The series' volumes on one grid (``images``, (S, X, Y, Z), resampled there from ``acquired``, the series
    as acquired, or None for one acquired on this grid) at the voxels ``inside``, each moved by what its own
    acquisition does to ``predicted`` ((S, N) signals there, e.g. re-synthesised maps; the images elsewhere):
    ``image + predicted - reacquired(predicted)``. The fit then sees each series as if acquired on this grid.
    Returns (S, N)."""
    out = images[:, inside].astype(np.float64)
    for s, series in enumerate(acquired):
        if series is None or _same_grid(series, affine, images.shape[1:]):
            continue
        full = images[s].astype(np.float64)
        full[inside] = predicted[s]
        out[s] += (full - reacquired(full, affine, series))[inside]
    return out


def water_fraction(images: np.ndarray, predicted: np.ndarray, sample: np.ndarray | None = None) -> np.ndarray:
    """Fraction (0.05-1) of ``predicted`` ((S, N) signals of tissue maps, e.g. the network's re-synthesised) that
    ``images`` ((S, N), same units) hold in every series at once.

    Tissue that gives no signal lowers every series by the same factor, so a voxel's deficit is at most that of
    the series least short of its prediction: c = the largest ratio image / predicted (a map error, e.g. too long
    a T2, lowers some series only, and one series at its prediction rules a deficit out), relative to its median
    over the ``sample`` voxels (default all). The voxel is whole tissue (c = 1 up to the robust spread of c there:
    noise and the maps' own error) or a fraction (uniform in 0-1, prior share ``PARTIAL_SHARE``); the fraction
    returned is the posterior mean, 1 - P(fraction | c) (1 - c): a deficit within the spread is left alone, a
    clear one is kept whole, an excess (fat beside the brain) stays 1."""
    largest = np.max(images / np.maximum(predicted, 1e-12), axis=0)
    tissue = largest if sample is None else largest[sample]
    centre = np.median(tissue)  # whole tissue's level of the largest of three noisy ratios (above 1)
    scale = max(1.4826 * np.median(np.abs(tissue - centre)) / centre, 1e-3)
    common = np.clip(largest / centre, 0.05, 1.0)
    whole = (1.0 - PARTIAL_SHARE) * np.exp(-0.5 * ((common - 1.0) / scale) ** 2) / (scale * np.sqrt(2 * np.pi))
    partial = PARTIAL_SHARE / (PARTIAL_SHARE + whole)
    return 1.0 - partial * (1.0 - common)


def _same_grid(series: MetaTensor, affine: np.ndarray, shape: tuple[int, ...]) -> bool:
    return tuple(series.shape[1:]) == tuple(shape) and np.allclose(np.asarray(series.affine), affine, atol=1e-3)
