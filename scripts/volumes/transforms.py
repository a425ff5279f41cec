"""The volume transform chain: files -> image (3, S, S, D) in [-1, 1] and label (binary or class indices), checked."""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import NibabelReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RepeatChanneld,
    Resized,
    ScaleIntensityRanged,
)
from monai.utils import ImageMetaKey, convert_to_dst_type

from scripts.classes import get_class_set
from scripts.data import DatasetError
from scripts.transforms import LoadImaged
from scripts.volumes.datalist import DATASETS, TRANSUNET8
from scripts.volumes.reading import SimpleITKReader

__all__ = ["CheckVolumed", "Foregroundd", "ClassIndexd", "volume_transforms"]


def _filename(x) -> str:
    return str(getattr(x, "meta", {}).get(ImageMetaKey.FILENAME_OR_OBJ, "<volume>"))


class CheckVolumed(MapTransform):
    """Fail with the file named on a volume that is not 3D or has non-finite voxels (right after loading)."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if x.ndim != 3:
                raise DatasetError(f"{_filename(x)}: expected a 3D volume, got shape {tuple(x.shape)}")
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise DatasetError(f"{_filename(x)}: {int((~torch.isfinite(x)).sum())} NaN or infinite voxels")
        return d


class Foregroundd(MapTransform):
    """Label volume -> binary foreground (float 0/1), after checking its values.

    BTCV labels must be integers 0..13; ``foreground="all13"`` (paper) keeps every organ, ``"transunet8"``
    (authors' code) only :data:`TRANSUNET8`. STS-3D labels must be non-negative integers; every tooth counts.
    Not MONAI's ``LabelToMaskd``: that does not check the label values, and bad ones must stop naming the file.
    """

    def __init__(self, keys: KeysCollection, dataset: str, foreground: str = "all13", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if dataset not in DATASETS:
            raise DatasetError(f"unknown 3D dataset {dataset!r}; choose one of {sorted(DATASETS)}")
        if foreground not in ("all13", "transunet8"):
            raise ValueError(f"foreground must be 'all13' or 'transunet8', got {foreground!r}")
        self.max_label = DATASETS[dataset]["max_label"]
        self.keep = TRANSUNET8 if (dataset == "btcv" and foreground == "transunet8") else None

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            y = d[key]
            values = torch.unique(y.as_tensor() if hasattr(y, "as_tensor") else torch.as_tensor(y))
            top = self.max_label if self.max_label is not None else float("inf")
            bad = values[(values != values.round()) | (values < 0) | (values > top)]
            if bad.numel():
                allowed = f"integers 0..{self.max_label}" if self.max_label is not None else "non-negative integers"
                raise DatasetError(f"{_filename(y)}: unexpected label values {bad[:5].tolist()} (expected {allowed})")
            fg = torch.isin(y, torch.tensor(self.keep, dtype=y.dtype)) if self.keep else y > 0
            d[key] = fg.to(torch.float32)
        return d


class ClassIndexd(MapTransform):
    """Label volume -> class indices 0..C-1 (float) of a multi-class ``--classes`` (:mod:`scripts.classes`): BTCV ids
    to their class; a value outside the set fails naming the file, the value and the ``--classes`` in force."""

    def __init__(self, keys: KeysCollection, classes: str, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.class_set = get_class_set(classes)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            y = d[key]
            index = self.class_set.to_index(y, _filename(y))
            d[key] = convert_to_dst_type(index, y, dtype=torch.float32)[0]  # a MetaTensor keeps its metadata
        return d


def volume_transforms(
    dataset: str,
    hu_window: tuple[float, float],
    image_size: int,
    foreground: str | None = None,
    resample_label: bool = True,
    classes: str = "binary",
) -> Compose:
    """The volume chain: ``image`` (and ``label`` if present) file -> image (3, S, S, D) in [-1, 1] with axial
    slices along the last axis (RAS), label binary (``classes="binary"``, by ``foreground``) or class indices 0..C-1 of
    a multi-class ``classes`` (:class:`ClassIndexd`). ``resample_label=False`` keeps the label on its own grid
    (for metrics at the original resolution). ``Invertd`` with this chain maps predictions back onto the input.

    ``foreground`` (``--foreground``) is the binary rule: ``None`` means ``all13`` (the paper); a multi-class
    ``classes`` segments every organ of its set itself, so giving it a ``foreground`` too is an error.

    The returned ``Compose`` has a ``signature`` (its arguments) that keys the slice cache.
    """
    geometric = ["image", "label"] if resample_label else ["image"]
    class_set = get_class_set(classes)
    class_set.check_dataset(dataset)
    if foreground is not None and not class_set.binary:
        raise ValueError(
            f"--foreground {foreground} is the binary foreground; --classes {class_set.name} segments each of its "
            f"classes ({', '.join(class_set.organs[:3])}, ...) itself: drop --foreground (or use --classes binary)"
        )
    foreground = "all13" if foreground is None else foreground
    if class_set.binary:
        target = Foregroundd("label", dataset, foreground, allow_missing_keys=True)
    else:
        target = ClassIndexd("label", classes, allow_missing_keys=True)
    chain = Compose(
        [
            # readers are tried last first: nibabel for NIfTI, SimpleITK for the rest; read errors name the file
            LoadImaged(
                ["image", "label"], reader=[SimpleITKReader, NibabelReader], image_only=True, allow_missing_keys=True
            ),
            CheckVolumed(["image", "label"], allow_missing_keys=True),
            EnsureChannelFirstd(["image", "label"], channel_dim="no_channel", allow_missing_keys=True),
            Orientationd(geometric, axcodes="RAS", labels=None, allow_missing_keys=True),
            ScaleIntensityRanged("image", a_min=hu_window[0], a_max=hu_window[1], b_min=-1.0, b_max=1.0, clip=True),
            target,
            Resized(
                geometric,
                spatial_size=(image_size, image_size, -1),
                mode=["trilinear", "nearest"][: len(geometric)],
                allow_missing_keys=True,
            ),
            RepeatChanneld("image", repeats=3),
            EnsureTyped(["image", "label"], dtype=torch.float32, allow_missing_keys=True),
        ]
    )
    signature = [dataset, list(hu_window), int(image_size), foreground, bool(resample_label), 1]
    chain.signature = json.dumps(signature + ([] if class_set.binary else [class_set.name]))
    return chain
