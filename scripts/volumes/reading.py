"""Reading 3D volumes: NIfTI through nibabel, ``.mha``/``.mhd``/``.nrrd``/``.nhdr`` files and DICOM series folders
through :class:`SimpleITKReader` (MONAI's RAS affine either way), and header checks that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from scripts.data import DatasetError, natural_key

__all__ = ["SITK_SUFFIXES", "VOLUME_SUFFIXES", "volume_stem", "dicom_series", "SimpleITKReader", "check_pair"]

SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
VOLUME_SUFFIXES = (".nii.gz", ".nii") + SITK_SUFFIXES
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
        key=lambda p: natural_key(p.name),
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
    SimpleITK. Arrays come in (x, y, z) order with MONAI's RAS affine, as ``NibabelReader`` gives them.
    Not MONAI's ``ITKReader``: that needs the ``itk`` package; SimpleITK is the lighter, pinned dependency."""

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
