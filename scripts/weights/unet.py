"""Pretrained diffusion U-Nets (LDM's ``openaimodel.UNetModel``, e.g. LSUN-Churches, the paper's start; diffusers'
``UNet2DModel``) -> MONAI's ``DiffusionModelUNet`` / :class:`scripts.ldm_unet.LDMUNet`.

The block structure is read from the keys; LDM's legacy attention ``qkv`` 1x1 conv (q, k, v interleaved per head)
becomes MONAI's ``to_q`` / ``to_k`` / ``to_v`` with the target's head counts. ``conv_in`` is zero-padded to the
target's input channels.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.networks.blocks import SpatialAttentionBlock
from torch import nn

from scripts.weights.reading import check_fit, check_groups, count, known_layout, read_state_dict, resolve, unwrap_unet

__all__ = ["convert_unet_state_dict", "prepare_unet_state_dict", "load_unet_weights"]

LSUN_CHURCHES = "https://ommer-lab.com/files/latent-diffusion/lsun_churches.zip"


def _unet_layout(sd: Mapping[str, torch.Tensor]) -> str:
    if "conv_in.conv.weight" in sd:
        return "monai"
    if "conv_in.weight" in sd and any(k.startswith("time_embedding.") for k in sd):
        return "diffusers"
    if "input_blocks.0.0.weight" in sd:
        return "compvis"
    return "unknown"


def _compvis_unet_names(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """CompVis module prefix -> diffusers module prefix, read from the block structure of the keys.

    The output blocks give the levels (each but the last ends in an up-sampler: a second res block, or a conv) and
    their res-block counts (``num_res_blocks + 1``); the input blocks have ``num_res_blocks`` per level, then a
    down-sampler (a res block, or the conv ``op``) on every level but the last."""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in sd)

    names = {"input_blocks.0.0.": "conv_in.", "time_embed.0.": "time_embedding.linear_1."}
    names.update({"time_embed.2.": "time_embedding.linear_2.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."})
    names.update({f"middle_block.{i}.": f"mid_block.{n}." for i, n in enumerate(("resnets.0", "attentions.0"))})
    names["middle_block.2."] = "mid_block.resnets.1."
    level, r, per_level = 0, 0, []
    for k in range(count(sd, "output_blocks.")):
        names[f"output_blocks.{k}.0."] = f"up_blocks.{level}.resnets.{r}."
        upsampled = False
        for j in range(1, count(sd, f"output_blocks.{k}.")):
            src = f"output_blocks.{k}.{j}."
            if has(src + "qkv."):
                names[src] = f"up_blocks.{level}.attentions.{r}."
            else:
                names[src], upsampled = f"up_blocks.{level}.upsamplers.0.", True
        if upsampled:
            per_level.append(r + 1)
            level, r = level + 1, 0
        else:
            r += 1
    per_level.append(r)
    n_down = [n - 1 for n in reversed(per_level)]
    level, r = 0, 0
    for k in range(1, count(sd, "input_blocks.")):
        if level >= len(n_down):
            break  # more input blocks than the output blocks imply: left unconverted, reported as unexpected
        if r == n_down[level]:
            names[f"input_blocks.{k}.0."] = f"down_blocks.{level}.downsamplers.0."
            level, r = level + 1, 0
            continue
        names[f"input_blocks.{k}.0."] = f"down_blocks.{level}.resnets.{r}."
        if has(f"input_blocks.{k}.1.qkv."):
            names[f"input_blocks.{k}.1."] = f"down_blocks.{level}.attentions.{r}."
        r += 1
    return names


_COMPVIS_UNET_PARAMS = [  # CompVis parameter names inside a module -> diffusers names
    (r"\.in_layers\.0\.", ".norm1."),
    (r"\.in_layers\.2\.", ".conv1."),
    (r"\.emb_layers\.1\.", ".time_emb_proj."),
    (r"\.out_layers\.0\.", ".norm2."),
    (r"\.out_layers\.3\.", ".conv2."),
    (r"\.skip_connection\.", ".conv_shortcut."),
    (r"(\.attentions\.\d+)\.norm\.", r"\1.group_norm."),
    (r"(\.attentions\.\d+)\.qkv\.", r"\1.qkv_ldm."),  # split into q, k, v per head below
    (r"(\.attentions\.\d+)\.proj_out\.", r"\1.to_out.0."),
    (r"(\.downsamplers\.0)\.op\.", r"\1.conv."),
]
_DIFFUSERS_UNET_RULES = [  # diffusers UNet2DModel name -> MONAI DiffusionModelUNet name
    (r"^conv_in\.", "conv_in.conv."),
    (r"^time_embedding\.linear_1\.", "time_embed.0."),
    (r"^time_embedding\.linear_2\.", "time_embed.2."),
    (r"^conv_norm_out\.", "out.0."),
    (r"^conv_out\.", "out.2.conv."),
    (r"^mid_block\.resnets\.0\.", "middle_block.resnet_1."),
    (r"^mid_block\.resnets\.1\.", "middle_block.resnet_2."),
    (r"^mid_block\.attentions\.0\.", "middle_block.attention."),
    (r"\.downsamplers\.0\.conv\.", ".downsampler.op.conv."),
    (r"\.upsamplers\.0\.conv\.", ".upsampler.postconv.conv."),
    (r"\.(down|up)samplers\.0\.", r".\1sampler."),
    (r"\.conv([12])\.", r".conv\1.conv."),
    (r"\.conv_shortcut\.", ".skip_connection.conv."),
    (r"\.(query|key|value)\.", lambda m: f".to_{m.group(1)[0]}."),  # diffusers < 0.14
    (r"\.proj_attn\.", ".to_out.0."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_(q|k|v)\.", r".attn.to_\1."),
    (r"\.to_out\.0\.", ".attn.out_proj."),
    (r"\.qkv_ldm\.", ".attn.qkv_ldm."),
]


def convert_unet_state_dict(
    state_dict: Mapping[str, torch.Tensor], num_heads: int | Mapping[str, int] = 8
) -> dict[str, torch.Tensor]:
    """A diffusion U-Net state dict (CompVis/LDM ``openaimodel``, diffusers ``UNet2DModel`` or MONAI keys, or a
    checkpoint holding one) -> MONAI ``DiffusionModelUNet`` / :class:`scripts.ldm_unet.LDMUNet` keys.

    ``num_heads``: attention heads of the CompVis blocks (LDM's legacy ``qkv`` interleaves q, k, v per head), one
    number or a map from MONAI attention-block prefix (``"down_blocks.0.attentions.0."``) to heads.
    """
    sd = unwrap_unet(state_dict)
    layout = known_layout(sd, _unet_layout, "an LDM or diffusers U-Net")
    if layout == "monai":
        return dict(sd)
    if layout == "compvis":
        names = _compvis_unet_names(sd)
        renamed = {}
        for key, value in sd.items():
            src = max((p for p in names if key.startswith(p)), key=len, default=None)
            key = names[src] + key[len(src) :] if src else key
            for pattern, repl in _COMPVIS_UNET_PARAMS:
                key = re.sub(pattern, repl, key)
            renamed[key] = value[..., 0] if re.search(r"\.(qkv_ldm|to_out\.0)\.weight$", key) else value  # conv1d
        sd = renamed
    out = {}
    for key, value in sd.items():
        for pattern, repl in _DIFFUSERS_UNET_RULES:
            key = re.sub(pattern, repl, key)
        if ".attn.qkv_ldm." in key:
            prefix, param = key.split("attn.qkv_ldm.")
            heads = num_heads if isinstance(num_heads, int) else num_heads.get(prefix, 8)
            if value.shape[0] % (3 * heads):
                raise ValueError(f"{key}: {value.shape[0]} channels do not split into q, k, v of {heads} heads")
            q, k, v = value.reshape(heads, 3, value.shape[0] // (3 * heads), *value.shape[1:]).unbind(1)
            for name, part in zip("qkv", (q, k, v)):
                out[f"{prefix}attn.to_{name}.{param}"] = part.reshape(-1, *value.shape[1:])
            continue
        out[key] = value
    return out


def prepare_unet_state_dict(
    raw: Mapping[str, torch.Tensor], unet: nn.Module, where: str = "U-Net weights"
) -> dict[str, torch.Tensor]:
    """``raw`` (any layout :func:`convert_unet_state_dict` reads) as an exact state dict of ``unet``: converted with
    ``unet``'s attention heads, ``conv_in`` zero-padded when ``unet`` takes more input channels than the file (SDSeg:
    4 -> 8, the z_c channels start at zero, as in the paper). Raises ``ValueError`` naming ``where`` and the keys."""
    heads = {f"{name}.": m.attn.num_heads for name, m in unet.named_modules() if isinstance(m, SpatialAttentionBlock)}
    try:
        sd = convert_unet_state_dict(raw, heads)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    target = unet.state_dict()
    key = "conv_in.conv.weight"
    if key in sd and key in target and sd[key].ndim == target[key].ndim:
        w, t = sd[key], target[key]
        if w.shape[1] < t.shape[1] and (w.shape[0], *w.shape[2:]) == (t.shape[0], *t.shape[2:]):
            sd[key] = torch.cat([w, w.new_zeros((w.shape[0], t.shape[1] - w.shape[1], *w.shape[2:]))], dim=1)
    common = set(sd) & set(target)

    def hints() -> list[str]:
        if any(k.endswith("time_emb_proj.weight") and sd[k].shape[0] == 2 * target[k].shape[0] for k in common):
            return [
                "  the file's res blocks use scale-shift time conditioning (LDM's use_scale_shift_norm): build the "
                "U-Net with scripts.ldm_unet.LDMUNet, as configs/paper.yaml does"
            ]
        return []

    check_fit(target, sd, where, part="U-Net", hints=hints)
    return sd


def load_unet_weights(path: str | os.PathLike, unet: nn.Module) -> nn.Module:
    """Load a pretrained diffusion U-Net into ``unet`` (MONAI ``DiffusionModelUNet``; LDM's scale-shift res blocks
    need :class:`scripts.ldm_unet.LDMUNet`): a CompVis/LDM ``.ckpt`` (its ``model.diffusion_model.*`` keys, e.g. the
    LSUN-Churches LDM the paper starts from), a diffusers ``UNet2DModel`` folder or ``.safetensors`` / ``.bin``, or a
    MONAI state dict. ``conv_in`` is zero-padded to ``unet``'s input channels (:func:`prepare_unet_state_dict`).

    Raises ``FileNotFoundError`` (saying where to get the LSUN-Churches U-Net), or ``ValueError`` naming the file and
    listing missing / unexpected keys and shape mismatches when it does not fit ``unet``.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"U-Net weights not found: {path}. The paper preset starts the U-Net from LDM's LSUN-Churches model: "
            f"download {LSUN_CHURCHES} and unzip its model.ckpt to models/lsun_churches.ckpt (or point --unet_path "
            "at it); or train the U-Net from scratch with --unet_path None."
        )
    file, config = resolve(Path(path), "unet")
    raw = read_state_dict(file, part="unet")
    layout = _unet_layout(raw)
    expected = 32 if layout == "compvis" else config.get("norm_num_groups")  # LDM's GroupNorm32
    check_groups(unet, expected, str(file), f"{layout} U-Net", "unet_norm_groups")
    unet.load_state_dict(prepare_unet_state_dict(raw, unet, str(file)))
    return unet
