"""The 3D datasets (BTCV, STS-3D): where each keeps its volumes, the fixed splits and the datalists."""

from __future__ import annotations

import math
from pathlib import Path

from scripts.bundle_config import CONFIGS
from scripts.data import DatasetError, natural_key, read_split_file
from scripts.volumes.reading import VOLUME_SUFFIXES, check_pair, volume_stem

__all__ = ["DATASETS", "BTCV_TEST", "TRANSUNET8", "split_volumes", "make_datalist", "volume_list"]

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
TRANSUNET8 = (1, 2, 3, 4, 6, 7, 8, 11)  # spleen, r./l. kidney, gallbladder, liver, stomach, aorta, pancreas


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


def split_volumes(
    dataset: str, names: list[str], val_fraction: float = 0.1, split_file: str | None = None, where: str = "the dataset"
) -> dict:
    """The fixed train/val/test split of ``names`` (see the module docstring); a split file is checked by
    :func:`scripts.data.read_split_file`."""
    names = sorted(names, key=natural_key)
    split_file = split_file or (str(CONFIGS / DATASETS[dataset]["split"]) if DATASETS[dataset]["split"] else None)
    if split_file:
        splits = read_split_file(split_file, names, where)
        test, train = list(splits.get("test", [])), sorted(splits.get("train", []), key=natural_key)
        if "val" in splits:
            return {"train": train, "val": list(splits["val"]), "test": test}
    else:  # BTCV: the authors' fixed test ids, the rest trains
        test = [n for n in names if n in BTCV_TEST]
        train = [n for n in names if n not in BTCV_TEST]
    n_val = min(math.ceil(len(train) * val_fraction), max(len(train) - 1, 0))
    return {"train": train[: len(train) - n_val], "val": train[len(train) - n_val :], "test": test}


def make_datalist(
    dataset: str,
    dataset_dir: str,
    split: str,
    val_fraction: float = 0.1,
    split_file: str | None = None,
    check: bool = True,
) -> list[dict]:
    """``[{"image": path, "label": path, "name": image stem}, ...]`` for one split of a 3D dataset.

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
    splits = split_volumes(dataset, list(images), val_fraction, split_file, str(root / layout["images"]))
    names = [n for s in ("train", "val", "test") for n in splits[s]] if split == "all" else splits.get(split)
    if names is None:
        raise DatasetError(f"unknown split {split!r}; choose train, val, test or all")
    if not names:
        raise DatasetError(f"{root}: the {split!r} split is empty ({len(images)} volumes in total)")
    items = [{"image": str(images[n]), "label": str(labels[n]), "name": volume_stem(images[n])} for n in names]
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
