"""The authors' denoising U-Net (LDM's ``openaimodel.UNetModel``) as a small extension of MONAI's U-Net.

MONAI's ``DiffusionModelUNet`` has the LDM U-Net's structure (levels of res blocks and self-attention, res-block
up/down-sampling, a mid block with attention) but its res blocks add the time embedding to the features. LDM's
LSUN-Churches U-Net, which SDSeg starts from, modulates them instead (``use_scale_shift_norm``: ``GroupNorm(h) *
(1 + scale) + shift``, FiLM) and drops out before the last convolution (``dropout``). :class:`LDMUNet` is MONAI's
U-Net with those res blocks swapped in; everything else, and every parameter name, is MONAI's, so the weights of an
LDM / diffusers U-Net load through ``scripts.weights.unet.load_unet_weights``.
"""

from __future__ import annotations

import functools

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock
from torch import nn

__all__ = ["ScaleShiftResnetBlock", "LDMUNet"]


class ScaleShiftResnetBlock(DiffusionUNetResnetBlock):
    """MONAI's diffusion res block with LDM's time conditioning and dropout.

    ``scale_shift_norm=True``: the time embedding is projected to ``2 * out_channels`` (scale, shift) and applied
    after the second GroupNorm, ``norm2(h) * (1 + scale) + shift``; ``False``: added before it, as in MONAI.
    ``dropout`` acts before the last convolution (LDM's ``out_layers``). Other arguments: ``DiffusionUNetResnetBlock``.
    """

    def __init__(self, *args, scale_shift_norm: bool = True, dropout: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale_shift_norm = bool(scale_shift_norm)
        if self.scale_shift_norm:
            self.time_emb_proj = nn.Linear(self.emb_channels, 2 * self.out_channels)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def like(cls, block: DiffusionUNetResnetBlock, **kwargs) -> ScaleShiftResnetBlock:
        """A new block with the shape of ``block`` (channels, up/down-sampling, norm)."""
        return cls(
            spatial_dims=block.spatial_dims,
            in_channels=block.channels,
            temb_channels=block.emb_channels,
            out_channels=block.out_channels,
            up=block.up,
            down=block.down,
            norm_num_groups=block.norm1.num_groups,
            norm_eps=block.norm1.eps,
            **kwargs,
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.nonlinearity(self.norm1(x))
        if self.upsample is not None:
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        h = self.conv1(h)
        temb = self.time_emb_proj(self.nonlinearity(emb))
        temb = temb.view(*temb.shape, *([1] * self.spatial_dims))
        if self.scale_shift_norm:
            scale, shift = temb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + temb)
        h = self.conv2(self.dropout(self.nonlinearity(h)))
        return self.skip_connection(x) + h


class LDMUNet(DiffusionModelUNet):
    """MONAI ``DiffusionModelUNet`` whose res blocks are :class:`ScaleShiftResnetBlock` (LDM's ``UNetModel``).

    Args:
        scale_shift_norm: LDM's ``use_scale_shift_norm`` (the LSUN-Churches U-Net: True).
        dropout: LDM's res-block ``dropout`` (SDSeg's configs: 0.2).
        norm_eps: GroupNorm epsilon; LDM's ``GroupNorm32`` uses PyTorch's default 1e-5 (MONAI's U-Net: 1e-6).
        kwargs: ``DiffusionModelUNet``'s arguments.

    SDSeg's U-Net (LSUN-Churches, 8 input channels): ``channels=(192, 384, 384, 768, 768)``, ``attention_levels=
    (True, True, True, True, False)`` (LDM's ``attention_resolutions: [1, 2, 4, 8]`` are down-sampling factors),
    ``num_head_channels=(24, 48, 48, 96, 96)`` (8 heads), ``num_res_blocks=2``, ``resblock_updown=True``.
    """

    def __init__(self, *args, scale_shift_norm: bool = True, dropout: float = 0.0, norm_eps: float = 1e-5, **kwargs):
        super().__init__(*args, norm_eps=norm_eps, **kwargs)
        ldm_block = functools.partial(ScaleShiftResnetBlock.like, scale_shift_norm=scale_shift_norm, dropout=dropout)
        for module in list(self.modules()):  # swap every plain res block (levels, up/down-samplers, mid block)
            for name, child in module.named_children():
                if type(child) is DiffusionUNetResnetBlock:
                    setattr(module, name, ldm_block(child))
