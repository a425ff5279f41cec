"""The mask autoencoder: MONAI's ``AutoencoderKL`` in MONAI's layout or in LDM's (kl-f8, SD VAE).

LDM's autoencoder differs from MONAI's ``AutoencoderKL`` in three places, so :func:`kl_autoencoder` builds it with
``layout="ldm"``: the decoder has one more res block per level than the encoder (3 vs 2 for kl-f8); the encoder ends in
``2 * latent_channels`` channels (mean and log-variance, ``double_z``) and one 1x1 ``quant_conv``, whose two halves
become ``quant_conv_mu`` and ``quant_conv_log_sigma``; a SiLU follows the last GroupNorm of encoder and decoder.
Weights (the autoencoder stage's or pretrained) load through :func:`scripts.weights.kl.load_autoencoder`, which
builds on this module (never the reverse: no import circle).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import AutoencoderKL
from monai.networks.nets.autoencoderkl import Decoder, Encoder
from monai.utils import ensure_tuple_rep
from torch import nn

__all__ = ["GroupNormSiLU", "kl_autoencoder", "is_ldm_layout", "nonlocal_attn_hint"]


class GroupNormSiLU(nn.GroupNorm):
    """GroupNorm then SiLU: LDM's ``norm_out`` and nonlinearity before ``conv_out`` (same parameters as GroupNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


def kl_autoencoder(
    spatial_dims: int = 2,
    in_channels: int = 3,
    out_channels: int = 3,
    channels: Sequence[int] = (128, 256, 512, 512),
    num_res_blocks: int | Sequence[int] = 2,
    latent_channels: int = 4,
    norm_num_groups: int = 32,
    attention_levels: Sequence[bool] | None = None,
    layout: str = "monai",
    decoder_res_blocks: int | Sequence[int] | None = None,
    **kwargs,
) -> AutoencoderKL:
    """MONAI ``AutoencoderKL`` in MONAI's layout, or in LDM's (``layout="ldm"``; kl-f8 with the other defaults).

    ``layout="ldm"``: decoder with ``num_res_blocks + 1`` res blocks per level, ``double_z`` encoder with
    ``quant_conv_mu`` / ``quant_conv_log_sigma`` taking ``2 * latent_channels``, SiLU after the last GroupNorms.
    ``decoder_res_blocks`` overrides the decoder's res blocks per level in either layout. ``layout="monai"`` without
    it is exactly ``AutoencoderKL(...)`` (same modules, same state dict). Other arguments go to ``AutoencoderKL``.
    """
    if layout not in ("monai", "ldm"):
        raise ValueError(f"layout must be 'monai' or 'ldm', got {layout!r}")
    attention_levels = (False,) * len(channels) if attention_levels is None else attention_levels
    ae = AutoencoderKL(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        num_res_blocks=num_res_blocks,
        channels=channels,
        attention_levels=attention_levels,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        **kwargs,
    )
    common = dict(
        spatial_dims=spatial_dims,
        channels=channels,
        norm_num_groups=norm_num_groups,
        norm_eps=kwargs.get("norm_eps", 1e-6),
        attention_levels=attention_levels,
        include_fc=kwargs.get("include_fc", True),
        use_combined_linear=kwargs.get("use_combined_linear", False),
        use_flash_attention=kwargs.get("use_flash_attention", False),
    )
    num_res_blocks = ensure_tuple_rep(num_res_blocks, len(channels))
    if layout == "ldm":
        ae.encoder = Encoder(
            in_channels=in_channels,
            out_channels=2 * latent_channels,
            num_res_blocks=num_res_blocks,
            with_nonlocal_attn=kwargs.get("with_encoder_nonlocal_attn", True),
            **common,
        )
        for name in ("quant_conv_mu", "quant_conv_log_sigma"):
            conv = Convolution(spatial_dims, 2 * latent_channels, latent_channels, kernel_size=1, conv_only=True)
            setattr(ae, name, conv)
        if decoder_res_blocks is None:
            decoder_res_blocks = tuple(n + 1 for n in num_res_blocks)
    if decoder_res_blocks is not None and ensure_tuple_rep(decoder_res_blocks, len(channels)) != num_res_blocks:
        ae.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            num_res_blocks=ensure_tuple_rep(decoder_res_blocks, len(channels)),
            with_nonlocal_attn=kwargs.get("with_decoder_nonlocal_attn", True),
            use_convtranspose=kwargs.get("use_convtranspose", False),
            **common,
        )
    if layout == "ldm":
        for part in (ae.encoder, ae.decoder):
            norm = part.blocks[-2]
            part.blocks[-2] = GroupNormSiLU(norm.num_groups, norm.num_channels, norm.eps)
    return ae


def is_ldm_layout(autoencoder: nn.Module) -> bool:
    """Whether ``autoencoder`` was built with ``layout="ldm"``."""
    return any(isinstance(m, GroupNormSiLU) for m in autoencoder.modules())


def nonlocal_attn_hint(network_keys, file_keys, prefix: str = "") -> str | None:
    """A line telling the user to set ``autoencoder_nonlocal_attn`` when the file's mask autoencoder (its keys under
    ``prefix``) has the non-local attention blocks and the configured one does not, or the reverse; else None."""

    def has_attn(keys) -> bool:
        return any(k.startswith(prefix) and ".attn." in k for k in keys)

    file_attn, net_attn = has_attn(file_keys), has_attn(network_keys)
    if file_attn == net_attn:
        return None
    return (
        f"The file's mask autoencoder was trained {'with' if file_attn else 'without'} its non-local attention blocks, "
        f"the configured one {'has' if net_attn else 'has not'} them: set autoencoder_nonlocal_attn: {file_attn} (or "
        f"--autoencoder_nonlocal_attn {file_attn}) as in training (default: true for binary, false for multi-class "
        "--classes since 0.7.0)."
    )
