"""The 3D datasets (BTCV, STS-3D): where each keeps its volumes, the fixed splits and the datalists."""

from __future__ import annotations

import math
from pathlib import Path

from scripts.bundle_config import CONFIGS
from scripts.classes import TRANSUNET8_IDS
from scripts.data import DatasetError, natural_key, read_split_file
from scripts.volumes.reading import VOLUME_SUFFIXES, check_pair, volume_stem

__all__ = [
    "DATASETS",
    "BTCV_TEST",
    "TRANSUNET8",
    "split_volumes",
    "make_datalist",
    "volume_list",
    "check_val_slices",
    "val_block",
]

DATASETS = {  # image folder, label folder, name prefixes to strip, largest label, default split file, HU window
    "btcv": {
        "images": "img",
        "labels": "label",
        "prefixes": ("img", "label"),
        "max_label": 13,
        "split": None,
        "window": (-175, 250),
    },
    "sts3d": {
        "images": "image",
        "labels": "label",
        "prefixes": (),
        "max_label": None,
        "split": "sts3d_split.json",
        "window": (-100, 1100),
    },
}
BTCV_TEST = ("0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035", "0036", "0038")
TRANSUNET8 = TRANSUNET8_IDS  # spleen, r./l. kidney, gallbladder, liver, stomach, aorta, pancreas (scripts/classes.py)


def _volumes_in(folder: Path, prefixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not (p.is_dir() or p.name.lower().endswith(VOLUME_SUFFIXES)):
            continue
        key = volume_stem(p)
        for prefix in prefixes:
            if key.startswith(prefix) and key[len(prefix) :]:
                key = key[len(prefix) :]
                break
        if key in files:
            raise DatasetError(f"{folder}: {files[key].name} and {p.name} are both volume {key!r}; keep one")
        files[key] = p
    if not files:
        raise DatasetError(f"{folder}: no volumes ({', '.join(VOLUME_SUFFIXES)} or DICOM folders) found")
    return files


VAL_SLICES_FORMS = "a fraction 0 < f < 1 (e.g. 0.2) or a block [start, stop] of axial slice indices (e.g. [30, 40])"


def check_val_slices(val_slices):
    """``val_slices`` as given (a fraction, or ``[start, stop]``: ints, 0 <= start < stop), or a
    :class:`DatasetError` naming what is wrong; ``None`` (the option off) passes through."""
    if val_slices is None:
        return None
    if isinstance(val_slices, float) and 0 < val_slices < 1:
        return val_slices
    if isinstance(val_slices, (list, tuple)) and len(val_slices) == 2:
        start, stop = val_slices
        if all(isinstance(i, int) and not isinstance(i, bool) for i in val_slices) and 0 <= start < stop:
            return [start, stop]
    raise DatasetError(f"val_slices={val_slices!r}: expected {VAL_SLICES_FORMS}, counted from 0 in RAS order")


def val_block(val_slices, depth: int, where: str) -> tuple[int, int]:
    """The held-back block ``[start, stop)`` of a volume of ``depth`` axial slices: a fraction is the last
    ``ceil(f * depth)`` slices. The block must fit the volume and leave at least one slice to train on."""
    val_slices = check_val_slices(val_slices)
    if isinstance(val_slices, float):
        start, stop = depth - math.ceil(val_slices * depth), depth
    else:
        start, stop = val_slices
    if stop > depth:
        raise DatasetError(
            f"{where}: val_slices [{start}, {stop}) does not fit its {depth} axial slices (stop <= {depth})"
        )
    if stop - start >= depth:
        raise DatasetError(
            f"{where}: val_slices {val_slices!r} holds back all {depth} axial slices; training needs at least one"
        )
    return start, stop


def split_volumes(
    dataset: str,
    names: list[str],
    val_fraction: float = 0.1,
    split_file: str | None = None,
    where: str = "the dataset",
    val_slices=None,
) -> dict:
    """The fixed train/val/test split of ``names`` (see the module docstring); a split file is checked by
    :func:`scripts.data.read_split_file`. With ``val_slices`` no volume is held back whole: every non-test
    volume trains and "val" names the same volumes (their held-back slices, see :func:`make_datalist`)."""
    names = sorted(names, key=natural_key)
    split_file = split_file or (str(CONFIGS / DATASETS[dataset]["split"]) if DATASETS[dataset]["split"] else None)
    if split_file:
        splits = read_split_file(split_file, names, where)
        test, train = list(splits.get("test", [])), sorted(splits.get("train", []), key=natural_key)
        if val_slices is not None and splits.get("val"):
            raise DatasetError(
                f"{split_file}: lists 'val' volumes, and val_slices={val_slices!r} validates on slices held back "
                "from the training volumes; use one or the other"
            )
        if val_slices is not None:
            return {"train": train, "val": list(train), "test": test}
        if "val" in splits:
            return {"train": train, "val": list(splits["val"]), "test": test}
    else:  # BTCV: the authors' fixed test ids, the rest trains
        test = [n for n in names if n in BTCV_TEST]
        train = [n for n in names if n not in BTCV_TEST]
    if val_slices is not None:
        return {"train": train, "val": list(train), "test": test}
    n_val = min(math.ceil(len(train) * val_fraction), max(len(train) - 1, 0))
    return {"train": train[: len(train) - n_val], "val": train[len(train) - n_val :], "test": test}


def make_datalist(
    dataset: str,
    dataset_dir: str,
    split: str,
    val_fraction: float = 0.1,
    split_file: str | None = None,
    check: bool = True,
    val_slices=None,
    whole_volumes: bool = False,
) -> list[dict]:
    """``[{"image": path, "label": path, "name": image stem}, ...]`` for one split of a 3D dataset.

    ``val_slices`` (a fraction or ``[start, stop]``, see :func:`val_block`) validates on a block of axial slices
    held back from each training volume, so that one labelled volume is enough: then every non-test volume is in
    "train" and in "val", each item with ``"val_slices"``; :class:`~scripts.volumes.cache.VolumeCacheDataset`
    trains on the other slices and validates on the block alone. ``whole_volumes=True`` (inference,
    evaluation) refuses such a "val" split, whose volumes were also trained on.

    With ``check`` every pair's headers are read and compared (3D, same shape, same affine) so a missing,
    unreadable or mismatched file fails before training, with its name. Voxel checks (NaN images, label
    values) run when a volume is first preprocessed (:class:`CheckVolumed`, :class:`Foregroundd`).
    """
    if dataset not in DATASETS:
        raise DatasetError(f"unknown 3D dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    root, layout = Path(dataset_dir), DATASETS[dataset]
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found (set --dataset_dir)")
    images = _volumes_in(root / layout["images"], layout["prefixes"])
    labels = _volumes_in(root / layout["labels"], layout["prefixes"])
    for missing, have, kind in (
        (set(images) - set(labels), images, "label"),
        (set(labels) - set(images), labels, "image"),
    ):
        if missing:
            raise DatasetError(
                f"{have[sorted(missing, key=natural_key)[0]]}: no matching {kind} ({len(missing)} without)"
            )
    val_slices = check_val_slices(val_slices)
    splits = split_volumes(dataset, list(images), val_fraction, split_file, str(root / layout["images"]), val_slices)
    names = [n for s in ("train", "val", "test") for n in splits[s]] if split == "all" else splits.get(split)
    if names is None:
        raise DatasetError(f"unknown split {split!r}; choose train, val, test or all")
    names = list(dict.fromkeys(names))  # "all" with val_slices: each volume once
    if val_slices is not None and split == "val" and whole_volumes:
        raise DatasetError(
            f"with val_slices={val_slices!r} the 'val' split is slices held back from the training volumes, and "
            "inference and evaluation read whole volumes; evaluate the test split (or validate while training)"
        )
    if not names:
        raise DatasetError(f"{root}: the {split!r} split is empty ({len(images)} volumes in total)")
    items = [{"image": str(images[n]), "label": str(labels[n]), "name": volume_stem(images[n])} for n in names]
    if val_slices is not None and split in ("train", "val"):
        items = [dict(d, val_slices=val_slices) for d in items]
    if check:
        for d in items:
            check_pair(Path(d["image"]), Path(d["label"]))
    return items


def volume_list(input_dir: str) -> list[dict]:
    """``[{"image": path, "name": stem}, ...]`` for every volume (file or DICOM folder) in ``input_dir``."""
    volumes = _volumes_in(Path(input_dir), ())
    for p in volumes.values():
        check_pair(p)
    return [{"image": str(volumes[n]), "name": volume_stem(volumes[n])} for n in sorted(volumes, key=natural_key)]
