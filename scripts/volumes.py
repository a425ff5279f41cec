"""3D CT datasets (BTCV, STS-3D): file lists and splits, input checks, the volume transform chain, an on-disk
slice cache for training, a slice-batching volume inferer and an atomic NIfTI writer.

| dataset   | images                  | labels                             | HU window    | foreground           |
|-----------|-------------------------|------------------------------------|--------------|----------------------|
| ``btcv``  | ``img/img00XX.nii.gz``  | ``label/label00XX.nii.gz`` (0..13) | [-175, 250]  | all13 or transunet8  |
| ``sts3d`` | ``image/<name>.<ext>``  | ``label/<name>.<ext>`` (>= 0)      | [-100, 1100] | label > 0            |

Volumes may be NIfTI (read by nibabel), ``.mha``/``.mhd``/``.nrrd``/``.nhdr`` files or DICOM series folders
(read by :class:`SimpleITKReader`); geometry is always MONAI's RAS affine. Splits are fixed: BTCV's 12 test
ids as in the authors' code, STS-3D by ``configs/sts3d_split.json``; the validation volumes are the last
``val_fraction`` (rounded up) of the sorted training names.

Flow: files -> :func:`volume_transforms` (load, check, orient to RAS so axial slices are the last axis,
window, scale to [-1, 1], binary foreground, resize in-plane, repeat to 3 channels) -> training: the
:class:`VolumeCacheDataset` keeps each preprocessed volume once on disk as ``npy`` (memory-mapped, read slice
by slice); inference: :class:`VolumeInferer` runs a 2D inferer on batches of axial slices and restacks them,
MONAI's ``Invertd`` maps the result back onto the input grid and :class:`SaveVolumed` writes it.
``python -m scripts.volumes --benchmark`` measures its throughput against the bare networks.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import Dataset, ImageReader, NibabelReader
from monai.inferers import Inferer
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
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys, convert_to_dst_type

from scripts.bundle_config import CONFIGS, parse_configs
from scripts.data import DatasetError, LoadImaged, _natural_key, check_foreground, read_split_file
from scripts.io_utils import atomic_path, atomic_write_json

__all__ = [
    "DATASETS",
    "BTCV_TEST",
    "TRANSUNET8",
    "SimpleITKReader",
    "dicom_series",
    "make_datalist",
    "volume_list",
    "volume_transforms",
    "CheckVolumed",
    "Foregroundd",
    "VolumeCacheDataset",
    "LoadCachedd",
    "VolumeInferer",
    "SaveVolumed",
    "benchmark",
]

logger = logging.getLogger(__name__)

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
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
VOLUME_SUFFIXES = (".nii.gz", ".nii") + SITK_SUFFIXES
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ---- reading -------------------------------------------------------------------------------------
def volume_stem(path: str | os.PathLike) -> str:
    """``img0001.nii.gz`` -> ``img0001``; a DICOM folder keeps its name."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _sitk_affine(image: sitk.Image) -> np.ndarray:
    """The RAS voxel-to-world affine of a SimpleITK image (ITK is LPS)."""
    spacing, direction = np.array(image.GetSpacing()), np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = direction * spacing, image.GetOrigin()
    return LPS_TO_RAS @ affine


def dicom_series(folder: str | os.PathLike) -> tuple[list[str], tuple[int, ...], np.ndarray]:
    """The slice files of the one DICOM series in ``folder`` (in slice order), its shape and RAS affine, from the
    file headers (no pixel data read). A file of the folder that is not a readable slice of the series (corrupt,
    truncated, not DICOM, another series), a second series, or slices that are not evenly spaced along the stack
    (a missing slice) raise a :class:`DatasetError` naming the folder. Hidden files and ``DICOMDIR`` are ignored."""
    folder = str(folder)
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not ids:
        raise DatasetError(f"{folder}: no DICOM series in this folder")
    if len(ids) > 1:
        raise DatasetError(f"{folder}: {len(ids)} DICOM series in one folder; keep one series per folder")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, ids[0]))
    others = sorted(
        (p for p in Path(folder).iterdir() if not p.name.startswith(".") and p.name.upper() != "DICOMDIR"),
        key=lambda p: _natural_key(p.name),
    )
    others = [p for p in others if str(p) not in set(files)]
    if others:
        raise DatasetError(
            f"{folder}: {others[0].name} is not a readable slice of the series (corrupt, truncated or not DICOM; "
            f"{len(others)} such file(s), {len(files)} readable slices)"
        )
    reader = sitk.ImageFileReader()
    positions = []
    for f in files:
        reader.SetFileName(f)
        reader.ReadImageInformation()
        if not positions:
            size, spacing, direction = reader.GetSize(), reader.GetSpacing(), reader.GetDirection()
            components = reader.GetNumberOfComponents()
        positions.append(reader.GetOrigin())
    positions = np.asarray(positions, float)
    columns = np.asarray(direction, float).reshape(3, 3)
    if len(files) > 1:
        steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
        step = float(np.linalg.norm(positions[-1] - positions[0])) / (len(files) - 1)
        worst = int(np.argmax(np.abs(steps - step)))
        if step == 0 or abs(steps[worst] - step) > max(0.01 * step, 1e-3):
            raise DatasetError(
                f"{folder}: uneven slice spacing: {steps[worst]:.4g} mm between {Path(files[worst]).name} and "
                f"{Path(files[worst + 1]).name}, {step:.4g} mm on average (a missing or misplaced slice?)"
            )
        columns[:, 2] = (positions[-1] - positions[0]) / (step * (len(files) - 1))
        spacing = (spacing[0], spacing[1], step)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = columns * np.asarray(spacing, float), positions[0]
    shape = (int(size[0]), int(size[1]), len(files)) + ((components,) if components > 1 else ())
    return files, shape, LPS_TO_RAS @ affine


def _read_sitk(path: str) -> sitk.Image:
    if os.path.isdir(path):
        return sitk.ReadImage(dicom_series(path)[0])
    return sitk.ReadImage(path)


class SimpleITKReader(ImageReader):
    """MONAI image reader for ``.mha``/``.mhd``/``.nrrd``/``.nhdr`` files and DICOM series folders, through
    SimpleITK. Arrays come in (x, y, z) order with MONAI's RAS affine, as ``NibabelReader`` gives them."""

    def verify_suffix(self, filename) -> bool:
        names = [str(f) for f in (filename if isinstance(filename, (list, tuple)) else [filename])]
        return all(os.path.isdir(f) or f.lower().endswith(SITK_SUFFIXES) for f in names)

    def read(self, data, **kwargs):
        names = [str(f) for f in (data if isinstance(data, (list, tuple)) else [data])]
        images = [_read_sitk(f) for f in names]
        return images if len(images) > 1 else images[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        images = img if isinstance(img, list) else [img]
        arrays = [sitk.GetArrayFromImage(i) for i in images]  # (z, y, x[, components])
        arrays = [a.transpose(2, 1, 0, *range(3, a.ndim)) for a in arrays]
        affine = _sitk_affine(images[0])
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.array(arrays[0].shape[:3]),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if arrays[0].ndim == 3 else -1,
        }
        if len(arrays) > 1:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
            return np.stack(arrays), meta
        return arrays[0], meta


def _geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and RAS affine from the file header (image data not read)."""
    try:
        if path.name.lower().endswith((".nii", ".nii.gz")):
            img = nib.load(str(path))
            return tuple(int(s) for s in img.shape), np.asarray(img.affine, float)
        if path.is_dir():
            return dicom_series(path)[1:]
        img = sitk.ImageFileReader()
        img.SetFileName(str(path))
        img.ReadImageInformation()
        shape = tuple(int(s) for s in img.GetSize()) + (
            (img.GetNumberOfComponents(),) if img.GetNumberOfComponents() > 1 else ()
        )
        return shape, _sitk_affine(img)
    except DatasetError:
        raise
    except Exception as e:  # nibabel and SimpleITK raise many types for corrupt files
        raise DatasetError(f"{path}: cannot be read as a volume ({e})") from e


def check_pair(image: Path, label: Path | None = None) -> None:
    """Header checks before anything trains: 3D volumes, and a label with its image's shape and affine."""
    shape, affine = _geometry(image)
    if len(shape) != 3:
        raise DatasetError(f"{image}: expected a 3D volume, got shape {shape}")
    if label is None:
        return
    lshape, laffine = _geometry(label)
    if lshape != shape:
        raise DatasetError(f"{label}: label shape {lshape} differs from its image {image.name} {shape}")
    if not np.allclose(laffine, affine, rtol=1e-4, atol=1e-3):
        raise DatasetError(f"{label}: label affine differs from its image {image.name}:\n{laffine}\nvs\n{affine}")


# ---- file lists and splits -----------------------------------------------------------------------
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
    names = sorted(names, key=_natural_key)
    split_file = split_file or (str(CONFIGS / DATASETS[dataset]["split"]) if DATASETS[dataset]["split"] else None)
    if split_file:
        splits = read_split_file(split_file, names, where)
        test, train = list(splits.get("test", [])), sorted(splits.get("train", []), key=_natural_key)
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
                f"{have[sorted(missing, key=_natural_key)[0]]}: no matching {kind} ({len(missing)} without)"
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
    return [{"image": str(volumes[n]), "name": volume_stem(volumes[n])} for n in sorted(volumes, key=_natural_key)]


# ---- transforms ----------------------------------------------------------------------------------
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


def volume_transforms(
    dataset: str,
    hu_window: tuple[float, float],
    image_size: int,
    foreground: str = "all13",
    resample_label: bool = True,
) -> Compose:
    """The volume chain: ``image`` (and ``label`` if present) file -> image (3, S, S, D) in [-1, 1] with axial
    slices along the last axis (RAS), label binary. ``resample_label=False`` keeps the label on its own grid
    (for metrics at the original resolution). ``Invertd`` with this chain maps predictions back onto the input.

    The returned ``Compose`` has a ``signature`` (its arguments) that keys the slice cache.
    """
    geometric = ["image", "label"] if resample_label else ["image"]
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
            Foregroundd("label", dataset, foreground, allow_missing_keys=True),
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
    chain.signature = json.dumps([dataset, list(hu_window), int(image_size), foreground, bool(resample_label), 1])
    return chain


# ---- the slice cache -----------------------------------------------------------------------------
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
        atomic_write_json(folder / "meta.json", {"name": item.get("name"), "source": stat, "foreground": foreground})
    meta = json.loads((folder / "meta.json").read_text())
    return {
        "image": str(folder / "image.npy"),
        "label": str(folder / "label.npy"),
        "name": item.get("name"),
        "foreground": meta["foreground"],
    }


class VolumeCacheDataset(Dataset):
    """Training/validation data from 3D volumes through the on-disk cache (:func:`cache_volume`).

    ``data`` is a volume datalist (:func:`make_datalist`); every volume is preprocessed once by
    ``volume_transform`` before anything trains (bad input fails here). With ``slices=True`` the items are
    all axial slices of all volumes, ``transform`` loading one slice (:class:`LoadCachedd`); with
    ``slices=False`` they are whole volumes. ``skip_empty`` is the probability that a slice without foreground
    is replaced by a random slice with foreground each time it is drawn.
    """

    def __init__(
        self,
        data: list[dict],
        transform,
        volume_transform: Compose,
        cache_dir: str,
        slices: bool = True,
        skip_empty: float = 0.0,
    ):
        entries = [cache_volume(item, volume_transform, cache_dir) for item in data]
        if slices:
            items = [dict(e, slice=k, foreground=fg) for e in entries for k, fg in enumerate(e["foreground"])]
        else:
            items = [dict(e, foreground=any(e["foreground"])) for e in entries]
        super().__init__(items, transform)
        self.skip_empty = float(skip_empty)
        self.with_foreground = [i for i, d in enumerate(items) if d["foreground"]]
        if slices and data:  # training: the labels must hold foreground somewhere
            check_foreground(len(self.with_foreground), len(items), Path(data[0]["label"]).parent, "label slices")
        logger.info(f"{len(entries)} volumes, {len(items)} {'slices' if slices else 'volumes'} cached in {cache_dir}")

    def _transform(self, index: int):
        if self.skip_empty > 0 and not self.data[index]["foreground"] and self.with_foreground:
            if float(torch.rand(())) < self.skip_empty:
                index = self.with_foreground[int(torch.randint(len(self.with_foreground), ()))]
        return super()._transform(index)


class LoadCachedd(MapTransform):
    """Read cached arrays: slice ``d["slice"]`` as (1, S, S), or the whole volume as (1, S, S, D), float32."""

    def __call__(self, data: Mapping[Hashable, str]) -> dict:
        d = dict(data)
        k = d.get("slice")
        for key in self.key_iterator(d):
            array = np.load(d[key], mmap_mode="r")
            x = array[k] if k is not None else np.moveaxis(array, 0, -1)
            d[key] = torch.from_numpy(np.asarray(x, dtype=np.float32))[None]
        return d


# ---- volume inference ----------------------------------------------------------------------------
class VolumeInferer(Inferer):
    """Run a 2D ``inferer`` on volumes (B, C, H, W, D): axial slices go through it in batches of
    ``batch_size`` and the outputs are restacked in slice order as (B, C', H, W, D). 2D inputs (B, C, H, W)
    pass straight through, so the same wiring serves 2D and 3D datasets."""

    def __init__(self, inferer: Inferer, batch_size: int = 8):
        super().__init__()
        self.inferer, self.batch_size = inferer, int(batch_size)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        if inputs.dim() == 4:
            return self.inferer(inputs, network, *args, **kwargs)
        if inputs.dim() != 5:
            raise ValueError(f"expected (B, C, H, W) slices or (B, C, H, W, D) volumes, got {tuple(inputs.shape)}")
        b, c, h, w, depth = inputs.shape
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        slices = x.permute(0, 4, 1, 2, 3).reshape(b * depth, c, h, w)
        outs = [
            self.inferer(slices[i : i + self.batch_size], network, *args, **kwargs)
            for i in range(0, b * depth, self.batch_size)
        ]
        out = torch.cat([o.as_tensor() if hasattr(o, "as_tensor") else o for o in outs])
        out = out.reshape(b, depth, *out.shape[1:]).permute(0, 2, 3, 4, 1)
        return convert_to_dst_type(out, inputs)[0]  # a MetaTensor input keeps its meta (for Invertd)


class SaveVolumed(MapTransform):
    """Write ``d[key]`` (1, H, W, D) on the input's grid as ``<output_dir>/<input stem>.nii.gz``, atomically.

    The affine is the input's own (``original_affine`` of ``d[name_key]``), so the mask overlays the input; a
    NIfTI input also lends its header (qform/sform codes). Binary masks are stored as uint8 0/1, other maps
    (``dtype="float32"``) as float32.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        name_key: str = "image",
        dtype: str = "uint8",
        allow_missing_keys=False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.name_key, self.dtype = Path(output_dir), name_key, np.dtype(dtype)

    def __call__(self, data):
        d = dict(data)
        meta = d[self.name_key].meta
        source = str(meta[ImageMetaKey.FILENAME_OR_OBJ])
        affine = np.asarray(meta[MetaKeys.ORIGINAL_AFFINE], dtype=np.float64)
        shape = tuple(int(s) for s in meta[MetaKeys.SPATIAL_SHAPE])
        header = nib.load(source).header.copy() if source.lower().endswith((".nii", ".nii.gz")) else None
        for key in self.key_iterator(d):
            value = torch.as_tensor(d[key]).detach().float().cpu().numpy()
            if value.ndim != 4 or value.shape[0] != 1 or value.shape[1:] != shape:
                raise ValueError(f"{key} for {source}: expected a (1, *{shape}) volume, got shape {value.shape}")
            array = np.round(value[0]).astype(self.dtype) if self.dtype.kind in "iu" else value[0].astype(self.dtype)
            img = nib.Nifti1Image(array, affine, header)
            img.set_data_dtype(self.dtype)
            img.header.set_slope_inter(1.0, 0.0)
            with atomic_path(self.output_dir / f"{volume_stem(source)}.nii.gz") as tmp:
                tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
        return d


# ---- throughput ----------------------------------------------------------------------------------
def benchmark(
    dataset_dir: str, dataset: str = "btcv", preset: str = "tiny", batch_size: int = 8, repeats: int = 3
) -> dict:
    """Slices/s of the bare networks (``SDSegInferer`` on ready slice batches) vs volume inference of the
    same volumes: the volume chain, :class:`VolumeInferer`, ``Invertd`` to the input grid and threshold
    (no file writing), and the same without loading (``VolumeInferer`` on preprocessed volumes)."""
    from monai.transforms import AsDiscreted, Invertd

    from scripts.sampler import SDSegInferer

    parser = parse_configs(["train.yaml", f"{preset}.yaml"])
    parser["network_def"]["autoencoder_path"] = None
    net = parser.get_parsed_content("network_def").eval()
    net.scale_factor.fill_(1.0)
    image_size, window = parser["image_size"], DATASETS[dataset]["window"]
    items = make_datalist(dataset, dataset_dir, "all")
    pre = volume_transforms(dataset, window, image_size, resample_label=False)
    post = Compose([Invertd("pred", pre, orig_keys="image", nearest_interp=False), AsDiscreted("pred", threshold=0.5)])
    inner = SDSegInferer(seed=0)
    vol_inferer = VolumeInferer(inner, batch_size)
    volumes = [pre({"image": d["image"]})["image"] for d in items]
    n = sum(v.shape[-1] for v in volumes)
    slices = [v.as_tensor().permute(3, 0, 1, 2).contiguous() for v in volumes]

    def bare():
        for s in slices:
            for i in range(0, s.shape[0], batch_size):
                inner(s[i : i + batch_size], net)

    def inferer_only():
        for v in volumes:
            vol_inferer(v[None], net)

    def end_to_end():
        for d in items:
            x = pre({"image": d["image"]})
            x["pred"] = vol_inferer(x["image"][None], net)[0]
            post(x)

    runs = {"bare": bare, "inferer": inferer_only, "end_to_end": end_to_end}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats + 1):  # interleaved, so that load from other processes hits all alike; best time
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    out = {"slices": n, **{f"{name}_slices_per_s": n / t for name, t in best.items()}}
    out["inferer_ratio"] = out["inferer_slices_per_s"] / out["bare_slices_per_s"]
    out["end_to_end_ratio"] = out["end_to_end_slices_per_s"] / out["bare_slices_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", action="store_true", help="measure volume inference vs the bare networks")
    parser.add_argument("--dataset", default="btcv", choices=sorted(DATASETS))
    parser.add_argument("--dataset_dir", default=None, help="default: data/demo/<dataset>")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "paper"])
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    if not args.benchmark:
        parser.print_help()
        return
    result = benchmark(args.dataset_dir or f"data/demo/{args.dataset}", args.dataset, args.preset, args.batch_size)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
