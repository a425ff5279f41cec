"""The bundle's own dictionary transforms beside MONAI's, each for a job MONAI's does differently.

* :class:`LoadImaged`: MONAI's ``LoadImaged``, every read error naming its file (2D images and 3D volumes).
* :class:`MaskToTargetd`: a dataset's mask -> binary target, by its rule (:func:`scripts.data.mask_to_target`), or
  class indices of a multi-class ``--classes`` (REFUGE2 ``disc_cup``).
* :func:`unpad_collated`: undo ``PadListDataCollate(method="end")`` exactly (MONAI's inverse centre-crops).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged as _LoadImaged
from monai.transforms import MapTransform
from monai.utils import TraceKeys, convert_to_dst_type

from scripts.classes import get_class_set
from scripts.data import LAYOUTS, DatasetError, mask_to_target

__all__ = ["LoadImaged", "MaskToTargetd", "unpad_collated"]


class LoadImaged(_LoadImaged):
    """MONAI's ``LoadImaged`` (same arguments), with every read error naming its file. MONAI names the file when
    no reader opens it (in a long list of every reader's traceback), but not when the data turn out truncated or
    corrupt while being read (``EOFError`` from a cut ``.nii.gz``); here any read error becomes a
    :class:`DatasetError` ``"<file>: cannot be read (<the reader's error>)"``. On an error (only then) each file is
    read again with the reader MONAI picks first for it, to find which one failed and why.
    """

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as e:
            for key in self.key_iterator(dict(data)):
                cause = self._read_error(data[key], reader)
                if isinstance(cause, DatasetError):
                    raise cause from e
                if cause is not None:
                    raise DatasetError(f"{data[key]}: cannot be read ({type(cause).__name__}: {cause})") from e
            raise

    def _read_error(self, filename, reader=None) -> Exception | None:
        for r in [reader] if reader is not None else self._loader.readers[::-1]:
            if reader is not None or r.verify_suffix(filename):
                try:
                    r.get_data(r.read(filename))
                except Exception as e:
                    return e
                return None
        return None


class MaskToTargetd(MapTransform):
    """Dictionary transform: replace the mask under ``keys`` by the dataset's target: binary (float 0/1, by the
    dataset's rule, :func:`scripts.data.mask_to_target`) or, for a multi-class ``classes`` (REFUGE2 ``disc_cup``), the
    class indices 0..C-1 (float, (1, H, W)) of a gray mask's values (:meth:`scripts.classes.ClassSet.to_index`).

    Multi-class masks must be gray (equal channels) and hold only the class set's mask values (``label_values=True``:
    its label values, e.g. 0/1/2 for ``disc_cup``, as the bundle's and MONAI Label's label maps hold them; binary
    ignores it); anything else fails naming the file, the value(s) and the ``--classes`` in force. A class set meant
    for another dataset fails here, when the transform is built (before any training).
    """

    def __init__(
        self,
        keys: KeysCollection,
        dataset: str,
        allow_missing_keys: bool = False,
        classes: str = "binary",
        label_values: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.label_values = bool(label_values)
        if dataset not in LAYOUTS:
            raise DatasetError(f"unknown 2D dataset {dataset!r}; choose one of {sorted(LAYOUTS)}")
        self.class_set = get_class_set(classes)
        self.class_set.check_dataset(dataset)
        self.rule = LAYOUTS[dataset][2]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = torch.as_tensor(d[key])
            if self.class_set.binary:
                d[key] = mask_to_target(mask, self.rule)
                continue
            where = str(getattr(d[key], "meta", {}).get("filename_or_obj", "<mask>"))
            if mask.shape[0] > 1 and bool((mask[1:] != mask[:1]).any()):
                raise DatasetError(
                    f"{where}: a colour (RGB) mask; --classes {self.class_set.name} reads gray masks with the values "
                    f"{list(self.class_set.mask_reads(self.label_values))} for {', '.join(self.class_set.names)}"
                )
            index = self.class_set.to_index(mask[:1], where, self.label_values)
            d[key] = convert_to_dst_type(index, mask[:1], dtype=torch.float32)[0]  # a MetaTensor keeps its meta
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
