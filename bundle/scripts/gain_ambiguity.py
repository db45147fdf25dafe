"""How far the images alone determine the maps: one study explained exactly by other receiver gains.

Each voxel gives three equations (T1w, T2w, FLAIR) for three unknowns (T1, T2, PD). With the per-series
receiver gains unknown, as they are for every clinical study, other gains explain the images too: the
voxel-wise solve finds maps that re-synthesise them exactly, and those maps have other ROI means. What picks
one explanation is prior knowledge of tissue values, not the images; this script measures how far apart the
explanations are and how well that prior can pick one:

- ``--factors``: noise-free images of a clinical-like study's true maps (on its T1w grid, true gains) fitted
  voxel by voxel (``physics.fit_maps``) with the true gains scaled by each factor triple: the re-synthesis
  residual (% of the mean signal, WM+GM) and the WM / GM bias of each map against the truth;
- always: per study and prior (``PRIORS``: tissue ranges of GM and WM, of pure CSF too, of the scalp's fat
  too), the gain ratios whose explanation keeps every tissue inside its range, the bias span of those
  explanations and the bias of the prior's best guess among them (``prior_calibration``), then its mean |bias|
  over the studies: what the prior allows a method without the gains, to hold a network's calibration against.

From the repository root (about 2 s per study; ``--factors`` 9 s more)::

    python bundle/scripts/gain_ambiguity.py bundle/eval/validation/studies/val-* --factors
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
from scripts import calibration, physics  # noqa: E402
from scripts.calibration import CSF, FAT, GM, RATIOS, WM  # noqa: E402

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
TISSUES = (GM, WM)
#: CSF-labelled voxels above this percentile of the true T1 stand for CSF itself. At 4-5 mm slices most
#: CSF-labelled voxels are partial volume (median T1 ~2100 ms on philips-1 against 3300-4800 ms for CSF), so
#: no prior on CSF values applies to the label as a whole; its core (the ventricles') is CSF.
PURE_CSF_PERCENTILE = 99.0
#: Scalp-labelled voxels at or above this percentile of the true PD stand for the scalp's fat: partial volume with
#: air and the skull's marrow (PD 5-15 p.u.) lowers it; selecting on T1 or T2 would pick one end of the fat's
#: texture and bias the reference itself.
PURE_FAT_PERCENTILE = 50.0
#: The priors compared: tissue ranges of GM and WM only, with pure CSF's too, and with the scalp's fat (T1, T2) too.
WITH_CSF = (GM, WM, CSF)
WITH_FAT = (GM, WM, CSF, FAT)
PRIORS = {"GM, WM": TISSUES, "GM, WM, pure CSF (T1w, T2w)": WITH_CSF, "GM, WM, pure CSF, scalp fat": WITH_FAT}


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


def tissue_values(study: Path) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Each tissue's true (T1, T2, PD), the median over its labelled voxels (CSF: over pure CSF; the scalp's fat,
    where the head has a scalp: over pure fat), and the protocol."""
    truth = np.stack([nib.load(study / "truth" / f"{m}.nii.gz").get_fdata(dtype=np.float32) for m in physics.MAPS])
    labels = np.asarray(nib.load(study / "truth" / "labels.nii.gz").dataobj)
    params = np.asarray(json.loads((study / "truth" / "acquisition.json").read_text())["params"])
    csf, fat = labels == CSF, labels == FAT
    pure = {CSF: csf & (truth[0] >= np.percentile(truth[0][csf], PURE_CSF_PERCENTILE))}
    if fat.any():
        pure[FAT] = fat & (truth[2] >= np.percentile(truth[2][fat], PURE_FAT_PERCENTILE))
    tissues = (GM, WM, *pure)
    return {t: np.median(truth[:, pure.get(t, labels == t)], axis=1).astype(np.float64) for t in tissues}, params


def prior_calibration(values: dict[int, np.ndarray], params, tissues=TISSUES, ratios=RATIOS) -> dict:
    """What prior knowledge of tissue values makes of a head's calibration when the images are exact.

    Every gain triple (1, a, b) for T1w, T2w, FLAIR over ``ratios`` explains the noise-free images exactly
    (a common factor only rescales PD, handled in closed form); ``params`` is the protocol, and each tissue is
    represented by its true ``values`` ({label: (T1, T2, PD)}, e.g. ``tissue_values``). An explanation is
    plausible when T1 and T2 of every tissue in ``tissues`` lie inside ``phantom.TISSUE_RANGES`` (the prior
    every training and test head is drawn from) and some common scale puts every PD inside too. The prior's
    best guess is the mean log-maps over the plausible explanations (a uniform prior over the gain ratios;
    PD at the geometric middle of its scales): about what a method without the gains can reach on average
    with this prior, an ideal observer that reads each tissue's exact values; on one head it may land
    anywhere in the span.

    Returns the plausible count, whether the truth is plausible, and per map and ROI (``T1_WM``, ...) the
    bias span (min, max) and the best guess's bias (``T1_WM_guess``), %; no guess where nothing is plausible.
    """
    truth = np.stack([values[WM], values[GM]], axis=1)  # (maps, tissues)
    signals = {t: physics.synthesize(values[t], params) for t in (WM, GM, *tissues)}  # at gains 1
    explained = calibration.plausible_explanations(signals, params, tissues, ratios)
    out = {
        "plausible": 0 if explained is None else explained[0].shape[1],
        "of": len(ratios) ** 2,
        "truth_plausible": all(  # inside the ranges the calibration holds (not the fat's PD)
            lo <= values[t][c] <= hi for t in tissues for c, (lo, hi) in enumerate(calibration.held_ranges(t))
        ),
    }
    if explained is None:
        return out
    guess, lowest, highest = (100 * (v / truth - 1) for v in calibration.tissue_value_span(explained))
    for c, name in enumerate(physics.MAPS):
        for j, roi in enumerate(("WM", "GM")):
            out[f"{name}_{roi}"] = (float(lowest[c, j]), float(highest[c, j]))
            out[f"{name}_{roi}_guess"] = float(guess[c, j])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", type=Path, nargs="+", help="clinical-like study folders (with truth/)")
    parser.add_argument("--voxels", type=int, default=20000, help="WM+GM voxels drawn for the factor table")
    parser.add_argument("--factors", action="store_true", help="also fit each study with the gains x FACTORS")
    args = parser.parse_args(argv)
    for study in args.studies if args.factors else ():
        print(f"{study.name}: noise-free images of the truth, fitted with the true gains times the factors")
        print("| gain factors T1w, T2w, FLAIR | worst residual % | "
              + " | ".join(f"{m} WM / GM bias %" for m in physics.MAPS) + " |")  # fmt: skip
        print("|---|---|" + "---|" * len(physics.MAPS))
        for r in explanations(study, voxels=args.voxels):
            cells = [f"{r[f'{m}_WM_bias']:+.1f} / {r[f'{m}_GM_bias']:+.1f}" for m in physics.MAPS]
            factors = ", ".join(f"{f:g}" for f in r["factors"])
            print(f"| {factors} | {r['residual_pct']:.2f} | " + " | ".join(cells) + " |")
        print()
    print(f"Gain ratios T2w/T1w and FLAIR/T1w {RATIOS[0]:.1f}-{RATIOS[-1]:.1f} ({len(RATIOS)}^2) that explain the "
          "noise-free images exactly with every tissue of the prior inside its range (* the truth is not); "
          "WM / GM bias of the prior's best guess [span of the plausible explanations], %:\n")  # fmt: skip
    print("| study | prior | plausible | " + " | ".join(f"{m} WM / GM" for m in physics.MAPS) + " |")
    print("|---|---|---|" + "---|" * len(physics.MAPS))
    guesses = {name: [] for name in PRIORS}
    for study in args.studies:
        values, params = tissue_values(study)
        for name, tissues in PRIORS.items():
            if not set(tissues) <= set(values):  # a head without a scalp
                continue
            r = prior_calibration(values, params, tissues)
            count = f"{r['plausible']}{'' if r['truth_plausible'] else '*'}"
            if not r["plausible"]:
                print(f"| {study.name} | {name} | {count} |" + " - |" * len(physics.MAPS))
                continue
            guesses[name].append([r[f"{m}_{roi}_guess"] for m in physics.MAPS for roi in ("WM", "GM")])
            cells = [" / ".join(f"{r[f'{m}_{roi}_guess']:+.1f} [{r[f'{m}_{roi}'][0]:+.0f}..{r[f'{m}_{roi}'][1]:+.0f}]"
                                for roi in ("WM", "GM")) for m in physics.MAPS]  # fmt: skip
            print(f"| {study.name} | {name} | {count} | " + " | ".join(cells) + " |")
    for name, rows in guesses.items():
        if rows:
            mean = np.abs(np.array(rows)).mean(axis=0)
            cells = ", ".join(f"{m} {mean[2 * c]:.1f} / {mean[2 * c + 1]:.1f}" for c, m in enumerate(physics.MAPS))
            print(f"\nprior {name}: mean |bias| of the best guess over {len(rows)} studies, WM / GM %: {cells}")


if __name__ == "__main__":
    main()
