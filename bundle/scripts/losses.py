"""Training loss: the paper's masked, per-map weighted L2 (its Eq. 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import LossReduction
from scripts.metrics import split_target_mask
from torch.nn.modules.loss import _Loss

#: The paper's weights for the T1, T2 and PD losses (MAPS order), chosen there to balance their magnitudes.
PAPER_MAP_WEIGHTS = (0.1, 0.5, 0.15)


class MaskedWeightedMSELoss(_Loss):
    """``sum_c w_c * MSE_c``, each MSE over the voxels inside the (brain) mask only.

    ``forward(input, target, mask=None)``: ``input`` and ``target`` are (B, C, *spatial); ``mask`` is
    (B, 1, *spatial) (broadcast over channels) or (B, C, *spatial), binary or non-negative voxel weights;
    ``None`` means every voxel.

    Two-argument form for MONAI's ``SupervisedTrainer``/``SupervisedEvaluator``, which call
    ``loss_function(pred, label)``: when ``target`` has exactly one channel more than ``input``, that last
    channel is the mask (build the label with e.g. ``ConcatItemsd(["T1", "T2", "PD", "mask"], "label")``).

    Args:
        weights: one weight per channel (default: the paper's T1 0.1, T2 0.5, PD 0.15).
        batch: True (default) pools the squared errors of all in-mask voxels of the batch before dividing,
            so every brain voxel counts the same and a slice with a tiny mask is not amplified (the
            batch is then one item for ``reduction``). False gives one loss per sample, then ``reduction``
            over the samples; a sample with an empty mask contributes 0.
        reduction: "mean", "sum" or "none" over the items (samples, or the single pooled batch item).
        log: compare ``log(input)`` with ``log(target)`` (both clamped to ``eps``): squared relative errors,
            so a 10 % error in WM T2 (80 ms) weighs as much as one in CSF T2 (1500 ms). On linear maps the
            large CSF values dominate the loss and WM/GM, the tissues users measure, are left biased.
        eps: the clamp of ``log``, on the network's scale (1e-4 is 0.5 ms T1, 0.25 ms T2, 0.01 p.u.).

    An empty mask gives a loss of exactly 0 that still backpropagates (zero gradients), never NaN.
    """

    def __init__(
        self,
        weights: Sequence[float] = PAPER_MAP_WEIGHTS,
        batch: bool = True,
        reduction: LossReduction | str = LossReduction.MEAN,
        log: bool = False,
        eps: float = 1e-4,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.batch, self.log, self.eps = batch, log, eps
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32).reshape(-1))

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n_channels = input.shape[1]
        if mask is None:
            target, mask = split_target_mask(input, target)  # the mask as target's extra last channel, or all ones
        elif target.shape[1] == n_channels + 1:
            raise ValueError("the mask was given twice: as target's extra last channel and as `mask`.")
        if target.shape != input.shape:
            raise ValueError(f"target shape {tuple(target.shape)} must equal input shape {tuple(input.shape)}.")
        if n_channels != self.weights.numel():
            raise ValueError(f"{self.weights.numel()} weights for {n_channels} channels.")
        if mask.shape[0] != input.shape[0] or mask.shape[1] not in (1, n_channels) or mask.shape[2:] != input.shape[2:]:
            raise ValueError(f"mask shape {tuple(mask.shape)} must be (B, 1 or C, *spatial) for {tuple(input.shape)}.")

        mask = mask.to(input.dtype).expand_as(input)
        if self.log:
            input, target = torch.log(input.clamp_min(self.eps)), torch.log(target.clamp_min(self.eps))
        sum_dims = [0, *range(2, input.dim())] if self.batch else list(range(2, input.dim()))
        squared_error = torch.sum(mask * (input - target) ** 2, dim=sum_dims)
        # An empty mask has squared_error == 0 too, so the clamp only replaces 0 / 0 by 0.
        count = torch.sum(mask, dim=sum_dims).clamp_min(torch.finfo(input.dtype).eps)
        loss = torch.sum(squared_error / count * self.weights.to(input), dim=-1)  # (B,) or ()
        loss = loss.reshape(-1)
        if self.reduction == LossReduction.MEAN.value:
            return loss.mean()
        if self.reduction == LossReduction.SUM.value:
            return loss.sum()
        return loss
