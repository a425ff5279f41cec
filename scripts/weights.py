"""Checkpoint import: pretrained KL autoencoders (LDM kl-f8, the Stable Diffusion VAE) into MONAI's AutoencoderKL, and
pretrained LDM diffusion U-Nets (LSUN-Churches, the paper's start) into MONAI's DiffusionModelUNet / LDMUNet.

Reads local files only: a CompVis/LDM Lightning ``.ckpt`` (``loss.*`` dropped, ``first_stage_model.`` stripped from a
full LDM/SD checkpoint), a diffusers ``AutoencoderKL`` ``.safetensors`` / ``.bin`` or model folder, or a MONAI state
dict (the autoencoder stage's ``autoencoder.pt``, or a file this module converted).

LDM's autoencoder differs from MONAI's ``AutoencoderKL`` in three places, so :func:`kl_autoencoder` builds it with
``layout="ldm"``: the decoder has one more res block per level than the encoder (3 vs 2 for kl-f8); the encoder ends in
``2 * latent_channels`` channels (mean and log-variance, ``double_z``) and one 1x1 ``quant_conv``, whose two halves
become ``quant_conv_mu`` and ``quant_conv_log_sigma``; a SiLU follows the last GroupNorm of encoder and decoder. The
mid-block attention's 1x1 convs (CompVis) or linear layers (diffusers) become MONAI's linear layers. Encoder mean and
std and decoder output then match diffusers' to float precision (tests/test_weights.py).

Convert once: ``python -m scripts.weights convert kl-f8/model.ckpt models/kl-f8.pt``.

U-Nets (:func:`load_unet_weights`): LDM's ``openaimodel.UNetModel`` (``model.diffusion_model.*`` of a CompVis ``.ckpt``)
or diffusers' ``UNet2DModel``. The block structure is read from the keys; LDM's legacy attention ``qkv`` 1x1 conv
(q, k, v interleaved per head) becomes MONAI's ``to_q`` / ``to_k`` / ``to_v`` with the target's head counts. Scale-shift
res blocks need :class:`scripts.ldm_unet.LDMUNet`. ``conv_in`` is zero-padded to the target's input channels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, SpatialAttentionBlock
from monai.networks.nets import AutoencoderKL
from monai.networks.nets.autoencoderkl import Decoder, Encoder
from monai.utils import ensure_tuple_rep
from torch import nn

__all__ = [
    "GroupNormSiLU",
    "kl_autoencoder",
    "convert_kl_state_dict",
    "read_state_dict",
    "load_kl_weights",
    "convert_unet_state_dict",
    "prepare_unet_state_dict",
    "load_unet_weights",
]

DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors")
WRAPPER_PREFIXES = ("first_stage_model.", "autoencoder.", "vae.")  # LDM/SD checkpoint, SDSeg model.pt, pipelines


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


def _is_ldm(autoencoder: nn.Module) -> bool:
    return any(isinstance(m, GroupNormSiLU) for m in autoencoder.modules())


# ---- key layouts ---------------------------------------------------------------------------------------
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


def _count(keys, prefix: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _to_diffusers_names(sd):
    n_up = _count(sd, "decoder.up.")
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
        for i in range(_count(sd, f"{part}.{levels}.")):
            level = f"{part}.{levels}.{i}."
            for j in range(_count(sd, f"{level}resnets.")):
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
    sd = _unwrap(state_dict)
    layout = _key_layout(sd)
    if layout == "monai":
        return dict(sd)
    if layout == "unknown":
        raise ValueError(f"not a KL autoencoder state dict (first keys: {list(sd)[:5]})")
    return _diffusers_to_monai(_to_diffusers_names(sd))


def _describe(sd: Mapping[str, torch.Tensor]) -> dict | None:
    """The :func:`kl_autoencoder` arguments of a MONAI-keyed state dict (None if it cannot tell)."""

    def levels(part: str) -> tuple[list[int], list[int], list[bool]]:
        res, chans, attn = [0], [0], [False]  # per level, split at the down/up-sampling convs
        for b in range(1, _count(sd, f"{part}.blocks.") - 2):  # not conv_in, the last norm and conv
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
        enc_out = sd[f"encoder.blocks.{_count(sd, 'encoder.blocks.') - 1}.conv.weight"].shape[0]
        latent = sd["post_quant_conv.conv.weight"].shape[0]
        layout = "ldm" if enc_out == 2 * latent else "monai"
        default_dec = [n + (layout == "ldm") for n in enc]
        return dict(
            spatial_dims=conv_in.ndim - 2,
            in_channels=conv_in.shape[1],
            out_channels=sd[f"decoder.blocks.{_count(sd, 'decoder.blocks.') - 1}.conv.weight"].shape[0],
            channels=channels,
            num_res_blocks=enc[0] if len(set(enc)) == 1 else enc,
            attention_levels=attention,
            latent_channels=latent,
            layout=layout,
            decoder_res_blocks=None if dec == default_dec else dec[0] if len(set(dec)) == 1 else dec,
        )
    except (KeyError, IndexError, AttributeError):
        return None


def _config_hint(arch: dict) -> str:
    extra = "" if arch["decoder_res_blocks"] is None else f", decoder_res_blocks {arch['decoder_res_blocks']}"
    return (
        f"autoencoder_channels {arch['channels']}, autoencoder_res_blocks {arch['num_res_blocks']}, "
        f"autoencoder_layout {arch['layout']}, latent_channels {arch['latent_channels']}{extra}"
    )


# ---- reading files -------------------------------------------------------------------------------------
class _Foreign:
    """Stands in for a class a checkpoint pickled (Lightning callbacks, numpy scalars): built, never run."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _torch_load(path: Path):
    """``torch.load(weights_only=True)``. A Lightning ``.ckpt`` also pickles callback objects and numpy scalars,
    which ``weights_only`` refuses; those are read as inert placeholders (nothing from the file is imported or run),
    never with ``weights_only=False``."""
    is_zip = zipfile.is_zipfile(path)  # torch.save's format since 1.6; memory-mapped, so big SD files stay cheap
    kwargs = dict(map_location="cpu", weights_only=True, mmap=is_zip)
    try:
        try:
            return torch.load(path, **kwargs)
        except pickle.UnpicklingError:
            if not is_zip:
                raise
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            with torch.serialization.safe_globals([(_Foreign, name) for name in names]):
                return torch.load(path, **kwargs)
    except Exception as e:
        lines = [line for line in str(e).splitlines() if line.strip()] or [""]
        detail = next((line for line in lines if "Unsupported" in line), lines[0])  # the useful line of torch's text
        raise ValueError(
            f"{path}: not readable as a PyTorch weights file ({type(e).__name__}: {detail}). "
            "If it is a checkpoint you trust that holds more than weights, extract its state dict yourself: "
            "torch.save(torch.load(f, weights_only=False)['state_dict'], 'out.pt')"
        ) from e


def _unwrap(obj) -> dict[str, torch.Tensor]:
    """The autoencoder's tensors in a checkpoint: Lightning ``state_dict``, ``autoencoder`` entry, known prefixes."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "autoencoder"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not any(k.startswith(("encoder.", "decoder.")) for k in sd):
        prefix = next((p for p in WRAPPER_PREFIXES if any(k.startswith(p + "encoder.") for k in sd)), "")
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in sd.items() if not k.startswith("loss.")}  # LDM's discriminator and LPIPS


def _resolve(path: Path, subfolder: str = "vae") -> tuple[Path, dict]:
    """A diffusers model folder (or a pipeline folder with ``vae/`` or ``unet/``) -> its weight file and config."""
    if not path.is_dir():
        return path, {}
    for folder in (path, path / subfolder):
        for name in DIFFUSERS_FILES:
            if (folder / name).is_file():
                config = folder / "config.json"
                return folder / name, json.loads(config.read_text()) if config.is_file() else {}
    raise FileNotFoundError(f"{path}: no {' or '.join(DIFFUSERS_FILES)} in this folder or its {subfolder}/")


def read_state_dict(path: str | os.PathLike, part: str = "autoencoder") -> dict[str, torch.Tensor]:
    """The autoencoder (``part="unet"``: U-Net) tensors in ``path`` (.ckpt/.pt/.pth/.bin, .safetensors, diffusers
    folder), keys unconverted."""
    file, _ = _resolve(Path(path), "unet" if part == "unet" else "vae")
    unwrap = _unwrap_unet if part == "unet" else _unwrap
    if not file.is_file():
        raise FileNotFoundError(f"{part} weights not found: {file}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(file), device="cpu")
        except Exception as e:
            raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    else:
        obj = _torch_load(file)
    try:
        sd = unwrap(obj)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    if not sd:
        top = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{file}: no {part} weights found (top-level entries: {top})")
    return sd


def _fmt(names, n: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _check_fit(
    model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], where: str, part: str = "autoencoder"
) -> None:
    """Raise naming ``where`` unless ``sd`` has exactly the keys and shapes of ``model_sd`` (``part``: what it is)."""
    missing, unexpected = set(model_sd) - set(sd), set(sd) - set(model_sd)
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
        for k in sorted(set(sd) & set(model_sd))
        if sd[k].shape != model_sd[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{where}: the weights do not fit the configured {part} (wrong architecture or preset?)"]
    lines += [f"  missing keys ({len(missing)}): {_fmt(missing)}"] if missing else []
    lines += [f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}"] if unexpected else []
    lines += [f"  shape mismatches ({len(shapes)}): {'; '.join(shapes[:4])}"] if shapes else []
    arch = _describe(sd) if part == "autoencoder" else None
    lines += [f"  the file holds: {_config_hint(arch)}"] if arch else []
    common = set(sd) & set(model_sd)
    if any(k.endswith("time_emb_proj.weight") and sd[k].shape[0] == 2 * model_sd[k].shape[0] for k in common):
        lines += [
            "  the file's res blocks use scale-shift time conditioning (LDM's use_scale_shift_norm): build the U-Net "
            "with scripts.ldm_unet.LDMUNet, as configs/paper.yaml does"
        ]
    raise ValueError("\n".join(lines))


def load_kl_weights(path: str | os.PathLike, autoencoder: AutoencoderKL) -> AutoencoderKL:
    """Load a KL autoencoder checkpoint (CompVis, diffusers or MONAI keys) into ``autoencoder`` exactly.

    Raises ``FileNotFoundError``, or ``ValueError`` naming the file and listing missing / unexpected keys and shape
    mismatches when the file does not fit ``autoencoder`` (wrong architecture).
    """
    file, config = _resolve(Path(path))
    raw = read_state_dict(file)
    layout = _key_layout(raw)
    if layout in ("compvis", "diffusers") and not _is_ldm(autoencoder):
        raise ValueError(
            f"{file}: {layout} KL autoencoder weights need the autoencoder built in LDM's layout "
            "(scripts.weights.kl_autoencoder with layout='ldm'; in the configs: autoencoder_layout: ldm)"
        )
    groups = {m.num_groups for m in autoencoder.modules() if isinstance(m, nn.GroupNorm)}
    expected = 32 if layout == "compvis" else config.get("norm_num_groups")  # LDM's Normalize: always 32
    if expected and groups != {expected}:
        raise ValueError(
            f"{file}: this {layout} autoencoder uses {expected} GroupNorm groups, the configured one "
            f"{sorted(groups)} (set autoencoder_norm_groups: {expected})"
        )
    try:
        sd = convert_kl_state_dict(raw)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    _check_fit(autoencoder.state_dict(), sd, str(file))
    autoencoder.load_state_dict(sd)
    return autoencoder


# ---- the denoising U-Net: LDM (CompVis openaimodel) / diffusers UNet2DModel -> MONAI DiffusionModelUNet ------------
UNET_PREFIXES = ("model.diffusion_model.",)  # a full LDM checkpoint (the authors' load_only_unet reads these keys)
LSUN_CHURCHES = "https://ommer-lab.com/files/latent-diffusion/lsun_churches.zip"


def _unwrap_unet(obj) -> dict[str, torch.Tensor]:
    """The U-Net's tensors in a checkpoint: Lightning ``state_dict``, ``model.diffusion_model.*`` of an LDM."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    prefix = next((p for p in UNET_PREFIXES if any(k.startswith(p) for k in sd)), "")
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


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
    for k in range(_count(sd, "output_blocks.")):
        names[f"output_blocks.{k}.0."] = f"up_blocks.{level}.resnets.{r}."
        upsampled = False
        for j in range(1, _count(sd, f"output_blocks.{k}.")):
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
    for k in range(1, _count(sd, "input_blocks.")):
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
    sd = _unwrap_unet(state_dict)
    layout = _unet_layout(sd)
    if layout == "monai":
        return dict(sd)
    if layout == "unknown":
        raise ValueError(f"not an LDM or diffusers U-Net state dict (first keys: {list(sd)[:5]})")
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
    _check_fit(target, sd, where, part="U-Net")
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
    file, config = _resolve(Path(path), "unet")
    raw = read_state_dict(file, part="unet")
    layout = _unet_layout(raw)
    groups = {m.num_groups for m in unet.modules() if isinstance(m, nn.GroupNorm)}
    expected = 32 if layout == "compvis" else config.get("norm_num_groups")  # LDM's GroupNorm32
    if expected and groups != {expected}:
        raise ValueError(
            f"{file}: this {layout} U-Net uses {expected} GroupNorm groups, the configured one {sorted(groups)} "
            f"(set unet_norm_groups: {expected})"
        )
    unet.load_state_dict(prepare_unet_state_dict(raw, unet, str(file)))
    return unet


# ---- command line --------------------------------------------------------------------------------------
def convert_file(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Convert ``src`` to a MONAI state dict at ``dst`` (atomically); returns the :func:`kl_autoencoder` arguments."""
    from scripts.io_utils import atomic_path

    file, _ = _resolve(Path(src))
    raw = read_state_dict(file)
    try:
        sd = convert_kl_state_dict(raw)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    arch = _describe(sd)
    if arch is None:
        raise ValueError(f"{file}: not a complete KL autoencoder (first keys: {list(sd)[:5]})")
    with torch.device("meta"):  # check against the model the file describes, without memory or compute
        model = kl_autoencoder(norm_num_groups=math.gcd(*arch["channels"]), **arch)
    _check_fit(model.state_dict(), sd, str(file))
    with atomic_path(dst) as tmp:
        torch.save({k: v.contiguous().clone() for k, v in sd.items()}, tmp)
    return arch


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="write a MONAI AutoencoderKL state dict (atomically)")
    conv.add_argument("input", help="kl-f8 .ckpt, diffusers .safetensors/.bin or model folder")
    conv.add_argument("output", help="MONAI state dict (.pt), e.g. models/kl-f8.pt")
    args = parser.parse_args(argv)
    try:
        arch = convert_file(args.input, args.output)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.output}; configure the autoencoder with: {_config_hint(arch)}")


if __name__ == "__main__":
    main()
