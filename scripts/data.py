"""2D datasets in their release layouts: file lists, deterministic splits, input checks, mask rules.

The transform chains themselves are wired in the configs from MONAI transforms; this module adds
what MONAI does not know: where each dataset keeps its files, how its masks encode the target,
and how the splits are drawn.

| dataset   | images                       | masks                      | target rule                       |
|-----------|------------------------------|----------------------------|-----------------------------------|
| ``cvc``     | ``Original/*.png|tif``        | ``Ground Truth/*.png|tif``  | gray > 128                        |
| ``kvasir``  | ``images/*.jpg``              | ``masks/*.jpg``             | gray > 128                        |
| ``refuge2`` | ``images/*.png``              | ``masks/*.png``             | cup: RGB -> G == 255; gray -> < 64 |

Splits (sorted names, so they never depend on the file system's listing order): the last
``test_fraction`` of the files is the test split (REFUGE2: the ``T*`` files, as released), and
the last ``val_fraction`` (of all files) of what remains is the validation split used for model
selection; the rest trains. Fractions are rounded up. For the real CVC-ClinicDB (612 images) the
defaults give 488 / 62 / 62 and for Kvasir-SEG (1000) 800 / 100 / 100, the paper's training and test
counts. A JSON ``split_file`` ``{"train": [names], "val": [...], "test": [...]}`` overrides the rule.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import TraceKeys
from PIL import Image

__all__ = [
    "LAYOUTS",
    "DatasetError",
    "make_datalist",
    "image_list",
    "split_names",
    "mask_to_target",
    "MaskToTargetd",
    "to_rgb",
    "to_uint8",
    "unpad_collated",
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


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _images_in(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    files = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")}
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def split_names(
    dataset: str, names: list[str], val_fraction: float = 0.1, test_fraction: float = 0.1
) -> dict[str, list[str]]:
    """The deterministic train/val/test split of ``names`` (see the module docstring)."""
    names = sorted(names, key=_natural_key)
    if dataset == "refuge2":
        test = [n for n in names if n.startswith("T")]
        rest = [n for n in names if not n.startswith("T")]
    else:
        n_test = math.ceil(len(names) * test_fraction)
        test, rest = names[len(names) - n_test :], names[: len(names) - n_test]
    n_val = min(math.ceil(len(names) * val_fraction), max(len(rest) - 1, 0))
    return {"train": rest[: len(rest) - n_val], "val": rest[len(rest) - n_val :], "test": test}


def _check_pair(image: Path, mask: Path) -> None:
    sizes = []
    for path in (image, mask):
        try:
            with Image.open(path) as im:
                im.load()
                sizes.append(im.size)
        except Exception as e:  # PIL raises many types for corrupt files
            raise DatasetError(f"{path}: cannot be read as an image ({e})") from e
    if sizes[0] != sizes[1]:
        raise DatasetError(f"{mask}: mask size {sizes[1]} differs from its image {image.name} {sizes[0]}")


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
            example = have[sorted(missing, key=_natural_key)[0]]
            raise DatasetError(f"{example}: no matching {kind} ({len(missing)} file(s) without a {kind})")
    if split_file:
        try:
            splits = json.loads(Path(split_file).read_text())
        except (OSError, ValueError) as e:
            raise DatasetError(f"{split_file}: cannot read the split file ({e})") from e
        unknown = [n for s in SPLITS for n in splits.get(s, []) if n not in images]
        if unknown:
            raise DatasetError(f"{split_file}: names not in {root / image_dir}: {unknown[:5]}")
    else:
        splits = split_names(dataset, list(images), val_fraction, test_fraction)
    names = [n for s in SPLITS for n in splits.get(s, [])] if split == "all" else splits.get(split, [])
    if not names:
        raise DatasetError(f"{root}: the {split!r} split is empty ({len(images)} images in total)")
    items = [{"image": str(images[n]), "label": str(masks[n]), "name": n} for n in names]
    if check:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda d: _check_pair(Path(d["image"]), Path(d["label"])), items))
    return items


def image_list(input_dir: str) -> list[dict]:
    """``[{"image": path, "name": stem}, ...]`` for every image file in ``input_dir`` (sorted by name)."""
    images = _images_in(Path(input_dir))
    return [{"image": str(images[n]), "name": n} for n in sorted(images, key=_natural_key)]


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


class MaskToTargetd(MapTransform):
    """Dictionary transform: replace the mask under ``keys`` by the dataset's binary target (float 0/1)."""

    def __init__(self, keys: KeysCollection, dataset: str, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if dataset not in LAYOUTS:
            raise DatasetError(f"unknown 2D dataset {dataset!r}; choose one of {sorted(LAYOUTS)}")
        self.rule = LAYOUTS[dataset][2]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = mask_to_target(torch.as_tensor(d[key]), self.rule)
        return d


def unpad_collated(data: Mapping) -> dict:
    """Undo ``PadListDataCollate(method="end")`` on one decollated item: every value it padded is cropped back to
    its own size (``configs/evaluate.yaml``: labels of differently sized images in one batch). MONAI's own
    ``PadListDataCollate.inverse`` centre-crops, a pixel off wherever symmetric padding was odd."""
    d = dict(data)
    for key, value in d.items():
        ops = getattr(value, "applied_operations", None)
        if ops and ops[-1].get(TraceKeys.CLASS_NAME) == "PadListDataCollate":
            size = ops.pop()[TraceKeys.ORIG_SIZE]
            d[key] = value[(slice(None), *(slice(0, int(s)) for s in size))]
    return d
