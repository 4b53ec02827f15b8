# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``VQVAE`` with MONAI Generative 0.2.3's ``num_channels`` (MONAI core's network, same weights and numbers)."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import vqvae as _core

from generative._dropin import resolve_alias

__all__ = ["VQVAE"]


class VQVAE(_core.VQVAE):
    """MONAI core's vector-quantised autoencoder with 0.2.3's ``num_channels`` argument.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: input channels.
        out_channels: output channels.
        num_channels: channels of each level (MONAI core's ``channels`` also works).
        num_res_layers: residual units per level.
        num_res_channels: channels of the residual units per level.
        downsample_parameters: (stride, kernel size, dilation, padding) per level.
        upsample_parameters: (stride, kernel size, dilation, padding, output padding) per level.
        num_embeddings: codebook size.
        embedding_dim: codebook vector size.
        embedding_init: codebook initialisation.
        commitment_cost: weight of the commitment loss.
        decay: EMA decay of the codebook.
        epsilon: EMA epsilon.
        dropout: dropout rate.
        act: activation.
        output_act: activation of the output.
        ddp_sync: synchronise the codebook across processes.
        use_checkpointing: activation checkpointing.
        channels: MONAI core's name for ``num_channels``.

    ``forward(x)`` -> (reconstruction, quantisation loss) for x BxCx[SPATIAL DIMS].
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_channels: Sequence[int] | None = None,
        num_res_layers: int = 3,
        num_res_channels: Sequence[int] | int = (96, 96, 192),
        downsample_parameters: Sequence[tuple[int, int, int, int]] | tuple[int, int, int, int] = (
            (2, 4, 1, 1), (2, 4, 1, 1), (2, 4, 1, 1)),
        upsample_parameters: Sequence[tuple[int, int, int, int, int]] | tuple[int, int, int, int, int] = (
            (2, 4, 1, 1, 0), (2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
        num_embeddings: int = 32,
        embedding_dim: int = 64,
        embedding_init: str = "normal",
        commitment_cost: float = 0.25,
        decay: float = 0.5,
        epsilon: float = 1e-5,
        dropout: float = 0.0,
        act: tuple | str | None = "RELU",
        output_act: tuple | str | None = None,
        ddp_sync: bool = True,
        use_checkpointing: bool = False,
        *,
        channels: Sequence[int] | None = None,
    ) -> None:
        channels = resolve_alias(type(self).__name__, "num_channels", num_channels, "channels", channels,
                                 (96, 96, 192))
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, channels=channels,
            num_res_layers=num_res_layers, num_res_channels=num_res_channels,
            downsample_parameters=downsample_parameters, upsample_parameters=upsample_parameters,
            num_embeddings=num_embeddings, embedding_dim=embedding_dim, embedding_init=embedding_init,
            commitment_cost=commitment_cost, decay=decay, epsilon=epsilon, dropout=dropout, act=act,
            output_act=output_act, ddp_sync=ddp_sync, use_checkpointing=use_checkpointing,
        )
