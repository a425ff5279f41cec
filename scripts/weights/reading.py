"""Reading weight files: CompVis/LDM Lightning ``.ckpt``, diffusers ``.safetensors`` / ``.bin`` or model folders and
MONAI state dicts; the autoencoder's or U-Net's tensors found in them; checks that they fit a model, naming the file."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "read_state_dict",
    "resolve",
    "unwrap_autoencoder",
    "unwrap_unet",
    "check_fit",
    "check_groups",
    "count",
    "known_layout",
]

DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors")
WRAPPER_PREFIXES = ("first_stage_model.", "autoencoder.", "vae.")  # LDM/SD checkpoint, SDSeg model.pt, pipelines
UNET_PREFIXES = ("model.diffusion_model.",)  # a full LDM checkpoint (the authors' load_only_unet reads these keys)


def count(keys, prefix: str) -> int:
    """How many numbered children ``<prefix><i>.`` the keys have (largest index + 1)."""
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def known_layout(sd: Mapping[str, torch.Tensor], layout_of: Callable[[Mapping], str], what: str) -> str:
    """``layout_of(sd)``; a ``ValueError`` when it is ``unknown`` (``what``: the kind of state dict expected)."""
    layout = layout_of(sd)
    if layout == "unknown":
        raise ValueError(f"not {what} state dict (first keys: {list(sd)[:5]})")
    return layout


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


def unwrap_autoencoder(obj) -> dict[str, torch.Tensor]:
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


def resolve(path: Path, subfolder: str = "vae") -> tuple[Path, dict]:
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
    file, _ = resolve(Path(path), "unet" if part == "unet" else "vae")
    unwrap = unwrap_unet if part == "unet" else unwrap_autoencoder
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


def unwrap_unet(obj) -> dict[str, torch.Tensor]:
    """The U-Net's tensors in a checkpoint: Lightning ``state_dict``, ``model.diffusion_model.*`` of an LDM."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    prefix = next((p for p in UNET_PREFIXES if any(k.startswith(p) for k in sd)), "")
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _fmt(names, n: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def check_fit(
    model_sd: Mapping[str, torch.Tensor],
    sd: Mapping[str, torch.Tensor],
    where: str,
    part: str = "autoencoder",
    hints: Callable[[], list[str]] | None = None,
) -> None:
    """Raise naming ``where`` unless ``sd`` has exactly the keys and shapes of ``model_sd`` (``part``: what it is);
    ``hints()`` adds lines saying what the file holds."""
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
    lines += hints() if hints else []
    raise ValueError("\n".join(lines))


def check_groups(module: nn.Module, expected: int | None, where: str, what: str, setting: str) -> None:
    """Raise naming ``where`` unless every GroupNorm of ``module`` has ``expected`` groups (None: not known)."""
    groups = {m.num_groups for m in module.modules() if isinstance(m, nn.GroupNorm)}
    if expected and groups != {expected}:
        raise ValueError(
            f"{where}: this {what} uses {expected} GroupNorm groups, the configured one {sorted(groups)} "
            f"(set {setting}: {expected})"
        )
