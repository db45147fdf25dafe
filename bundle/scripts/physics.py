"""MR signal physics and the fixed constants shared by training and inference.

Units everywhere outside the network: T1, T2, TR, TE, TI in milliseconds; PD in percent units (p.u.,
free water = 100). The functions here take numpy arrays or torch tensors (and plain floats) alike and
return the type they were given, so the same equation serves data synthesis, inference QA and losses.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
#: Display range of each map (its units) in every figure the bundle draws, so figures compare at a glance.
DISPLAY_WINDOWS = {"T1": (0.0, 4500.0), "T2": (0.0, 300.0), "PD": (0.0, 100.0)}

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


def synthesize(maps, protocol):
    """The three weighted images (``SERIES`` order, stacked first) of (T1, T2, PD) maps stacked in ``MAPS`` order.

    ``maps`` (3, ...) in ms, ms, p.u.; ``protocol`` (3, 3) rows of TR/TE/TI (ms) in ``SERIES`` order.
    """
    t1, t2, pd = maps
    stack = torch.stack if _backend(pd) is torch else np.stack
    return stack([signal(pd, t1, t2, *(float(v) for v in row)) for row in protocol])


def least_squares_gains(synth, images):
    """Per series, the receiver gain ``g`` that fits ``g * synth`` best to ``images`` (both (3, N) voxels): (3,).

    A weighted image is known only up to its gain, so a re-synthesis is compared after this fit."""
    if _backend(synth) is torch:
        return (synth * images).sum(dim=1) / (synth * synth).sum(dim=1).clamp(min=torch.finfo(synth.dtype).tiny)
    return (synth * images).sum(axis=1) / np.maximum((synth * synth).sum(axis=1), np.finfo(synth.dtype).tiny)


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


#: Bounds of the voxel-wise fit: T1 (ms), T2 (ms), PD (p.u.). The ceilings are those of free water at body
#: temperature with a margin (CSF, the slowest-relaxing water in a head: up to 4800 and 2200 ms in the tissue prior,
#: ``phantom.TISSUE_RANGES``), which are also the network's target scales (``MAP_SCALE``). A fit pushed past them
#: explains a gain or a partial volume, not a tissue: with ceilings of 10000 and 5000 ms, CSF whose T2w signal the
#: calibrated gains left above what any T2 explains read T2 up to 5000 ms on eight of the twenty validation heads.
FIT_BOUNDS = {"T1": (50.0, MAP_SCALE[0]), "T2": (5.0, MAP_SCALE[1]), "PD": (0.1, 200.0)}


def fit_maps(
    images, params, gains, prior=None, prior_width=None, noise=None, iterations: int = 30, chunk: int = 20000
) -> np.ndarray:
    """Voxel-wise least-squares fit of (T1, T2, PD) to weighted images with known receiver gains.

    ``images`` (3, N) hold the voxels of the series (``SERIES`` order, scanner units), ``params`` (3, 3)
    their TR/TE/TI (ms), ``gains`` (3,) the scanner units per p.u. of ``signal``. Returns (3, N) maps in
    ``MAPS`` order (ms, ms, p.u.), inside ``FIT_BOUNDS``; Levenberg-Marquardt on (log T1, log T2, log PD).

    Without ``prior`` the fit is a solve (three series, three unknowns per voxel): a grid search over
    (T1, T2) with PD in closed form picks the start, since the equations have several local minima.
    With ``prior`` ((3, N) maps, e.g. a network's) the fit starts there and is a maximum a posteriori
    estimate: residuals divided by ``noise`` ((3,) standard deviation per series in p.u.), plus
    ``(log map - log prior) / prior_width`` ((3,) widths in log units, e.g. 0.1 = 10 %). Where the images
    determine a map poorly (CSF T1 and T2) it stays near the prior; elsewhere the data win.
    """
    y = torch.as_tensor(np.asarray(images, dtype=np.float64) / np.asarray(gains, dtype=np.float64)[:, None])
    protocol = torch.as_tensor(np.asarray(params, dtype=np.float64))
    if prior is not None:
        prior = torch.log(torch.as_tensor(np.asarray(prior, dtype=np.float64)).clamp_min(1e-3))
        weights = (
            torch.as_tensor(np.asarray(noise, dtype=np.float64)),
            torch.as_tensor(np.asarray(prior_width, dtype=np.float64)),
        )
    out = np.empty((3, y.shape[1]))

    def fit(start: int) -> None:
        part = slice(start, start + chunk)
        start_theta = _grid_start(y[:, part], protocol) if prior is None else prior[:, part]
        anchor = None if prior is None else (prior[:, part], *weights)
        out[:, part] = _levenberg_marquardt(y[:, part], protocol, start_theta, anchor, iterations).numpy()

    # Chunks are independent: one single-threaded chunk per core. Many small multi-threaded torch operations
    # would instead meet at an OpenMP barrier each, which costs ~10x as soon as another job shares the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fit, range(0, y.shape[1], chunk)))
    finally:
        torch.set_num_threads(threads)
    return out


def _model(theta: torch.Tensor, protocol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(3 series, N) signals of log-parameters ``theta`` (3: log T1, log T2, log PD, N) and their (3 series,
    3 parameters, N) derivatives: ``signal`` in closed form, differentiated analytically (the fit's hot loop)."""
    t1, t2, pd = torch.exp(theta)[:, None]
    tr, te, ti = protocol.T[:, :, None]
    recovery, inversion, decay = torch.exp(-tr / t1), torch.exp(-ti / t1), torch.exp(-te / t2)
    longitudinal = 1.0 - 2.0 * inversion + recovery
    signals = pd * longitudinal.abs() * decay
    d_log_t1 = pd * decay * torch.sign(longitudinal) * (tr * recovery - 2.0 * ti * inversion) / t1
    return signals, torch.stack([d_log_t1, signals * te / t2, signals], dim=1)


def _log_bounds(dtype) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = (torch.log(torch.tensor([FIT_BOUNDS[m][i] for m in MAPS], dtype=dtype))[:, None] for i in (0, 1))
    return low, high


def _grid_start(y: torch.Tensor, protocol: torch.Tensor) -> torch.Tensor:
    """Log-parameters of the best (T1, T2) on a log grid, PD in closed form."""
    t1_grid, t2_grid = torch.meshgrid(
        torch.logspace(np.log10(200.0), np.log10(6000.0), 48, dtype=y.dtype),
        torch.logspace(np.log10(20.0), np.log10(3000.0), 48, dtype=y.dtype),
        indexing="ij",
    )
    shapes = torch.stack([signal(torch.ones_like(t1_grid), t1_grid, t2_grid, *row) for row in protocol]).reshape(3, -1)
    # best candidate = largest (shape . y)^2 / |shape|^2, with PD = (shape . y) / |shape|^2 (float32: a matmul)
    norm = (shapes * shapes).sum(0)
    projection = shapes.T.float() @ y.float()  # (grid, N)
    best = (projection**2 / norm[:, None].float()).argmax(0)
    pd = projection[best, torch.arange(y.shape[1])].double() / norm[best]
    theta = torch.stack([t1_grid.reshape(-1)[best], t2_grid.reshape(-1)[best], pd])
    return torch.log(theta.clamp_min(1e-3)).clamp(*_log_bounds(y.dtype))


def _levenberg_marquardt(y, protocol, theta, anchor, iterations: int) -> torch.Tensor:
    """Minimise |(model - y) / noise|^2 (+ |(theta - prior) / width|^2 with ``anchor``) voxel by voxel.

    Voxels lie on the last axis of every array so that each step is a handful of vectorised operations:
    the analytic Jacobian comes with each model evaluation (one per iteration, for the candidate), and the
    3 x 3 normal equations are solved in closed form (Cramer's rule).
    """
    low, high = _log_bounds(y.dtype)
    prior, noise, width = anchor if anchor is not None else (None, torch.ones(3, dtype=y.dtype), None)
    noise = noise.reshape(3, 1)
    precision = None if prior is None else width.reshape(3, 1) ** -2
    diagonal = (torch.arange(3), torch.arange(3))

    def evaluate(t):
        """Cost, gradient (3, N) and Gauss-Newton matrix (3, 3, N) of the objective at ``t``."""
        signals, jacobian = _model(t, protocol)
        residual, jacobian = (signals - y) / noise, jacobian / noise[:, :, None]
        cost = (residual**2).sum(0)
        gradient = (jacobian * residual[:, None]).sum(0)
        normal = (jacobian[:, :, None] * jacobian[:, None]).sum(0)
        if prior is not None:
            cost = cost + ((t - prior) ** 2 * precision).sum(0)
            gradient = gradient + (t - prior) * precision
            normal[diagonal] += precision
        return cost, gradient, normal

    theta = theta.clamp(low, high)
    state = evaluate(theta)
    damping = torch.full((y.shape[1],), 1e-3, dtype=y.dtype)
    for _ in range(iterations):
        cost, gradient, normal = state
        system = normal.clone()
        system[diagonal] += damping * (normal[diagonal] + 1e-12)
        candidate = (theta + _solve3(system, -gradient)).clamp(low, high)
        trial = evaluate(candidate)
        better = trial[0] < cost
        theta = torch.where(better, candidate, theta)
        state = tuple(torch.where(better, new, old) for new, old in zip(trial, state, strict=True))
        damping = torch.where(better, damping / 3, damping * 5).clamp(1e-9, 1e9)
    return torch.exp(theta)


def _solve3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solutions x (3, N) of the N 3 x 3 systems a[:, :, n] x[:, n] = b[:, n] (Cramer's rule)."""
    columns = a.unbind(1)

    def det(c0, c1, c2):
        return (c0[0] * (c1[1] * c2[2] - c1[2] * c2[1]) - c1[0] * (c0[1] * c2[2] - c0[2] * c2[1])
                + c2[0] * (c0[1] * c1[2] - c0[2] * c1[1]))  # fmt: skip

    whole = det(*columns)
    return torch.stack([det(*(b if j == k else c for j, c in enumerate(columns))) for k in range(3)]) / whole
