"""The class sets of ``--classes``: one definition (names, label values, colours) that the data transforms, the mask
codec (:mod:`scripts.mask_codec`), the metrics, the writers and the metadata read.

* ``binary`` (default, any dataset): 0 background, 1 foreground by the dataset's own rule (paper; ``--foreground``);
* ``all13`` (btcv): 0 background, 1..13 the BTCV organs with their BTCV ids;
* ``transunet8`` (btcv): the authors' 8 organs, keeping their BTCV ids (1 2 3 4 6 7 8 11); 5 9 10 12 13 -> background;
* ``disc_cup`` (refuge2, 2D): 0 background, 1 optic disc (rim), 2 optic cup, read from the released gray disc maps
  (255 background, 128 disc, 0 cup: :attr:`ClassSet.mask_values`); masks holding 0/1/2 already are refused (0 would
  be cup in a released map, background in an index map), as are RGB masks and any other gray level.

A label voxel is mapped to its class index 0..C-1 (:meth:`ClassSet.to_index`, reading :attr:`ClassSet.mask_values`
where the masks encode the classes otherwise, else :attr:`ClassSet.values`); a value outside the set is an error
naming the file, the value and the ``--classes`` in force. Predictions are class indices, written back as label
values (:attr:`ClassSet.values`: NIfTI voxels in 3D, PNG pixels in 2D). :meth:`ClassSet.channel_def` (class index ->
name) and :meth:`ClassSet.label_def` (label value -> name) name them in metadata.json
(``python -m scripts.tools.metadata``) and in exported models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scripts.data import DatasetError

__all__ = ["ClassSet", "CLASS_SETS", "get_class_set", "PALETTE"]

BTCV_ORGANS = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
)

# RGB codes in [-1, 1]^3 for the 3-channel "maskige" (GSS) encoding: background black, then the 7 other corners of
# the cube (2 apart), then the 6 face centres: any two of the first 14 are at least sqrt(2) apart
PALETTE = (
    (-1, -1, -1),
    (1, 1, 1),
    (1, -1, -1),
    (-1, 1, -1),
    (-1, -1, 1),
    (1, 1, -1),
    (1, -1, 1),
    (-1, 1, 1),
    (1, 0, 0),
    (0, 1, 0),
    (0, 0, 1),
    (-1, 0, 0),
    (0, -1, 0),
    (0, 0, -1),
)


@dataclass(frozen=True)
class ClassSet:
    """One ``--classes`` choice. ``values[i]`` is the label value of class index ``i`` (0: background);
    ``background_values`` are other label values that count as background (``transunet8``'s dropped organs);
    ``mask_values[i]``, when given, is the value the dataset's masks hold for class ``i`` (REFUGE2's gray levels), read
    in place of ``values`` (which the written predictions hold)."""

    name: str
    names: tuple[str, ...]
    values: tuple[int, ...]
    datasets: tuple[str, ...] = ()
    background_values: tuple[int, ...] = ()
    mask_values: tuple[int, ...] = ()
    mask_hint: str = ""  # appended to the error on a mask value outside the set

    @property
    def binary(self) -> bool:
        return self.name == "binary"

    @property
    def num_classes(self) -> int:
        """C, background included."""
        return len(self.names)

    @property
    def organs(self) -> tuple[str, ...]:
        """The foreground class names (indices 1..C-1)."""
        return self.names[1:]

    @property
    def colours(self) -> torch.Tensor:
        """(C, 3) RGB codes in [-1, 1] for the 3-channel encoding (:data:`PALETTE`)."""
        return torch.tensor(PALETTE[: self.num_classes], dtype=torch.float32)

    def check_dataset(self, dataset: str) -> None:
        if self.datasets and dataset not in self.datasets:
            raise ValueError(
                f"--classes {self.name} is for the {'/'.join(self.datasets)} dataset, not {dataset!r} "
                "(use --classes binary)"
            )

    def mask_reads(self, label_values: bool = False) -> tuple[int, ...]:
        """The mask value read as each class: the dataset's :attr:`mask_values` (or :attr:`values`);
        ``label_values=True``: always :attr:`values`."""
        return self.values if label_values else (self.mask_values or self.values)

    def to_index(self, label: torch.Tensor, where: str = "<label>", label_values: bool = False) -> torch.Tensor:
        """Mask values (the dataset's :attr:`mask_values`, or :attr:`values`; ``label_values=True``: always
        :attr:`values`, the label maps the bundle and MONAI Label write) -> class indices (float, same shape); a value
        outside the set fails naming ``where``."""
        y = label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)
        read = self.mask_reads(label_values)
        hint = "" if label_values else self.mask_hint
        known = torch.tensor(read + self.background_values, dtype=y.dtype)
        values = torch.unique(y)
        bad = values[~torch.isin(values, known)]
        if bad.numel():
            raise DatasetError(
                f"{where}: label value(s) {bad[:5].tolist()} are not in --classes {self.name} "
                f"(allowed: {sorted(read + self.background_values)}){'; ' + hint if hint else ''}"
            )
        lut = torch.zeros(int(max(known.max().item(), 0)) + 1, dtype=torch.float32)
        for i, v in enumerate(read):
            lut[int(v)] = i
        return lut[y.long()]

    def channel_def(self) -> dict[str, str]:
        """Output channel (class index) -> class name: the model zoo's ``channel_def`` of the C per-class outputs."""
        return {str(i): name for i, name in enumerate(self.names)}

    def label_def(self) -> dict[str, str]:
        """Label value -> class name: what each value of a written label map (or an exported model's) means. The
        same as :meth:`channel_def` except where values skip (``transunet8``: liver is channel 5, value 6)."""
        return {str(v): name for v, name in zip(self.values, self.names)}

    def to_values(self, index: torch.Tensor) -> torch.Tensor:
        """Class indices -> label values (same shape, the input's dtype)."""
        lut = torch.tensor(self.values, dtype=index.dtype, device=index.device)
        return lut[index.long()]


TRANSUNET8_IDS = (1, 2, 3, 4, 6, 7, 8, 11)
CLASS_SETS = {
    "binary": ClassSet("binary", ("background", "foreground"), (0, 1)),
    "all13": ClassSet("all13", ("background", *BTCV_ORGANS), tuple(range(14)), ("btcv",)),
    "transunet8": ClassSet(
        "transunet8",
        ("background", *(BTCV_ORGANS[i - 1] for i in TRANSUNET8_IDS)),
        (0, *TRANSUNET8_IDS),
        ("btcv",),
        background_values=tuple(i for i in range(1, 14) if i not in TRANSUNET8_IDS),
    ),
    "disc_cup": ClassSet(
        "disc_cup",
        ("background", "optic_disc", "optic_cup"),
        (0, 1, 2),
        ("refuge2",),
        mask_values=(255, 128, 0),
        mask_hint="REFUGE2 gray disc maps: 255 background, 128 optic disc, 0 optic cup (0 would be cup in a released "
        "map, background in a 0/1/2 label map: masks that are 0/1/2 label maps, as MONAI Label saves them, need "
        "--masks_hold_label_values True)",
    ),
}


def get_class_set(name: str | ClassSet) -> ClassSet:
    """The :class:`ClassSet` called ``name``; an unknown name fails listing the choices."""
    if isinstance(name, ClassSet):
        return name
    if name not in CLASS_SETS:
        raise ValueError(f"unknown --classes {name!r}; choose one of {', '.join(CLASS_SETS)}")
    return CLASS_SETS[name]
