"""KL autoencoder weights (LDM kl-f8, the Stable Diffusion VAE; CompVis or diffusers keys) -> MONAI's AutoencoderKL.

CompVis names become diffusers' first, then diffusers' block structure (read from the keys) is walked onto MONAI's
flat ``blocks`` lists; the mid-block attention's 1x1 convs (CompVis) or linear layers (diffusers) become MONAI's
linear layers. Encoder mean and std and decoder output then match diffusers' to float precision.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.networks.nets import AutoencoderKL

from scripts.autoencoder import is_ldm_layout, nonlocal_attn_hint
from scripts.weights.reading import (
    check_fit,
    check_groups,
    count,
    known_layout,
    read_state_dict,
    resolve,
    unwrap_autoencoder,
)

__all__ = [
    "convert_kl_state_dict",
    "describe_autoencoder",
    "config_hint",
    "check_kl_fit",
    "load_kl_weights",
    "load_autoencoder",
]


def _key_layout(sd: Mapping[str, torch.Tensor]) -> str:
    if any(k.startswith(("encoder.blocks.", "decoder.blocks.", "quant_conv_mu.")) for k in sd):
        return "monai"
    if any(".down_blocks." in k or ".mid_block." in k for k in sd):
        return "diffusers"
    if any(re.match(r"(encoder|decoder)\.(down|up|mid)\.", k) for k in sd):
        return "compvis"
    return "unknown"


_COMPVIS_RULES = [  # CompVis/LDM name -> diffusers name (decoder.up.<i> is reversed first)
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.attn\.(\d+)\.", r"encoder.down_blocks.\1.attentions.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", r"decoder.up_blocks.\1.resnets.\2."),
    (r"^decoder\.up\.(\d+)\.attn\.(\d+)\.", r"decoder.up_blocks.\1.attentions.\2."),
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"(\.resnets\.\d+)\.nin_shortcut\.", r"\1.conv_shortcut."),
    (r"(\.attentions\.\d+)\.norm\.", r"\1.group_norm."),
    (r"(\.attentions\.\d+)\.(q|k|v)\.", r"\1.to_\2."),
    (r"(\.attentions\.\d+)\.proj_out\.", r"\1.to_out.0."),
    # diffusers before 0.14 (e.g. the first sd-vae-ft-mse files)
    (r"(\.attentions\.\d+)\.(query|key|value)\.", lambda m: f"{m.group(1)}.to_{m.group(2)[0]}."),
    (r"(\.attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
]
_RESNET = {"norm1": "norm1", "norm2": "norm2", "conv1": "conv1.conv", "conv2": "conv2.conv"}
_RESNET["conv_shortcut"] = "nin_shortcut.conv"
_ATTN = {"group_norm": "norm", "to_q": "attn.to_q", "to_k": "attn.to_k", "to_v": "attn.to_v"}
_ATTN["to_out.0"] = "attn.out_proj"


def _to_diffusers_names(sd):
    n_up = count(sd, "decoder.up.")
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.", key)
        for pattern, repl in _COMPVIS_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _diffusers_to_monai(sd):
    """Walk diffusers' block structure (read from the keys) onto MONAI's flat ``blocks`` lists."""
    prefixes: dict[str, tuple[str, dict | None]] = {}  # source prefix -> (MONAI prefix, parameter-name map)

    def add_levels(part: str, levels: str, resample: str, b: int) -> int:
        for i in range(count(sd, f"{part}.{levels}.")):
            level = f"{part}.{levels}.{i}."
            for j in range(count(sd, f"{level}resnets.")):
                prefixes[f"{level}resnets.{j}."], b = (f"{part}.blocks.{b}.", _RESNET), b + 1
                if any(k.startswith(f"{level}attentions.{j}.") for k in sd):
                    prefixes[f"{level}attentions.{j}."], b = (f"{part}.blocks.{b}.", _ATTN), b + 1
            if any(k.startswith(f"{level}{resample}s.0.") for k in sd):
                sub = "conv.conv" if resample == "downsampler" else "postconv.conv"
                prefixes[f"{level}{resample}s.0.conv."], b = (f"{part}.blocks.{b}.{sub}.", None), b + 1
        return b

    def add_mid(part: str, b: int) -> int:
        for j, (name, subs) in enumerate([("resnets.0", _RESNET), ("attentions.0", _ATTN), ("resnets.1", _RESNET)]):
            prefixes[f"{part}.mid_block.{name}."] = (f"{part}.blocks.{b + j}.", subs)
        return b + 3

    def add_ends(part: str, b: int) -> None:
        prefixes[f"{part}.conv_norm_out."] = (f"{part}.blocks.{b}.", None)
        prefixes[f"{part}.conv_out."] = (f"{part}.blocks.{b + 1}.conv.", None)

    for part in ("encoder", "decoder"):
        prefixes[f"{part}.conv_in."] = (f"{part}.blocks.0.conv.", None)
    add_ends("encoder", add_mid("encoder", add_levels("encoder", "down_blocks", "downsampler", 1)))
    add_ends("decoder", add_levels("decoder", "up_blocks", "upsampler", add_mid("decoder", 1)))
    prefixes["post_quant_conv."] = ("post_quant_conv.conv.", None)

    out = {}
    for key, value in sd.items():
        if key.startswith("quant_conv.") and value.shape[0] % 2 == 0:  # moments = cat(mean, log-variance)
            half, param = value.shape[0] // 2, key[len("quant_conv.") :]
            out[f"quant_conv_mu.conv.{param}"], out[f"quant_conv_log_sigma.conv.{param}"] = value[:half], value[half:]
            continue
        src = next((p for p in prefixes if key.startswith(p)), None)
        name, _, param = key[len(src or "") :].rpartition(".")
        dst, subs = prefixes[src] if src else (None, None)
        if src is None or (subs is not None and name not in subs):
            out[key] = value  # unknown: kept under its own name, reported as unexpected when loading
            continue
        if subs is _ATTN and value.ndim > 2:
            value = value.reshape(value.shape[0], -1)  # CompVis 1x1 conv -> linear
        out[dst + (f"{subs[name]}.{param}" if subs else f"{name}.{param}".lstrip("."))] = value
    return out


def convert_kl_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A KL autoencoder state dict (CompVis/LDM, diffusers or MONAI keys, or a checkpoint holding one) -> MONAI keys.

    The result loads into ``kl_autoencoder(..., layout="ldm")`` (MONAI-keyed input is returned as it is).
    """
    sd = unwrap_autoencoder(state_dict)
    if known_layout(sd, _key_layout, "a KL autoencoder") == "monai":
        return dict(sd)
    return _diffusers_to_monai(_to_diffusers_names(sd))


def describe_autoencoder(sd: Mapping[str, torch.Tensor]) -> dict | None:
    """The :func:`scripts.autoencoder.kl_autoencoder` arguments of a MONAI-keyed state dict (None if it cannot tell)."""

    def levels(part: str) -> tuple[list[int], list[int], list[bool]]:
        res, chans, attn = [0], [0], [False]  # per level, split at the down/up-sampling convs
        for b in range(1, count(sd, f"{part}.blocks.") - 2):  # not conv_in, the last norm and conv
            p = f"{part}.blocks.{b}."
            if p + "conv1.conv.weight" in sd:
                res[-1], chans[-1] = res[-1] + 1, sd[p + "conv2.conv.weight"].shape[0]
            elif p + "attn.to_q.weight" in sd:
                attn[-1] = True
            elif p + "conv.conv.weight" in sd or p + "postconv.conv.weight" in sd:
                res, chans, attn = res + [0], chans + [0], attn + [False]
        return res, chans, attn

    try:
        (enc, channels, attention), (dec, _, _) = levels("encoder"), levels("decoder")
        enc[-1], dec[0], attention[-1] = enc[-1] - 2, dec[0] - 2, False  # the mid block: res, attention, res
        dec = dec[::-1]
        conv_in = sd["encoder.blocks.0.conv.weight"]
        enc_out = sd[f"encoder.blocks.{count(sd, 'encoder.blocks.') - 1}.conv.weight"].shape[0]
        latent = sd["post_quant_conv.conv.weight"].shape[0]
        layout = "ldm" if enc_out == 2 * latent else "monai"
        default_dec = [n + (layout == "ldm") for n in enc]
        return dict(
            spatial_dims=conv_in.ndim - 2,
            in_channels=conv_in.shape[1],
            out_channels=sd[f"decoder.blocks.{count(sd, 'decoder.blocks.') - 1}.conv.weight"].shape[0],
            channels=channels,
            num_res_blocks=enc[0] if len(set(enc)) == 1 else enc,
            attention_levels=attention,
            latent_channels=latent,
            layout=layout,
            decoder_res_blocks=None if dec == default_dec else dec[0] if len(set(dec)) == 1 else dec,
        )
    except (KeyError, IndexError, AttributeError):
        return None


def config_hint(arch: dict) -> str:
    extra = "" if arch["decoder_res_blocks"] is None else f", decoder_res_blocks {arch['decoder_res_blocks']}"
    return (
        f"autoencoder_channels {arch['channels']}, autoencoder_res_blocks {arch['num_res_blocks']}, "
        f"autoencoder_layout {arch['layout']}, latent_channels {arch['latent_channels']}{extra}"
    )


def check_kl_fit(model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], where: str) -> None:
    """:func:`~scripts.weights.reading.check_fit` for an autoencoder, saying which configuration the file holds."""

    def hints() -> list[str]:
        arch = describe_autoencoder(sd)
        attn = nonlocal_attn_hint(model_sd, sd)
        return ([f"  the file holds: {config_hint(arch)}"] if arch else []) + ([f"  {attn}"] if attn else [])

    check_fit(model_sd, sd, where, hints=hints)


def load_kl_weights(path: str | os.PathLike, autoencoder: AutoencoderKL) -> AutoencoderKL:
    """Load a KL autoencoder checkpoint (CompVis, diffusers or MONAI keys) into ``autoencoder`` exactly.

    Raises ``FileNotFoundError``, or ``ValueError`` naming the file and listing missing / unexpected keys and shape
    mismatches when the file does not fit ``autoencoder`` (wrong architecture).
    """
    file, config = resolve(Path(path))
    raw = read_state_dict(file)
    layout = _key_layout(raw)
    if layout in ("compvis", "diffusers") and not is_ldm_layout(autoencoder):
        raise ValueError(
            f"{file}: {layout} KL autoencoder weights need the autoencoder built in LDM's layout "
            "(scripts.autoencoder.kl_autoencoder with layout='ldm'; in the configs: autoencoder_layout: ldm)"
        )
    expected = 32 if layout == "compvis" else config.get("norm_num_groups")  # LDM's Normalize: always 32
    check_groups(autoencoder, expected, str(file), f"{layout} autoencoder", "autoencoder_norm_groups")
    try:
        sd = convert_kl_state_dict(raw)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    check_kl_fit(autoencoder.state_dict(), sd, str(file))
    autoencoder.load_state_dict(sd)
    return autoencoder


def load_autoencoder(autoencoder: AutoencoderKL, path: str | os.PathLike) -> AutoencoderKL:
    """Load mask-autoencoder weights into ``autoencoder``: the autoencoder stage's state dict, a file converted by
    ``python -m scripts.tools.convert_weights convert``, or pretrained kl-f8 / SD VAE weights (CompVis ``.ckpt``,
    diffusers ``.safetensors`` / ``.bin`` or model folder), which need ``autoencoder_layout: ldm``."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"mask autoencoder weights not found: {path}. Train them first "
            "(python -m monai.bundle run training --config_file configs/train_autoencoder.yaml ...) or, for the "
            "paper preset, download LDM kl-f8 (https://ommer-lab.com/files/latent-diffusion/kl-f8.zip, model.ckpt) "
            "or the SD VAE (stabilityai/sd-vae-ft-mse) and point autoencoder_path at it."
        )
    return load_kl_weights(path, autoencoder)
