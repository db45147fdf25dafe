"""Receiver gains from the tissue prior: the gain ratios under which WM, GM, pure CSF and the scalp's fat look
like themselves.

Three weighted series give three equations per voxel for three unknowns, so with the receiver gains unknown
every gain triple explains a study's images exactly with other maps (``scripts/gain_ambiguity.py``). Prior
knowledge of tissue values picks among them: for gains ``(1, a, b)`` times a common factor, fit each
tissue's signals and keep the explanations whose tissues lie inside ``phantom.TISSUE_RANGES`` (the prior
every training head is drawn from); their mean is the prior's best guess. GM and WM are fitted from all
three series; pure CSF (the ventricles' core) is read from T1w and T2w only: it sits near FLAIR's null, where
a magnitude image holds mostly noise floor and the partial volume of brighter tissue.

Subcutaneous fat is the classic internal reference: its T1 and T2 vary little between people (the prior's
scalp: 350-420 ms, 100-130 ms), and its signal ratios between the series do not depend on how much of a voxel it
fills, on the coil's bias field or on its PD. Brain tissues alone leave a head's WM T1 open by 20-40 %
(``gain_ambiguity.py``); the fat's T2w/T1w and FLAIR/T1w ratios close most of that. It is sampled outside the
brain mask (``scalp_signals``), where the network maps nothing, so the images alone say where it is.

Once the gains are calibrated, ``level_corrected`` moves the network's maps toward what the images say about
each level of them (WM, GM, ...), which the refinement's prior then holds.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scripts import physics
from scripts.phantom import TISSUE_RANGES

CSF, GM, WM, FAT = 1, 2, 3, 6  # phantom labels; the phantom's scalp is fat
#: Gain ratios T2w/T1w and FLAIR/T1w searched: 0.61-1.65 in 0.8 % steps, 1 included.
RATIOS = tuple(np.exp(np.linspace(-0.5, 0.5, 121)))
#: Which voxels of a study sample each tissue: percentiles of the network's T1 inside the brain mask (WM's and
#: GM's middles, CSF's top: the ventricles' core), chosen on the validation heads with ``scripts/select_model.py``.
#: A tail of the histogram pulls a tissue's median toward its extreme (WM's lowest T1s read WM T1 high).
TISSUE_PERCENTILES = {WM: (10.0, 25.0), GM: (55.0, 75.0), CSF: (99.8, 100.0)}
#: Levels of the network's T1 that ``level_corrected`` corrects separately (10-40 scored alike on the validation heads).
LEVEL_BINS = 10
#: T1 (ms) from which ``level_corrected`` leaves a level where the network put it: GM's highest (``TISSUE_RANGES``),
#: so the levels of CSF and of its partial volume with tissue (1650, 2000 and 2333 were tried on the validation heads).
CSF_LEVEL_T1_MS = TISSUE_RANGES[GM][0][1]


#: Where ``scalp_signals`` looks for fat: this far outside the brain mask (mm), past the skull (4-7 mm in the
#: phantom) and within the scalp (4-8 mm more), with room for a mask a few mm off.
SCALP_SHELL_MM = (3.0, 20.0)
#: Fat is the brightest tissue of that shell in every series (short T1, long T2, PD ~90 p.u.): voxels at least
#: this fraction of the shell's 99th percentile in each series sample it. The scalp is a thin shell, and each
#: series' slabs cross it at their own angle and resolution, so where one series sees pure fat another may see
#: it mixed with air or skull: on the validation heads the median T2w/T1w and FLAIR/T1w ratios came out 5.6 % and
#: 7.0 % low at 0.5, 1.4 % and 2.0 % at 0.8, 0.5 % and 0.9 % at 0.9 (the model card, *The scalp's fat*).
SCALP_BRIGHT = 0.9
#: Fewer fat voxels than this and the scalp is not used (a study cropped to the brain, a fat-suppressed series).
MIN_SCALP_VOXELS = 200
#: Where no gains explain the scalp's fat and the brain's tissues inside their ranges together, the brain's ranges
#: are widened by the first of these fractions that admits some (``fat_held_explanations``): the fat is sampled
#: directly, the brain's tissues through the network's T1 percentiles, which read them a few % off, and a head's
#: tissue may sit at the edge of the prior (val-ge-4: WM's true T1 1102 ms against the prior's 700-1100 ms, its
#: sample 1137 ms under the true gains). On val-ge-4 the first that admits the fat, 5 %, scored error 8.80 against
#: 10.83 for the brain's tissues alone and 10.56 for 10 % at once (the model card, *The scalp's fat*).
BRAIN_WIDENING = (0.025, 0.05, 0.075, 0.1)


def scalp_signals(volumes: np.ndarray, brain: np.ndarray, spacing) -> np.ndarray | None:
    """(3,) T1w, T2w, FLAIR signal of the scalp's fat in ``volumes`` (3, X, Y, Z, one grid), ``brain`` (X, Y, Z) the
    brain mask, ``spacing`` (3,) its voxel size in mm; None where too few voxels qualify (``MIN_SCALP_VOXELS``).

    The fat is sampled in the shell ``SCALP_SHELL_MM`` outside the brain where every series has signal (inside every
    series' field of view) and is bright (``SCALP_BRIGHT``). Each series is the median T1w signal times the median
    per-voxel ratio to T1w: ratios cancel the bias field and partial volume with air, which the medians of the
    signals would not."""
    distance = ndimage.distance_transform_edt(~brain, sampling=spacing)
    shell = (distance >= SCALP_SHELL_MM[0]) & (distance <= SCALP_SHELL_MM[1]) & np.all(volumes > 0, axis=0)
    if shell.sum() < MIN_SCALP_VOXELS:
        return None
    values = volumes[:, shell]
    fat = values[:, np.all(values >= SCALP_BRIGHT * np.percentile(values, 99, axis=1)[:, None], axis=0)]
    if fat.shape[1] < MIN_SCALP_VOXELS:
        return None
    return np.median(fat[0]) * np.concatenate([[1.0], np.median(fat[1:] / fat[0], axis=1)])


def tissue_signals(images: np.ndarray, t1: np.ndarray, percentiles=TISSUE_PERCENTILES) -> dict[int, np.ndarray]:
    """{label: (3,) median T1w, T2w, FLAIR signal} of ``images`` (3, N) over the voxels whose ``t1`` (N,) lies
    between the tissue's ``percentiles``."""
    out = {}
    for label, (low, high) in percentiles.items():
        lo, hi = np.percentile(t1, (low, high))
        out[label] = np.median(images[:, (t1 >= lo) & (t1 <= hi)], axis=1)
    return out


def ratio_factors(ratios=RATIOS) -> np.ndarray:
    """(3, G) gain factors (1, a, b) for T1w, T2w, FLAIR over every pair of ``ratios``."""
    a, b = np.meshgrid(np.asarray(ratios, dtype=np.float64), np.asarray(ratios, dtype=np.float64), indexing="ij")
    return np.stack([np.ones(a.size), a.ravel(), b.ravel()])


def explanations(signals: dict[int, np.ndarray], params, factors: np.ndarray, tissues=(GM, WM), widenings=(0.0,)):
    """Each tissue's values under every gain factor triple, and which triples keep ``tissues`` inside their ranges.

    ``signals`` {label: (3,) T1w, T2w, FLAIR signal in p.u. at the current gains} for WM, GM (and CSF, FAT when
    in ``tissues``); ``params`` (3, 3) the protocol; ``factors`` (3, G) gain factors (the signals are divided by
    them); ``widenings``: fractions by which the brain tissues' ranges (not the fat's) are widened either way, in
    turn. Yields, per widening, ``plausible`` (G,), ``fitted`` (3 maps, WM GM, G) and the common PD scales
    [``low``, ``high``] (G,) that put WM and GM PD inside their ranges (true PD = fitted PD / scale); the tissues
    are fitted once, the ranges checked per widening.
    """
    images = np.stack([signals[WM], signals[GM]], axis=1)[:, :, None] / factors[:, None]
    fitted = physics.fit_maps(images.reshape(3, -1), params, np.ones(3), iterations=30).reshape(images.shape)
    fat = _fat_plausible(signals[FAT], params, factors) if FAT in tissues else True
    size = factors.shape[1]
    for widening in widenings:
        plausible = np.ones(size, dtype=bool)
        low, high = np.zeros(size), np.full(size, np.inf)
        for j, t in enumerate((WM, GM)):
            *t1_t2, pd_range = _widened(TISSUE_RANGES[t], widening)
            for c, (lo, hi) in enumerate(t1_t2):
                plausible &= (fitted[c, j] >= lo) & (fitted[c, j] <= hi)
            low, high = np.maximum(low, fitted[2, j] / pd_range[1]), np.minimum(high, fitted[2, j] / pd_range[0])
        plausible &= (low <= high) & fat
        if CSF in tissues:
            csf_ranges = _widened(TISSUE_RANGES[CSF], widening)
            plausible &= _csf_plausible(signals[CSF], params, factors, low, high, csf_ranges)
        yield plausible, fitted, low, high


def plausible_explanations(
    signals: dict[int, np.ndarray], params, tissues=(GM, WM, CSF), ratios=RATIOS, widening: float = 0.0
):
    """The explanations the prior allows (``explanations``): their gain factors (3, P), WM and GM values (3 maps,
    WM GM, P; PD before the common scale) and common PD scales [``low``, ``high``] (P,); None if none is plausible."""
    factors = ratio_factors(ratios)
    return _kept(factors, *next(explanations(signals, params, factors, tissues, (widening,))))


def fat_held_explanations(signals: dict[int, np.ndarray], params, tissues=(GM, WM, CSF)):
    """``plausible_explanations`` of the brain's ``tissues`` and the scalp's fat (``signals[FAT]``) together, with
    the brain's ranges as they are or else widened by the first of ``BRAIN_WIDENING`` that admits some; returns
    (the explanations, the widening) or (None, the largest widening tried)."""
    factors, widenings = ratio_factors(), (0.0, *BRAIN_WIDENING)
    for widening, found in zip(widenings, explanations(signals, params, factors, (*tissues, FAT), widenings)):
        if (explained := _kept(factors, *found)) is not None:
            return explained, widening
    return None, widening


def _kept(factors, plausible, fitted, low, high):
    """The plausible explanations' factors, fitted values and PD scales (``plausible_explanations``), or None."""
    if not plausible.any():
        return None
    return factors[:, plausible], fitted[:, :, plausible], low[plausible], high[plausible]


def _widened(ranges, widening: float) -> list[tuple[float, float]]:
    """``ranges`` [(low, high), ...] widened by the fraction ``widening`` either way (on a log scale)."""
    return [(lo / (1 + widening), hi * (1 + widening)) for lo, hi in ranges]


def prior_gain_factors(explained) -> np.ndarray:
    """(3,) factors for the current gains that the prior finds most likely, from ``plausible_explanations``: the
    mean log over the plausible explanations, times the geometric middle of their common PD scales."""
    factors, _, low, high = explained
    return np.exp(np.log(factors).mean(axis=1)) * _common_pd_scale(low, high)


def _common_pd_scale(low: np.ndarray, high: np.ndarray) -> float:
    """The prior's common PD scale: the mean log of the geometric middles of what each explanation allows."""
    return float(np.exp(np.log(np.sqrt(low * high)).mean()))


def tissue_value_span(explained) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """WM and GM values (3 maps, WM GM) of the prior's best guess (as ``prior_gain_factors`` picks it) and the
    lowest and highest the plausible explanations give (PD over every common scale each allows): how far a head's
    tissue values are fixed when the receiver gains are not known."""
    _, fitted, low, high = explained
    guess = np.exp(np.log(fitted).mean(axis=2))
    guess[2] /= _common_pd_scale(low, high)
    lowest, highest = fitted.min(axis=2), fitted.max(axis=2)
    lowest[2], highest[2] = (fitted[2] / high).min(axis=1), (fitted[2] / low).max(axis=1)
    return guess, lowest, highest


def level_corrected(
    prior: np.ndarray,
    fitted: np.ndarray,
    bins: int = LEVEL_BINS,
    sample: np.ndarray | None = None,
    csf_t1_ms: float = CSF_LEVEL_T1_MS,
) -> np.ndarray:
    """The network's maps ``prior`` (3, N) moved, level by level, to where the images put them (``fitted``, a
    loosely held fit under calibrated gains): the median log ratio per bin of the network's T1 (equal counts),
    interpolated between the bins and applied to every voxel by its level (below). ``sample`` (N,) bool, when
    given, holds the voxels the levels are measured on (the brain's, not a rim of other tissue around it).

    With the gains right the images fix each tissue's values, but a voxel's fit carries its noise; the network
    has the spatial detail, but maps WM and GM with the contrast of its training prior. Medians over thousands of
    voxels keep the images' values without their noise and leave the network's shape.

    Which level's move a voxel gets is read at the geometric mean of its network T1 and its fitted T1 (each bin's
    median of it): the network compresses the GM/WM contrast, and reads some WM voxels with GM's T1 (on the
    clinical-like studies 40 % of WM voxels lay in bins that are mostly GM), which then took GM's move, while the
    images, noisy as they are, still place them nearer WM. The bins and their moves stay the network's, so a
    voxel's own noise does not pick the move it is measured by.

    Levels from ``csf_t1_ms`` up are not moved (voxels between the highest tissue level and them take part of its
    move): there the fit's median is biased, not noisy. A voxel of CSF mixed with its neighbours' slabs is fitted as
    one compartment, and even the fit that knows the gains reads noise-free CSF-labelled voxels' T1 +15 % and PD +7 %
    on the clinical-like studies; on the validation heads moving those levels took CSF's PD +6.7 % to +9.1 %."""
    ratio = np.log(np.maximum(fitted, 1e-6) / np.maximum(prior, 1e-6))
    where = np.sqrt(prior[0] * np.maximum(fitted[0], 1e-6))
    measured = slice(None) if sample is None else sample
    t1, at, moved = prior[0, measured], where[measured], ratio[:, measured]
    edges = np.percentile(t1, np.linspace(0.0, 100.0, bins + 1))
    levels = [(t1 >= lo) & (t1 <= hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    centres = np.array([np.median(at[level]) for level in levels])
    shifts = np.stack([np.median(moved[:, level], axis=1) for level in levels], axis=1)  # (3, bins)
    shifts[:, centres >= csf_t1_ms] = 0.0
    order = np.argsort(centres)  # np.interp needs increasing centres; the fit can swap two close bins
    return prior * np.exp(np.stack([np.interp(where, centres[order], shift[order]) for shift in shifts]))


def held_ranges(tissue: int) -> tuple[tuple[float, float], ...]:
    """The ranges of ``tissue``'s (T1, T2, PD) that the calibration holds it to: all three, but only T1 and T2 for
    the scalp's fat, whose signals carry the bias field and its partial volume with air (``_fat_plausible``)."""
    ranges = tuple(TISSUE_RANGES[tissue])
    return ranges[:2] if tissue == FAT else ranges


def _fat_plausible(fat, params, factors) -> np.ndarray:
    """Which gain factor triples (3, G) explain the scalp fat's signals (3,) with its T1 and T2 inside their ranges
    (its PD is not held: the fat's signals carry the bias field and its partial volume with air)."""
    fitted = physics.fit_maps(np.asarray(fat, dtype=np.float64)[:, None] / factors, params, np.ones(3), iterations=30)
    plausible = np.ones(factors.shape[1], dtype=bool)
    for c, (lo, hi) in enumerate(held_ranges(FAT)):
        plausible &= (fitted[c] >= lo) & (fitted[c] <= hi)
    return plausible


def _csf_plausible(csf, params, factors, low, high, ranges, tolerance: float = 0.01, chunk: int = 1024) -> np.ndarray:
    """Which gain factor triples (3, G) explain pure CSF's T1w and T2w signals with values inside its ``ranges``
    (T1, T2, PD): some (T1, T2) in them explains T1w to ``tolerance`` with the PD that explains T2w, and a common
    PD scale in [``low``, ``high``] (WM's and GM's) puts that PD in range."""
    t1_range, t2_range, pd_range = ranges
    t1, t2 = (g.ravel() for g in np.meshgrid(np.linspace(*t1_range, 60), np.linspace(*t2_range, 20), indexing="ij"))
    shape_t1w, shape_t2w = (physics.signal(1.0, t1, t2, *params[k]) for k in (0, 1))
    measured = np.asarray(csf, dtype=np.float64)[:2, None] / factors[:2]  # (T1w T2w, G)
    plausible = np.zeros(factors.shape[1], dtype=bool)
    for start in range(0, factors.shape[1], chunk):  # (chunk, candidates) arrays: a few MB, not a few hundred
        part = slice(start, start + chunk)
        pd = measured[1, part, None] / shape_t2w
        explains = np.abs(pd * shape_t1w / measured[0, part, None] - 1) < tolerance
        in_range = np.maximum(low[part, None], pd / pd_range[1]) <= np.minimum(high[part, None], pd / pd_range[0])
        plausible[part] = np.any(explains & in_range, axis=1)
    return plausible
