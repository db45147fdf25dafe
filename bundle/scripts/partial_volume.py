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


def _same_grid(series: MetaTensor, affine: np.ndarray, shape: tuple[int, ...]) -> bool:
    return tuple(series.shape[1:]) == tuple(shape) and np.allclose(np.asarray(series.affine), affine, atol=1e-3)
