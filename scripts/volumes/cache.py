"""The on-disk slice cache for training: each preprocessed volume kept once as memory-mapped ``npy``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import Compose, MapTransform

from scripts.data import DatasetError, check_foreground
from scripts.io_utils import atomic_path, atomic_write_json
from scripts.volumes.datalist import val_block

__all__ = ["cache_volume", "VolumeCacheDataset", "LoadCachedd"]

logger = logging.getLogger(__name__)


def _unwrap(e: BaseException) -> BaseException:
    """The innermost cause of an exception raised inside ``Compose`` (MONAI wraps them in RuntimeError)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def cache_volume(item: dict, volume_transform: Compose, cache_dir: str | os.PathLike) -> dict:
    """Preprocess one volume once and keep it under ``cache_dir`` as ``image.npy`` (D, S, S) float16 and
    ``label.npy`` (D, S, S) uint8, slice-major so that one slice is one contiguous read. The entry is keyed by
    the source files (path, size, mtime) and the chain's ``signature``; ``meta.json`` is written last."""
    stat = [
        (str(Path(item[k]).resolve()), os.stat(item[k]).st_size, os.stat(item[k]).st_mtime_ns)
        for k in ("image", "label")
    ]
    key = hashlib.sha1(json.dumps([stat, getattr(volume_transform, "signature", "")]).encode()).hexdigest()[:20]
    folder = Path(cache_dir) / key
    if not (folder / "meta.json").is_file():
        try:
            d = volume_transform({"image": item["image"], "label": item["label"]})
        except Exception as e:
            cause = _unwrap(e)
            raise (cause if isinstance(cause, DatasetError) else DatasetError(f"{item['image']}: {cause}")) from e
        image = d["image"][0].permute(2, 0, 1).numpy().astype(np.float16)
        label = d["label"][0].permute(2, 0, 1).numpy().astype(np.uint8)
        _save_npy(folder / "image.npy", image)
        _save_npy(folder / "label.npy", label)
        foreground = [bool(s.any()) for s in label]
        meta = {"name": item.get("name"), "source": stat, "foreground": foreground}
        atomic_write_json(folder / "meta.json", dict(meta, classes=np.unique(label).tolist()))
    meta = json.loads((folder / "meta.json").read_text())
    return {
        "image": str(folder / "image.npy"),
        "label": str(folder / "label.npy"),
        "name": item.get("name"),
        "foreground": meta["foreground"],
        "classes": meta.get("classes"),
    }


class VolumeCacheDataset(Dataset):
    """Training/validation data from 3D volumes through the on-disk cache (:func:`cache_volume`).

    ``data`` is a volume datalist (:func:`make_datalist`); every volume is preprocessed once by
    ``volume_transform`` before anything trains (bad input fails here). With ``slices=True`` the items are
    all axial slices of all volumes, ``transform`` loading one slice (:class:`LoadCachedd`); with
    ``slices=False`` they are whole volumes. ``skip_empty`` is the probability that a slice without foreground
    is replaced by a random slice with foreground each time it is drawn.

    An item with ``"val_slices"`` (:func:`make_datalist` with ``val_slices``) has a held-back block of axial
    slices: with ``slices=True`` its slices outside the block are the items (training never sees the block);
    with ``slices=False`` the item is the block alone, a sub-volume named ``<name>[start:stop]`` (validation).

    Not MONAI's ``PersistentDataset``: it pickles whole transformed items, so every slice drawn would read its
    whole volume; here each volume is kept once, slice-major and memory-mapped, and a slice is one small read.
    """

    def __init__(
        self,
        data: list[dict],
        transform,
        volume_transform: Compose,
        cache_dir: str,
        slices: bool = True,
        skip_empty: float = 0.0,
        class_names: list[str] | None = None,
    ):
        items, present = [], set()
        for item in data:
            e = cache_volume(item, volume_transform, cache_dir)
            present.update(e.pop("classes") or [])
            fg = e["foreground"]
            a, b = (0, 0)
            if item.get("val_slices") is not None:
                a, b = val_block(item["val_slices"], len(fg), item["image"])
            if slices:
                items += [dict(e, slice=k, foreground=f) for k, f in enumerate(fg) if not a <= k < b]
            elif b > a:
                items.append(dict(e, name=f"{e['name']}[{a}:{b}]", block=[a, b], foreground=any(fg[a:b])))
            else:
                items.append(dict(e, foreground=any(fg)))
        super().__init__(items, transform)
        self.skip_empty = float(skip_empty)
        self.with_foreground = [i for i, d in enumerate(items) if d["foreground"]]
        if slices and data:  # training: the labels must hold foreground somewhere
            check_foreground(len(self.with_foreground), len(items), Path(data[0]["label"]).parent, "label slices")
        absent = [n for i, n in enumerate(class_names or []) if i and i not in present]
        if slices and data and absent:
            logger.warning(
                f"{Path(data[0]['label']).parent}: no training volume holds {', '.join(absent)}: the model cannot "
                "learn to segment them"
            )
        if not slices and any("block" in d for d in items) and not self.with_foreground:
            logger.warning(f"{Path(data[0]['label']).parent}: no held-back val_slices block has any foreground")
        logger.info(f"{len(data)} volumes, {len(items)} {'slices' if slices else 'volumes'} cached in {cache_dir}")

    def _transform(self, index: int):
        if self.skip_empty > 0 and not self.data[index]["foreground"] and self.with_foreground:
            if float(torch.rand(())) < self.skip_empty:
                index = self.with_foreground[int(torch.randint(len(self.with_foreground), ()))]
        return super()._transform(index)


class LoadCachedd(MapTransform):
    """Read cached arrays: slice ``d["slice"]`` as (1, S, S), or the whole volume as (1, S, S, D), float32 (only
    its axial slices ``d["block"] = [start, stop)`` when given)."""

    def __call__(self, data: Mapping[Hashable, str]) -> dict:
        d = dict(data)
        k, block = d.get("slice"), d.get("block")
        for key in self.key_iterator(d):
            array = np.load(d[key], mmap_mode="r")
            if block is not None:
                array = array[block[0] : block[1]]
            x = array[k] if k is not None else np.moveaxis(array, 0, -1)
            d[key] = torch.from_numpy(np.asarray(x, dtype=np.float32))[None]
        return d
