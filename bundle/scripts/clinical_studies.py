"""Clinical-like DICOM test studies with known truth: the acquisitions the evaluation scores the maps on.

The training cohort (``scripts/phantom.py``) is volumes on the network's grid; a clinic sends 2D multi-slice
acquisitions. Each study here is one phantom head (skull, scalp, lesions) "acquired" as a scanner does:

- Anatomy and truth: ``phantom.make_subject`` with skull, scalp and (random) lesions on a fine grid
  (default 1 mm isotropic), tissue values drawn per study from ``phantom.TISSUE_RANGES``.
- Each series has its own grid: oblique axial (one tilt about the left-right axis per study, 0-15 deg,
  plus up to 2 deg per series about the other axes), 4 or 5 mm slices with a 0-1.5 mm gap, its own field
  of view (220-240 mm) and matrix (T1w 256-320, T2w 320-384, FLAIR 224-256), slices covering the brain.
  A voxel's value is the mean of the fine-grid signal over its slice profile (7 samples across the
  thickness, trilinear), so partial volume comes from the acquisition as it does on a scanner.
- Signal: ``physics.signal`` of the true maps with the series' TR/TE/TI, times one smooth receive-coil
  bias field shared by the three series (exponential of a random quadratic in world coordinates, about
  +-15 % over the head), times a receiver gain of its own per series (counts per p.u., unknown to the
  pipeline), plus Rician noise at a WM SNR (mean WM signal over the noise sigma) drawn in 20-60.
- Storage as the vendor of the protocol stores it: Philips-like as Enhanced MR with a RescaleSlope,
  Siemens-like classic MR at slope 1, GE-like classic MR with a slope; a 3-slice localizer series; nested
  folders with arbitrary file names.
- Truth on the T1w grid, as the pipeline writes its maps: T1, T2 (ms) and PD (p.u.) averaged over each
  voxel's slice profile the way the phantom mixes partial volume (PD-weighted relaxation rates), labels
  (``phantom.LABEL_NAMES``) and the brain mask at the voxel centre, and ``acquisition.json`` (protocols,
  gains, SNR, geometry).

Protocols (ms, ``PROTOCOLS``): the paper's external Philips set (T1w TR 229.69 / TE 2.3, T2w 2364.65 / 90,
FLAIR 7000 / 120 / TI 2250), a Siemens-like and a GE-like 3 T protocol, and one outside the training ranges
in every series (``out_of_range``: long TR, short TE, short TI). ``INVARIANCE_PROTOCOLS`` are five in-range
protocols for one head; ``out_of_range_long_te`` breaks the ranges the other way (short-TR T1w, long-TE T2w and
FLAIR) for the out-of-range validation heads only.

The evaluation studies are never used for training or model selection; ``VALIDATION_STUDIES`` (other
heads, ``--validation``) are there for choosing among checkpoints. Run from the repository root:
``python bundle/scripts/clinical_studies.py --out bundle/eval/clinical/studies`` (or let
``scripts/clinical_eval.py`` write them).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import the bundle's ``scripts`` package instead of this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from collections.abc import Collection  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scripts import physics  # noqa: E402
from scripts.partial_volume import slab_means  # noqa: E402
from scripts.phantom import BRAIN_LABELS, make_subject, rotation, write_subject  # noqa: E402
from scripts.study import Study, write_classic_mr_series, write_enhanced_mr_series  # noqa: E402
from tqdm import tqdm  # noqa: E402


@dataclass(frozen=True)
class Protocol:
    """A site's T1w/T2w/FLAIR protocol: (TR, TE, TI) in ms per series, and how its scanner stores images."""

    vendor: str
    timing: dict[str, tuple[float, float, float]]
    enhanced: bool  # one Enhanced MR file per series, else one classic file per slice
    rescaled: bool  # integers with a RescaleSlope (Philips, GE) or the counts themselves (Siemens)


PROTOCOLS = {
    "philips": Protocol(
        "Philips",
        {"T1w": (229.69, 2.3, 0.0), "T2w": (2364.65, 90.0, 0.0), "FLAIR": (7000.0, 120.0, 2250.0)},
        True,
        True,
    ),
    "siemens": Protocol(
        "Siemens",
        {"T1w": (550.0, 10.0, 0.0), "T2w": (5000.0, 100.0, 0.0), "FLAIR": (9000.0, 120.0, 2500.0)},
        False,
        False,
    ),
    "ge": Protocol(
        "GE", {"T1w": (500.0, 14.0, 0.0), "T2w": (4200.0, 105.0, 0.0), "FLAIR": (9500.0, 140.0, 2375.0)}, False, True
    ),
    # every series breaks a training range: long-TR T1w, short-TE T2w, short-TI FLAIR
    "out_of_range": Protocol(
        "Siemens",
        {"T1w": (1400.0, 8.0, 0.0), "T2w": (3000.0, 40.0, 0.0), "FLAIR": (11000.0, 90.0, 1350.0)},
        False,
        True,
    ),
    # the other way: short-TR T1w, T2w and FLAIR at TEs past the training ranges (T2 well encoded, little signal)
    "out_of_range_long_te": Protocol(
        "GE", {"T1w": (160.0, 9.0, 0.0), "T2w": (6000.0, 190.0, 0.0), "FLAIR": (10000.0, 185.0, 2600.0)}, False, True
    ),
}
#: Five in-range protocols under which one head is written for the invariance test.
INVARIANCE_PROTOCOLS = {
    "philips": PROTOCOLS["philips"],
    "siemens": PROTOCOLS["siemens"],
    "ge": PROTOCOLS["ge"],
    "long": Protocol(
        "Siemens",
        {"T1w": (800.0, 20.0, 0.0), "T2w": (8000.0, 130.0, 0.0), "FLAIR": (11000.0, 150.0, 2800.0)},
        False,
        False,
    ),
    "short": Protocol(
        "GE", {"T1w": (350.0, 6.0, 0.0), "T2w": (3500.0, 70.0, 0.0), "FLAIR": (6000.0, 80.0, 1800.0)}, False, True
    ),
}
#: The evaluation's studies: (study id, protocol, seed). Seeds differ from every training seed (phantom.py).
EVALUATION_STUDIES = (
    ("philips-1", "philips", 101),
    ("philips-2", "philips", 102),
    ("siemens-1", "siemens", 103),
    ("ge-1", "ge", 104),
    ("out_of_range-1", "out_of_range", 105),
    ("out_of_range-2", "out_of_range", 106),
)
INVARIANCE_SEED = 201
#: Studies for choosing among checkpoints (``scripts/select_model.py``), never for the evaluation: other heads
#: (seeds) under the in-range protocols, so that model selection does not look at the evaluation's truth.
VALIDATION_STUDIES = (
    ("val-philips-1", "philips", 301),
    ("val-siemens-1", "siemens", 302),
    ("val-ge-1", "ge", 303),
    ("val-philips-2", "philips", 304),
    ("val-siemens-2", "siemens", 305),
    ("val-ge-2", "ge", 306),
    ("val-philips-3", "philips", 307),
    ("val-siemens-3", "siemens", 308),
    ("val-ge-3", "ge", 309),
    ("val-philips-4", "philips", 310),
    ("val-siemens-4", "siemens", 311),
    ("val-ge-4", "ge", 312),
)
#: Twelve more heads under the in-range protocols (``select_model --more-heads``): heads differ more than the
#: refinement's variants do, and on twelve a difference under about 0.2 % of error is within noise.
VALIDATION_MORE = tuple(
    (f"val-{protocol}-{5 + j // 3}", protocol, 503 + j) for j, protocol in enumerate(("philips", "siemens", "ge") * 4)
)
#: Other heads under the out-of-range protocols, for choosing how the pipeline behaves there (``select_model
#: --out-of-range``); never for the evaluation. The evaluation's protocol and one that breaks the ranges the other
#: way, so that what is chosen there does not rest on one protocol's weaknesses.
VALIDATION_OUT_OF_RANGE = tuple(
    (f"val-{protocol}-{k}", protocol, seed + k)
    for protocol, seed in (("out_of_range", 400), ("out_of_range_long_te", 404))
    for k in range(1, 5)
)

_MATRIX = {"T1w": (256, 320), "T2w": (320, 384), "FLAIR": (224, 256)}
_DESCRIPTIONS = {"T1w": "T1W_TSE_TRA", "T2w": "T2W_TSE_TRA", "FLAIR": "T2W_FLAIR_TRA"}
_SNR_RANGE = (20.0, 60.0)
#: What an acquisition does beyond sampling the truth, each one removable for ablations (``acquire_study``'s
#: ``without``): Rician noise, the coil's bias field, oblique slices, 4-5 mm slices with gaps (without: 3 mm
#: contiguous, the training cohort's own voxels), and T2w/FLAIR on grids of their own (without: the T1w's).
ACQUISITION_FACTORS = ("noise", "bias_field", "oblique", "thick_slices", "own_grids")
_THIN_SLICE_MM = 3.0


def acquire_study(
    out_dir: str | os.PathLike,
    protocols: dict[str, Protocol],
    seed: int,
    fine_voxel: float = 1.0,
    overwrite: bool = False,
    without: Collection[str] = (),
) -> list[Path]:
    """Write one head (``seed``) acquired under each of ``protocols`` ({name: Protocol}) into ``out_dir/<name>``.

    All acquisitions share the head, tissue values, bias field, tilt and noise levels; only the protocol
    (and storage) changes, which is what the protocol-invariance test needs. Each ``out_dir/<name>`` gets
    ``dicom/`` and ``truth/``. ``fine_voxel`` (mm) > 1 makes a coarse, fast study for tests. ``without``: factors
    of ``ACQUISITION_FACTORS`` to leave out, every random draw staying the same (e.g. ``("noise",)``: the same
    acquisition without its noise), to measure what each does to the maps; without "thick_slices" the grids have
    more slices, so the noise and the gains drawn after it differ.
    """
    unknown = set(without) - set(ACQUISITION_FACTORS)
    if unknown:
        raise ValueError(f"unknown acquisition factors {sorted(unknown)}; known: {ACQUISITION_FACTORS}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    subject = make_subject(rng, voxel_size=(fine_voxel,) * 3, lesions=bool(rng.integers(0, 4)), head=True)
    bias = _bias_field(rng, subject)
    if "bias_field" in without:
        bias = np.ones_like(bias)
    tilt = rng.uniform(0.0, 15.0)
    geometry = {name: _grid(rng, subject, name, tilt, fine_voxel, without) for name in physics.SERIES}
    if "own_grids" in without:
        geometry = dict.fromkeys(physics.SERIES, geometry["T1w"])
    snr = {name: rng.uniform(*_SNR_RANGE) for name in physics.SERIES}
    folders = []
    for name, protocol in protocols.items():
        study_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(8, len(folders))))
        folders.append(
            _write_acquisition(
                Path(out_dir) / name, subject, bias, geometry, snr, protocol, study_rng, seed, overwrite, without
            )
        )
    return folders


def _bias_field(rng, subject) -> np.ndarray:
    """exp(random quadratic of world coordinates / 100 mm): smooth, about +-15 % across a head."""
    shape = subject["mask"].shape
    world = nib.affines.apply_affine(subject["affine"], np.indices(shape).reshape(3, -1).T).T.reshape(3, *shape)
    centre = world[:, subject["mask"] > 0].mean(axis=1)
    x = (world - centre[:, None, None, None]) / 100.0
    terms = [*x, *(x[i] * x[j] for i in range(3) for j in range(i, 3))]
    return np.exp(sum(c * t for c, t in zip(rng.uniform(-0.12, 0.12, len(terms)), terms, strict=True))).astype(
        np.float32
    )


def _grid(rng, subject, series: str, tilt_deg: float, fine_voxel: float, without: Collection[str] = ()) -> dict:
    """Oblique axial acquisition grid of one series: RAS affine with voxel (column, row, slice), and shape.
    ``without`` "oblique": true axial; "thick_slices": 3 mm contiguous slices (same draws either way)."""
    angles = np.deg2rad([tilt_deg + rng.uniform(-2, 2), rng.uniform(-2, 2), rng.uniform(-2, 2)])
    if "oblique" in without:
        angles[:] = 0.0
    # DICOM display order: columns to the patient's left, rows to posterior, slices to superior (RAS)
    axes = rotation(angles) @ np.diag([-1.0, -1.0, 1.0])
    fov = rng.uniform(220.0, 240.0)
    low, high = _MATRIX[series]
    columns = max(16, int(rng.integers(low // 16, high // 16 + 1)) * 16 // max(1, round(fine_voxel)))
    spacing_in_plane = fov / columns
    thickness = float(rng.choice([4.0, 5.0])) * max(1.0, fine_voxel / 2)
    slice_spacing = thickness + rng.uniform(0.0, 1.5)
    if "thick_slices" in without:
        thickness = slice_spacing = _THIN_SLICE_MM * max(1.0, fine_voxel / 2)
    brain = nib.affines.apply_affine(subject["affine"], np.argwhere(subject["mask"] > 0))
    centre = brain.mean(axis=0) + rng.uniform(-5, 5, 3)
    along = (brain - centre) @ axes[:, 2]
    n_slices = int(np.ceil((along.max() - along.min()) / slice_spacing)) + 1
    shape = (columns, columns, n_slices)
    scale = np.diag([spacing_in_plane, spacing_in_plane, slice_spacing])
    mid = (along.max() + along.min()) / 2
    affine = nib.affines.from_matvec(axes @ scale, centre + mid * axes[:, 2])
    affine[:3, 3] -= affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return {"affine": affine, "shape": shape, "thickness": thickness}


def _sample(volume: np.ndarray, fine_affine, grid: dict, order: int = 1) -> np.ndarray:
    """Mean of ``volume`` (fine grid) over each voxel's slice profile; order 0: the value at its centre."""
    return slab_means(volume, fine_affine, grid["affine"], grid["shape"], grid["thickness"], order)


def _write_acquisition(folder, subject, bias, geometry, snr, protocol, rng, seed, overwrite, without) -> Path:
    if folder.exists():
        if not overwrite:
            raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(folder)
    t1, t2, pd = (subject[name] for name in physics.MAPS)
    study = Study(seed=f"pdpe-qmri clinical-like study {seed} {folder.name}", patient_id=f"CLIN-{seed:04d}",
                  patient_name=f"CLINICAL^{seed}", study_description=f"{protocol.vendor}-like brain")  # fmt: skip
    dicom_root = folder / "dicom" / f"{rng.integers(1e8):08d}"
    record = {"seed": seed, "vendor": protocol.vendor, "without": sorted(without), "series": {}}
    for number, name in enumerate(physics.SERIES, start=3):
        tr, te, ti = protocol.timing[name]
        grid = geometry[name]
        signal = _sample(physics.signal(pd, t1, t2, tr, te, ti) * bias, subject["affine"], grid)
        wm = _sample(subject["labels"].astype(np.float32), subject["affine"], grid, order=0) == 3
        sigma = signal[wm].mean() / snr[name] if "noise" not in without else 0.0
        noisy = np.hypot(signal + rng.normal(0, sigma, signal.shape), rng.normal(0, sigma, signal.shape))
        if protocol.rescaled:
            gain = float(rng.uniform(0.5, 500.0))
        else:  # counts stored as they are must fit 12 bits
            gain = min(float(rng.uniform(5.0, 30.0)), 4000.0 / float(noisy.max()))
        series_dir = dicom_root / f"{rng.integers(1e6):06d}"
        options = {"study": study, "series_number": number, "series_description": _DESCRIPTIONS[name],
                   "tr": tr, "te": te, "ti": ti, "slope": None if protocol.rescaled else 1.0,
                   "slice_thickness": grid["thickness"]}  # fmt: skip
        if protocol.enhanced:
            written = [write_enhanced_mr_series(gain * noisy, grid["affine"], series_dir, **options)]
        else:
            written = write_classic_mr_series(gain * noisy, grid["affine"], series_dir, **options)
        for path in written:
            path.rename(series_dir / f"{rng.integers(1e12):012d}")
        record["series"][name] = {
            "TR_ms": tr, "TE_ms": te, "TI_ms": ti, "gain_counts_per_pu": gain, "wm_snr": snr[name],
            "shape": list(grid["shape"]), "affine": grid["affine"].round(6).tolist(),
            "slice_thickness_mm": grid["thickness"], "enhanced": protocol.enhanced,
        }  # fmt: skip
    _write_localizer(study, dicom_root / "localizer", geometry["T1w"])
    _write_truth(folder / "truth", subject, geometry["T1w"])
    record["params"] = [list(protocol.timing[name]) for name in physics.SERIES]
    (folder / "truth" / "acquisition.json").write_text(json.dumps(record, indent=2) + "\n")
    return folder


def _write_localizer(study: Study, folder: Path, grid: dict) -> None:
    """Three coarse slices of a fast gradient-echo scout, as every exam starts with: never a usable input."""
    affine = grid["affine"] @ np.diag([4.0, 4.0, 8.0, 1.0])
    volume = np.full((64, 64, 3), 100.0)
    scout = ("ORIGINAL", "PRIMARY", "LOCALIZER", "NONE")
    write_classic_mr_series(volume, affine, folder, study=study, series_number=1, series_description="localizer",
                            tr=8.6, te=4.0, image_type=scout, slope=1.0)  # fmt: skip


def _write_truth(folder: Path, subject: dict, grid: dict) -> None:
    """True maps, labels and mask on the T1w grid: voxel means that mix water as the phantom does."""
    fine = subject["affine"]
    pd = _sample(subject["PD"], fine, grid)
    rates = {name: _sample(np.where(subject[name] > 0, subject["PD"] / np.maximum(subject[name], 1e-3), 0), fine, grid)
             for name in ("T1", "T2")}  # fmt: skip
    labels = _sample(subject["labels"].astype(np.float32), fine, grid, order=0).astype(np.uint8)
    tissue = labels > 0
    truth = {"PD": np.where(tissue, pd, 0).astype(np.float32), "labels": labels, "affine": grid["affine"],
             "mask": np.isin(labels, BRAIN_LABELS).astype(np.uint8)}  # fmt: skip
    for name, rate in rates.items():
        truth[name] = np.where(tissue & (rate > 0), pd / np.maximum(rate, 1e-12), 0).astype(np.float32)
    write_subject(truth, folder)


def without_suffix(without: Collection[str]) -> str:
    """Folder and table suffix of studies acquired without these ``ACQUISITION_FACTORS`` ("" for none)."""
    return "_without_" + "_".join(sorted(set(without))) if without else ""


def write_studies(
    out_dir: str | os.PathLike,
    studies=EVALUATION_STUDIES,
    fine_voxel: float = 1.0,
    overwrite: bool = False,
    without: Collection[str] = (),
) -> list[Path]:
    """One head per (study id, protocol, seed) of ``studies`` into ``out_dir/<study id>``; returns the folders.

    Studies already there (with their ``truth/``) are kept unless ``overwrite``; ``without`` as ``acquire_study``.
    """
    out = Path(out_dir)
    for study_id, protocol, seed in tqdm(studies, desc="clinical-like studies", unit="study"):
        if overwrite or not (out / study_id / "truth").is_dir():
            acquire_study(out, {study_id: PROTOCOLS[protocol]}, seed, fine_voxel, overwrite, without)
    return [out / study_id for study_id, _, _ in studies]


def write_evaluation_studies(out_dir: str | os.PathLike, fine_voxel: float = 1.0, overwrite: bool = False) -> dict:
    """All of ``EVALUATION_STUDIES`` and the invariance head; returns {"studies": [...], "invariance": [...]}."""
    out = Path(out_dir)
    studies = write_studies(out, EVALUATION_STUDIES, fine_voxel, overwrite)
    invariance = acquire_study(out / "invariance", INVARIANCE_PROTOCOLS, INVARIANCE_SEED, fine_voxel, overwrite)
    return {"studies": studies, "invariance": invariance}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the studies")
    parser.add_argument("--fine-voxel", type=float, default=1.0, help="mm of the anatomy grid (coarser: faster)")
    parser.add_argument("--validation", action="store_true", help="the model-selection studies instead")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.validation:
        written = write_studies(args.out, VALIDATION_STUDIES, args.fine_voxel, args.overwrite)
    else:
        found = write_evaluation_studies(args.out, args.fine_voxel, args.overwrite)
        written = [*found["studies"], *found["invariance"]]
    print("\n".join(str(p) for p in written))


if __name__ == "__main__":
    main()
