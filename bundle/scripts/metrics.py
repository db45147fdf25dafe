"""Masked image-quality metrics of the paper (Sec. 2.6) for quantitative maps, and a MONAI metric class for ignite.

Conventions: maps are stacked on channels in ``physics.MAPS`` order (T1, T2, PD); tensors are (B, C, *spatial) with
2 or 3 spatial dims; masks are (B, 1, *spatial) brain masks whose voxels > 0.5 are inside. Every metric is computed
per sample and channel over in-mask voxels only (the paper's "voxels in the brain region"), so voxels outside the mask
never change a value, and returns a (B, C) tensor. A sample/channel whose mask is empty, or whose reference has no
positive in-mask value, gets NaN; MONAI's metric reductions skip NaNs.

MAE, MPE, SSIM and NSE see both maps divided by the reference's in-mask maximum (per sample and channel), so the
reference lies in [0, 1] as in the paper; PSNR (Eq. 6) and MPE are invariant to that scaling.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics.regression import RegressionMetric, compute_ssim_and_cs
from monai.utils import MetricReduction, convert_to_tensor, look_up_option
from scripts import physics

#: Tissue labels of the phantom's ``labels.nii.gz`` (0 is background).
ROI_LABELS = {1: "CSF", 2: "GM", 3: "WM", 4: "lesion"}


def _masked_mean(x: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``inside`` per sample and channel: (B, C), NaN where ``inside`` is empty."""
    dims = tuple(range(2, x.ndim))
    return torch.where(inside, x, 0).sum(dims) / inside.sum(dims)


def _scaled(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor):
    """Both maps divided by the reference's in-mask maximum (NaN if none is positive), and the broadcast mask."""
    inside = (mask > 0.5).expand_as(ref)
    peak = torch.where(inside, ref, -torch.inf).amax(tuple(range(2, ref.ndim)), keepdim=True)
    peak = torch.where(peak > 0, peak, torch.nan)
    return pred / peak, ref / peak, inside


def masked_psnr(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR in dB, ``10 log10(max(ref)^2 / MSE)`` over the mask (Eq. 6); +inf where the maps agree exactly."""
    p, r, inside = _scaled(pred, ref, mask)
    return -10 * torch.log10(_masked_mean((p - r) ** 2, inside))


def masked_ssim(
    pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, win_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Mean SSIM (Eq. 8, Gaussian window, K1 = 0.01, K2 = 0.03) over the mask, on maps scaled to [0, 1].

    Both maps are zeroed outside the mask, i.e. compared skull-stripped, so windows at the brain edge see the same
    background in both and outside voxels cannot change the score. MONAI computes the SSIM map on "valid" windows
    only, which is also the region skimage averages for its mean SSIM; the mean is thus over mask voxels at least
    ``win_size // 2`` from the image edge (brain masks sit well inside the field of view). Each spatial size must be
    at least ``win_size``.
    """
    if win_size % 2 == 0:
        raise ValueError(f"win_size must be odd, got {win_size}.")
    p, r, inside = _scaled(pred, ref, mask)
    nd = ref.ndim - 2
    ssim_map, _ = compute_ssim_and_cs(
        p.masked_fill(~inside, 0),
        r.masked_fill(~inside, 0),
        spatial_dims=nd,
        kernel_size=[win_size] * nd,
        kernel_sigma=[sigma] * nd,
        data_range=1.0,
    )
    half = win_size // 2
    centres = inside[(..., *(slice(half, n - half) for n in ref.shape[2:]))]
    return _masked_mean(ssim_map, centres)


def masked_mae(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the mask on maps scaled to [0, 1] by the reference (Eq. 4)."""
    p, r, inside = _scaled(pred, ref, mask)
    return _masked_mean((p - r).abs(), inside)


def _relative_support(pred, ref, mask, eps):
    """Scaled maps and the in-mask voxels whose scaled reference exceeds ``eps``, where |p - r| / r is defined."""
    p, r, inside = _scaled(pred, ref, mask)
    return p, r, inside & (r > eps)


def masked_mpe(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Mean percentage error ``mean(|p - r| / r)`` (Eq. 5, a fraction, not x100) over the mask.

    Voxels whose reference is at most ``eps`` times the reference's in-mask maximum are left out rather than
    clamped: a near-zero reference (partial-volume edge, clipped outlier) would otherwise dominate the mean.
    """
    p, r, valid = _relative_support(pred, ref, mask, eps)
    return _masked_mean((p - r).abs() / r, valid)


def normalized_squared_error(
    pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, eps: float = 1e-3
) -> torch.Tensor:
    """NSE map ``(p - r)^2 / r x 100 %`` (Eq. 9) for error figures, same shape as ``pred``.

    Computed on maps scaled to [0, 1] by the reference's in-mask maximum so that it is unit-free; 0 outside the
    mask and where the reference is at most ``eps`` of its maximum (as in :func:`masked_mpe`).
    """
    p, r, valid = _relative_support(pred, ref, mask, eps)
    return torch.where(valid, 100 * (p - r) ** 2 / r, 0)


def roi_means(
    maps: torch.Tensor, labels: torch.Tensor, label_names: dict[int, str] | None = None
) -> dict[str, torch.Tensor]:
    """Mean of each channel of ``maps`` in each labelled ROI: ``{name: (B, C)}``, NaN where a label is absent.

    ``labels`` is a (B, 1, *spatial) label image; ``label_names`` maps label values to names (default
    :data:`ROI_LABELS`).
    """
    names = ROI_LABELS if label_names is None else label_names
    return {name: _masked_mean(maps, (labels == value).expand_as(maps)) for value, name in names.items()}


_METRICS = {"psnr": masked_psnr, "ssim": masked_ssim, "mae": masked_mae, "mpe": masked_mpe}


def split_target_mask(y_pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a target into ``(reference maps, mask)``, the bundle's convention for metrics and the loss.

    Ignite metric handlers and losses receive only ``(y_pred, y)``, so the brain mask travels as one extra LAST
    channel of ``y`` (``y.shape[1] == y_pred.shape[1] + 1``). A target with as many channels as ``y_pred`` carries no
    mask: every voxel counts (a mask of ones is returned).
    """
    extra = y.shape[1] - y_pred.shape[1]
    if y.shape[0] != y_pred.shape[0] or y.shape[2:] != y_pred.shape[2:] or extra not in (0, 1):
        raise ValueError(
            f"target {tuple(y.shape)} must match prediction {tuple(y_pred.shape)}, optionally with one extra "
            "last channel holding the mask."
        )
    return (y[:, :-1], y[:, -1:]) if extra else (y, torch.ones_like(y[:, :1]))


class MaskedMapMetric(RegressionMetric):
    """One of the masked map metrics as a MONAI cumulative metric, for ``monai.handlers.IgniteMetricHandler``.

    ``y`` is the reference maps with the brain mask as an extra last channel, or without it to use every voxel
    (see :func:`split_target_mask`). Each iteration buffers a (B, C) tensor of per-sample values (C = 1 when
    ``channel`` is set or channels are reduced); ``aggregate`` applies ``reduction`` and skips NaNs.

    Args:
        metric: ``"psnr"``, ``"ssim"``, ``"mae"`` or ``"mpe"``.
        channel: index of the one map to score (``physics.MAPS`` order), or None for all.
        channel_reduction: None, ``"sum"`` or ``"mean"`` over the scored channels per sample. The checkpoint key
            metric PSNR(T1) + PSNR(T2) + PSNR(PD) is ``metric="psnr", channel_reduction="sum"`` with the default
            ``reduction="mean"`` (a sample with one NaN channel is then left out as a whole).
        reduction: MONAI ``MetricReduction`` over the buffered (B, C) values.
        get_not_nans: whether ``aggregate`` also returns the count of non-NaN values.
        metric_kwargs: passed to the metric function, e.g. ``win_size``/``sigma`` (SSIM) or ``eps`` (MPE).
    """

    def __init__(
        self,
        metric: str = "psnr",
        channel: int | None = None,
        channel_reduction: str | None = None,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        **metric_kwargs,
    ) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)
        self.metric_fn = look_up_option(metric, _METRICS)
        inspect.signature(self.metric_fn).bind(None, None, None, **metric_kwargs)  # fail at config time, not later
        self.metric_kwargs = metric_kwargs
        self.channel = channel
        self.channel_reduction = (
            None if channel_reduction is None else look_up_option(channel_reduction, ("sum", "mean"))
        )

    def _check_shape(self, y_pred: torch.Tensor, y: torch.Tensor) -> None:
        split_target_mask(y_pred, y)

    def _compute_metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y_pred, y = convert_to_tensor(y_pred, track_meta=False), convert_to_tensor(y, track_meta=False)
        ref, mask = split_target_mask(y_pred, y)
        if self.channel is not None:
            y_pred, ref = y_pred[:, [self.channel]], ref[:, [self.channel]]
        values = self.metric_fn(y_pred, ref, mask, **self.metric_kwargs)
        if self.channel_reduction is not None:
            values = getattr(values, self.channel_reduction)(dim=1, keepdim=True)
        return values


def per_map_handlers(metrics: Sequence[str], prefix: str = "") -> dict[str, IgniteMetricHandler]:
    """One ignite metric handler per metric and map, named ``<prefix><metric>_<map>`` (e.g. ``val_mpe_T1``).

    For a bundle config's ``additional_metrics``, instead of one near-identical block per metric and map.

    Args:
        metrics: names of :class:`MaskedMapMetric` metrics, e.g. ``["mpe", "psnr"]``.
        prefix: prepended to every handler's name.
    """
    return {
        f"{prefix}{metric}_{name}": IgniteMetricHandler(
            metric_fn=MaskedMapMetric(metric, channel=channel), output_transform=from_engine(["pred", "label"])
        )
        for metric in metrics
        for channel, name in enumerate(physics.MAPS)
    }
