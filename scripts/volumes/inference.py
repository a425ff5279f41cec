"""Volume inference: a 2D inferer run on batches of axial slices, and the atomic NIfTI writer."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.inferers import Inferer
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey, MetaKeys, convert_to_dst_type

from scripts.io_utils import atomic_path
from scripts.volumes.reading import volume_stem

__all__ = ["VolumeInferer", "SaveVolumed"]


class VolumeInferer(Inferer):
    """Run a 2D ``inferer`` on volumes (B, C, H, W, D): axial slices go through it in batches of
    ``batch_size`` and the outputs are restacked in slice order as (B, C', H, W, D). 2D inputs (B, C, H, W)
    pass straight through, so the same wiring serves 2D and 3D datasets.
    Not MONAI's ``SliceInferer``: that runs a network (not an inferer such as SDSeg's sampler) through the
    sliding-window machinery, one window copy and importance map per slice; here whole slices are batched."""

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
    (``dtype="float32"``) as float32. ``values`` maps class indices to label values (multi-class masks: BTCV ids).
    A float map of C > 1 channels (per-class probabilities) is written as a 4D NIfTI (H, W, D, C).

    Not MONAI's ``SaveImaged``: its ``NibabelWriter`` writes straight to the target file (no temporary renamed over
    it, :func:`scripts.io_utils.atomic_path`) and builds a new header without the input's qform/sform codes.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        name_key: str = "image",
        dtype: str = "uint8",
        allow_missing_keys=False,
        values: list[int] | None = None,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.name_key, self.dtype = Path(output_dir), name_key, np.dtype(dtype)
        self.values = None if values is None else np.asarray(values)

    def __call__(self, data):
        d = dict(data)
        meta = d[self.name_key].meta
        source = str(meta[ImageMetaKey.FILENAME_OR_OBJ])
        affine = np.asarray(meta[MetaKeys.ORIGINAL_AFFINE], dtype=np.float64)
        shape = tuple(int(s) for s in meta[MetaKeys.SPATIAL_SHAPE])
        header = nib.load(source).header.copy() if source.lower().endswith((".nii", ".nii.gz")) else None
        for key in self.key_iterator(d):
            value = torch.as_tensor(d[key]).detach().float().cpu().numpy()
            channels = 1 if self.dtype.kind in "iu" else value.shape[0]
            if value.ndim != 4 or value.shape[0] != channels or value.shape[1:] != shape:
                raise ValueError(f"{key} for {source}: expected a ({channels}, *{shape}) volume, got {value.shape}")
            if self.dtype.kind in "iu":
                index = np.round(value[0]).astype(np.int64)
                array = (index if self.values is None else self.values[index]).astype(self.dtype)
            else:
                array = (value[0] if channels == 1 else np.moveaxis(value, 0, -1)).astype(self.dtype)
            img = nib.Nifti1Image(array, affine, header)
            img.set_data_dtype(self.dtype)
            img.header.set_slope_inter(1.0, 0.0)
            with atomic_path(self.output_dir / f"{volume_stem(source)}.nii.gz") as tmp:
                tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
        return d
