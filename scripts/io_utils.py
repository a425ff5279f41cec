"""Atomic file writing: a reader never sees a half-written mask, table or checkpoint."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from PIL import Image

__all__ = ["atomic_path", "atomic_save_image", "atomic_write_text", "atomic_write_json", "SaveMaskd"]


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; written files are for other users and tools too
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_image(path: str | os.PathLike, array: np.ndarray, **save_kwargs) -> None:
    """Save an ``HxW`` or ``HxWx3`` uint8 array as an image (format from the suffix), atomically."""
    fmt = Image.registered_extensions()[Path(path).suffix.lower()]
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format=fmt, **save_kwargs)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


class SaveMaskd(MapTransform):
    """Write ``d[key]`` (1, H, W) in [0, 1] as an 8-bit PNG named after the input file, atomically.

    Binary masks become 0/255; probability maps round(255 * p). The name comes from the
    ``filename_or_obj`` of ``d[name_key]``: ``<output_dir>/<input stem>.png``.
    """

    def __init__(self, keys: KeysCollection, output_dir: str, name_key: str = "image", allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.name_key = Path(output_dir), name_key

    def __call__(self, data):
        d = dict(data)
        name = Path(str(d[self.name_key].meta["filename_or_obj"])).stem
        for key in self.key_iterator(d):
            value = torch.as_tensor(d[key]).detach().float().cpu().numpy()
            if value.ndim != 3 or value.shape[0] != 1:
                raise ValueError(f"{key} for {name}: expected a (1, H, W) map, got shape {value.shape}")
            mask = np.round(value[0].clip(0, 1) * 255).astype(np.uint8)
            atomic_save_image(self.output_dir / f"{name}.png", mask, compress_level=1)  # fast; PNG stays lossless
        return d
