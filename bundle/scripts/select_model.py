"""Choose among checkpoints on clinical-like validation studies, scored the way the evaluation scores maps.

A lower validation error on phantom volumes did not mean better maps of clinical-like acquisitions (the
model card's training history shows it twice), so the checkpoint to ship is chosen here. Each candidate
maps the validation studies (``clinical_studies.VALIDATION_STUDIES``: other heads than the evaluation's,
under the in-range protocols; written on first use) with the literal inference command, and is ranked by

    error = mean over T1, T2, PD and the studies of ( (|WM bias| + |GM bias|) / 2 + MPE in WM+GM )   (%)

the two figures the accuracy targets are stated in. Prints the ranking with each candidate's difference from
the best on the same heads (mean and standard error over heads: heads differ more than checkpoints do, so
a difference within about two standard errors is noise), writes ``selection.csv`` (with every head's
error) to ``--work``. The evaluation studies are never looked at, so ``scripts/clinical_eval.py`` stays a test.

From the repository root, e.g. for the networks a training run kept (``<output_dir>/snapshots``)::

    python bundle/scripts/select_model.py bundle/runs/<run>/snapshots/*.pt bundle/models/model.pt

A candidate written ``<model.pt>:<overlay>`` is built with that training-config overlay (e.g.
``train_unet.json``) instead of ``--overlay``'s, so different architectures share one ranking.

The physics refinement's prior widths (``refine_prior_width`` in ``inference.json``: how far each of the
network's maps may be off) are chosen the same way: each ``--prior-width`` is one candidate per checkpoint::

    python bundle/scripts/select_model.py bundle/models/model.pt --prior-width 1,1,1 --prior-width 0.1,0.3,0.03

The refinement's per-study gain calibration is on, as in the bundle; ``--calibrate off`` maps without it
(``--refine_calibrate false``), ``--calibrate both`` ranks each candidate with and without it; likewise
``--partial-volume off|both`` for fitting T2w and FLAIR as acquired on their own grids, ``--scalp-fat off|both`` for
holding the scalp's fat to its prior in the calibration. ``--smoothing T1,T2,PD``
(repeatable, mm) ranks the widths over which the refinement averages each map's move from the prior
(``refine_smoothing_mm``).

``--more-heads`` ranks on twenty-four in-range heads, the twelve and twelve more (``VALIDATION_MORE``), for
telling apart candidates whose difference on the twelve is within noise.

``--out-of-range`` ranks on other heads under two out-of-range protocols (``VALIDATION_OUT_OF_RANGE``) instead,
for choosing what the pipeline does there without looking at the evaluation's; its ``--prior-width`` candidates
are the widths under such a protocol (``refine_out_of_range_prior_width``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import the bundle's ``scripts`` package instead of this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import csv  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
from scripts import physics  # noqa: E402
from scripts.clinical_eval import (  # noqa: E402
    BUNDLE,
    REFINEMENT_SWITCHES,
    _truth,
    network_maps,
    read_maps,
    score,
    split_overlay,
    truth_against_delivered,
)
from scripts.clinical_studies import (  # noqa: E402
    ACQUISITION_FACTORS,
    VALIDATION_MORE,
    VALIDATION_OUT_OF_RANGE,
    VALIDATION_STUDIES,
    without_suffix,
    write_studies,
)
from scripts.outputs import file_sha256  # noqa: E402
from tqdm import tqdm  # noqa: E402

#: The refinement's parts a candidate has on or off (``--calibrate``, ``--partial-volume``, ``--water-fraction``,
#: ``--scalp-fat``);
#: the smoothing has widths of its own (``--smoothing``).
ON_OFF = [switch for switch in REFINEMENT_SWITCHES.values() if switch[2] is False]


def selection_error(figures: dict[str, dict[str, float]]) -> float:
    """The ranking figure of one study's scores (``clinical_eval.score``): mean of ROI |bias| and MPE, %."""
    return float(np.mean([(abs(f["WM_bias"]) + abs(f["GM_bias"])) / 2 + f["mpe"] for f in figures.values()]))


def gain_ratio_errors(report: dict, study: Path) -> np.ndarray:
    """|error| (%) of the refinement's gain ratios T2w/T1w and FLAIR/T1w against the study's true receiver gains
    (``truth/acquisition.json``): what the maps' calibration rests on. NaN where the maps were not refined."""
    gains = report.get("physics_refinement", {}).get("gains_per_pu")
    if gains is None:
        return np.full(2, np.nan)
    series = json.loads((study / "truth" / "acquisition.json").read_text())["series"]
    true = np.array([series[s]["gain_counts_per_pu"] for s in physics.SERIES])
    ratios = (np.asarray(gains) / gains[0]) / (true / true[0])
    return 100 * np.abs(ratios[1:] - 1)


def truth_in_span(report: dict, figures: dict[str, dict[str, float]]) -> list[bool]:
    """Per map and WM / GM: whether the true ROI mean lies inside the calibration's span
    (``physics_refinement.calibration_span_pct``); empty where the maps were not calibrated."""
    spans = report.get("physics_refinement", {}).get("calibration_span_pct", {})
    return [low <= truth_against_delivered(figures[m], roi) <= high
            for m, rois in spans.items() for roi, (low, high) in rois.items()]  # fmt: skip


def made_by(
    out: Path,
    sha256: str,
    refine: bool,
    prior_width,
    calibrate: bool = True,
    partial_volume: bool = True,
    water_fraction: bool = True,
    smoothing_mm=(0.0, 0.0, 0.0),
    scalp_fat: bool = True,
) -> bool:
    """Whether ``out`` holds maps of the weights with this SHA-256, with this refinement, prior width (3,), gain
    calibration, partial-volume model, water fraction, smoothing and scalp fat in the calibration."""
    if not (out / "report.json").exists():
        return False
    report = json.loads((out / "report.json").read_text())
    refinement = report["physics_refinement"]
    return (
        report["model"]["checkpoint_sha256"] == sha256
        and refinement["enabled"] == refine
        and (not refine or np.allclose(refinement["prior_width_log"], prior_width))
        and ("calibration" in refinement) == (refine and calibrate)
        and refinement.get("partial_volume", False) == (refine and partial_volume)
        and ("water_fraction" in refinement) == (refine and water_fraction)
        and (not refine or np.allclose(refinement.get("smoothing_mm", 0.0), smoothing_mm))
        and refinement.get("scalp_fat", False) == (refine and calibrate and scalp_fat)
    )


def rank(
    candidates: list[str],
    work: Path,
    overlay: str | None = None,
    refine: bool = True,
    prior_widths=(None,),
    reuse: bool = False,
    calibrations=(True,),
    partial_volumes=(True,),
    water_fractions=(True,),
    smoothings=(None,),
    scalp_fats=(True,),
    heads=None,
    without=(),
    true_mask: bool = False,
    width_key: str = "refine_prior_width",
) -> list[dict]:
    """Score every candidate (checkpoint x refinement prior width; None: the bundle's) on every validation study.

    A candidate is a checkpoint path, or ``<path>:<overlay>`` with its own training-config overlay (else ``overlay``).

    ``calibrations``: without (False) and/or with (True) the refinement's per-study gain calibration, each a
    candidate (``--refine_calibrate``); ``partial_volumes`` likewise for fitting T2w and FLAIR as acquired on their
    own grids (``--refine_partial_volume``), ``water_fractions`` for reading a deficit common to every series as
    missing water (``--refine_water_fraction``), ``scalp_fats`` for holding the scalp's fat to its prior in the
    calibration (``--refine_scalp_fat``). ``heads``: (study id, protocol, seed) to rank on (default
    ``VALIDATION_STUDIES``). ``without``: the same heads acquired without these of
    ``clinical_studies.ACQUISITION_FACTORS`` (e.g. ``("noise",)``), in ``studies_without_<factors>`` and
    ``maps_without_<factors>``: what each part of the acquisition does to the maps. ``true_mask``: every study
    mapped inside its true brain mask (``--mask``) instead of the one the pipeline finds, maps in ``*_true_mask``.
    ``width_key``: the ``inference.json`` key that ``prior_widths`` set (the widths that apply to ``heads``).

    ``reuse``: score the maps an earlier run left in ``work`` where they were made by the same weights and
    refinement (the code that made them is taken to be today's). Rows sorted by ``error`` (best first)."""
    kind = without_suffix(without)
    studies = write_studies(work / f"studies{kind}", heads or VALIDATION_STUDIES, without=without)  # the missing ones
    truths = {s.name: _truth(s) for s in studies}
    bundle = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    bundle_widths, bundle_smoothing = bundle[width_key], bundle["refine_smoothing_mm"]
    rows = []
    pairs = list(
        itertools.product(
            candidates, prior_widths, calibrations, partial_volumes, water_fractions, smoothings, scalp_fats
        )
    )
    for candidate, width, calibrate, partial_volume, water_fraction, smoothing, scalp_fat in tqdm(
        pairs, desc="candidates", unit="candidate"
    ):
        checkpoint, own_overlay = split_overlay(candidate)
        candidate_overlay = own_overlay or overlay
        name = os.path.relpath(checkpoint)
        label = "bundle's" if width is None else ",".join(f"{w:g}" for w in width)
        # report.json does not record the overlay: maps of the same weights under another overlay live apart
        folder = name.replace(os.sep, "_") + (f"_{Path(candidate_overlay).stem}" if candidate_overlay else "")
        folder += "" if width is None else "_w" + label.replace(",", "_")
        folder += "" if smoothing is None else "_s" + "_".join(f"{w:g}" for w in smoothing)
        folder += "" if refine else "_network"  # apart from the refined maps of the same weights
        on = (calibrate, partial_volume, water_fraction, scalp_fat)
        switches = dict(zip((flag for flag, *_ in ON_OFF), on, strict=True))
        smoothing_used = bundle_smoothing if smoothing is None else smoothing
        off = [what for flag, what, _, within in ON_OFF
               if refine and not switches[flag] and (within is None or switches[within])]  # fmt: skip
        folder += "".join(f"_no_{switch.replace(' ', '_')}" for switch in off)
        folder += "_true_mask" if true_mask else ""
        sha256 = file_sha256(checkpoint) if reuse else None
        width_used = bundle_widths if width is None else width
        per_study, gain_errors, in_span = [], [], []
        for study in studies:
            out = work / f"maps{kind}" / folder / study.name
            if reuse and made_by(
                out, sha256, refine, width_used, calibrate, partial_volume, water_fraction, smoothing_used, scalp_fat
            ):
                maps, report = read_maps(out)
            else:
                maps, report = network_maps(
                    name,
                    str(Path(checkpoint).resolve()),
                    candidate_overlay,
                    refine,
                    study,
                    out,
                    switches
                    | ({width_key: json.dumps(list(width))} if width is not None else {})
                    | ({"mask": study / "truth" / "mask.nii.gz"} if true_mask else {})
                    | ({"refine_smoothing_mm": json.dumps(list(smoothing))} if smoothing is not None else {}),
                )
            per_study.append(score(maps, *truths[study.name]))
            gain_errors.append(gain_ratio_errors(report, study))
            in_span += truth_in_span(report, per_study[-1])
        errors = [selection_error(f) for f in per_study]
        suffix = f":{own_overlay}" if own_overlay else ""
        label += "".join(f", no {switch}" for switch in off)
        label += "" if smoothing is None else ", smoothing " + ",".join(f"{w:g}" for w in smoothing) + " mm"
        row = {"checkpoint": name + suffix, "prior_width": label, "error": float(np.mean(errors))}
        for m in physics.MAPS:
            for key in ("WM_bias", "GM_bias", "mpe"):
                row[f"{m}_{key}"] = float(np.mean([f[m][key] for f in per_study]))
            for roi in ("WM", "GM"):  # the signed mean hides heads off in opposite directions
                row[f"{m}_{roi}_abs_bias"] = float(np.mean([abs(f[m][f"{roi}_bias"]) for f in per_study]))
            row[f"{m}_psnr"] = float(np.mean([f[m]["psnr"] for f in per_study]))  # reported, not ranked on
        if not np.isnan(gain_errors).all():
            row |= dict(zip(("T2w_gain_ratio_abs_error", "FLAIR_gain_ratio_abs_error"), np.mean(gain_errors, axis=0)))
        if in_span:
            row |= {"truth_in_span": sum(in_span), "spans": len(in_span)}
        row |= {f"error_{s.name}": e for s, e in zip(studies, errors, strict=True)}
        rows.append(row)
    rows.sort(key=lambda r: r["error"])
    # heads differ more than checkpoints do: judge each against the best on the same heads (paired)
    for row in rows:
        diff = [row[f"error_{s.name}"] - rows[0][f"error_{s.name}"] for s in studies]
        row["vs_best"] = float(np.mean(diff))
        row["vs_best_se"] = float(np.std(diff, ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return rows


def _widths(text: str, zero_allowed: bool = False) -> tuple[float, float, float]:
    widths = tuple(float(w) for w in text.split(","))
    if len(widths) != 3 or min(widths) < 0 or (min(widths) == 0 and not zero_allowed):
        kind = "non-negative" if zero_allowed else "positive"
        raise argparse.ArgumentTypeError(f"three {kind} widths T1,T2,PD expected, got {text!r}")
    return widths


def _smoothing(text: str) -> tuple[float, float, float]:
    return _widths(text, zero_allowed=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidates", nargs="+", help="network state dicts (model.pt), each optionally :<overlay>")
    parser.add_argument("--work", type=Path, default=BUNDLE / "eval" / "validation", help="studies and maps")
    parser.add_argument("--overlay", help="training-config overlay of the candidates, e.g. train_unet.json")
    parser.add_argument("--refine", choices=("true", "false"), default="true", help="physics refinement")
    parser.add_argument("--prior-width", action="append", type=_widths, metavar="T1,T2,PD",
                        help="refinement prior widths (log units), repeatable (default: the bundle's; with "
                             "--out-of-range: the widths under such a protocol)")  # fmt: skip
    parser.add_argument("--calibrate", choices=("off", "on", "both"), default="on",
                        help="per-study gain calibration (both: each candidate with and without)")  # fmt: skip
    parser.add_argument("--partial-volume", choices=("off", "on", "both"), default="on",
                        help="fit T2w and FLAIR as acquired on their own grids (--refine_partial_volume)")  # fmt: skip
    parser.add_argument("--water-fraction", choices=("off", "on", "both"), default="on",
                        help="read a common deficit of all series as less water (--refine_water_fraction)")  # fmt: skip
    parser.add_argument("--scalp-fat", choices=("off", "on", "both"), default="on",
                        help="hold the scalp's fat to its prior in the calibration (--refine_scalp_fat)")  # fmt: skip
    parser.add_argument("--smoothing", action="append", type=_smoothing, metavar="T1,T2,PD",
                        help="refinement smoothing of the fit's moves per map in mm (--refine_smoothing_mm), "
                             "repeatable (default: the bundle's)")  # fmt: skip
    parser.add_argument("--out-of-range", action="store_true",
                        help="rank on the out-of-range validation heads (VALIDATION_OUT_OF_RANGE) instead, "
                             "into selection_out_of_range.csv")  # fmt: skip
    parser.add_argument("--more-heads", action="store_true",
                        help="rank on the twelve in-range heads and twelve more (VALIDATION_MORE), for differences "
                             "within the twelve's noise, into selection_more.csv")  # fmt: skip
    parser.add_argument("--without", action="append", default=[], choices=ACQUISITION_FACTORS,
                        help="the same heads acquired without this part of the acquisition (repeatable), into "
                             "selection_without_<factors>.csv")  # fmt: skip
    parser.add_argument("--true-mask", action="store_true",
                        help="map inside each head's true brain mask, into selection_true_mask.csv")  # fmt: skip
    parser.add_argument("--reuse", action="store_true",
                        help="score maps an earlier run made with these weights and refinement")  # fmt: skip
    args = parser.parse_args(argv)
    widths = args.prior_width or (None,)
    switch = {"off": (False,), "on": (True,), "both": (False, True)}  # a refinement switch's candidates
    calibrations, partial_volumes = switch[args.calibrate], switch[args.partial_volume]
    water_fractions, scalp_fats = switch[args.water_fraction], switch[args.scalp_fat]
    if args.out_of_range and args.more_heads:
        parser.error("--more-heads adds in-range heads: not with --out-of-range")
    heads = VALIDATION_OUT_OF_RANGE if args.out_of_range else VALIDATION_STUDIES + VALIDATION_MORE * args.more_heads
    width_key = "refine_out_of_range_prior_width" if args.out_of_range else "refine_prior_width"
    rows = rank(args.candidates, args.work, args.overlay, args.refine == "true", widths, args.reuse, calibrations,
                partial_volumes, water_fractions, args.smoothing or (None,), scalp_fats, heads, args.without,
                args.true_mask, width_key)  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    kind = without_suffix(args.without)
    scope = "_out_of_range" * args.out_of_range + "_more" * args.more_heads
    table = args.work / f"selection{scope}{kind}{'_true_mask' * args.true_mask}.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    maps = " | ".join(f"{m} WM / GM bias % (mean abs), MPE %" for m in physics.MAPS)
    psnr = " / ".join(physics.MAPS)
    print(f"| checkpoint | prior width | error % | minus best's, paired ± s.e. | {maps} | PSNR {psnr} dB | gain ratio "
          "error T2w / FLAIR % (mean abs) |")  # fmt: skip
    print("|---|---|---|---|" + "---|" * (len(physics.MAPS) + 2))
    for r in rows:
        cells = [f"{r[f'{m}_WM_bias']:+.1f} / {r[f'{m}_GM_bias']:+.1f} ({r[f'{m}_WM_abs_bias']:.1f} / "
                 f"{r[f'{m}_GM_abs_bias']:.1f}), {r[f'{m}_mpe']:.1f}" for m in physics.MAPS]  # fmt: skip
        cells.append(" / ".join(f"{r[f'{m}_psnr']:.2f}" for m in physics.MAPS))
        cells.append(f"{r['T2w_gain_ratio_abs_error']:.1f} / {r['FLAIR_gain_ratio_abs_error']:.1f}"
                     if "T2w_gain_ratio_abs_error" in r else "")  # fmt: skip
        paired = f"{r['vs_best']:+.2f} ± {r['vs_best_se']:.2f}"
        print(f"| {r['checkpoint']} | {r['prior_width']} | {r['error']:.2f} | {paired} | " + " | ".join(cells) + " |")
    for r in rows:
        if "spans" in r:
            print(
                f"{r['checkpoint']}, {r['prior_width']}: the true WM / GM mean inside the calibration's span "
                f"(report.json calibration_span_pct) for {r['truth_in_span']} of {r['spans']} (head, map, tissue)"
            )
    print(f"best: {rows[0]['checkpoint']}, prior width {rows[0]['prior_width']}")


if __name__ == "__main__":
    main()
