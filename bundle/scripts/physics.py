"""MR signal physics and the fixed constants shared by training and inference.

Units everywhere outside the network: T1, T2, TR, TE, TI in milliseconds; PD in percent units (p.u.,
free water = 100). The functions here take numpy arrays or torch tensors (and plain floats) alike and
return the type they were given, so the same equation serves data synthesis, inference QA and losses.
"""

from __future__ import annotations

import numpy as np
import torch

#: Order of the weighted input series and of the quantitative maps, everywhere (channels, params rows).
SERIES = ("T1w", "T2w", "FLAIR")
MAPS = ("T1", "T2", "PD")
SEQUENCE_PARAMETERS = ("TR", "TE", "TI")

#: The network sees (TR, TE, TI) divided by these fixed constants (ms), never by batch statistics.
PARAMETER_SCALE = (10000.0, 200.0, 4000.0)
#: Network targets are the maps divided by these fixed constants: T1 ms, T2 ms, PD p.u.
MAP_SCALE = (5000.0, 2500.0, 100.0)
MAP_UNITS = ("ms", "ms", "p.u.")

#: Training ranges (ms) of the sequence parameters per series: the model's declared validity domain.
#: TI = 0 means no inversion (turbo spin echo).
PROTOCOL_RANGES = {
    "T1w": {"TR": (200.0, 1200.0), "TE": (2.0, 30.0), "TI": (0.0, 0.0)},
    "T2w": {"TR": (1500.0, 10000.0), "TE": (50.0, 160.0), "TI": (0.0, 0.0)},
    "FLAIR": {"TR": (5000.0, 12000.0), "TE": (70.0, 160.0), "TI": (1500.0, 3200.0)},
}

# Relaxation times below this (ms) are treated as this: keeps exp(-t/T) finite on background voxels.
_MIN_RELAXATION_MS = 1e-3


def _backend(x):
    return torch if isinstance(x, torch.Tensor) else np


def signal(pd, t1, t2, tr, te, ti=0.0):
    """Magnitude signal of an (inversion-recovery) turbo spin echo, the paper's Eqs. (1)-(2).

    ``S = PD * |1 - 2 exp(-TI/T1) + exp(-TR/T1)| * exp(-TE/T2)``. With ``ti = 0`` (no inversion) this
    is exactly the TSE equation ``S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2)``, so one function serves
    T1w, T2w and FLAIR. Maps and parameters broadcast against each other; voxels with PD = 0 give 0
    and T1, T2 <= 0 are clamped to a tiny positive value, so background never produces NaN.

    Args:
        pd: proton density (p.u.).
        t1, t2: relaxation times (ms).
        tr, te, ti: repetition, echo and inversion time (ms); scalars or arrays broadcastable to the maps.
    """
    xp = _backend(pd)
    if xp is torch:
        t1 = torch.clamp(torch.as_tensor(t1, dtype=pd.dtype, device=pd.device), min=_MIN_RELAXATION_MS)
        t2 = torch.clamp(torch.as_tensor(t2, dtype=pd.dtype, device=pd.device), min=_MIN_RELAXATION_MS)
        tr, te, ti = (torch.as_tensor(v, dtype=pd.dtype, device=pd.device) for v in (tr, te, ti))
    else:
        pd = np.asarray(pd, dtype=np.result_type(pd, np.float32))
        t1 = np.maximum(np.asarray(t1, dtype=pd.dtype), _MIN_RELAXATION_MS)
        t2 = np.maximum(np.asarray(t2, dtype=pd.dtype), _MIN_RELAXATION_MS)
    longitudinal = xp.abs(1.0 - 2.0 * xp.exp(-ti / t1) + xp.exp(-tr / t1))
    return pd * longitudinal * xp.exp(-te / t2)


def null_inversion_time(t1, tr=None):
    """Inversion time (ms) that nulls a tissue of the given T1 (ms); ``T1 ln 2`` when TR >> T1."""
    xp = _backend(t1)
    if tr is None:
        return t1 * np.log(2.0)
    return t1 * (np.log(2.0) - xp.log(1.0 + xp.exp(-tr / t1)))


def normalize_parameters(params, inverse: bool = False):
    """(..., 3) TR/TE/TI in ms -> the network's fixed-scale parameters (or back)."""
    if _backend(params) is np:
        scale = np.asarray(PARAMETER_SCALE)
    else:
        scale = torch.tensor(PARAMETER_SCALE, dtype=params.dtype, device=params.device)
    return params * scale if inverse else params / scale


def scale_maps(maps, inverse: bool = False, channel_dim: int = 0):
    """Maps stacked on ``channel_dim`` in MAPS order: physical units -> network targets (or back)."""
    shape = [1] * maps.ndim
    shape[channel_dim] = len(MAP_SCALE)
    if _backend(maps) is np:
        scale = np.asarray(MAP_SCALE, dtype=maps.dtype).reshape(shape)
    else:
        scale = torch.tensor(MAP_SCALE, dtype=maps.dtype, device=maps.device).reshape(shape)
    return maps * scale if inverse else maps / scale


def protocol_bounds(ranges=None) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) arrays of shape (3, 3): rows in SERIES order, columns TR/TE/TI (ms)."""
    ranges = PROTOCOL_RANGES if ranges is None else ranges
    low = np.array([[ranges[s][p][0] for p in SEQUENCE_PARAMETERS] for s in SERIES], dtype=float)
    high = np.array([[ranges[s][p][1] for p in SEQUENCE_PARAMETERS] for s in SERIES], dtype=float)
    if (low > high).any():
        raise ValueError(f"every range must be (low, high) with low <= high, got {ranges}")
    return low, high


def protocol_violations(params, ranges=None) -> list[str]:
    """Human-readable list of TR/TE/TI values (rows in SERIES order, ms) outside the training ranges."""
    ranges = PROTOCOL_RANGES if ranges is None else ranges
    problems = []
    for series, row in zip(SERIES, np.asarray(params, dtype=float), strict=True):
        for name, value in zip(SEQUENCE_PARAMETERS, row, strict=True):
            low, high = ranges[series][name]
            if not low <= value <= high:
                problems.append(f"{series} {name} = {value:g} ms is outside the training range [{low:g}, {high:g}] ms")
    return problems
