"""REFUGE2 optic disc + cup (``--classes disc_cup``, the 2D half of multi-class): the released gray disc maps
(255 background, 128 disc, 0 cup) -> class indices 0/1/2, PNG label maps holding 0/1/2, per-class probability PNGs,
per-class Dice / IoU / HD95, and a short run of the bundle on the generated REFUGE2 demo data (both training stages,
evaluation, inference) as users type it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_bundle
from monai.data import MetaTensor, decollate_batch
from PIL import Image

from scripts.bundle_config import parse_configs
from scripts.classes import get_class_set
from scripts.data import DatasetError, mask_to_target
from scripts.handlers import CaseFigures
from scripts.io_utils import SaveMaskd
from scripts.metrics import class_scores
from scripts.transforms import MaskToTargetd, unpad_collated

DISC_CUP = get_class_set("disc_cup")


def _mask(values, name="masks/g0001.png", channels=3) -> MetaTensor:
    x = torch.as_tensor(values, dtype=torch.float32)[None].expand(channels, -1, -1).clone()
    return MetaTensor(x, meta={"filename_or_obj": name})


def test_released_gray_levels_become_background_disc_cup_and_binary_stays_the_cup():
    gray = [[255, 128, 0], [0, 128, 255]]
    index = MaskToTargetd("label", "refuge2", classes="disc_cup")({"label": _mask(gray)})["label"]
    assert index.shape == (1, 2, 3) and index.tolist() == [[[0, 1, 2], [2, 1, 0]]]
    assert index.meta["filename_or_obj"] == "masks/g0001.png"  # kept: evaluation crops padded labels by it
    binary = MaskToTargetd("label", "refuge2")({"label": _mask(gray)})["label"]  # the paper: cup only, as before
    assert torch.equal(binary, mask_to_target(_mask(gray), "refuge_cup"))
    assert binary.tolist() == [[[0, 0, 1], [1, 0, 0]]]
    assert DISC_CUP.names == ("background", "optic_disc", "optic_cup") and DISC_CUP.values == (0, 1, 2)


@pytest.mark.parametrize(
    "mask, message",
    [
        ([[255, 128, 64]], r"masks/g0001.png: label value\(s\) \[64.0\] are not in --classes disc_cup"),
        ([[0, 1, 2]], r"masks/g0001.png: label value\(s\) \[1.0, 2.0\] are not in --classes disc_cup"),  # 0/1/2 maps
    ],
)
def test_bad_mask_values_fail_naming_file_value_and_classes(mask, message):
    with pytest.raises(DatasetError, match=message + r" \(allowed: \[0, 128, 255\]\); REFUGE2 gray disc maps"):
        MaskToTargetd("label", "refuge2", classes="disc_cup")({"label": _mask(mask)})


def test_label_maps_as_monai_label_saves_them_are_read_with_masks_hold_label_values():
    """MONAI Label's datastore holds 0/1/2 label maps: refused by default (the error says which switch reads them),
    read as background / disc / cup with ``--masks_hold_label_values True``, which then refuses the gray levels."""
    labels = [[0, 1, 2], [2, 1, 0]]
    with pytest.raises(DatasetError, match=r"\[1.0, 2.0\] are not in .*--masks_hold_label_values True"):
        MaskToTargetd("label", "refuge2", classes="disc_cup")({"label": _mask(labels)})
    read = MaskToTargetd("label", "refuge2", classes="disc_cup", label_values=True)
    assert read({"label": _mask(labels)})["label"].tolist() == [labels]
    with pytest.raises(
        DatasetError,
        match=r"label value\(s\) \[128.0, 255.0\] are not in --classes disc_cup " r"\(allowed: \[0, 1, 2\]\)$",
    ):
        read({"label": _mask([[255, 128, 0]])})
    binary = MaskToTargetd("label", "refuge2", label_values=True)({"label": _mask([[255, 128, 0]])})["label"]
    assert binary.tolist() == [[[0, 0, 1]]]  # binary ignores it (the dataset's own rule)
    for config in (["train.yaml"], ["inference.yaml", "evaluate.yaml"]):  # the key reaches the transform
        parser = parse_configs(
            [*config, "tiny.yaml"], classes="disc_cup", dataset="refuge2", masks_hold_label_values=True
        )
        key = "train#load_transforms" if config == ["train.yaml"] else "load_transforms"
        found = [t for t in parser.get_parsed_content(key) if isinstance(t, MaskToTargetd)]
        assert found and all(t.label_values for t in found), config


def test_colour_mask_and_other_dataset_are_refused():
    rgb = _mask([[255, 128, 0]])
    rgb[1, 0, 0] = 0
    with pytest.raises(DatasetError, match=r"masks/g0001.png: a colour \(RGB\) mask; --classes disc_cup reads gray"):
        MaskToTargetd("label", "refuge2", classes="disc_cup")({"label": rgb})
    with pytest.raises(ValueError, match="--classes disc_cup is for the refuge2 dataset, not 'kvasir'"):
        MaskToTargetd("label", "kvasir", classes="disc_cup")


def test_swapped_disc_and_cup_get_swapped_dice(tmp_path):
    names = DISC_CUP.names
    label = torch.zeros(1, 16, 16)
    label[0, 2:14, 2:14], label[0, 6:9, 6:9] = 1, 2  # disc rim 135 px, cup 9 px
    swapped = label.clone()
    swapped[label == 1], swapped[label == 2] = 2, 1
    right, wrong = class_scores(label, label, names), class_scores(swapped, label, names)
    assert right["dice_optic_disc"] == right["dice_optic_cup"] == 1 == right["dice"]
    assert wrong["dice_optic_disc"] == wrong["dice_optic_cup"] == 0 == wrong["dice"]
    half = label.clone()
    half[0, 6:9, 6:9] = 1  # cup missed (called disc): disc Dice 135 * 2 / (135 + 144), cup 0
    s = class_scores(half, label, names)
    assert s["dice_optic_cup"] == 0 and s["dice_optic_disc"] == pytest.approx(270 / 279)
    # the evaluation figure's caption too (a binary Dice of disc + cup against disc + cup would say 1)
    figures = CaseFigures(str(tmp_path), num_cases=2)
    figures.reset()
    score = torch.nn.functional.one_hot(swapped[0].long(), 3).permute(2, 0, 1).float()
    for pred in (label, swapped):
        image = MetaTensor(torch.zeros(3, 16, 16), meta={"filename_or_obj": "T0001.png"})
        figures.add({"image": image, "label": label, "pred": pred, "score": score})
    assert [c["dice"] for c in figures.cases] == [1, 0] and figures.cases[0]["label"].max() == 1
    figures.completed(None)
    assert (tmp_path / "cases.png").is_file()


def test_label_map_png_holds_the_label_values_and_scores_one_png_per_class(tmp_path):
    index = torch.tensor([[[0, 1, 2, 2], [1, 1, 0, 0]]], dtype=torch.float32)
    probs = torch.nn.functional.one_hot(index[0].long(), 3).permute(2, 0, 1).float()
    image = MetaTensor(torch.zeros(3, 2, 4), meta={"filename_or_obj": "/data/T0001.png"})
    SaveMaskd("pred", str(tmp_path), values=DISC_CUP.values)({"image": image, "pred": index})
    SaveMaskd("score", str(tmp_path / "scores"), class_names=DISC_CUP.names)({"image": image, "score": probs})
    png = np.asarray(Image.open(tmp_path / "T0001.png"))
    assert png.dtype == np.uint8 and png.tolist() == [[0, 1, 2, 2], [1, 1, 0, 0]]
    for c, name in enumerate(DISC_CUP.names):
        score = np.asarray(Image.open(tmp_path / "scores" / f"T0001_{name}.png"))
        assert np.array_equal(score, (index[0].numpy() == c) * 255)
    with pytest.raises(ValueError, match=r"expected a \(3, H, W\) map"):
        SaveMaskd("score", str(tmp_path), class_names=DISC_CUP.names)({"image": image, "score": probs[:1]})


def _with_odd_sized_test_case(demo_root, dest):
    """A copy of the REFUGE2 demo set whose first test pair is resized to 120 x 136 (the mask nearest-neighbour)."""
    shutil.copytree(demo_root / "refuge2", dest)
    name = sorted(p.name for p in (dest / "images").glob("T*.png"))[0]
    for sub, resample in (("images", Image.BILINEAR), ("masks", Image.NEAREST)):
        with Image.open(dest / sub / name) as im:
            small = im.resize((136, 120), resample)
        small.save(dest / sub / name)
    return dest, name


def test_evaluation_reads_the_test_masks_as_class_indices_at_their_own_size(demo_root, tmp_path):
    """evaluate.yaml's label chain with --classes disc_cup: cup where the file holds 0, disc where 128; labels of
    different sizes batched together come back at their own size (the class-index label keeps its metadata)."""
    data, odd = _with_odd_sized_test_case(demo_root, tmp_path / "refuge2")
    parser = parse_configs(
        ["inference.yaml", "evaluate.yaml", "tiny.yaml"],
        dataset="refuge2",
        dataset_dir=str(data),
        classes="disc_cup",
        num_workers=0,
        device="cpu",
        batch_size=3,
    )
    batch = next(iter(parser.get_parsed_content("infer#dataloader")))
    items = [unpad_collated(d) for d in decollate_batch(batch)]
    assert Path(items[0]["label"].meta["filename_or_obj"]).name == odd
    for item in items:
        gray = np.asarray(Image.open(item["label"].meta["filename_or_obj"]))
        assert item["label"].shape == (1, *gray.shape)  # its own size (PIL, reverse_indexing off)
        lab = item["label"][0].numpy()
        assert np.array_equal(lab == 2, gray == 0) and np.array_equal(lab == 1, gray == 128) and (lab == 2).any()
    assert items[0]["label"].shape == (1, 120, 136) and items[1]["label"].shape == (1, 160, 160)
    report = parser.get_parsed_content("report")
    assert report.hd95 and report.class_names == DISC_CUP.names


# ---- the bundle, as users run it ------------------------------------------------------------------
AE = ["train.yaml", "train_autoencoder.yaml", "tiny.yaml"]
TRAIN = ["train.yaml", "tiny.yaml"]
EVAL = ["inference.yaml", "evaluate.yaml", "tiny.yaml"]
INFER = ["inference.yaml", "tiny.yaml"]


def _common(root, data, dataset="refuge2"):
    return ["--bundle_root", str(root), "--dataset", dataset, "--dataset_dir", str(data), "--classes", "disc_cup"]


def test_disc_cup_run_trains_evaluates_and_infers_label_maps(demo_root, tmp_path):
    root, (data, _) = tmp_path, _with_odd_sized_test_case(demo_root, tmp_path / "refuge2")  # mixed sizes evaluate
    common = [*_common(root, data), "--image_size", "32", "--num_workers", "0"]
    run_bundle("training", AE, root, *common, "--autoencoder_max_iterations", "2", "--autoencoder_val_interval", "2")
    run_bundle("training", TRAIN, root, *common, "--max_iterations", "2", "--val_interval", "2", "--batch_size", "4")
    ckpt = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["_extra_state"]["mask_codec"] == "onehot:disc_cup"  # the default encoding
    proc = run_bundle("evaluate", EVAL, root, *common, "--save_score", "True")
    rows = (root / "eval" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:4] == ["name", "dice", "iou", "hd95"]
    assert {f"{m}_{c}" for m in ("dice", "iou", "hd95") for c in ("optic_disc", "optic_cup")} <= set(header)
    tests = sorted(p.stem for p in (data / "images").glob("T*.png"))
    assert len(rows) == 1 + len(tests) and f"{len(tests)} cases: dice" in proc.stdout
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert {"dice_optic_disc", "dice_optic_cup", "hd95_optic_cup", "organ_mean_dice"} <= set(summary)
    for name in tests:
        mask = np.asarray(Image.open(root / "eval" / "masks" / f"{name}.png"))
        assert mask.shape == np.asarray(Image.open(data / "masks" / f"{name}.png")).shape
        assert set(np.unique(mask).tolist()) <= {0, 1, 2}  # label values, not 0/255
        for c in DISC_CUP.names:
            assert (root / "eval" / "masks" / "scores" / f"{name}_{c}.png").is_file()
    out = root / "infer"
    run_bundle("inference", INFER, root, *common, "--input_dir", str(data / "images"), "--output_dir", str(out))
    written = sorted(out.glob("*.png"))
    assert len(written) == len(list((data / "images").glob("*.png")))
    assert set(np.unique(np.asarray(Image.open(written[0]))).tolist()) <= {0, 1, 2}


def test_disc_cup_bundle_fails_clearly_on_other_datasets_and_bad_masks(demo_root, tmp_path):
    with pytest.raises(AssertionError, match="--classes disc_cup is for the refuge2 dataset, not 'kvasir'"):
        run_bundle("training", AE, tmp_path, *_common(tmp_path, demo_root / "kvasir", "kvasir"))
    with pytest.raises(AssertionError, match="--classes disc_cup is for the refuge2 dataset, not 'kvasir'"):
        run_bundle("inference", INFER, tmp_path, *_common(tmp_path, demo_root / "kvasir", "kvasir"))
    bad = tmp_path / "bad"
    shutil.copytree(demo_root / "refuge2", bad)
    victim = sorted((bad / "masks").glob("g*.png"))[0]
    gray = np.asarray(Image.open(victim)).copy()
    gray[0, 0] = 64
    Image.fromarray(gray).save(victim)
    message = rf"{victim.name}: label value\(s\) \[64.0\] are not in --classes disc_cup"
    with pytest.raises(AssertionError, match=message):
        run_bundle("training", AE, tmp_path, *_common(tmp_path, bad), "--num_workers", "0")


def test_demo_classes_disc_cup_runs_the_2d_refuge2_job():
    from scripts.tools import demo

    steps = demo.steps(demo._parser().parse_args(["--classes", "disc_cup", "--n", "30"]))
    assert steps[0][1][-2:] == ["--n", "30"]  # 2D demo data, not --3d
    for name, cmd in steps[1:]:
        text = " ".join(cmd)
        assert "ct.yaml" not in text and "--dataset refuge2 --classes disc_cup" in text, name
    with pytest.raises(SystemExit, match="--classes disc_cup runs the refuge2 demo"):
        demo.main(["--classes", "disc_cup", "--dataset", "kvasir"])
