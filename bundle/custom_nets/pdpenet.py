"""PDPE-Net: a multi-branch U-Net whose encoders are conditioned on each series' TR/TE/TI (the paper's Fig. 3).

Each weighted image (T1w, T2w, FLAIR) has its own encoder. Its sequence parameters, already divided by the
fixed ``physics.PARAMETER_SCALE``, are embedded once per branch (Linear + LayerNorm + activation); at every
encoder level that vector is broadcast over the feature map, concatenated on channels and fused by two 1x1
convolutions. The branches meet at the bottleneck and one decoder, fed with the skips of all three branches,
outputs the scaled T1, T2 and PD maps. With ``embed_parameters=False`` the same class is the paper's baseline
"U-Net without parameter embedding".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from monai.networks.layers.utils import get_act_layer
from torch import nn

__all__ = ["PDPENet"]

N_SEQUENCE_PARAMETERS = 3  # TR, TE, TI


class ParameterFusion(nn.Module):
    """Concatenate a per-sample embedding, broadcast over space, to a feature map; mix with two 1x1 convs.

    No normalisation here on purpose: the embedding is constant over space, so an instance norm after the
    first 1x1 conv would subtract exactly its contribution. The activation between the convs turns the
    embedding into a voxel-wise gating that survives the normalisation of the following blocks.
    """

    def __init__(self, spatial_dims: int, channels: int, embed_dim: int, act) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.mix = nn.Sequential(
            Convolution(spatial_dims, channels + embed_dim, channels, kernel_size=1, act=act, norm=None),
            Convolution(spatial_dims, channels, channels, kernel_size=1, conv_only=True),
        )

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        for _ in range(self.spatial_dims):
            embedding = embedding.unsqueeze(-1)
        size = [-1, -1] + list(x.shape[2:])
        return self.mix(torch.cat([x, embedding.expand(size)], dim=1))


class EncoderLevel(nn.Module):
    """One encoder level of one branch: a residual conv block (strided except at level 0), then the fusion."""

    def __init__(self, block: nn.Module, fusion: ParameterFusion | None) -> None:
        super().__init__()
        self.block = block
        self.fusion = fusion

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        x = self.block(x)
        if self.fusion is not None and embedding is not None:
            x = self.fusion(x, embedding)
        return x


class EncoderBranch(nn.Module):
    """The encoder of one weighted image; returns the features of every level (the last is the bottleneck)."""

    def __init__(self, levels: Sequence[EncoderLevel], embedding: nn.Module | None) -> None:
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.embedding = embedding

    def forward(self, image: torch.Tensor, params: torch.Tensor | None) -> list[torch.Tensor]:
        embedding: torch.Tensor | None = None
        if self.embedding is not None and params is not None:
            embedding = self.embedding(params)
        features: list[torch.Tensor] = []
        x = image
        for level in self.levels:
            x = level(x, embedding)
            features.append(x)
        return features


class DecoderStage(nn.Module):
    """Upsample, concatenate the skips of all branches at this level, then a residual conv block."""

    def __init__(self, up: nn.Module, block: nn.Module) -> None:
        super().__init__()
        self.up = up
        self.block = block

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        return self.block(torch.cat([self.up(x)] + skips, dim=1))


class PDPENet(nn.Module):
    """Quantitative T1/T2/PD maps from T1w/T2w/FLAIR images and their TR/TE/TI.

    Args:
        spatial_dims: 2 for slices (the paper), 3 for volumes.
        in_series: number of weighted images, each a 1-channel input with its own encoder branch.
        out_channels: number of output maps (T1, T2, PD as ``physics.MAP_SCALE``-scaled targets).
        channels: feature channels per level; depth = ``len(channels)`` with ``depth - 1`` stride-2
            downsamplings, so every spatial size must be divisible by ``2 ** (depth - 1)``.
        embed_dim: length of the parameter embedding vector.
        embed_parameters: False gives the baseline U-Net without parameter embedding (``params`` ignored).
        norm, act, dropout: MONAI layer specs for the conv blocks (``act`` also in embedding and fusion).
        default_params: optional ``(in_series, 3)`` normalised TR/TE/TI used when ``forward`` gets no
            ``params``, so single-input tools (``monai.bundle verify_net_in_out``) can run the network. It is
            not saved in checkpoints. Without it, calling an embedding network without ``params`` is an error.

    Output non-negativity comes from a final softplus, not ReLU: a voxel whose pre-activation goes negative
    still gets a gradient and can recover, where ReLU would leave it dead at 0. Softplus only approaches 0,
    which costs nothing: tissue maps are well above 0 and the background is masked.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_series: int = 3,
        out_channels: int = 3,
        channels: Sequence[int] = (32, 64, 128, 256),
        embed_dim: int = 32,
        embed_parameters: bool = True,
        norm: tuple | str | None = "INSTANCE",
        act: tuple | str = "PRELU",
        dropout: float = 0.0,
        default_params: Sequence[Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if in_series < 1 or out_channels < 1:
            raise ValueError(f"in_series and out_channels must be >= 1, got {in_series} and {out_channels}.")
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels needs at least 2 positive entries (depth >= 2), got {channels}.")
        if embed_parameters and embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1 when embedding parameters, got {embed_dim}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.spatial_dims = spatial_dims
        self.in_series = in_series
        self.embed_parameters = embed_parameters
        self.size_divisor = 2 ** (len(channels) - 1)

        self.has_default_params = default_params is not None
        default = torch.zeros(in_series, N_SEQUENCE_PARAMETERS)
        if default_params is not None:
            default = torch.as_tensor(default_params, dtype=torch.float32)
            if default.shape != (in_series, N_SEQUENCE_PARAMETERS):
                raise ValueError(f"default_params must have shape ({in_series}, 3), got {tuple(default.shape)}.")
        self.register_buffer("default_params", default, persistent=False)

        # A conv bias right before a normalisation is cancelled by it (zero gradient): drop it when normalising.
        bias = not norm

        def block(in_c: int, out_c: int, stride: int = 1) -> ResidualUnit:
            return ResidualUnit(
                spatial_dims, in_c, out_c, strides=stride, act=act, norm=norm, dropout=dropout, bias=bias
            )

        def branch() -> EncoderBranch:
            levels = [
                EncoderLevel(
                    block(1 if i == 0 else channels[i - 1], c, stride=1 if i == 0 else 2),
                    ParameterFusion(spatial_dims, c, embed_dim, act) if embed_parameters else None,
                )
                for i, c in enumerate(channels)
            ]
            embedding = None
            if embed_parameters:  # LayerNorm keeps the vector on a fixed scale even for out-of-range protocols
                embedding = nn.Sequential(
                    nn.Linear(N_SEQUENCE_PARAMETERS, embed_dim), nn.LayerNorm(embed_dim), get_act_layer(act)
                )
            return EncoderBranch(levels, embedding)

        self.branches = nn.ModuleList([branch() for _ in range(in_series)])
        self.bottleneck = block(in_series * channels[-1], channels[-1])
        self.decoder = nn.ModuleList(
            [
                DecoderStage(
                    UpSample(spatial_dims, channels[i + 1], channels[i], scale_factor=2, mode="deconv"),
                    block((in_series + 1) * channels[i], channels[i]),
                )
                for i in reversed(range(len(channels) - 1))
            ]
        )
        self.head = nn.Sequential(
            Convolution(spatial_dims, channels[0], out_channels, kernel_size=1, conv_only=True), nn.Softplus()
        )

    def forward(self, images: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """``images`` (B, in_series, *spatial); ``params`` (B, in_series, 3): rows per series, columns TR/TE/TI
        divided by ``physics.PARAMETER_SCALE``. Returns (B, out_channels, *spatial), non-negative."""
        if images.dim() != self.spatial_dims + 2 or images.shape[1] != self.in_series:
            raise ValueError(
                f"images must have shape (B, {self.in_series}, *spatial) with {self.spatial_dims} spatial dims, "
                f"got {list(images.shape)}."
            )
        for size in images.shape[2:]:
            if size % self.size_divisor != 0:
                raise ValueError(
                    f"every spatial size must be divisible by {self.size_divisor}, got {list(images.shape[2:])}."
                )
        if self.embed_parameters:
            if params is None:
                if not self.has_default_params:
                    raise ValueError("params (B, in_series, 3) are required: this network embeds TR/TE/TI.")
                params = self.default_params.to(images.dtype).expand(images.shape[0], -1, -1)
            if list(params.shape) != [images.shape[0], self.in_series, 3]:
                raise ValueError(
                    f"params must have shape ({images.shape[0]}, {self.in_series}, 3), got {list(params.shape)}."
                )

        features: list[list[torch.Tensor]] = []
        for i, branch in enumerate(self.branches):
            series_params: torch.Tensor | None = None
            if self.embed_parameters and params is not None:
                series_params = params[:, i]
            features.append(branch(images[:, i : i + 1], series_params))

        x = self.bottleneck(torch.cat([f[-1] for f in features], dim=1))
        depth = len(features[0])
        for j, stage in enumerate(self.decoder):
            level = depth - 2 - j
            x = stage(x, [f[level] for f in features])
        return self.head(x)
