"""How far the images alone determine the maps: one study explained exactly by other receiver gains.

Each voxel gives three equations (T1w, T2w, FLAIR) for three unknowns (T1, T2, PD). With the per-series
receiver gains unknown, as they are for every clinical study, other gains explain the images too: the
voxel-wise solve finds maps that re-synthesise them exactly, and those maps have other ROI means. What picks
one explanation is prior knowledge of tissue values, not the images; this script measures how far apart the
explanations are. Noise-free images of a clinical-like study's true maps (on its T1w grid, true gains) are
fitted voxel by voxel (``physics.fit_maps``) with the true gains scaled by each factor triple; printed: the
re-synthesis residual (% of the mean signal, WM+GM) and the WM / GM bias of each map against the truth.

From the repository root::

    python bundle/scripts/gain_ambiguity.py bundle/eval/clinical/studies/philips-1
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import the bundle's ``scripts`` package instead of this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scripts import physics  # noqa: E402
from scripts.phantom import TISSUE_RANGES  # noqa: E402

#: Gain factors (T1w, T2w, FLAIR) tried: each series 10 % off either way, and all three together (PD scale).
FACTORS = (
    (1.0, 1.0, 1.0),
    (1.1, 1.0, 1.0),
    (0.9, 1.0, 1.0),
    (1.0, 1.1, 1.0),
    (1.0, 0.9, 1.0),
    (1.0, 1.0, 1.1),
    (1.0, 1.0, 0.9),
    (1.1, 1.1, 1.1),
)
#: Gain ratios T2w/T1w and FLAIR/T1w searched for plausible explanations.
RATIOS = tuple(np.linspace(0.7, 1.3, 13))
WM, GM = 3, 2
# CSF is left out: at 4-5 mm slices its labelled voxels are mostly partial volume (median T1 ~2100 ms on
# philips-1 against 3300-4800 ms for CSF itself), so no prior on CSF values applies to them.
TISSUES = (GM, WM)


def _sample(study: Path, voxels: int, seed: int):
    """The truth's maps (3, N) and labels (N,) at ``voxels`` random GM/WM voxels, and the protocol."""
    truth = np.stack([nib.load(study / "truth" / f"{m}.nii.gz").get_fdata(dtype=np.float32) for m in physics.MAPS])
    labels = np.asarray(nib.load(study / "truth" / "labels.nii.gz").dataobj).reshape(-1)
    params = np.asarray(json.loads((study / "truth" / "acquisition.json").read_text())["params"])
    index = np.flatnonzero(np.isin(labels, TISSUES))
    index = np.random.default_rng(seed).choice(index, min(voxels, index.size), replace=False)
    return truth.reshape(3, -1)[:, index].astype(np.float64), labels[index], params


def _explain(images, params, factor) -> tuple[np.ndarray, float]:
    """Maps fitted to the truth's noise-free ``images`` (gains 1) with gains ``factor``; worst residual (%)."""
    gains = np.asarray(factor, dtype=np.float64)
    fitted = physics.fit_maps(images, params, gains)
    residual = np.abs(gains[:, None] * physics.synthesize(fitted, params) - images).mean(axis=1)
    return fitted, float(100 * np.max(residual / images.mean(axis=1)))


def _bias(fitted, true_maps, tissue, c: int, label: int) -> float:
    sel = tissue == label
    return float(100 * (fitted[c, sel].mean() / true_maps[c, sel].mean() - 1))


def explanations(study: Path, factors=FACTORS, voxels: int = 20000, seed: int = 0) -> list[dict]:
    """One row per gain factor triple: worst residual (%) and WM/GM bias (%) of T1, T2, PD against the truth."""
    true_maps, tissue, params = _sample(study, voxels, seed)
    images = physics.synthesize(true_maps, params)
    rows = []
    for factor in factors:
        fitted, residual = _explain(images, params, factor)
        row = {"factors": factor, "residual_pct": residual}
        for c, name in enumerate(physics.MAPS):
            for roi, label in (("WM", WM), ("GM", GM)):
                row[f"{name}_{roi}_bias"] = _bias(fitted, true_maps, tissue, c, label)
        rows.append(row)
    return rows


def plausible_range(study: Path, ratios=RATIOS, voxels: int = 6000, seed: int = 0) -> dict:
    """Every exact explanation whose tissues still look like tissues, and the ROI biases they span.

    Gains (1, a, b) for T1w, T2w, FLAIR over ``ratios`` (a common factor only rescales PD, handled in
    closed form): an explanation is plausible when the median T1, T2 (and, for some common PD scale, PD)
    of GM and WM fall inside ``phantom.TISSUE_RANGES``, the prior the phantoms draw every head from.
    Returns {map_ROI: (min, max) bias %} over the plausible explanations, their count, and whether the truth
    itself passes (partial volume can push a tissue's median out of its range).
    """
    true_maps, tissue, params = _sample(study, voxels, seed)
    images = physics.synthesize(true_maps, params)
    ranges = {label: TISSUE_RANGES[label] for label in TISSUES}

    def pd_scales(maps) -> tuple[float, float] | None:
        """The common PD scales that put every tissue inside its ranges, or None if T1/T2 already miss."""
        medians = {label: np.median(maps[:, tissue == label], axis=1) for label in TISSUES}
        if not all(lo <= medians[t][c] <= hi for t in TISSUES for c, (lo, hi) in enumerate(ranges[t][:2])):
            return None
        low = max(medians[t][2] / ranges[t][2][1] for t in TISSUES)
        high = min(medians[t][2] / ranges[t][2][0] for t in TISSUES)
        return (low, high) if low <= high else None

    spans, count = {}, 0
    for a in ratios:
        for b in ratios:
            fitted, _ = _explain(images, params, (1.0, a, b))
            if (scales := pd_scales(fitted)) is None:
                continue
            low, high = scales
            count += 1
            for c, name in enumerate(physics.MAPS):
                for roi, label in (("WM", WM), ("GM", GM)):
                    biases = [_bias(fitted / np.array([1, 1, s])[:, None], true_maps, tissue, c, label)
                              for s in ((low, high) if name == "PD" else (1.0,))]  # fmt: skip
                    old = spans.get(f"{name}_{roi}", (np.inf, -np.inf))
                    spans[f"{name}_{roi}"] = (min(old[0], *biases), max(old[1], *biases))
    return {"plausible": count, "of": len(ratios) ** 2, "truth_plausible": pd_scales(true_maps) is not None, **spans}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="a clinical-like study folder (with truth/)")
    parser.add_argument("--voxels", type=int, default=20000, help="WM+GM voxels drawn for the fits")
    args = parser.parse_args(argv)
    rows = explanations(args.study, voxels=args.voxels)
    print(f"{args.study.name}: noise-free images of the truth, fitted with the true gains times the factors")
    print(
        "| gain factors T1w, T2w, FLAIR | worst residual % | "
        + " | ".join(f"{m} WM / GM bias %" for m in physics.MAPS)
        + " |"
    )
    print("|---|---|" + "---|" * len(physics.MAPS))
    for r in rows:
        cells = [f"{r[f'{m}_WM_bias']:+.1f} / {r[f'{m}_GM_bias']:+.1f}" for m in physics.MAPS]
        print(f"| {', '.join(f'{f:g}' for f in r['factors'])} | {r['residual_pct']:.2f} | " + " | ".join(cells) + " |")
    span = plausible_range(args.study)
    print(
        f"\n{span['plausible']} of {span['of']} gain ratios (T2w/T1w, FLAIR/T1w 0.7-1.3) explain the images exactly "
        f"with GM and WM inside the phantom's tissue ranges (the truth {'is' if span['truth_plausible'] else 'is not'}"
        " one of them); the WM / GM bias they span:"
    )
    for name in physics.MAPS:
        print(
            f"- {name}: WM {span[f'{name}_WM'][0]:+.1f} .. {span[f'{name}_WM'][1]:+.1f} %, "
            f"GM {span[f'{name}_GM'][0]:+.1f} .. {span[f'{name}_GM'][1]:+.1f} %"
        )


if __name__ == "__main__":
    main()
