"""Physics QA of the maps: how well they re-synthesise each input, per series and per slice, and when to warn.

The residual (``transforms.ResynthesisResiduald``: re-synthesised minus input, after fitting each series'
receiver gain) never vanishes on real data: the model's systematic error leaves a residual that differs
by series (on clean clinical-like studies T1w about 8 %, FLAIR over 20 % of the mean brain signal) and
grows smoothly towards the ends of the brain (partial volume, skull base: 2-4 times the middle slices'). So
each series has its own threshold, and each slice is judged against its two neighbours, from which that
smooth error cancels: a zeroed or corrupt slice stands out even where the whole-volume residual hardly
moves. Every threshold is here; they are calibrated by ``scripts/qa_calibration.py`` on
clean and deliberately broken studies (the measured numbers are in the model card, "Physics QA").
"""

from __future__ import annotations

import numpy as np

#: Mean absolute residual in the brain mask, as a fraction of the series' mean brain signal there, above
#: which the maps do not explain the series: 1.3 times the largest of four clean clinical-like studies.
SERIES_THRESHOLDS = {"T1w": 0.12, "T2w": 0.27, "FLAIR": 0.33}
#: A slice whose mean absolute residual exceeds this multiple of its two neighbours' mean is flagged: between
#: the clean studies' worst slice (1.17) and the mildest zeroed input slice, spread by resampling (1.55).
SLICE_RATIO_THRESHOLD = 1.35
#: Slices with less brain than this fraction of the largest brain slice are not judged: a few voxels of
#: skull base or vertex give noisy, partial-volume residuals.
MIN_SLICE_BRAIN = 0.25


def physics_qa(
    residuals: np.ndarray, images: np.ndarray, mask: np.ndarray, series: tuple[str, ...], delivered: dict | None = None
) -> dict:
    """QA of every series, the warnings, and the worst slice (the one ``qa_figure`` shows).

    Args:
        residuals, images: (series, X, Y, Z) residuals and the normalised inputs they refer to; slices
            are axis 3 (axis 2 of each volume), the T1w grid's slices.
        mask: (X, Y, Z) brain mask.
        series: the names of the series, in order.
        delivered: where the physics refinement replaced the network's maps (which ``residuals`` describe), its
            residual per series (%, ``physics_refinement.residual_pct.refined``): a warning then says which maps
            it is about and how well the delivered ones explain the series.

    Returns ``{"series": {name: entry}, "warnings": [...], "worst_slice": {...}}``; slice numbers are 1-based.
    """
    brain = mask.sum(axis=(0, 1))
    judged = np.flatnonzero(brain >= MIN_SLICE_BRAIN * brain.max())
    entries, warnings, worst = {}, [], None
    maps = "the maps" if delivered is None else "the network's maps"
    for name, residual, image in zip(series, residuals, images, strict=True):
        signal = max(float(image[mask].mean()), 1e-12)
        absolute = np.abs(np.where(mask, residual, 0.0))
        relative = float(absolute[mask].mean() / signal)
        per_slice = absolute.sum(axis=(0, 1)) / np.maximum(brain, 1) / signal
        own = per_slice[judged]
        # a neighbour without brain, or beyond the volume, is replaced by the slice itself
        padded = np.pad(np.where(brain > 0, per_slice, np.nan), 1, constant_values=np.nan)
        left, right = (np.where(np.isnan(side), own, side) for side in (padded[judged], padded[judged + 2]))
        ratios = own / np.maximum((left + right) / 2, 1e-12)
        k = int(np.argmax(ratios))
        entry = {
            "relative_mean_abs_residual": relative,
            "rms_residual": float(np.sqrt((residual[mask] ** 2).mean())),
            "threshold": SERIES_THRESHOLDS[name],
            "worst_slice": {
                "slice": int(judged[k]) + 1,
                "relative_mean_abs_residual": float(own[k]),
                "ratio_to_neighbours": float(ratios[k]),
            },
        }
        if relative > SERIES_THRESHOLDS[name]:
            after = "" if delivered is None else (f" (the maps delivered after the physics refinement: "
                                                  f"{delivered[name]:.1f} % on the T1w grid)")  # fmt: skip
            warnings.append(
                f"{name}: re-synthesised from {maps} with its own TR/TE/TI, it differs from the input by "
                f"{100 * relative:.1f} % of its mean brain signal (threshold {100 * SERIES_THRESHOLDS[name]:.0f} %): "
                f"{maps} do not explain this series well{after}; check its TR/TE/TI and that it is the series named."
            )
        flagged = np.flatnonzero(ratios > SLICE_RATIO_THRESHOLD)
        if flagged.size:
            listed = ", ".join(f"{judged[i] + 1} ({ratios[i]:.2f} x)" for i in flagged)
            warnings.append(
                f"{name}: re-synthesised from {maps}, slice(s) {listed} of {mask.shape[2]} of the T1w grid differ "
                f"from the input more than {SLICE_RATIO_THRESHOLD:g} times as much as their neighbours: a corrupt "
                "slice of this series, or of another one that spoils the maps there?"
            )
        entries[name] = entry
        if worst is None or ratios[k] > worst["ratio_to_neighbours"]:
            worst = {"series": name, **entry["worst_slice"]}
    return {"series": entries, "warnings": warnings, "worst_slice": worst}
