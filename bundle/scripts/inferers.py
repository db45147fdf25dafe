"""Whole-volume inference of the 2D network, slice by slice, with each volume's protocol."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.inferers import SliceInferer


class ProtocolSliceInferer(SliceInferer):
    """``SliceInferer`` that hands the network the (1, 3, 3) protocol of the volume with every batch of slices.

    MONAI 1.6's ``SliceInferer`` does not pass extra arguments on to the network, and its sliding
    windows batch slices of one volume together, so the protocol is expanded to the window batch here.
    In-plane the slices are padded to ``roi_size`` (or tiled with overlapping windows if larger).
    """

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], params: torch.Tensor):
        if inputs.shape[0] != 1 or params.shape[0] != 1:
            raise ValueError(f"infer one volume at a time, got a batch of {inputs.shape[0]}")

        def with_protocol(slices: torch.Tensor) -> torch.Tensor:
            return network(slices, params.expand(slices.shape[0], -1, -1))

        return super().__call__(inputs, with_protocol)
