"""Checkpoint import: pretrained KL autoencoders (LDM kl-f8, the Stable Diffusion VAE) into MONAI's AutoencoderKL.

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
from monai.networks.blocks import Convolution
from monai.networks.nets import AutoencoderKL
from monai.networks.nets.autoencoderkl import Decoder, Encoder
from monai.utils import ensure_tuple_rep
from torch import nn

__all__ = ["GroupNormSiLU", "kl_autoencoder", "convert_kl_state_dict", "read_state_dict", "load_kl_weights"]

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


def _resolve(path: Path) -> tuple[Path, dict]:
    """A diffusers model folder (or a pipeline folder with ``vae/``) -> its weight file and ``config.json``."""
    if not path.is_dir():
        return path, {}
    for folder in (path, path / "vae"):
        for name in DIFFUSERS_FILES:
            if (folder / name).is_file():
                config = folder / "config.json"
                return folder / name, json.loads(config.read_text()) if config.is_file() else {}
    raise FileNotFoundError(f"{path}: no {' or '.join(DIFFUSERS_FILES)} in this folder or its vae/")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The autoencoder tensors in ``path`` (.ckpt/.pt/.pth/.bin, .safetensors, diffusers folder), keys unconverted."""
    file, _ = _resolve(Path(path))
    if not file.is_file():
        raise FileNotFoundError(f"autoencoder weights not found: {file}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(file), device="cpu")
        except Exception as e:
            raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    else:
        obj = _torch_load(file)
    try:
        sd = _unwrap(obj)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    if not sd:
        top = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{file}: no autoencoder weights found (top-level entries: {top})")
    return sd


def _fmt(names, n: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _check_fit(model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise naming ``where`` unless ``sd`` has exactly the keys and shapes of ``model_sd``."""
    missing, unexpected = set(model_sd) - set(sd), set(sd) - set(model_sd)
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
        for k in sorted(set(sd) & set(model_sd))
        if sd[k].shape != model_sd[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{where}: the weights do not fit the configured autoencoder (wrong architecture or preset?)"]
    lines += [f"  missing keys ({len(missing)}): {_fmt(missing)}"] if missing else []
    lines += [f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}"] if unexpected else []
    lines += [f"  shape mismatches ({len(shapes)}): {'; '.join(shapes[:4])}"] if shapes else []
    arch = _describe(sd)
    lines += [f"  the file holds: {_config_hint(arch)}"] if arch else []
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
