"""MONAI dictionary transforms of the PDPE-Net pipeline, declared in the bundle configs.

Only what MONAI lacks lives here: masked percentile clipping, signal-equation synthesis with random
protocols, Rician noise at a given SNR, masked max normalisation, the fixed scalings of maps and
sequence parameters, and for study inference the brain mask (and the margin the maps reach beyond it), the
physics QA residual and the physics refinement.
Cropping/padding, flips, zoom, bias field and misregistration are MONAI's own
transforms, used directly in the configs.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence
from functools import lru_cache

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, RandomizableTransform, ResampleToMatch
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import convert_to_numpy, convert_to_tensor
from scipy import ndimage
from scripts import calibration, partial_volume, phantom, physics


def _in_mask(mask) -> torch.Tensor:
    """Spatial boolean selector from a channel-first, single-channel mask; refuses an empty mask."""
    inside = torch.as_tensor(convert_to_tensor(mask))[0] > 0
    if not inside.any():
        raise ValueError("the brain mask is empty: nothing to normalise or clip against")
    return inside


class ClipPercentiled(MapTransform):
    """Clip each channel of each key to its [lower, upper] percentile computed inside the mask only.

    Background voxels do not enter the percentiles (they would drag the lower bound to 0) but are
    clipped like the rest, so zeros stay zeros unless the lower bound is negative.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "mask",
        lower: float = 0.5,
        upper: float = 99.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        self.mask_key, self.lower, self.upper = mask_key, lower, upper

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        inside = _in_mask(d[self.mask_key])
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], track_meta=True)
            out = img.clone()
            for c, channel in enumerate(torch.as_tensor(img)):
                low, high = percentile(channel[inside], [self.lower, self.upper])
                out[c] = torch.clamp(channel, low, high)
            d[key] = out
        return d


class RandMaskJitterd(RandomizableTransform):
    """Run a transform with the brain mask randomly grown or shrunk, then put the true mask back.

    Inference normalises each series inside a mask it estimates (deepbet), which is never the training
    mask: a mask a voxel larger or smaller moved the shipped model's WM T1 by up to 20 % on clinical-like
    studies. Normalising training samples inside a jittered mask teaches the network that the statistics
    of the mask's edge carry no information; the loss and the targets keep the true mask.

    Args:
        transform: the (dictionary) transform to run with the jittered mask, e.g. the normalisation.
        mask_key: the brain mask's key.
        max_radius: the mask is dilated (or eroded) by 1 to ``max_radius`` voxels, direction and radius uniform.
        prob: probability of jittering; otherwise ``transform`` runs with the true mask.
    """

    def __init__(self, transform, mask_key: str = "mask", max_radius: int = 2, prob: float = 0.8) -> None:
        RandomizableTransform.__init__(self, prob)
        self.transform, self.mask_key, self.max_radius = transform, mask_key, int(max_radius)
        self.radius = 0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.radius = int(self.R.randint(1, self.max_radius + 1)) * (1 if self.R.rand() < 0.5 else -1)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        self.randomize()
        d = dict(data)
        true_mask = d[self.mask_key]
        if self._do_transform:
            jittered = _grown(convert_to_numpy(true_mask)[0] > 0, self.radius).astype(np.float32)[None]
            d[self.mask_key] = convert_to_tensor(jittered, track_meta=False).to(true_mask)
        d = dict(self.transform(d))
        d[self.mask_key] = true_mask
        return d


class RandTissueValuesd(RandomizableTransform, MapTransform):
    """New T1/T2/PD maps of the same anatomy: tissue fractions re-mixed with freshly drawn tissue values.

    A cohort of N subjects holds only N draws of the per-subject tissue values, and those values are what
    ROI means (the figures users read) depend on; re-drawing them for every sample teaches the network the
    whole prior of ``phantom.TISSUE_RANGES`` rather than N points of it. Values, texture and partial-volume
    mixing are the phantom's own (``phantom.random_tissue_values``, ``random_texture``, ``mix``).

    Args:
        keys: the (7, *spatial) tissue fractions by label (``phantom.LABEL_NAMES``), e.g. ``fractions.nii.gz``.
        output_keys: names of the new T1 (ms), T2 (ms) and PD (p.u.) maps, in ``physics.MAPS`` order.
        mask_key: where the brain mask (labels 1-4 of the fractions) goes, consistent with the new maps.
    """

    def __init__(
        self,
        keys: KeysCollection = "fractions",
        output_keys: Sequence[str] = physics.MAPS,
        mask_key: str = "mask",
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.output_keys, self.mask_key = tuple(output_keys), mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        (key,) = self.keys
        fractions = MetaTensor(d[key])
        f = convert_to_numpy(fractions, dtype=np.float32)
        labels = phantom.labels_of(f)
        rng = np.random.default_rng(self.R.randint(2**32, dtype=np.uint64))  # the phantom draws from a Generator
        values = phantom.random_tissue_values(rng, [k for k in phantom.TISSUE_RANGES if f[k].any()])
        texture = phantom.random_texture(rng, labels.shape, fractions.pixdim.tolist())
        maps = phantom.mix(f, values, texture, labels)
        for name, out in zip(physics.MAPS, self.output_keys, strict=True):
            d[out] = MetaTensor(torch.from_numpy(maps[name])[None], meta=dict(fractions.meta))
        mask = np.isin(labels, phantom.BRAIN_LABELS).astype(np.float32)
        d[self.mask_key] = MetaTensor(torch.from_numpy(mask)[None], meta=dict(fractions.meta))
        return d


class SynthesizeWeightedd(RandomizableTransform, MapTransform):
    """Synthesise T1w, T2w and FLAIR images from T1/T2/PD maps with the signal equations of ``physics``.

    The protocol is a (3, 3) array of (TR, TE, TI) in ms, one row per series in ``physics.SERIES`` order
    (``output_keys`` name the synthesised images in that order).
    If the data dict already holds one under ``params_key`` (a fixed protocol, e.g. a validation or an
    out-of-range test entry) it is used as is; otherwise each parameter is drawn uniformly from
    ``ranges`` (default: the training ranges, ``physics.PROTOCOL_RANGES``), or with ``log_uniform`` uniformly in
    its logarithm: as many protocols per factor of TR or TE at the short end of a range as at the long end,
    where uniform draws leave a short-TR T1w (e.g. 230 ms in 200-1200) rare. The protocol used is written back
    to ``params_key`` so that it travels with the images to the network.
    """

    def __init__(
        self,
        keys: KeysCollection = physics.MAPS,
        output_keys: Sequence[str] = physics.SERIES,
        params_key: str = "params",
        ranges: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
        log_uniform: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if len(self.keys) != 3:
            raise ValueError(f"keys must name the T1, T2 and PD maps in that order, got {self.keys}")
        self.output_keys = tuple(output_keys)
        self.params_key = params_key
        self.low, self.high = physics.protocol_bounds(ranges)
        self.log_uniform = log_uniform
        self.protocol = self.low

    def randomize(self, data=None) -> None:
        u = self.R.uniform(size=np.shape(self.low))
        if self.log_uniform:  # TI of 0 (no inversion) stays 0
            low, high = (np.maximum(b, 1e-9) for b in (self.low, self.high))
            self.protocol = np.where(self.high > 0, low * (high / low) ** u, 0.0)
        else:
            self.protocol = self.low + u * (self.high - self.low)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if d.get(self.params_key) is None:
            self.randomize()
            protocol = self.protocol
        else:
            protocol = np.asarray(d[self.params_key], dtype=np.float64).reshape(3, 3)
        t1, t2, pd = (convert_to_tensor(d[k], track_meta=True, dtype=torch.float32) for k in self.keys)
        for key, (tr, te, ti) in zip(self.output_keys, protocol, strict=True):
            d[key] = physics.signal(pd, t1, t2, float(tr), float(te), float(ti))
        d[self.params_key] = torch.as_tensor(protocol, dtype=torch.float32)
        return d


class RandSliceProfiled(RandomizableTransform, MapTransform):
    """Thick slices: average the images over a slice profile along the slice axis, the maps as tissue mixes.

    Training images are synthesised voxel by voxel from maps, so a voxel's partial volume is in its maps;
    a clinic's 2D multi-slice series average the *signal* over 4-6 mm slices, and a voxel of WM and CSF
    does not give the signal of its mixed T1/T2/PD. Averaging the synthesised images (signals add
    linearly) over a box profile of random thickness along the last spatial axis, and the target maps with
    water-weighted relaxation rates (as ``phantom.mix`` mixes tissues and the clinical-like studies' truth
    is made), gives training samples whose partial volume comes from the acquisition. Run it after
    synthesis and before noise (each acquired voxel has noise of its own). Voxels outside the tissue keep
    their zero maps.

    A clinic's series do not share their slices: the maps are delivered on the ``reference_key`` series'
    slices, and every other series was acquired on slices of its own (own thickness, a gap, an offset) and
    is read on the reference's by linear interpolation between its two nearest slices. With
    ``reference_key`` the maps follow the reference's profile and each other key gets that profile of its
    own; without it every key shares one profile.

    Args:
        keys: the synthesised images (signals).
        map_keys: the T1 (ms), T2 (ms) and PD (p.u.) maps, in that order.
        thickness_range: slice thickness (mm), drawn uniformly per series; profiles thinner than a voxel
            do nothing to the reference.
        prob: probability of a thick-slice sample.
        reference_key: the series whose slices the maps are on; None: all keys share its profile.
        gap_range: gap between a non-reference series' slices (mm), drawn uniformly per series.
    """

    def __init__(
        self,
        keys: KeysCollection,
        map_keys: Sequence[str] = physics.MAPS,
        thickness_range: Sequence[float] = (3.0, 6.0),
        prob: float = 0.5,
        reference_key: str | None = None,
        gap_range: Sequence[float] = (0.0, 1.5),
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        if len(map_keys) != 3:
            raise ValueError(f"map_keys must name the T1, T2 and PD maps in that order, got {map_keys}")
        if reference_key is not None and reference_key not in self.keys:
            raise ValueError(f"reference_key {reference_key!r} is not one of keys {self.keys}")
        self.map_keys, self.thickness_range = tuple(map_keys), tuple(float(t) for t in thickness_range)
        self.reference_key, self.gap_range = reference_key, tuple(float(g) for g in gap_range)
        self.thickness = self.thickness_range[0]
        self.own_slices: dict[Hashable, tuple[float, float, float]] = {}  # key: thickness, spacing (mm), offset

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.thickness = self.R.uniform(*self.thickness_range)
        self.own_slices = {}
        for key in self.keys:
            if self.reference_key is not None and key != self.reference_key:
                thickness = self.R.uniform(*self.thickness_range)
                spacing = thickness + self.R.uniform(*self.gap_range)
                self.own_slices[key] = (thickness, spacing, self.R.uniform(0.0, spacing))

    @staticmethod
    def profile(width: float, centre: float = 0.0, reach: int = 0) -> np.ndarray:
        """Weights of a box ``width`` voxels wide centred ``centre`` voxels off: each voxel's overlap with the
        box, on the offsets -n..n (n at least ``reach``)."""
        half = width / 2
        n = max(reach, int(np.ceil(abs(centre) + half - 0.5)))
        offsets = np.arange(-n, n + 1)
        weights = np.clip(np.minimum(offsets + 0.5, centre + half) - np.maximum(offsets - 0.5, centre - half), 0, 1)
        return weights / weights.sum()

    @classmethod
    def interpolated_profile(cls, width: float, spacing: float, offset: float) -> np.ndarray:
        """Weights of a series of ``width``-voxel slices every ``spacing`` voxels, one slice centred ``offset``
        (0 to ``spacing``) voxels past the reference voxel, read there by linear interpolation between the
        slices on either side."""
        after, before = offset, offset - spacing
        reach = int(np.ceil(max(abs(after), abs(before)) + width / 2 - 0.5))
        return (1 - offset / spacing) * cls.profile(width, after, reach) + offset / spacing * cls.profile(
            width, before, reach
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        self.randomize()
        d = dict(data)
        if not self._do_transform:
            return d
        maps = [convert_to_tensor(d[k], track_meta=True, dtype=torch.float32) for k in self.map_keys]
        voxel = float(maps[0].pixdim[-1])
        weights = self.profile(self.thickness / voxel)

        def average(x, kernel=weights) -> np.ndarray:  # kernel[n + j] weighs the voxel j further on (n: its middle)
            return ndimage.correlate1d(convert_to_numpy(x, dtype=np.float32), kernel, axis=-1, mode="constant")

        def like(value: np.ndarray, src) -> MetaTensor:
            return MetaTensor(torch.from_numpy(value.astype(np.float32)), meta=dict(src.meta))

        for key in self.key_iterator(d):
            if key in self.own_slices:
                thickness, spacing, offset = (v / voxel for v in self.own_slices[key])
                d[key] = like(average(d[key], self.interpolated_profile(thickness, spacing, offset)), d[key])
            elif len(weights) > 1:
                d[key] = like(average(d[key]), d[key])
        if len(weights) == 1:
            return d
        t1, t2, pd = (convert_to_numpy(m, dtype=np.float64) for m in maps)
        tissue = pd > 0

        def rate(times: np.ndarray) -> np.ndarray:  # water-weighted relaxation rate, 0 outside the tissue
            return average(np.divide(pd, times, out=np.zeros_like(pd), where=tissue))

        water, r1, r2 = average(pd), rate(t1), rate(t2)
        mixed = (water / np.where(tissue, r1, 1.0), water / np.where(tissue, r2, 1.0), water)
        for key, value, src in zip(self.map_keys, mixed, maps, strict=True):
            d[key] = like(np.where(tissue, value, 0.0), src)
        return d


class RandRicianNoiseSNRd(RandomizableTransform, MapTransform):
    """Rician (magnitude) noise at an SNR drawn per key from ``snr_range``.

    SNR follows the MR convention: mean in-mask signal over the standard deviation of the complex
    Gaussian noise in each channel. MONAI's ``RandRicianNoised`` scales noise to an absolute value or to
    the whole-image standard deviation (background included), which has no fixed SNR meaning.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "mask",
        snr_range: Sequence[float] = (20.0, 100.0),
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0 < snr_range[0] <= snr_range[1]:
            raise ValueError(f"snr_range must be positive (low, high), got {snr_range}")
        self.mask_key, self.snr_range = mask_key, tuple(snr_range)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        inside = _in_mask(d[self.mask_key])
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], track_meta=True, dtype=torch.float32)
            sigma = torch.as_tensor(img)[:, inside].mean() / self.R.uniform(*self.snr_range)
            real = torch.as_tensor(self.R.standard_normal(img.shape), dtype=img.dtype) * sigma
            imag = torch.as_tensor(self.R.standard_normal(img.shape), dtype=img.dtype) * sigma
            d[key] = torch.sqrt((img + real) ** 2 + imag**2)
        return d


class MaskedMaxNormalized(MapTransform):
    """Divide each key by its maximum inside the mask (the paper's modality-specific max scaling)."""

    def __init__(self, keys: KeysCollection, mask_key: str = "mask", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        inside = _in_mask(d[self.mask_key])
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], track_meta=True, dtype=torch.float32)
            peak = torch.as_tensor(img)[:, inside].max()
            if peak <= 0:
                raise ValueError(f"MaskedMaxNormalized: '{key}' has no positive signal inside the mask")
            d[key] = img / peak
        return d


class ScaleMapsd(MapTransform):
    """Channel-stacked (T1, T2, PD) maps: physical units (ms, ms, p.u.) to network targets, or back."""

    def __init__(self, keys: KeysCollection, inverse: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.inverse = inverse

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = physics.scale_maps(convert_to_tensor(d[key], track_meta=True), inverse=self.inverse)
        return d


class NormalizeParametersd(MapTransform):
    """(3, 3) TR/TE/TI in ms to the network's fixed-scale parameters (``physics.PARAMETER_SCALE``)."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = physics.normalize_parameters(torch.as_tensor(d[key], dtype=torch.float32))
        return d


class BrainMaskd(MapTransform):
    """Brain mask of the T1w image in ``keys`` into ``mask_key``: deepbet, or the user's own mask file.

    deepbet (MIT, PyPI) ships its TorchScript weights inside the wheel, so skull stripping runs offline,
    in seconds on a CPU. A user mask (NIfTI) is resampled (nearest) onto the image grid. The method used,
    and whether the input looked skull-stripped already (almost no signal outside the brain mask), go to
    ``info_key`` as a sentence for the report; the seconds spent go to ``seconds_key``.
    """

    def __init__(
        self,
        keys: KeysCollection = "T1w",
        mask_key: str = "mask",
        mask_file: str | None = None,
        info_key: str = "mask_info",
        seconds_key: str = "mask_seconds",
        stripped_fraction: float = 0.02,
    ) -> None:
        super().__init__(keys)
        self.mask_key, self.mask_file, self.info_key, self.seconds_key = mask_key, mask_file, info_key, seconds_key
        self.stripped_fraction = stripped_fraction

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        start = time.perf_counter()
        (key,) = self.keys
        img = convert_to_tensor(d[key], track_meta=True, dtype=torch.float32)
        if self.mask_file:
            user_mask = LoadImage(image_only=True, ensure_channel_first=True)(self.mask_file)
            mask = ResampleToMatch(mode="nearest")(user_mask, img) > 0.5
            info = f"user mask {self.mask_file}"
        else:
            mask = torch.from_numpy(_deepbet_mask(img[0].numpy(), np.asarray(img.affine)))[None]
            info = "deepbet"
        mask = MetaTensor(mask.to(torch.float32), meta=dict(img.meta))  # the meta holds the affine
        if not mask.any():
            raise ValueError(f"the brain mask ({info}) is empty")
        support = torch.as_tensor(img) > 0
        outside = (support & (torch.as_tensor(mask) == 0)).sum() / support.sum().clamp(min=1)
        if outside < self.stripped_fraction:
            info += f"; the input looks skull-stripped already ({100 * float(outside):.1f} % of its signal outside)"
        d[self.mask_key], d[self.info_key] = mask, info
        d[self.seconds_key] = time.perf_counter() - start
        return d


class GrowMaskd(MapTransform):
    """The mask in ``keys`` grown by ``margin`` voxels (face neighbours, one voxel a step) into ``name``, and a
    sentence saying so appended to ``info_key`` (when the data hold it).

    deepbet draws its brain mask tight: it leaves out voxels of cortex and sulcal CSF at its edge and, on
    4-5 mm slices, much of the brain's first and last slices. The maps are delivered on the grown mask, so that
    those voxels carry values, while the brain mask stays what sets the receiver gains (``PhysicsRefined``'s
    ``brain_key``) and what ``mask.nii.gz`` holds. The rim it adds is mostly skull and scalp: fitted, not brain.
    """

    def __init__(self, keys: KeysCollection, name: str, margin: int = 1, info_key: str = "mask_info") -> None:
        super().__init__(keys)
        if margin < 0:
            raise ValueError(f"GrowMaskd: margin must be 0 or more voxels, got {margin}")
        self.name, self.margin, self.info_key = name, int(margin), info_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        (key,) = self.keys
        mask = convert_to_tensor(d[key], track_meta=True)
        inside = convert_to_numpy(mask)[0] > 0
        grown = _grown(inside, self.margin)
        d[self.name] = MetaTensor(torch.from_numpy(grown[None]).to(torch.float32), meta=dict(mask.meta))
        if self.info_key in d:
            added = int(grown.sum() - inside.sum())
            steps = f"{self.margin} voxel{'' if self.margin == 1 else 's'}"
            d[self.info_key] = f"{d[self.info_key]}; maps delivered on it grown by {steps} ({added} voxels more)"
        return d


def _grown(inside: np.ndarray, voxels: int) -> np.ndarray:
    """``inside`` grown by ``voxels`` steps to face neighbours, shrunk where negative, unchanged for 0 (scipy
    would repeat a step of 0 iterations until nothing changes)."""
    if voxels == 0:
        return inside
    morph = ndimage.binary_dilation if voxels > 0 else ndimage.binary_erosion
    return morph(inside, iterations=abs(voxels))


@lru_cache(maxsize=1)
def _deepbet():
    from deepbet.bet import BrainExtraction  # imports torch models: only when a mask is needed

    return BrainExtraction(no_gpu=not torch.cuda.is_available())


def _deepbet_mask(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """deepbet's brain mask (bool) of a T1w volume on its own grid (deepbet reorients internally)."""
    _, mask, _ = _deepbet().run(nib.Nifti1Image(volume, affine))
    return np.asarray(mask.dataobj) > 0


class ResynthesisResiduald(MapTransform):
    """Physics QA: re-synthesise the weighted images from the predicted maps with the study's own protocol.

    ``keys`` holds predicted maps as network targets (``physics.MAP_SCALE``), ``params_key`` the protocol
    as the network saw it (``physics.PARAMETER_SCALE``), ``image_key`` the normalised inputs. A weighted
    image is known only up to the receiver gain, so each re-synthesised series is scaled by the gain that
    fits it best to its input in the mask (least squares); ``residual_key`` gets (fitted - input) per
    series. Maps that explain their inputs leave only noise.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        image_key: str = "image",
        params_key: str = "params",
        mask_key: str = "mask",
        residual_key: str = "residual",
    ) -> None:
        super().__init__(keys)
        self.image_key, self.params_key, self.mask_key, self.residual_key = (
            image_key,
            params_key,
            mask_key,
            residual_key,
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        (key,) = self.keys
        maps = physics.scale_maps(convert_to_tensor(d[key], track_meta=True), inverse=True)
        protocol = physics.normalize_parameters(torch.as_tensor(d[self.params_key]), inverse=True).reshape(3, 3)
        synth = physics.synthesize(maps, protocol)
        image, inside = d[self.image_key], _in_mask(d[self.mask_key])
        gain = physics.least_squares_gains(torch.as_tensor(synth)[:, inside], torch.as_tensor(image)[:, inside])
        d[self.residual_key] = synth * gain.reshape(-1, *[1] * (synth.ndim - 1)) - image
        return d


class PhysicsRefined(MapTransform):
    """Refine the network's maps against the study's own images with the signal equations (maximum a posteriori).

    The network pools spatial context, so its maps are calibrated but blurred by its grid and biased
    voxel by voxel; the images determine WM/GM voxels well once each series' receiver gain is known, and CSF
    T1/T2 poorly. So: (1) each series' gain is the median over tissue voxels (network T1 below
    ``tissue_t1_ms``) of image / re-synthesised signal, which keeps the network's calibration; (2) the noise
    per series is 1.4826 x the median absolute deviation of the gain-scaled residual there; (3) every
    brain voxel is fitted (``physics.fit_maps``) with the network's maps as the prior, ``prior_width`` wide
    in log units. Where the data are weak the prior holds the maps; elsewhere the images decide.

    With ``calibrate``, step (1) is followed by a per-study calibration (``scripts.calibration``): the gain
    ratios under which WM, GM and the ventricles' core (sampled by the network's T1) look like themselves
    replace the network's, and the network's maps are re-explained under them (their noise-free re-synthesis
    fitted with the new gains, exactly), then moved level by level to what the images say about each level
    (``calibration.level_corrected``: median log ratio of a loosely held fit, per bin of the network's T1, each
    voxel moved as the level between its network T1 and its fitted T1) before (3). A 2D network calibrates each
    slice on what the slice holds, while the gains belong to the whole series and most slices hold no ventricle;
    and it maps WM and GM with its training prior's contrast. With ``scalp_fat`` the scalp's fat, sampled outside
    the brain mask (``calibration.scalp_signals``), is held to its prior too: brain tissues alone leave the gain
    ratios, and so WM T1, open by tens of % on some heads.
    Under a protocol outside the training ``ranges`` the network's maps, which pick the voxels each tissue is
    sampled from, are the least reliable, and calibrating on the brain's tissues alone there made the evaluation's
    out-of-range studies worse: the calibration runs only where the scalp's fat holds it (elsewhere the network's
    gains stay), and its level correction moves T1 and PD but not T2, which the fit is held to more tightly there
    (``out_of_range_prior_width``): an out-of-range protocol may leave T2 weakly encoded (a T2w TE of 40 ms, half
    of WM's T2), and there the loose fit's T2 levels took GM T2 +11 % on the validation heads.

    With ``partial_volume``, T2w and FLAIR are fitted as acquired on their own grids: each is moved by what its
    acquisition (slice profile, position, gaps) and the resampling onto this grid do to the network's
    re-synthesised signal, computed once under the network's gains (the calibration re-explains the same
    signals, so it leaves the move as it is).

    Args:
        keys: the predicted (T1, T2, PD) maps in ms, ms, p.u., on the grid of ``image_keys``.
        image_keys: the T1w, T2w and FLAIR images on that grid, before any normalisation.
        params_key: the protocol as the network saw it (``physics.PARAMETER_SCALE``).
        mask_key: voxels to refine and deliver (the brain mask, or a margin beyond it: ``GrowMaskd``).
        brain_key: the brain mask, when ``mask_key`` reaches beyond it: only its voxels set the gains, the noise,
            the calibration and the level correction's levels (a rim of skull and scalp would pull them), and the
            residuals reported; the rim is fitted like the rest. None: every voxel of ``mask_key``.
        info_key: where a summary for the report goes (gains, noise, median change per map from the network's, the
            share of brain voxels whose T1 or T2 the fit left at its ceiling, ``physics.FIT_BOUNDS``: images no
            tissue explains under the gains, e.g. CSF with its gain ratios off).
        prior_width: (3,) prior standard deviations of log T1, log T2, log PD: how far the network's maps may be
            off (0.1 = 10 %). The bundle sets them in ``inference.json`` (``refine_prior_width``), chosen on
            clinical-like validation heads with ``scripts/select_model.py``; 1.0 lets the images decide.
        out_of_range_prior_width: (3,) the same under a protocol outside ``ranges`` (None: ``prior_width``);
            ``refine_out_of_range_prior_width``, chosen with ``select_model.py --out-of-range``.
        tissue_t1_ms: voxels whose network T1 is below this set the gains and noise (not CSF).
        iterations: Levenberg-Marquardt iterations from the prior.
        enabled: False passes the network's maps through unchanged (``info_key`` says so).
        calibrate: calibrate the gains on the study's tissues (above); where no gains are plausible, or the
            protocol is outside ``ranges`` and the scalp's fat does not take part, the network's stay (``info_key``
            says why).
        ranges: the training protocol ranges (``physics.PROTOCOL_RANGES`` when None).
        acquired_keys: each series as acquired (its own grid, ``slice_thickness`` in its meta), in ``image_keys``
            order; a key that is missing or holds the grid of ``keys`` needs no correction.
        partial_volume: fit T2w and FLAIR as acquired on their own grids (``scripts.partial_volume``): each
            image is moved by what its acquisition and the resampling do to the network's re-synthesised
            signal before the fits (not the gains' tissue medians); ``info_key`` reports the mean move.
        water_fraction: read a deficit common to every series as partial volume with tissue that gives no signal
            (bone, dura, air: the brain's surface, 4-5 mm slabs crossing it), i.e. as less water: the prior's PD
            is scaled by ``partial_volume.water_fraction`` before the fit, which would otherwise explain the
            missing signal with longer T1 and shorter T2; ``info_key`` reports the share of voxels whose PD it
            lowers by more than 5 % and their median fraction.
        scalp_fat: with ``calibrate``, also hold the scalp's fat to its prior (above); where no gains explain it
            with the brain's tissues, their ranges are widened by up to 10 % (``calibration.fat_held_explanations``);
            where the grid holds too little fat, or that does not reconcile them, the brain's tissues calibrate alone
            (``info_key`` lists the ``calibration_references``, the widening, and why fat is not among them).
        smoothing_mm: (3,) widths (mm, Gaussian sigma) over which each map's move from the prior is averaged after
            the fit (``smoothed_moves``; 0 leaves a map as fitted): each voxel's fit carries its own images' noise,
            independent from its neighbours', while the prior's edges stay. The bundle sets them in
            ``inference.json`` (``refine_smoothing_mm``), chosen on the validation heads with ``select_model``.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        image_keys: Sequence[str] = ("T1w_grid", "T2w_grid", "FLAIR_grid"),
        params_key: str = "params",
        mask_key: str = "brain_mask",
        brain_key: str | None = None,
        info_key: str = "refinement",
        prior_width: Sequence[float] = (1.0, 1.0, 1.0),
        out_of_range_prior_width: Sequence[float] | None = None,
        tissue_t1_ms: float = 2000.0,
        iterations: int = 10,
        enabled: bool = True,
        calibrate: bool = False,
        ranges: dict | None = None,
        acquired_keys: Sequence[str] = ("T1w_acquired", "T2w_acquired", "FLAIR_acquired"),
        partial_volume: bool = False,
        water_fraction: bool = False,
        smoothing_mm: Sequence[float] = (0.0, 0.0, 0.0),
        scalp_fat: bool = False,
    ) -> None:
        super().__init__(keys)
        self.enabled, self.calibrate, self.ranges, self.scalp_fat = enabled, calibrate, ranges, scalp_fat
        self.acquired_keys, self.partial_volume = tuple(acquired_keys), partial_volume
        self.water_fraction, self.smoothing_mm = water_fraction, tuple(smoothing_mm)
        self.image_keys, self.params_key, self.mask_key, self.brain_key, self.info_key = (
            tuple(image_keys),
            params_key,
            mask_key,
            brain_key,
            info_key,
        )
        self.prior_width, self.tissue_t1_ms, self.iterations = tuple(prior_width), tissue_t1_ms, iterations
        self.out_of_range_prior_width = (
            self.prior_width if out_of_range_prior_width is None else tuple(out_of_range_prior_width)
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if not self.enabled:
            d[self.info_key] = {"enabled": False}
            return d
        (key,) = self.keys
        maps = convert_to_tensor(d[key], track_meta=True)
        inside = _in_mask(d[self.mask_key]).numpy()
        brain_volume = _in_mask(d[self.brain_key]).numpy() & inside if self.brain_key else inside
        brain = brain_volume[inside]
        network = prior = convert_to_numpy(maps, dtype=np.float64)[:, inside]
        volumes = np.stack([convert_to_numpy(d[k], dtype=np.float64)[0] for k in self.image_keys])
        images = volumes[:, inside]
        params = physics.normalize_parameters(convert_to_numpy(d[self.params_key], dtype=np.float64), inverse=True)
        params = params.reshape(3, 3)
        out_of_range = bool(physics.protocol_violations(params, self.ranges))
        width = self.out_of_range_prior_width if out_of_range else self.prior_width
        synth = physics.synthesize(prior, params)
        tissue = (prior[0] < self.tissue_t1_ms) & np.all(synth > 0, axis=0) & brain
        if tissue.sum() < 100:
            raise ValueError("PhysicsRefined: fewer than 100 tissue voxels to calibrate the series' gains on")
        gains = np.median(images[:, tissue] / synth[:, tissue], axis=1)
        noise_counts = np.array([_noise_sigma(convert_to_numpy(d[k])[0], brain_volume) for k in self.image_keys])
        seen = images
        grid = np.asarray(convert_to_numpy(maps.affine), dtype=np.float64)
        spacing = np.linalg.norm(grid[:3, :3], axis=0)
        if self.partial_volume:
            acquired = [d[k] if k in d else None for k in self.acquired_keys]
            # the network's maps model the brain only: the rim beyond it keeps its measured signal
            predicted = np.where(brain, synth * gains[:, None], images)
            seen = partial_volume.corrected_images(volumes, predicted, inside, grid, acquired)
        calibrated = {}
        if self.calibrate:
            grid_volumes = (volumes, brain_volume, spacing)
            prior, gains, calibrated = self._calibrated(
                prior, synth, images, seen, gains, noise_counts, params, brain, grid_volumes, out_of_range
            )
        noise = _noise_pu(noise_counts, gains)
        water = {}
        if self.water_fraction:
            synthesized = physics.synthesize(prior, params)
            fraction = partial_volume.water_fraction(seen / gains[:, None], synthesized, sample=brain)
            prior = np.concatenate([prior[:2], prior[2:] * fraction])
            lowered = fraction < 0.95
            water = {"water_fraction": {"lowered_pct": round(float(100 * lowered.mean()), 2),
                                        "median": round(float(np.median(fraction[lowered])), 3)
                                        if lowered.any() else 1.0}}  # fmt: skip
        refined = physics.fit_maps(seen, params, gains, prior=prior, prior_width=width, noise=noise,
                                   iterations=self.iterations)  # fmt: skip
        if any(self.smoothing_mm):
            refined = smoothed_moves(refined, prior, inside, np.outer(self.smoothing_mm, 1 / spacing))
        out = maps.clone()
        out[:, torch.from_numpy(inside)] = torch.as_tensor(refined, dtype=out.dtype)
        d[key] = out
        change = np.median(np.abs(refined[:, tissue] / network[:, tissue] - 1), axis=1)
        ceiling = np.array([physics.FIT_BOUNDS[m][1] for m in physics.MAPS[:2]])
        at_ceiling = 100 * (refined[:2, brain] >= ceiling[:, None] * (1 - 1e-6)).mean(axis=1)
        residual = {
            "network": _residual_pct(synth[:, brain], seen[:, brain]),
            "refined": _residual_pct(physics.synthesize(refined[:, brain], params), seen[:, brain]),
        }
        d[self.info_key] = {
            "enabled": True,
            "gains_per_pu": gains.round(6).tolist(),
            **calibrated,
            "prior_width_log": list(width),
            "partial_volume": self.partial_volume,
            "scalp_fat": self.calibrate and self.scalp_fat,
            **({"partial_volume_pct": _change_pct(seen, images)} if self.partial_volume else {}),
            **water,
            "noise_pu": noise.round(6).tolist(),
            "smoothing_mm": list(self.smoothing_mm),
            "median_change_in_tissue_pct": dict(zip(physics.MAPS, (100 * change).round(2).tolist(), strict=True)),
            "at_fit_ceiling_pct": dict(zip(physics.MAPS[:2], at_ceiling.round(2).tolist(), strict=True)),
            "residual_pct": residual,
        }
        return d

    def _calibrated(self, prior, synth, images, seen, gains, noise_counts, params, brain, grid_volumes, out_of_range):
        """The per-study gain calibration (class docstring): (prior, gains, report entries) for the refinement;
        where it does not apply, the network's prior and gains, ``calibration`` None and a note saying why. The
        gains come from tissue medians of the ``images`` in the ``brain`` and, with ``scalp_fat``, the fat sampled
        in ``grid_volumes`` (the series' whole volumes, the brain mask on that grid and its spacing: the scalp
        lies outside the mapped voxels); the level correction fits the images as the fits see them (``seen``),
        measures the levels in the ``brain`` and moves every voxel (``out_of_range``: T1 and PD only).
        ``calibration_span_pct``: the lowest and highest WM and GM value of each map among the explanations the
        tissue prior allows, % of the calibrated value: what the images leave open."""
        if out_of_range and not self.scalp_fat:
            return prior, gains, {"calibration": None, "calibration_note": "protocol outside the training ranges: "
                                  "the network's gains kept"}  # fmt: skip
        signals = calibration.tissue_signals(images[:, brain] / gains[:, None], prior[0, brain])
        brain_tissues = (calibration.GM, calibration.WM, calibration.CSF)
        allowed, fat = None, {}
        if self.scalp_fat:
            if (scalp := calibration.scalp_signals(*grid_volumes)) is None:
                fat["calibration_fat_note"] = "too few bright voxels outside the brain mask to sample the scalp's fat"
            else:
                signals[calibration.FAT] = scalp / gains
                allowed, widening = calibration.fat_held_explanations(signals, params, brain_tissues)
                if allowed is None:
                    fat["calibration_fat_note"] = (f"no gains explain the scalp's fat and the brain's tissues inside "
                                                   f"their ranges together, {100 * widening:g} % wider included: "
                                                   "the brain's tissues alone")  # fmt: skip
                else:
                    fat["calibration_brain_widening_pct"] = round(100 * widening, 1)
        if out_of_range and allowed is None:
            return prior, gains, {"calibration": None, "calibration_note": "protocol outside the training ranges "
                                  "and no scalp fat to hold: the network's gains kept", **fat}  # fmt: skip
        references = ["WM", "GM", "CSF"] + (["scalp fat"] if allowed is not None else [])
        if allowed is None and (allowed := calibration.plausible_explanations(signals, params, brain_tissues)) is None:
            return prior, gains, {"calibration": None, "calibration_note": "no gains put WM, GM and CSF inside "
                                  "their ranges: the network's gains kept", **fat}  # fmt: skip
        factors = calibration.prior_gain_factors(allowed)
        guess, lowest, highest = calibration.tissue_value_span(allowed)
        span = {
            name: {roi: [round(float(100 * (v[c, j] / guess[c, j] - 1)), 1) for v in (lowest, highest)]
                   for j, roi in enumerate(("WM", "GM"))}
            for c, name in enumerate(physics.MAPS)
        }  # fmt: skip
        gains = gains * factors
        explained = physics.fit_maps(synth / factors[:, None], params, np.ones(3), prior=prior,
                                     prior_width=(1e3,) * 3, noise=np.ones(3), iterations=20)  # fmt: skip
        info = {"calibration": factors.round(4).tolist(), "calibration_references": references, **fat,
                "calibration_span_pct": span}  # fmt: skip
        loose = physics.fit_maps(seen, params, gains, prior=explained, prior_width=(1.0,) * 3,
                                 noise=_noise_pu(noise_counts, gains), iterations=self.iterations)  # fmt: skip
        corrected = calibration.level_corrected(explained, loose, sample=brain)
        if out_of_range:
            corrected[1] = explained[1]
            info["calibration_note"] = "protocol outside the training ranges: T2 not level-corrected"
        return corrected, gains, info


def smoothed_moves(refined: np.ndarray, prior: np.ndarray, inside: np.ndarray, sigma) -> np.ndarray:
    """``refined`` (3, N) at the voxels ``inside`` with each map's move from ``prior`` (its log ratio) averaged by
    a Gaussian of ``sigma[map]`` voxels per axis ((3, 3); a row of zeros leaves that map as fitted) over the
    voxels ``inside`` only: the fit's noise is independent from voxel to voxel, the prior's edges are kept. The
    averaged maps stay inside the fit's bounds (``physics.FIT_BOUNDS``): voxels fitted at a ceiling beside ones
    below it would otherwise take an average past it."""
    out, weights = refined.copy(), {}
    for c, width in enumerate(np.asarray(sigma, dtype=np.float64)):
        if not width.any():
            continue
        key = tuple(width)  # maps of the same width share the mask's own average
        if key not in weights:
            weights[key] = ndimage.gaussian_filter(inside.astype(np.float64), width)[inside]
        move = np.zeros(inside.shape)
        move[inside] = np.log(refined[c] / prior[c])
        smoothed = prior[c] * np.exp(ndimage.gaussian_filter(move, width)[inside] / weights[key])
        out[c] = np.clip(smoothed, *physics.FIT_BOUNDS[physics.MAPS[c]])
    return out


def _change_pct(moved: np.ndarray, images: np.ndarray) -> dict[str, float]:
    """Per series: mean |moved - image| over the voxels, % of the mean image."""
    relative = np.abs(moved - images).mean(axis=1) / np.maximum(images.mean(axis=1), 1e-12)
    return dict(zip(physics.SERIES, (100 * relative).round(2).tolist(), strict=True))


def _residual_pct(synth: np.ndarray, images: np.ndarray) -> dict[str, float]:
    """Per series: mean |re-synthesis - image| over the voxels, % of the mean image (the physics QA's figure),
    each re-synthesis (``synth``, (3, N)) scaled by its least-squares gain; on the T1w grid, where the refinement
    fits, against the images as the fits see them (moved for partial volume where that is on)."""
    return _change_pct(physics.least_squares_gains(synth, images)[:, None] * synth, images)


def _noise_pu(noise_counts: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Each series' noise (counts) in p.u. under its receiver gain (counts per p.u.), floored for the fits."""
    return np.maximum(noise_counts / gains, 1e-6)


def _noise_sigma(image: np.ndarray, inside: np.ndarray) -> float:
    """Noise standard deviation of ``image`` from differences of neighbouring voxels inside the mask (robust)."""
    both = inside[1:] & inside[:-1]
    differences = (image[1:] - image[:-1])[both]
    return float(1.4826 * np.median(np.abs(differences - np.median(differences))) / np.sqrt(2.0))
