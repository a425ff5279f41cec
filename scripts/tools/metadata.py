"""The metadata.json of a multi-class bundle, built from ``configs/metadata.json`` and the class set.

    python -m scripts.tools.metadata --classes all13 --out configs/metadata_all13.json
    python -m monai.bundle run inference --meta_file configs/metadata_all13.json --config_file ... --classes all13

``configs/metadata.json`` describes the binary bundle (one score channel). With ``--classes`` (all13, transunet8,
disc_cup) the network outputs C class probabilities: ``network_data_format.outputs.pred`` gets ``num_channels`` C and
``channel_def`` {channel: class name} (:meth:`scripts.classes.ClassSet.channel_def`, as the zoo's
swin_unetr_btcv_segmentation names its 14 outputs), ``post_processed_outputs.pred`` the label map the bundle writes,
and ``task`` / ``label_classes`` / ``pred_classes`` say what each label value means
(:meth:`~scripts.classes.ClassSet.label_def`: "6 liver"). The input is described for the class set's dataset
(BTCV: CT slices). The binary figure of ``eval_metrics`` is dropped (no multi-class figure is claimed). The rest
(versions, changelog, references) is copied from the base file, so the generated file follows it: it is written on
demand, not shipped. ``--classes binary`` writes the base file unchanged. Check a result with
``python -m scripts.tools.bundle_check --metadata FILE --classes NAME``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from scripts.classes import get_class_set
from scripts.io_utils import atomic_path
from scripts.volumes.datalist import DATASETS

__all__ = ["INPUTS", "multiclass_metadata", "class_text", "main"]


def _ct_input(window: tuple[int, int]) -> dict:
    return {
        "modality": "CT",
        "channel_def": {"0": "CT", "1": "CT (copy)", "2": "CT (copy)"},
        "image_classes": f"axial CT slice, HU clipped to [{window[0]}, {window[1]}] and scaled to [-1, 1], resized to "
        "the preset's size (256 px for the paper preset), repeated to 3 channels",
        "data_type": "nifti/mha/nrrd/dicom volumes (configs/ct.yaml), segmented slice by slice",
        "label_shape": ["*", "*", "*"],  # the written label map: on the input volume's grid
    }


# the network input for the dataset a class set is for, where it is not the base file's RGB image
INPUTS = {"btcv": _ct_input(DATASETS["btcv"]["window"])}


def class_text(class_set) -> str:
    """``0 background, 1 spleen, ...``: each label value and its class (label value order)."""
    return ", ".join(f"{value} {name}" for value, name in class_set.label_def().items())


def multiclass_metadata(base: dict, classes: str) -> dict:
    """``base`` (configs/metadata.json's content) rewritten for ``--classes classes``; binary: ``base`` unchanged."""
    class_set, meta = get_class_set(classes), copy.deepcopy(base)
    if class_set.binary:
        return meta
    c, values, dataset = class_set.num_classes, class_text(class_set), "/".join(class_set.datasets)
    dropped = (
        f"; BTCV ids {', '.join(map(str, class_set.background_values))} are read as background (0)"
        if class_set.background_values
        else ""
    )
    meta["task"] = (
        f"Multi-class segmentation ({c - 1} classes, --classes {class_set.name}, {dataset}) with a latent diffusion "
        "model and a single-step reverse process"
    )
    meta["description"] += (
        f" Multi-class (--classes {class_set.name}): masks reach the mask autoencoder as --mask_encoding says "
        "(one-hot C channels by default, or colour-coded 3 channels) and its decoded output gives C class "
        "probabilities, one pass per image; the prediction is their argmax, written as the class's label value."
    )
    meta["label_classes"] = f"single channel label map, value = class: {values}{dropped}"
    meta["pred_classes"] = (
        f"{c} channels of class probabilities (channel i = class i of: {', '.join(class_set.names)}); after argmax, "
        f"a single channel label map, value = class: {values}"
    )
    meta.pop("eval_metrics", None)
    fmt = meta["network_data_format"]
    given = INPUTS.get(class_set.datasets[0] if class_set.datasets else "", {})
    for key in ("image_classes", "data_type"):
        if key in given:
            meta[key] = given[key]
    fmt["inputs"]["image"].update({k: given[k] for k in ("modality", "channel_def") if k in given})
    pred = fmt["outputs"]["pred"]
    pred.update(num_channels=c, channel_def=class_set.channel_def())
    fmt["post_processed_outputs"] = {
        "pred": {
            "type": "image",
            "format": "labels",
            "num_channels": 1,
            "spatial_shape": given.get("label_shape", ["*", "*"]),  # the input's own size (Invertd)
            "dtype": "uint8",
            "value_range": [0, max(class_set.values)],
            "is_patch_data": False,
            "channel_def": {"0": f"label value ({values})"},
        }
    }
    return meta


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m scripts.tools.metadata", description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", required=True, help="all13 | transunet8 | disc_cup (binary: the base, unchanged)")
    p.add_argument("--base", default="configs/metadata.json", help="default: configs/metadata.json")
    p.add_argument("--out", required=True, help="the metadata file to write, e.g. configs/metadata_all13.json")
    args = p.parse_args(argv)
    meta = multiclass_metadata(json.loads(Path(args.base).read_text()), args.classes)
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=4) + "\n")
    print(
        f"wrote {args.out} (--classes {args.classes}: {meta['network_data_format']['outputs']['pred']['channel_def']})"
    )
    return Path(args.out)


if __name__ == "__main__":
    main()
