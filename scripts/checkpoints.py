"""Weight files and checkpoints: safe to kill at any moment, resumed runs that continue exactly, clear errors.

* :class:`AtomicDiskSaver`: ignite's ``DiskSaver`` that writes a complete file (temporary, fsync, rename) and
  removes the file it replaces only afterwards, so at every instant the last checkpoint and ``model.pt`` are
  complete on disk (ignite removes first, then writes).
* :class:`ResumeLoader`: ``--resume``: the newest complete checkpoint, falling back to an older one with a
  warning when the newest cannot be read.
* :class:`ModelLoader`: ``CheckpointLoader`` for ``model.pt`` that names the file and the likely fix when it
  is damaged or comes from another preset, instead of printing the whole state-dict mismatch.

What a checkpoint holds besides weights, optimiser and schedule is :class:`scripts.run_state.RunState`.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import warnings
from pathlib import Path

import torch
import yaml
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader

from scripts.autoencoder import nonlocal_attn_hint
from scripts.bundle_config import CONFIGS
from scripts.io_utils import atomic_path

__all__ = [
    "CheckpointError",
    "AtomicDiskSaver",
    "checkpoint_files",
    "read_checkpoint",
    "weights_mismatch",
    "load_weights",
    "ModelLoader",
    "ResumeLoader",
]

logger = logging.getLogger(__name__)
PRESETS = ("tiny", "small", "paper")


class CheckpointError(RuntimeError):
    """A weight file or checkpoint that cannot be used; the message names the file and the likely fix."""


# ---- writing --------------------------------------------------------------------------------------------
class AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` whose files are always complete: each is written to a temporary next to it, flushed to
    the disk and renamed over the target; a file that ignite asks to remove before a save (the checkpoint the new
    one replaces) is removed only after the new one is in place. ``filename`` fixes the name (``model.pt``)."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, save_on_rank: int = 0):
        super().__init__(dirname, atomic=True, create_dir=True, require_empty=False, save_on_rank=save_on_rank)
        self.filename = filename
        self._replaced: list[str] = []

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        name = self.filename or filename
        super().__call__(checkpoint, name, metadata)
        replaced, self._replaced = self._replaced, []
        for old in replaced:
            if old != name:
                super().remove(old)

    def _save_func(self, checkpoint, path: Path, func) -> None:
        with atomic_path(path, fsync=True) as tmp:
            func(checkpoint, tmp, **self.kwargs)

    def remove(self, filename: str) -> None:
        if self.filename is None:  # a fixed name is replaced by the rename itself
            self._replaced.append(filename)


def checkpoint_files(ckpt_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """``{prefix}_checkpoint_epoch=N.pt`` files in ``ckpt_dir``, newest (largest N) first."""
    pattern = re.compile(rf"{re.escape(prefix)}_checkpoint_epoch=(\d+)\.pt")
    found = []
    for path in Path(ckpt_dir).glob(f"{glob.escape(prefix)}_checkpoint_epoch=*.pt"):
        m = pattern.fullmatch(path.name)
        if m:
            found.append((int(m[1]), path))
    return [p for _, p in sorted(found, reverse=True)]


# ---- reading --------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, map_location=None):
    """``torch.load(path, weights_only=True)``; a missing, truncated or damaged file raises :class:`CheckpointError`
    naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle or tensor data; not a PyTorch file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        if "Weights only load failed" in reason:
            hint = "it holds Python objects, not only weights; the bundle reads weights only (weights_only=True)"
        else:
            hint = "the file is truncated or damaged (an interrupted copy or save?); copy or train it again"
        raise CheckpointError(
            f"{path}: cannot be read as PyTorch weights ({path.stat().st_size:,} bytes): {hint} ({reason})"
        ) from e


def _preset_sizes() -> dict[str, dict]:
    """U-Net channels, its res blocks and the mask autoencoder's first width of each preset (and the defaults)."""
    base = yaml.safe_load((CONFIGS / "train.yaml").read_text())
    sizes = {}
    for name in ("defaults", *PRESETS):
        cfg = dict(base)
        if name != "defaults":
            cfg.update(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()))
        sizes[name] = {
            "unet_channels": list(cfg["unet_channels"]),
            "unet_res_blocks": int(cfg["unet_res_blocks"]),
            "autoencoder_width": int(cfg["autoencoder_channels"][0]),
        }
    return sizes


def _sizes_of(state: dict) -> dict:
    """The same sizes read off an SDSeg state dict (empty where its keys are not SDSeg's)."""
    channels, i = [], 0
    while f"unet.down_blocks.{i}.resnets.0.conv2.conv.weight" in state:
        channels.append(int(state[f"unet.down_blocks.{i}.resnets.0.conv2.conv.weight"].shape[0]))
        i += 1
    res_blocks = len({k.split(".")[4] for k in state if k.startswith("unet.down_blocks.0.resnets.")})
    ae = state.get("autoencoder.encoder.blocks.0.conv.weight")
    conv_in = state.get("unet.conv_in.conv.weight")
    return {
        "unet_channels": channels,
        "unet_res_blocks": res_blocks,
        "autoencoder_width": int(ae.shape[0]) if ae is not None else None,
        "unet_inputs": int(conv_in.shape[1]) if conv_in is not None else None,
    }


def _preset_names(sizes: dict) -> list[str]:
    keys = ("unet_channels", "unet_res_blocks", "autoencoder_width")
    return [name for name, s in _preset_sizes().items() if all(s[k] == sizes[k] for k in keys)]


def _describe(names: list[str], sizes: dict) -> str:
    what = f"U-Net channels {sizes['unet_channels']}, mask autoencoder width {sizes['autoencoder_width']}"
    if not names:
        return f"no preset ({what})"
    shown = ["the configs' defaults" if n == "defaults" else f"'{n}' (configs/{n}.yaml)" for n in names]
    return f"{' or '.join(shown)} ({what})"


def weights_mismatch(module: torch.nn.Module, state: dict, path: str | os.PathLike) -> str | None:
    """None if ``state`` loads into ``module``; otherwise a few lines naming the file, the preset the weights seem
    to come from (by their sizes) and the likely fix."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and torch.is_tensor(own[k]) and tuple(own[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    head = (
        f"{path}: the weights do not fit the configured network ({len(shapes)} of {len(own)} tensors differ in "
        f"shape, {len(missing)} missing, {len(unexpected)} unexpected"
    )
    if shapes:
        k = shapes[0]
        head += f"; e.g. {k} is {list(state[k].shape)} in the file, {list(own[k].shape)} in the network"
    head += ")."
    if {"network", "ema", "optimizer"} <= set(state):
        return head + (
            "\nIt is a training checkpoint (sdseg_checkpoint_epoch=N.pt), not a model file: model.pt holds the "
            "EMA weights alone. Point the loader at model.pt, or resume training from it with --resume."
        )
    if not any(k.startswith("unet.") for k in state):
        kind = "a mask autoencoder file (autoencoder.pt)" if any(k.startswith("encoder.") for k in state) else None
        return head + f"\nIt is {kind or 'not an SDSeg model file'}: no U-Net weights in it."
    attn = nonlocal_attn_hint(own, state, prefix="autoencoder.")
    if attn:
        return head + "\n" + attn
    file_sizes, net_sizes = _sizes_of(state), _sizes_of(own)
    if (
        file_sizes["unet_inputs"] != net_sizes["unet_inputs"]
        and file_sizes["unet_channels"] == net_sizes["unet_channels"]
    ):
        latent = getattr(getattr(_unwrap(module), "autoencoder", None), "latent_channels", 4)
        inputs = file_sizes["unet_inputs"]
        how = "fusion 'crossattn'" if inputs == latent else f"fusion 'concat', --condition_channels {inputs - latent}"
        return head + (
            f"\nThe file's U-Net takes {inputs} input channels ({how}), the network {net_sizes['unet_inputs']}: use "
            "the same fusion (ablation overlay) and condition_channels as in training."
        )
    file_names, net_names = _preset_names(file_sizes), _preset_names(net_sizes)
    lines = [head, f"The file looks like {_describe(file_names, file_sizes)};"]
    lines.append(f"the network is configured as {_describe(net_names, net_sizes)}.")
    presets = [n for n in file_names if n != "defaults"]
    if presets:
        lines.append(
            f"Fix: end --config_file with 'configs/{presets[0]}.yaml' (the preset the model was trained with), or "
            "use a model trained with the configured preset."
        )
    elif "defaults" in file_names:
        lines.append("Fix: leave the preset file out of --config_file, or use a model trained with the configured one.")
    else:
        lines.append(
            "Fix: set unet_channels, unet_res_blocks and autoencoder_channels to the sizes it was trained with."
        )
    return "\n".join(lines)


def _unwrap(module):
    return (
        module.module
        if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel))
        else module
    )


def load_weights(module: torch.nn.Module, state: dict, path: str | os.PathLike) -> torch.nn.Module:
    """``module.load_state_dict(state)`` (strict), raising :class:`CheckpointError` with :func:`weights_mismatch`'s
    explanation when the weights do not fit."""
    module = _unwrap(module)
    problem = weights_mismatch(module, state, path)
    if problem:
        raise CheckpointError(problem)
    module.load_state_dict(state)
    return module


class ModelLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` (loaded when the engine starts) with clear errors: a missing, truncated or
    damaged file, or weights of another preset, stop the run naming the file and the likely fix."""

    def __call__(self, engine) -> None:
        checkpoint = read_checkpoint(self.load_path, self.map_location)
        key = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and (not isinstance(checkpoint, dict) or key not in checkpoint):
            checkpoint = {key: checkpoint}  # a bare state dict (model.pt)
        _load_objects(self.load_dict, checkpoint, self.load_path)
        self.logger.info(f"Restored all variables from {self.load_path}")


def _load_objects(load_dict: dict, checkpoint: dict, path) -> None:
    missing = [k for k in load_dict if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: no {missing} in it (it holds {sorted(checkpoint)})")
    for k, obj in load_dict.items():
        if isinstance(obj, torch.nn.Module):
            load_weights(obj, checkpoint[k], path)
    others = {k: v for k, v in load_dict.items() if not isinstance(v, torch.nn.Module)}
    if others:
        Checkpoint.load_objects(to_load=others, checkpoint={k: checkpoint[k] for k in others}, strict=True)


class ResumeLoader(CheckpointLoader):
    """``--resume``: load the newest ``{prefix}_checkpoint_epoch=N.pt`` of ``ckpt_dir`` when the engine starts; if it
    cannot be read (truncated, damaged), warn and fall back to the next older complete one. Entries of
    ``optional`` that a checkpoint lacks (written by an earlier version) are skipped with a warning."""

    def __init__(self, ckpt_dir: str, prefix: str, load_dict: dict, map_location=None, optional=("run_state",)):
        self.candidates = checkpoint_files(ckpt_dir, prefix)
        if not self.candidates:
            raise FileNotFoundError(f"{ckpt_dir}: no '{prefix}_checkpoint_epoch=N.pt' checkpoint to resume from")
        super().__init__(load_path=str(self.candidates[0]), load_dict=load_dict, map_location=map_location)
        self.optional = set(optional)

    def __call__(self, engine) -> None:
        problems = []
        for path in self.candidates:
            try:
                checkpoint = read_checkpoint(path, self.map_location)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            break
        else:
            raise CheckpointError("no complete checkpoint to resume from:\n" + "\n".join(problems))
        if problems:
            message = f"{problems[-1]}\nResuming from {path}, the newest complete checkpoint, instead."
            self.logger.warning(message)
            warnings.warn(message, stacklevel=2)
        self.load_path = str(path)
        load_dict = dict(self.load_dict)
        for k in sorted(self.optional & set(load_dict)):
            if k not in checkpoint:
                load_dict.pop(k)
                self.logger.warning(
                    f"{path} has no '{k}' (an earlier version wrote it): the best validation metric and the random "
                    "states start afresh, so the next validation replaces model.pt"
                )
        prior_max_epochs = engine.state.max_epochs
        _load_objects(load_dict, checkpoint, path)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise CheckpointError(
                f"{path}: it is at epoch {engine.state.epoch}, beyond this run's {prior_max_epochs} "
                "(max_iterations // val_interval): raise --max_iterations to train further"
            )
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Resumed from {path} (iteration {engine.state.iteration})")
