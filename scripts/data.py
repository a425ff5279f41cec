"""2D datasets in their release layouts: file lists, deterministic splits, input checks, mask rules.

The transform chains themselves are wired in the configs from MONAI transforms and the few of
:mod:`scripts.transforms`; this module adds what MONAI does not know: where each dataset keeps its
files, how its masks encode the target, and how the splits are drawn.

| dataset   | images                       | masks                      | target rule                       |
|-----------|------------------------------|----------------------------|-----------------------------------|
| ``cvc``     | ``Original/*.png|tif``        | ``Ground Truth/*.png|tif``  | gray > 128                        |
| ``kvasir``  | ``images/*.jpg``              | ``masks/*.jpg``             | gray > 128                        |
| ``refuge2`` | ``images/*.png``              | ``masks/*.png``             | cup: RGB -> G == 255; gray -> < 64 |

``--classes disc_cup`` (REFUGE2 disc + cup) reads the gray levels instead (:class:`scripts.transforms.MaskToTargetd`,
:mod:`scripts.classes`): 255 background, 128 disc, 0 cup -> class indices 0 / 1 / 2.

Splits (sorted names, so they never depend on the file system's listing order): the last
``test_fraction`` of the files is the test split, and the last ``val_fraction`` (of all files) of what
remains is the validation split used for model selection; the rest trains. Fractions are rounded up.
For the real CVC-ClinicDB (612 images) the defaults give 488 / 62 / 62 and for Kvasir-SEG (1000)
800 / 100 / 100, the paper's training and test counts. REFUGE2: the ``T*`` files are the test split, as
released, and ``val_fraction`` of the other files validates, stratified by the released name prefixes
(``g`` glaucoma, ``n`` normal, anything else one more group): 720 / 80 / 400 for the 1,200 released images.
A JSON ``split_file`` ``{"train": [names], "val": [...], "test": [...]}`` overrides the rule.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "LAYOUTS",
    "DatasetError",
    "natural_key",
    "make_datalist",
    "read_split_file",
    "check_foreground",
    "check_batches",
    "image_list",
    "split_names",
    "mask_to_target",
    "to_rgb",
    "to_uint8",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

LAYOUTS = {  # dataset -> (image folder, mask folder, mask rule)
    "cvc": ("Original", "Ground Truth", "gray"),
    "kvasir": ("images", "masks", "gray"),
    "refuge2": ("images", "masks", "refuge_cup"),
}
SPLITS = ("train", "val", "test")

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """Bad dataset input: the message names the file and the problem."""


def natural_key(name: str) -> list:
    """Sort key that orders numbers by value: ``img2`` before ``img10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _images_in(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            if p.stem in files:
                raise DatasetError(f"{folder}: {files[p.stem].name} and {p.name} share the name {p.stem!r}; keep one")
            files[p.stem] = p
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def split_names(
    dataset: str, names: list[str], val_fraction: float = 0.1, test_fraction: float = 0.1
) -> dict[str, list[str]]:
    """The deterministic train/val/test split of ``names`` (see the module docstring)."""
    names = sorted(names, key=natural_key)
    if dataset == "refuge2":
        test = [n for n in names if n.startswith("T")]
        rest = [n for n in names if not n.startswith("T")]
        groups: dict[str, list[str]] = {}
        for n in rest:  # stratified by the g / n prefixes, the last val_fraction of each
            groups.setdefault(n[0].lower() if n[0].lower() in ("g", "n") else "", []).append(n)
        val = {n for g in groups.values() for n in g[len(g) - math.ceil(len(g) * val_fraction) :]}
        if len(val) < len(rest):  # else (a handful of images) as below, keeping one to train
            return {"train": [n for n in rest if n not in val], "val": [n for n in rest if n in val], "test": test}
    else:
        n_test = math.ceil(len(names) * test_fraction)
        test, rest = names[len(names) - n_test :], names[: len(names) - n_test]
    n_val = min(math.ceil(len(names) * val_fraction), max(len(rest) - 1, 0))
    return {"train": rest[: len(rest) - n_val], "val": rest[len(rest) - n_val :], "test": test}


def read_split_file(split_file: str | os.PathLike, available: Collection[str], where: str | os.PathLike) -> dict:
    """The checked contents of a JSON split file ``{"train": [names], "val": [...], "test": [...]}`` (2D and 3D).

    Each present split must be a list of names (strings) found in ``available`` (the dataset's names, in
    ``where``); a name may appear once, in one split only. Anything else raises a :class:`DatasetError` that names
    the file and the problem. Returns only the splits the file has.
    """
    try:
        splits = json.loads(Path(split_file).read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{split_file}: cannot read the split file ({e})") from e
    if not isinstance(splits, dict):
        raise DatasetError(
            f'{split_file}: expected a JSON object {{"train": [names], "val": [...], "test": [...]}}, '
            f"got a {type(splits).__name__}"
        )
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise DatasetError(f"{split_file}: unknown split(s) {unknown}; use {', '.join(SPLITS)}")
    owner: dict[str, str] = {}
    for split, names in splits.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{split_file}: {split!r} must be a list of names (strings), got {names!r:.80}")
        for n in names:
            if n in owner:
                where_else = "twice in" if owner[n] == split else f"in both {owner[n]!r} and"
                raise DatasetError(f"{split_file}: {n!r} is {where_else} {split!r}; every name belongs to one split")
            owner[n] = split
    missing = [n for n in owner if n not in available]
    if missing:
        raise DatasetError(f"{split_file}: names not in {where}: {missing[:5]} ({len(missing)} in all)")
    return splits


def _check_pair(image: Path, mask: Path, rule: str | None = None) -> bool | None:
    """Open both files fully and compare their sizes; with a mask ``rule``, whether the mask has any target."""
    sizes, foreground = [], None
    for path in (image, mask):
        try:
            with Image.open(path) as im:
                im.load()
                sizes.append(im.size)
                if rule and path is mask:
                    rgb = torch.from_numpy(np.array(to_rgb(im))).permute(2, 0, 1)
                    foreground = bool(mask_to_target(rgb, rule).any())
        except Exception as e:  # PIL raises many types for corrupt files
            raise DatasetError(f"{path}: cannot be read as an image ({e})") from e
    if sizes[0] != sizes[1]:
        raise DatasetError(f"{mask}: mask size {sizes[1]} differs from its image {image.name} {sizes[0]}")
    return foreground


def make_datalist(
    dataset: str,
    dataset_dir: str,
    split: str,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_file: str | None = None,
    check: bool = True,
) -> list[dict]:
    """``[{"image": path, "label": path, "name": stem}, ...]`` for one split of a 2D dataset.

    With ``check`` every image/mask pair of the split is opened and compared before anything
    trains, so a missing, corrupt or mismatched file fails early with its name.
    """
    if dataset not in LAYOUTS:
        raise DatasetError(f"unknown 2D dataset {dataset!r}; choose one of {sorted(LAYOUTS)}")
    if split not in SPLITS + ("all",):
        raise DatasetError(f"unknown split {split!r}; choose one of {SPLITS + ('all',)}")
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found (set --dataset_dir)")
    image_dir, mask_dir, _ = LAYOUTS[dataset]
    images, masks = _images_in(root / image_dir), _images_in(root / mask_dir)
    for missing, have, kind in ((set(images) - set(masks), images, "mask"), (set(masks) - set(images), masks, "image")):
        if missing:
            example = have[sorted(missing, key=natural_key)[0]]
            raise DatasetError(f"{example}: no matching {kind} ({len(missing)} file(s) without a {kind})")
    if split_file:
        splits = read_split_file(split_file, images, root / image_dir)
    else:
        splits = split_names(dataset, list(images), val_fraction, test_fraction)
    names = [n for s in SPLITS for n in splits.get(s, [])] if split == "all" else splits.get(split, [])
    if not names:
        raise DatasetError(f"{root}: the {split!r} split is empty ({len(images)} images in total)")
    items = [{"image": str(images[n]), "label": str(masks[n]), "name": n} for n in names]
    if check:
        rule = LAYOUTS[dataset][2] if split == "train" else None  # the training masks must hold targets
        with ThreadPoolExecutor(4) as pool:
            found = list(pool.map(lambda d: _check_pair(Path(d["image"]), Path(d["label"]), rule), items))
        if rule:
            check_foreground(sum(found), len(items), root / mask_dir, "training masks")
    return items


def check_foreground(with_target: int, total: int, where: str | os.PathLike, what: str) -> None:
    """Stop when none of ``total`` training items has a target (nothing to learn); warn under 1 %."""
    if with_target == 0:
        raise DatasetError(
            f"{where}: none of the {total} {what} has any foreground (check the masks, their values and --dataset)"
        )
    if with_target < 0.01 * total:
        logger.warning(
            f"{where}: only {with_target} of the {total} {what} ({100 * with_target / total:.1f} %) has any foreground"
        )


def check_batches(loader, dataset_dir: str | os.PathLike = "") -> int:
    """``len(loader)`` for the training loader: batches per pass. Zero (fewer training items than one batch, the
    incomplete batch being dropped) is a :class:`DatasetError`, not a run that trains nothing."""
    n = len(loader)
    if n == 0:
        items = len(loader.sampler) if loader.sampler is not None else len(loader.dataset)
        per = " per process" if items != len(loader.dataset) else ""
        raise DatasetError(
            f"{dataset_dir}: {items} training items{per}, fewer than one batch of {loader.batch_size}: "
            "lower --batch_size or add training images"
        )
    return n


def image_list(input_dir: str) -> list[dict]:
    """``[{"image": path, "name": stem}, ...]`` for every image file in ``input_dir`` (sorted by name)."""
    images = _images_in(Path(input_dir))
    return [{"image": str(images[n]), "name": n} for n in sorted(images, key=natural_key)]


def to_rgb(image: Image.Image) -> Image.Image:
    """PIL converter for images and masks: grayscale, palette and RGBA files all become RGB; 16-bit, 32-bit and
    float files are brought to 0..255 first (:func:`to_uint8`) instead of being clipped to white."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = Image.fromarray(to_uint8(np.asarray(image), image.mode, getattr(image, "filename", "") or "image"))
    return image.convert("RGB")


def to_uint8(array: np.ndarray, mode: str, name: str = "image") -> np.ndarray:
    """A 16-bit (``I;16``), 32-bit integer (``I``) or float (``F``) PIL image array -> uint8, scaled by its type.

    ``I;16``: v / 257 (65535 -> 255). ``I``: kept if within 0..255, else v / 257 if within 0..65535 (16-bit data).
    ``F``: v * 255 if within [0, 1], kept if within [0, 255]. Integer 0/1 label maps stay 0/1 (the mask rules read
    them). Anything else (negative or larger values) is scaled by its own min..max, with a logged notice.
    """
    a = array.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode != "F" and lo >= 0 and hi <= 1:
        scale = 1.0
    elif mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi <= 65535):
        scale = 1 / 257
    elif lo >= 0 and hi <= (1 if mode == "F" else 255):
        scale = 255.0 if mode == "F" else 1.0
    elif lo >= 0 and hi <= 255:
        scale = 1.0
    else:
        logger.warning(f"{name}: {mode} values in [{lo:g}, {hi:g}] scaled to 0..255 by their own range")
        a, scale = a - lo, 255 / (hi - lo) if hi > lo else 0.0
    return np.rint(a * scale).clip(0, 255).astype(np.uint8)


def mask_to_target(mask: torch.Tensor, rule: str) -> torch.Tensor:
    """A loaded mask (C, H, W) -> binary target (1, H, W) float, by the dataset's rule.

    ``gray``: channel mean > 128 (0/255 masks; tolerates JPEG noise), or > 0.5 for 0/1 label maps (as MONAI
    Label saves them). ``refuge_cup``: an RGB mask whose channels
    differ marks the cup with G == 255; a gray disc map (0 cup, 128 disc, 255 background) marks
    it with values < 64.
    """
    if rule == "gray":
        gray = mask.float().mean(0, keepdim=True)
        return (gray > (0.5 if float(gray.max()) <= 1 else 128)).float()
    if rule == "refuge_cup":
        if mask.shape[0] >= 3 and bool((mask[0] != mask[1]).any() or (mask[1] != mask[2]).any()):
            return (mask[1:2] == 255).float()
        return (mask[0:1] < 64).float()
    raise ValueError(f"unknown mask rule {rule!r}")
