"""MONAI dictionary transforms of the PDPE-Net pipeline (METHOD §2), declared in the bundle configs.

Only what MONAI lacks lives here: masked percentile clipping, signal-equation synthesis with random
protocols, Rician noise at a given SNR, masked max normalisation and the fixed scalings of maps and
sequence parameters. Cropping/padding, flips, zoom, bias field and misregistration are MONAI's own
transforms, used directly in the configs.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import convert_to_tensor

from scripts import physics


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


class SynthesizeWeightedd(RandomizableTransform, MapTransform):
    """Synthesise T1w, T2w and FLAIR images from T1/T2/PD maps with the signal equations of ``physics``.

    The protocol is a (3, 3) array of (TR, TE, TI) in ms, one row per series in ``physics.SERIES`` order
    (``output_keys`` name the synthesised images in that order).
    If the data dict already holds one under ``params_key`` (a fixed protocol, e.g. a validation or an
    out-of-range test entry) it is used as is; otherwise each parameter is drawn uniformly from
    ``ranges`` (default: the training ranges, ``physics.PROTOCOL_RANGES``). The protocol used is
    written back to ``params_key`` so that it travels with the images to the network.
    """

    def __init__(
        self,
        keys: KeysCollection = physics.MAPS,
        output_keys: Sequence[str] = physics.SERIES,
        params_key: str = "params",
        ranges: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if len(self.keys) != 3:
            raise ValueError(f"keys must name the T1, T2 and PD maps in that order, got {self.keys}")
        self.output_keys = tuple(output_keys)
        self.params_key = params_key
        self.low, self.high = physics.protocol_bounds(ranges)
        self.protocol = self.low

    def randomize(self, data=None) -> None:
        self.protocol = self.R.uniform(self.low, self.high)

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
