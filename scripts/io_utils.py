"""Atomic file writing: a reader never sees a half-written mask, table or checkpoint.

A file is written to a hidden temporary next to it, ``.<name>.<random>.<host>.<pid>.tmp``, and renamed over
it when complete. A process killed while writing leaves that temporary behind; the next write into the same
folder removes the temporaries of processes of this host that no longer run (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from PIL import Image

__all__ = [
    "atomic_path",
    "atomic_save_image",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_csv",
    "json_safe",
    "remove_stale_temporaries",
    "SaveMaskd",
]

logger = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
# .<name>.<random>.<host>.<pid>.tmp (mkstemp's random part has no dot)
_TEMPORARY = re.compile(r"^\..+\.[^.]+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.tmp$")
_OTHER_HOST_AGE = 24 * 3600  # seconds: another host's temporary older than this is stale too
_swept: set[str] = set()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that writers killed mid-write left in ``folder``: those of processes of this host
    that no longer run, and those of other hosts older than a day. Returns the removed paths."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m["pid"])
        if m["host"] == _HOST:
            stale = pid != os.getpid() and not _running(pid)
        else:
            try:
                stale = time.time() - entry.stat().st_mtime > _OTHER_HOST_AGE
            except FileNotFoundError:
                continue
        if stale:
            try:
                os.remove(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    if removed:
        logger.info(f"{folder}: removed {len(removed)} temporary file(s) left by an interrupted run")
    return removed


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False):
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds.

    ``fsync=True`` flushes the file and the folder to the disk before returning (checkpoints: complete even
    after a power cut). The first write into a folder removes the stale temporaries of earlier runs there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.abspath(path.parent)
    if folder not in _swept:
        _swept.add(folder)
        remove_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{_HOST}.{os.getpid()}.tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; written files are for other users and tools too
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync(folder, directory=True)
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


def atomic_write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str] | None = None) -> None:
    """``rows`` as a CSV table with a header (``columns``; default: the first row's keys), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns or rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def json_safe(obj):
    """NaN -> None and inf -> "inf", so that JSON files stay strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


class SaveMaskd(MapTransform):
    """Write ``d[key]`` (1, H, W) in [0, 1] as an 8-bit PNG named after the input file, atomically.

    Binary masks become 0/255; probability maps round(255 * p). The name comes from the
    ``filename_or_obj`` of ``d[name_key]``: ``<output_dir>/<input stem>.png``.
    Multi-class (``--classes`` other than binary): with ``values`` a (1, H, W) map of class indices is written as a
    label map whose pixels are ``values[index]`` (``disc_cup``: 0 background, 1 optic disc, 2 optic cup); with
    ``class_names`` a (C, H, W) probability map is written one PNG per class, ``<input stem>_<class name>.png``
    (round(255 * p)).
    Not MONAI's ``SaveImaged``: its writers write straight to the target file, not a temporary renamed over it.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        name_key: str = "image",
        allow_missing_keys=False,
        values: list[int] | None = None,
        class_names: list[str] | None = None,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.name_key = Path(output_dir), name_key
        self.values = None if values is None else np.asarray(values)
        self.class_names = None if class_names is None else list(class_names)
        if self.values is not None and (self.values.min() < 0 or self.values.max() > 255):
            raise ValueError(f"label values {self.values.tolist()} do not fit an 8-bit PNG")

    def __call__(self, data):
        d = dict(data)
        name = Path(str(d[self.name_key].meta["filename_or_obj"])).stem
        for key in self.key_iterator(d):
            value = torch.as_tensor(d[key]).detach().float().cpu().numpy()
            channels = len(self.class_names) if self.class_names and self.values is None else 1
            if value.ndim != 3 or value.shape[0] != channels:
                raise ValueError(f"{key} for {name}: expected a ({channels}, H, W) map, got shape {value.shape}")
            if self.values is not None:  # class indices -> label values
                labels = self.values[np.round(value[0]).astype(np.int64)].astype(np.uint8)
                atomic_save_image(self.output_dir / f"{name}.png", labels, compress_level=1)
                continue
            for c in range(channels):
                mask = np.round(value[c].clip(0, 1) * 255).astype(np.uint8)
                stem = f"{name}_{self.class_names[c]}" if channels > 1 else name
                atomic_save_image(self.output_dir / f"{stem}.png", mask, compress_level=1)  # fast; PNG stays lossless
        return d
