"""Synthetic quantitative-MRI cohort: T1/T2/PD maps of distinct virtual subjects with labels and masks.

The paper's MDME data are private and nothing may be downloaded at run time, so the bundle generates its
own data (the model card, docs/README.md, Data). Decisions taken here:

- Anatomy: the MNI152 (2009) GM/WM probability maps and brain mask shipped offline with nilearn; CSF is
  the rest of the brain mask. GM/WM are cut to the brain mask so the three tissues sum to it. The
  population-average probabilities are sharpened (power 3, renormalised) into individual-like crisp
  boundaries, then blurred by a Gaussian of the target voxel's extent to model its partial volume.
- A subject is the template pulled back through one composed coordinate map, so the probabilities are
  interpolated once (trilinear, keeping partial volume): a random affine about the brain centre
  (rotation up to 8 deg per axis, scaling 0.92-1.08 per axis, translation up to 6 mm, which also sets a
  random slice position), a Gaussian radial expansion about each lateral ventricle (ventricle
  enlargement, a diffeomorphism for strength < 1) and a smooth random displacement field.
- Grid: axial slices of a 224 x 256 x 192 mm RAS field of view centred on the brain, default voxels
  1 x 1 x 3 mm (a clinical 2D TSE). Any voxel size works as long as the in-plane matrix stays <= 256.
- Values: per subject and tissue a base (T1, T2, PD) drawn uniformly in ``TISSUE_RANGES``, times a smooth
  multiplicative texture (3 % standard deviation, smoothed over 2 mm), clipped into the tissue's range, so
  every pure-tissue voxel stays inside its range. Partial volume mixes water, not numbers: PD is the
  volume-weighted mean (empty space holds no water), R1 = 1/T1 and R2 = 1/T2 are averaged with weights
  volume x PD (fast exchange between compartments), so a voxel relaxes like the water it contains.
- Lesions (optional): 2-6 blobs of random radius (3-10 mm) with smoothly irregular borders, centred in
  deep WM, replacing WM only; each lesion draws its own values.
- Head (optional): skull and scalp fat shells around the deformed brain, thicknesses (4-7 mm and 4-8 mm)
  modulated smoothly, from the distance to the brain mask; they fill the non-brain part of each voxel.
- Labels: a voxel belongs to the brain when its brain fraction is >= 0.5 (then its dominant brain
  tissue), else to the head when head tissue outweighs empty space, else to the background. The mask
  is labels 1-4 and every map is 0 on background voxels.
- Reproducibility: every subject draws from its own ``SeedSequence(seed, spawn_key=(family, k))``, so a
  subject does not depend on the cohort size; nibabel writes gzip with mtime 0, so a seed gives the same
  bytes.

Run from ``bundle/``: ``python -m scripts.phantom --out ../data/phantoms --subjects 40 --seed 0``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache, partial
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scripts.physics import MAP_UNITS, MAPS, SERIES, protocol_bounds, protocol_violations
from tqdm import tqdm

LABEL_NAMES = ("background", "CSF", "GM", "WM", "lesion", "skull", "scalp")
BRAIN_LABELS = (1, 2, 3, 4)
#: (low, high) of T1 (ms), T2 (ms), PD (p.u.) per label: 3 T literature ranges (the model card, Data).
TISSUE_RANGES = {
    1: ((3300.0, 4800.0), (900.0, 2200.0), (95.0, 100.0)),
    2: ((1150.0, 1650.0), (85.0, 115.0), (78.0, 88.0)),
    3: ((700.0, 1100.0), (65.0, 90.0), (65.0, 75.0)),
    4: ((900.0, 2500.0), (100.0, 400.0), (75.0, 95.0)),
    5: ((200.0, 300.0), (1.0, 10.0), (5.0, 15.0)),
    6: ((350.0, 420.0), (100.0, 130.0), (85.0, 95.0)),
}

DEFAULT_VOXEL_SIZE = (1.0, 1.0, 3.0)
FOV_MM = (224.0, 256.0, 192.0)
#: MNI152 point the field of view and the random affine are centred on (mm).
BRAIN_CENTER_MM = (0.0, -17.0, 5.0)
MAX_IN_PLANE = 256

# Lateral ventricles in the nilearn MNI152 CSF map (deep CSF components): centroids and spread (mm).
_VENTRICLE_CENTERS_MM = ((-16.0, -20.0, 16.0), (16.0, -20.0, 16.0))
_VENTRICLE_SIGMA_MM = (8.0, 22.0, 7.0)
_SHARPEN = 3.0
_TEXTURE_STD = 0.03
_TEXTURE_SIGMA_MM = 2.0

#: Out-of-range protocols of the "protocol" test family, rows (TR, TE, TI) ms in SERIES order: every
#: series breaks at least one training range (checked at generation against physics.PROTOCOL_RANGES).
SHIFTED_PROTOCOLS = (
    ((1800.0, 8.0, 0.0), (4000.0, 40.0, 0.0), (9000.0, 90.0, 1300.0)),  # long-TR T1w, short-TE T2w, short-TI
    ((500.0, 40.0, 0.0), (12000.0, 200.0, 0.0), (14000.0, 120.0, 3500.0)),  # long-TE T1w, very long TR/TE/TI
)

# MR Shepp-Logan tissues as phantominator computes them at 3 T (Gach et al. 2008; T1 = A B0^C):
# label -> (T1 ms, T2 ms, PD p.u.). Voxels are labelled by the nearest entry.
_SHEPP_LOGAN_TISSUES = {
    1: (4200.0, 1990.0, 98.0),  # CSF
    2: (1295.3, 100.0, 74.5),  # gray matter
    3: (887.0, 80.0, 61.7),  # white matter
    4: (1175.3, 100.0, 95.0),  # "tumor"
    5: (587.1, 50.0, 12.0),  # marrow (skull)
    6: (376.6, 70.0, 80.0),  # scalp
}

FAMILIES = {
    "deformation": "unseen deformations of the template (same distribution as training)",
    "lesion": "subjects with WM lesions; training and validation subjects have none",
    "protocol": "fixed TR/TE/TI outside physics.PROTOCOL_RANGES, given in the entry's 'params'",
    "shepp_logan": "unseen anatomy: phantominator's 3D MR Shepp-Logan phantom (brain part)",
    "head": "subject with skull and scalp around the brain (source of the sample DICOM study)",
}
_FAMILY_KEYS = {"regular": 0, "lesion": 1, "protocol": 2, "head": 3, "validation_protocols": 99}


@lru_cache(maxsize=1)
def _mni152():
    """(CSF, GM, WM) probabilities, float32 (3, 197, 233, 189), and the template's world->voxel affine."""
    from nilearn import datasets  # slow import, only needed here

    brain = datasets.load_mni152_brain_mask(resolution=1)
    mask = brain.get_fdata(dtype=np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32) * mask
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32) * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    return np.stack([csf, gm, wm]), np.linalg.inv(brain.affine)


@lru_cache(maxsize=2)
def _template(voxel_size) -> tuple[np.ndarray, np.ndarray]:
    """MNI152 tissue fractions as one subject would have them, seen through voxels of ``voxel_size`` (mm).

    A population-average probability map is blurrier than any single brain: raising the probabilities
    to ``_SHARPEN`` and renormalising gives crisp, individual-like tissue boundaries. A Gaussian of the
    voxel's extent (FWHM) then models the partial volume of the target voxels (e.g. 3 mm slices), so
    that one trilinear sample per voxel gives its volume fractions.
    """
    probabilities, to_voxel = _mni152()
    sharp = probabilities**_SHARPEN
    sharp *= probabilities.sum(axis=0) / np.maximum(sharp.sum(axis=0), 1e-12)
    sigma = [0.0, *(np.sqrt(np.maximum(np.square(voxel_size) - 1.0, 0.0)) / (2 * np.sqrt(2 * np.log(2))))]
    return ndimage.gaussian_filter(sharp, sigma, mode="constant"), to_voxel


def output_grid(voxel_size=DEFAULT_VOXEL_SIZE, fov_mm=FOV_MM, center_mm=BRAIN_CENTER_MM):
    """Shape and RAS affine of an axial grid covering ``fov_mm`` around ``center_mm``."""
    spacing = np.asarray(voxel_size, dtype=float)
    shape = tuple(int(round(f / v)) for f, v in zip(fov_mm, spacing, strict=True))
    if max(shape[:2]) > MAX_IN_PLANE:
        raise ValueError(f"in-plane matrix {shape[:2]} exceeds {MAX_IN_PLANE}: use a coarser voxel size")
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.asarray(center_mm) - (np.asarray(shape) - 1) / 2 * spacing
    return shape, affine


def _transform(affine, points) -> np.ndarray:
    """Apply a 4x4 affine to points stored as (3, ...), in float32."""
    affine = np.asarray(affine, dtype=np.float32)
    return np.tensordot(affine[:3, :3], points, axes=1) + affine[:3, 3].reshape(3, *[1] * (points.ndim - 1))


def _smooth_noise(rng, shape, spacing, sigma_mm, count=1) -> np.ndarray:
    """``count`` unit-variance random fields, white noise smoothed by a Gaussian of ``sigma_mm``, (count, *shape).

    Drawn on a grid no finer than sigma/2 and interpolated up: the same field statistics at a fraction
    of the cost of filtering full-size noise.
    """
    spacing = np.asarray(spacing, dtype=float)
    coarse = np.maximum(spacing, sigma_mm / 2.0)
    coarse_shape = np.ceil(np.asarray(shape) * spacing / coarse).astype(int)
    fields = np.empty((count, *shape), dtype=np.float32)
    for field in fields:
        noise = ndimage.gaussian_filter(
            rng.standard_normal(coarse_shape, dtype=np.float32), sigma_mm / coarse, mode="wrap"
        )
        noise /= noise.std()
        field[...] = ndimage.zoom(noise, np.asarray(shape) / coarse_shape, order=1, mode="nearest", grid_mode=True)
    return fields


def rotation(angles) -> np.ndarray:
    """Rotation matrix from angles (rad) about x, y, z."""
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(angle)
        r[i, j], r[j, i] = -np.sin(angle), np.sin(angle)
        matrix = r @ matrix
    return matrix


def _enlarge_ventricles(points, strength) -> None:
    """Pull template sample points towards each ventricle centre, in place: the ventricles grow.

    ``q -> q - s exp(-m^2/2) (q - c)`` with m the Mahalanobis radius is monotone along every ray from c
    for s < 1, hence invertible and smooth.
    """
    sigma = np.asarray(_VENTRICLE_SIGMA_MM, dtype=np.float32)[:, None, None, None]
    for center in _VENTRICLE_CENTERS_MM:
        offset = points - np.asarray(center, dtype=np.float32)[:, None, None, None]
        weight = strength * np.exp(-0.5 * np.sum((offset / sigma) ** 2, axis=0))
        points -= weight * offset


def _brain_fractions(rng, world, voxel_size) -> np.ndarray:
    """(CSF, GM, WM) volume fractions of one random subject on the grid of ``world``, (3, *shape)."""
    probabilities, to_voxel = _template(tuple(voxel_size))
    # Random affine about the brain centre c, as a pull-back: q = A (p - c - t) + c.
    linear = rotation(np.deg2rad(rng.uniform(-8, 8, 3))) @ np.diag(rng.uniform(0.92, 1.08, 3))
    center = np.asarray(BRAIN_CENTER_MM)
    pullback = np.eye(4)
    pullback[:3, :3] = linear
    pullback[:3, 3] = center - linear @ (center + rng.uniform(-6, 6, 3))
    points = _transform(pullback, world)
    _enlarge_ventricles(points, rng.uniform(0.0, 0.45))
    points += rng.uniform(1.5, 4.0) * _smooth_noise(rng, world.shape[1:], voxel_size, 15.0, count=3)
    index = _transform(to_voxel, points)
    return np.stack(
        [ndimage.map_coordinates(p, index, order=1, mode="constant", prefilter=False) for p in probabilities]
    )


def _uniform(rng, ranges) -> np.ndarray:
    """One (T1, T2, PD) drawn uniformly within ``ranges``."""
    low, high = np.asarray(ranges).T
    return rng.uniform(low, high).astype(np.float32)


def _add_lesions(rng, fractions, values, world, voxel_size) -> None:
    """Carve WM lesions into ``fractions`` (CSF..scalp at index = label) and their values into ``values``."""
    shape = fractions.shape[1:]
    deep_wm = np.flatnonzero(fractions[3] >= 0.95)
    if deep_wm.size == 0:
        return
    irregularity = np.clip(1.0 + 0.3 * _smooth_noise(rng, shape, voxel_size, 3.0)[0], 0.5, 1.5)
    edge_mm = voxel_size[0]
    blob = np.zeros(shape, dtype=np.float32)
    lesion_values = np.zeros((3, *shape), dtype=np.float32)
    for center in rng.choice(deep_wm, size=rng.integers(2, 7)):
        radius = rng.uniform(3.0, 10.0)
        distance = np.linalg.norm(world - world.reshape(3, -1)[:, center, None, None, None], axis=0)
        this = np.clip((radius * irregularity - distance) / edge_mm + 0.5, 0.0, 1.0)
        stronger = this > blob
        blob[stronger] = this[stronger]
        lesion_values[:, stronger] = _uniform(rng, TISSUE_RANGES[4])[:, None]
    fractions[4] = fractions[3] * blob
    fractions[3] -= fractions[4]
    values[4] = lesion_values


def _add_head(rng, fractions, voxel_size) -> None:
    """Fill the non-brain part of voxels near the brain with a skull shell wrapped in scalp fat."""
    brain = fractions[1:5].sum(axis=0)
    distance = ndimage.distance_transform_edt(brain < 0.5, sampling=voxel_size).astype(np.float32)
    thickness = 1.0 + 0.2 * _smooth_noise(rng, brain.shape, voxel_size, 15.0, count=2)
    skull_out = rng.uniform(4.0, 7.0) * thickness[0]
    scalp_out = skull_out + rng.uniform(4.0, 8.0) * thickness[1]
    inside_skull, inside_head = (
        np.clip((r - distance) / voxel_size[0] + 0.5, 0.0, 1.0) for r in (skull_out, scalp_out)
    )
    fractions[5] = (1.0 - brain) * inside_skull
    fractions[6] = (1.0 - brain) * (inside_head - inside_skull)


def labels_of(fractions) -> np.ndarray:
    """Brain (fraction >= 0.5) -> its dominant tissue; else head tissue if it outweighs empty space; else 0."""
    brain = fractions[1:5].sum(axis=0)
    head = fractions[5:7].sum(axis=0)
    labels = np.where(head > fractions[0], 5 + np.argmax(fractions[5:7], axis=0), 0)
    labels = np.where(brain >= 0.5, 1 + np.argmax(fractions[1:5], axis=0), labels)
    return labels.astype(np.uint8)


def random_tissue_values(rng: np.random.Generator, labels: Sequence[int]) -> dict[int, np.ndarray]:
    """One (T1, T2, PD) per label, each drawn uniformly within ``TISSUE_RANGES``."""
    return {label: _uniform(rng, TISSUE_RANGES[label]) for label in labels}


def random_texture(rng: np.random.Generator, shape, spacing) -> np.ndarray:
    """(3, *shape) smooth multiplicative texture of T1, T2 and PD (``_TEXTURE_STD`` over ``_TEXTURE_SIGMA_MM``)."""
    return 1.0 + _TEXTURE_STD * _smooth_noise(rng, shape, spacing, _TEXTURE_SIGMA_MM, count=3)


def mix(fractions, values, texture, labels) -> dict[str, np.ndarray]:
    """T1, T2, PD maps from tissue fractions and values: water-weighted relaxation rates (module doc).

    ``fractions`` (7, *shape) by label, ``values`` {label: (T1, T2, PD)}, ``texture`` (3, *shape),
    ``labels`` (*shape) as :func:`labels_of`; maps are 0 where ``labels`` is 0.
    """
    water = np.zeros(labels.shape, dtype=np.float32)
    r1 = np.zeros_like(water)
    r2 = np.zeros_like(water)
    for label, base in values.items():
        t1, t2, pd = (
            np.clip(b * t, low, high) for b, t, (low, high) in zip(base, texture, TISSUE_RANGES[label], strict=True)
        )
        tissue_water = fractions[label] * pd
        water += tissue_water
        r1 += tissue_water / t1
        r2 += tissue_water / t2
    tissue = labels > 0
    maps = {name: np.zeros(labels.shape, dtype=np.float32) for name in MAPS}
    maps["T1"][tissue] = water[tissue] / r1[tissue]
    maps["T2"][tissue] = water[tissue] / r2[tissue]
    maps["PD"][tissue] = water[tissue]
    return maps


def make_subject(
    rng: np.random.Generator, *, voxel_size=DEFAULT_VOXEL_SIZE, lesions: bool = False, head: bool = False
) -> dict:
    """One random subject on the axial grid of ``voxel_size`` (mm).

    Returns float32 "T1" (ms), "T2" (ms), "PD" (p.u.); uint8 "mask" (labels 1-4) and "labels"
    (``LABEL_NAMES``); the 4x4 RAS "affine"; and float32 "fractions" (7, *shape): the volume fraction of
    each label's tissue (index = label, 0 = empty space), e.g. to select pure-tissue voxels.
    """
    voxel_size = tuple(float(v) for v in voxel_size)
    shape, affine = output_grid(voxel_size)
    world = _transform(affine, np.indices(shape, dtype=np.float32))
    fractions = np.zeros((len(LABEL_NAMES), *shape), dtype=np.float32)
    fractions[1:4] = _brain_fractions(rng, world, voxel_size)
    values = random_tissue_values(rng, (1, 2, 3))
    if lesions:
        _add_lesions(rng, fractions, values, world, voxel_size)
    if head:
        _add_head(rng, fractions, voxel_size)
        values.update(random_tissue_values(rng, (5, 6)))
    fractions[0] = np.clip(1.0 - fractions[1:].sum(axis=0), 0.0, 1.0)
    labels = labels_of(fractions)
    maps = mix(fractions, values, random_texture(rng, shape, voxel_size), labels)
    mask = np.isin(labels, BRAIN_LABELS).astype(np.uint8)
    return {**maps, "mask": mask, "labels": labels, "affine": affine, "fractions": fractions}


def shepp_logan_subject(*, voxel_size=DEFAULT_VOXEL_SIZE, head: bool = False) -> dict:
    """phantominator's 3D MR Shepp-Logan phantom as a subject (deterministic; keys as ``make_subject``).

    phantominator (Gach et al. 2008) returns M0 as a fraction (0-1) and T1/T2 in seconds at the given
    B0 (3 T here); they become PD in p.u. (x100) and ms (x1000). Its [-1, 1] cube is scaled to 200 mm
    (a 190 x 144 x 186 mm head) on an axial grid of ``voxel_size``. Each voxel is labelled by the nearest
    tissue of ``_SHEPP_LOGAN_TISSUES`` in (log T1, log T2, PD) ("tumor" ellipsoids are lesions, label 4;
    bone marrow is skull, 5) and then given that tissue's values: where phantominator's ellipsoid edges
    do not nest, its sums give a few non-physical voxels (e.g. PD 118 p.u.). Without ``head`` the scalp
    and marrow are removed (skull-stripped, like the training subjects). There is no partial volume, so
    "fractions" is omitted.
    """
    from phantominator import mr_shepp_logan

    spacing = np.asarray(voxel_size, dtype=float)
    shape, affine = output_grid(spacing, fov_mm=200.0 + spacing, center_mm=(0.0, 0.0, 0.0))
    # phantominator's arrays are (y, x, z) with +y anterior; ours are (x, y, z) RAS.
    m0, t1, t2 = (np.transpose(a, (1, 0, 2)) for a in mr_shepp_logan((shape[1], shape[0], shape[2]), B0=3.0))
    tissues = np.asarray(list(_SHEPP_LOGAN_TISSUES.values()), dtype=np.float32)
    features = np.stack([np.log(np.maximum(t1 * 1000.0, 1.0)), np.log(np.maximum(t2 * 1000.0, 1.0)), m0])
    centres = np.stack([np.log(tissues[:, 0]), np.log(tissues[:, 1]), tissues[:, 2] / 100.0])
    distance = ((features[:, None] - centres[:, :, None, None, None]) ** 2).sum(axis=0)
    labels = np.asarray(list(_SHEPP_LOGAN_TISSUES), dtype=np.uint8)[np.argmin(distance, axis=0)]
    labels[m0 <= 0] = 0
    if not head:
        labels[~np.isin(labels, BRAIN_LABELS)] = 0
    values = np.zeros((len(LABEL_NAMES), len(MAPS)), dtype=np.float32)
    values[list(_SHEPP_LOGAN_TISSUES)] = tissues
    maps = {name: values[labels, i] for i, name in enumerate(MAPS)}
    mask = np.isin(labels, BRAIN_LABELS).astype(np.uint8)
    return {**maps, "mask": mask, "labels": labels, "affine": affine}


_DESCRIPTIONS = {
    **{name: f"{name} ({unit})" for name, unit in zip(MAPS, MAP_UNITS, strict=True)},
    "mask": "brain mask (labels 1-4)",
    "labels": "0 bg 1 CSF 2 GM 3 WM 4 lesion 5 skull 6 scalp",
}


def write_subject(subject: dict, out_dir) -> Path:
    """Write the maps, mask and labels of ``subject`` as NIfTI (``<key>.nii.gz``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, description in _DESCRIPTIONS.items():
        image = nib.Nifti1Image(subject[key], subject["affine"])
        image.set_qform(subject["affine"], code="scanner")
        image.set_sform(subject["affine"], code="scanner")
        header = image.header
        header.set_xyzt_units(xyz="mm")
        header["descrip"] = f"pdpe-qmri phantom: {description}".encode()
        if key in MAPS:
            header.set_intent("estimate", name=f"{key} {MAP_UNITS[MAPS.index(key)]}")
        else:
            header.set_intent("label", name=key)
        nib.save(image, out_dir / f"{key}.nii.gz")
    if "fractions" in subject:
        # (x, y, z, label): training re-mixes them with new tissue values (transforms.RandTissueValuesd);
        # stored as 8-bit (nibabel sets the scale factor): 1/255 resolution, a quarter of float32's size
        image = nib.Nifti1Image(np.moveaxis(subject["fractions"], 0, -1), subject["affine"])
        image.set_data_dtype(np.uint8)
        image.header.set_xyzt_units(xyz="mm")
        image.header["descrip"] = b"pdpe-qmri phantom: tissue volume fractions by label (0 = empty space)"
        nib.save(image, out_dir / "fractions.nii.gz")
    return out_dir


def _entry(subject_id: str) -> dict:
    entry = {**{key: f"{subject_id}/{key}.nii.gz" for key in _DESCRIPTIONS}, "subject": subject_id}
    return entry | ({"fractions": f"{subject_id}/fractions.nii.gz"} if "shepplogan" not in subject_id else {})


def subject_rng(seed: int, family: str, index: int) -> np.random.Generator:
    """The random generator of subject ``index`` of ``family`` in the cohort of ``seed``, e.g. ("head", 0)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_FAMILY_KEYS[family], index)))


def _write_job(job, out_dir: Path, seed: int, voxel_size) -> None:
    """Generate and write one subject; a job is (subject id, family key, index, make_subject options)."""
    subject_id, family, index, options = job
    if family == "shepp_logan":
        subject = shepp_logan_subject(voxel_size=voxel_size, **options)
    else:
        subject = make_subject(subject_rng(seed, family, index), voxel_size=voxel_size, **options)
    write_subject(subject, out_dir / subject_id)


def generate_cohort(
    out_dir,
    n_subjects: int = 40,
    seed: int = 0,
    voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE,
    family_size: int = 2,
    head: bool = False,
    workers: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write a cohort and its MONAI datalist; return the datalist path (``out_dir/datalist.json``).

    ``n_subjects`` regular subjects are split 70/15/15 (at least one each) into training / validation /
    test ("deformation" family); the test split also gets ``family_size`` lesion and protocol subjects,
    one head subject and the Shepp-Logan phantom (``FAMILIES``). ``head`` adds skull and scalp to the
    regular subjects too. Subjects are written by ``workers`` processes; the bytes do not depend on it.
    """
    if n_subjects < 3:
        raise ValueError(f"need at least 3 regular subjects (one per split), got {n_subjects}")
    out_dir = Path(out_dir)
    datalist_path = out_dir / "datalist.json"
    if datalist_path.exists() and not overwrite:
        raise FileExistsError(f"{datalist_path} exists; pass overwrite=True (--overwrite) to regenerate")
    for params in SHIFTED_PROTOCOLS:
        inside = [s for s in SERIES if not any(p.startswith(f"{s} ") for p in protocol_violations(params))]
        if inside:
            raise ValueError(f"shifted protocol {params} is inside the training ranges for {inside}")
    voxel_size = tuple(float(v) for v in voxel_size)

    n_val = n_test = max(1, round(0.15 * n_subjects))
    n_train = n_subjects - n_val - n_test
    regular = [(f"sub-{k:03d}", "regular", k, {"head": head}) for k in range(n_subjects)]
    lesion = [(f"sub-lesion{k:02d}", "lesion", k, {"lesions": True, "head": head}) for k in range(family_size)]
    protocol = [(f"sub-protocol{k:02d}", "protocol", k, {"head": head}) for k in range(family_size)]
    extra = [("sub-head00", "head", 0, {"head": True}), ("sub-shepplogan00", "shepp_logan", 0, {"head": head})]
    jobs = regular + lesion + protocol + extra

    write = partial(_write_job, out_dir=out_dir, seed=seed, voxel_size=voxel_size)
    progress = partial(tqdm, total=len(jobs), desc="phantom subjects", unit="subject")
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(progress(pool.map(write, jobs)))
    else:
        list(progress(map(write, jobs)))

    def test_entry(job, family):
        return {**_entry(job[0]), "family": family}

    test = [test_entry(job, "deformation") for job in regular[n_train + n_val :]]
    test += [test_entry(job, "lesion") for job in lesion]
    test += [
        {**test_entry(job, "protocol"), "params": [list(row) for row in SHIFTED_PROTOCOLS[k % len(SHIFTED_PROTOCOLS)]]}
        for k, job in enumerate(protocol)
    ]
    test += [test_entry(extra[0], "head"), test_entry(extra[1], "shepp_logan")]
    key = (_FAMILY_KEYS["validation_protocols"],)
    validation_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
    datalist = {
        "description": "pdpe-qmri synthetic qMRI phantom cohort: deformed MNI152 subjects (nilearn) with T1/T2 "
        "(ms), PD (p.u.), brain mask and labels; see scripts/phantom.py",
        "seed": seed,
        "voxel_size": list(voxel_size),
        "labels": dict(enumerate(LABEL_NAMES)),
        "families": FAMILIES,
        "training": [_entry(job[0]) for job in regular[:n_train]],
        # a fixed protocol per validation subject keeps validation identical from epoch to epoch
        "validation": [
            {**_entry(job[0]), "params": validation_rng.uniform(*protocol_bounds()).round(1).tolist()}
            for job in regular[n_train : n_train + n_val]
        ],
        "test": test,
    }
    datalist_path.write_text(json.dumps(datalist, indent=2) + "\n")
    return datalist_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="cohort folder (gets datalist.json)")
    parser.add_argument("--subjects", type=int, default=40, help="regular subjects, split 70/15/15")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--voxel-size", type=float, nargs=3, default=DEFAULT_VOXEL_SIZE, metavar=("X", "Y", "Z"))
    parser.add_argument("--family-size", type=int, default=2, help="subjects in the lesion and protocol families")
    parser.add_argument("--head", action="store_true", help="add skull and scalp to every subject")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--overwrite", action="store_true", help="regenerate over an existing cohort")
    args = parser.parse_args(argv)
    path = generate_cohort(
        args.out,
        n_subjects=args.subjects,
        seed=args.seed,
        voxel_size=args.voxel_size,
        family_size=args.family_size,
        head=args.head,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    print(path)


if __name__ == "__main__":
    main()
