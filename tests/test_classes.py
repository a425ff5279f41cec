"""Multi-class SDSeg (--classes): the class sets, label values -> class indices and back, the mask codecs, per-organ
metrics, and a short multi-class run of the bundle on the demo volumes (train both stages, evaluate, infer)."""

import json
import logging
import re
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import build_tiny_sdseg, input_dependent_tiny_sdseg, run_bundle
from monai.transforms import Compose

from scripts.autoencoder import kl_autoencoder
from scripts.classes import CLASS_SETS, get_class_set
from scripts.data import DatasetError
from scripts.engine import AutoencoderTrainStep, SDSegTrainStep
from scripts.handlers import SegmentationReport
from scripts.mask_codec import BinaryCodec, ColourCodec, OneHotCodec, make_codec
from scripts.metrics import OrganDiceMetric, class_scores
from scripts.networks import ae_output_to_score, mask_to_ae_input
from scripts.volumes.cache import LoadCachedd, VolumeCacheDataset
from scripts.volumes.transforms import ClassIndexd, volume_transforms


def test_unknown_classes_and_encoding_fail_listing_the_choices():
    with pytest.raises(
        ValueError, match="unknown --classes 'all14'; choose one of binary, all13, transunet8, disc_cup"
    ):
        make_codec("all14")
    with pytest.raises(ValueError, match="unknown --mask_encoding 'rgb'; choose one of onehot, colour"):
        make_codec("all13", "rgb")
    with pytest.raises(ValueError, match="--classes all13 is for the btcv dataset, not 'sts3d'"):
        volume_transforms("sts3d", (-100, 1100), 32, classes="all13")


def test_class_sets_keep_btcv_ids_and_distinct_colours():
    all13, tu8 = get_class_set("all13"), get_class_set("transunet8")
    assert all13.values == tuple(range(14)) and all13.names[6] == "liver" and all13.names[12] == "adrenal_gland_right"
    assert tu8.values == (0, 1, 2, 3, 4, 6, 7, 8, 11) and tu8.names[5] == "liver" and tu8.names[8] == "pancreas"
    for c in CLASS_SETS.values():
        colours = c.colours
        assert colours.shape == (c.num_classes, 3) and colours.abs().max() <= 1
        d = torch.cdist(colours, colours) + 9 * torch.eye(c.num_classes)
        assert float(d.min()) >= 2**0.5 - 1e-6  # every two codes well apart


def test_channel_def_names_channels_and_label_def_names_label_values():
    """The zoo's channel_def (output channel -> class) and the label-map key (value -> class), one source."""
    all13, tu8 = get_class_set("all13"), get_class_set("transunet8")
    assert all13.channel_def() == all13.label_def()  # BTCV ids are the channels
    assert all13.channel_def()["0"] == "background" and all13.channel_def()["13"] == "adrenal_gland_left"
    assert len(all13.channel_def()) == 14
    assert tu8.channel_def()["5"] == "liver" == tu8.label_def()["6"] and tu8.label_def()["11"] == "pancreas"
    assert list(tu8.label_def()) == ["0", "1", "2", "3", "4", "6", "7", "8", "11"]
    assert get_class_set("disc_cup").label_def() == {"0": "background", "1": "optic_disc", "2": "optic_cup"}


def test_label_values_map_to_classes_and_back_and_bad_values_name_the_file():
    label = torch.tensor([[0, 1, 5, 6, 11, 13]], dtype=torch.float32)
    for name in ("all13", "transunet8"):
        c = get_class_set(name)
        index = c.to_index(label, "label0007.nii.gz")
        back = c.to_values(index)
        kept = torch.isin(label, torch.tensor(c.values, dtype=label.dtype))
        assert torch.equal(back[kept], label[kept]) and not back[~kept].any()  # dropped organs -> background
    assert get_class_set("transunet8").to_index(label).tolist() == [[0, 1, 0, 5, 8, 0]]
    with pytest.raises(DatasetError, match=r"label0007.nii.gz: label value\(s\) \[14.0\] are not in --classes all13"):
        get_class_set("all13").to_index(torch.tensor([0.0, 14.0]), "label0007.nii.gz")
    with pytest.raises(DatasetError, match=r"label value\(s\) \[2.5\] are not in --classes transunet8"):
        ClassIndexd("label", "transunet8")({"label": torch.tensor([[0.0, 2.5]])})


@pytest.mark.parametrize("codec", [OneHotCodec("all13"), ColourCodec("all13"), ColourCodec("transunet8")])
def test_codecs_round_trip_class_indices(codec):
    mask = torch.randint(0, codec.class_set.num_classes, (2, 1, 8, 8)).float()
    x = codec.encode(mask)
    assert x.shape == (2, codec.channels, 8, 8) and x.min() >= -1 and x.max() <= 1
    p = codec.decode(x + 0.2 * torch.randn_like(x).clamp(-1, 1))  # a reconstruction off by up to 0.2 per channel
    assert p.shape == (2, codec.class_set.num_classes, 8, 8) and torch.allclose(p.sum(1), torch.ones(2, 8, 8))
    assert torch.equal(p.argmax(1, keepdim=True).float(), mask)


class _FixedDecoderOutput(torch.nn.Module):
    """An "autoencoder" whose reconstruction is a fixed, trainable X: the gradient each loss puts on X is visible."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = torch.nn.Parameter(x.clone())

    def forward(self, inputs):
        n = inputs.shape[0]
        return self.x, torch.zeros(n, 1, 2, 2), torch.ones(n, 1, 2, 2)


def _one_step(network, step, image, mask, seed: int = 0) -> tuple[dict, dict]:
    """One ``iteration_update`` of ``network`` (SGD at lr 0: weights kept) on one batch; its outputs and the gradient
    of each trained tensor, by name."""
    params = {k: p for k, p in network.named_parameters() if p.requires_grad}
    engine = SimpleNamespace(
        prepare_batch=lambda batch, *args: (batch["image"], batch["label"]),
        state=SimpleNamespace(device=torch.device("cpu")),
        non_blocking=False,
        network=network,
        amp=False,
        amp_kwargs=None,
        optimizer=torch.optim.SGD(params.values(), lr=0.0),
        scaler=None,
        fire_event=lambda event: None,
    )
    torch.manual_seed(seed)
    out = step(engine, {"image": image, "label": mask})
    return out, {k: p.grad.clone() for k, p in params.items() if p.grad is not None}


def _autoencoder_step_grad(step: AutoencoderTrainStep, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _one_step(_FixedDecoderOutput(x), step, mask, mask)[1]["x"]


@pytest.mark.parametrize("encoding", ["onehot", "colour"])
def test_autoencoder_loss_pulls_an_organ_the_decoder_has_not_drawn(encoding):
    """The decoder draws background where a small organ is (the state in which the tiny autoencoder left small organs
    at Dice 0 on real CT): the multi-class loss must still pull those pixels towards the organ, far harder than the
    L1 alone. A softmax-saturated soft Dice gives them ~exp(-20) and fails this."""
    codec = make_codec("all13", encoding)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 2:4, 2:4] = 12  # adrenal_gland_right, 4 of 256 pixels
    mask[:, :, 8:, :] = 6  # liver, half the slice, drawn
    drawn = codec.encode(torch.where(mask == 12, 0.0, mask))  # every organ but the small one
    l1_only = _autoencoder_step_grad(AutoencoderTrainStep(codec=codec, dice_weight=0, ce_weight=0), mask, drawn)
    full = _autoencoder_step_grad(AutoencoderTrainStep(codec=codec), mask, drawn)
    organ = (mask == 12).expand_as(full)
    pull = (full[organ] * (drawn - codec.encode(mask))[organ]).sum()  # > 0: a descent step moves X to the organ
    l1_pull = (l1_only[organ] * (drawn - codec.encode(mask))[organ]).sum()
    assert l1_pull > 0 and pull > 10 * l1_pull


def test_mask_space_loss_trains_the_single_step_through_the_frozen_decoder():
    """``mask_loss_weight``: the DiceCE of the decoded z~0 at t = T-1 reaches the U-Net and the vision encoder
    through the frozen decoder (the autoencoder gets no gradient), and is the loss named ``loss_mask``."""
    model = input_dependent_tiny_sdseg(classes="all13", mask_encoding="onehot")  # z_c reaches the U-Net
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1
    mask = torch.randint(0, 14, (4, 1, 32, 32), generator=gen).float()
    plain, g_plain = _one_step(model, SDSegTrainStep(final_step_share=0.5), image, mask)
    with_mask, g_mask = _one_step(model, SDSegTrainStep(final_step_share=0.5, mask_loss_weight=2.0), image, mask)
    assert "loss_mask" not in plain and float(with_mask["loss_mask"]) > 0
    assert torch.allclose(with_mask["loss"], plain["loss"] + 2.0 * with_mask["loss_mask"])  # same t and noise
    assert not any(k.startswith("autoencoder.") for k in g_mask)
    for part in ("unet.", "vision_encoder."):
        keys = [k for k in g_mask if k.startswith(part)]
        assert keys and any(not torch.allclose(g_mask[k], g_plain[k]) for k in keys), part
    # the items at T-1 only: with none of them (share 0, no consistency pairs) there is no mask-space term
    none, _ = _one_step(model, SDSegTrainStep(final_step_share=0.0, mask_loss_weight=2.0), image, mask)
    assert "loss_mask" not in none
    binary = input_dependent_tiny_sdseg()
    out, _ = _one_step(binary, SDSegTrainStep(final_step_share=0.5, mask_loss_weight=2.0), image, mask > 6)
    assert "loss_mask" not in out  # binary: the paper's losses only


def test_binary_codec_is_the_papers_encoding():
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    codec = make_codec("binary", "colour")  # the encoding choice does not touch binary
    assert isinstance(codec, BinaryCodec) and not codec.multiclass and codec.channels == 3
    x = codec.encode(mask)
    assert torch.equal(x, mask_to_ae_input(mask)) and torch.equal(codec.decode(x), ae_output_to_score(x))
    assert list(codec.state_dict()) == [] and codec.class_names is None


@pytest.mark.parametrize("encoding", ["onehot", "colour"])
def test_multiclass_sdseg_is_one_pass_with_c_outputs_and_records_its_codec(encoding):
    model = build_tiny_sdseg(classes="all13", mask_encoding=encoding).eval()
    codec = model.codec
    assert model.autoencoder.encoder.blocks[0].conv.in_channels == codec.channels
    assert model.vision_encoder.encoder.blocks[0].conv.in_channels == 3  # the image keeps 3 channels
    model.scale_factor.fill_(1.0)
    image, mask = torch.randn(2, 3, 32, 32), torch.randint(0, 14, (2, 1, 32, 32)).float()
    assert model(image).shape == (2, 14, 32, 32)
    assert torch.isfinite(model(image, mask=mask)["loss"])
    state = model.state_dict()
    assert state["_extra_state"]["mask_codec"] == f"{encoding}:all13"
    with pytest.raises(ValueError, match="trained with the mask codec"):
        build_tiny_sdseg().load_state_dict(state, strict=False)


def test_paper_preset_autoencoder_takes_the_colour_codes():
    """The paper preset's pretrained kl-f8 is 3-channel (LDM layout): the colour codec feeds it C classes."""
    codec = make_codec("all13", "colour")
    ae = kl_autoencoder(
        in_channels=codec.channels,
        out_channels=codec.channels,
        channels=(8, 8),
        layout="ldm",
        norm_num_groups=4,
        num_res_blocks=1,
    )
    mask = torch.randint(0, 14, (1, 1, 16, 16)).float()
    assert codec.decode(ae.reconstruct(codec.encode(mask))).shape == (1, 14, 16, 16)


def test_swapped_organs_get_swapped_dice_and_absent_organs_are_nan():
    names = get_class_set("all13").names
    label = torch.zeros(1, 16, 16, 4)
    label[0, 2:8, 2:8], label[0, 9:14, 9:14] = 1, 6  # spleen and liver
    swapped = label.clone()
    swapped[label == 1], swapped[label == 6] = 6, 1
    right, wrong = class_scores(label, label, names), class_scores(swapped, label, names)
    assert right["dice_spleen"] == right["dice_liver"] == 1 and right["dice"] == 1
    assert wrong["dice_spleen"] == wrong["dice_liver"] == 0 and wrong["dice"] == 0
    assert np.isnan(right["dice_pancreas"]) and np.isnan(right["hd95_pancreas"])  # absent from both: not counted
    extra = label.clone()
    extra[0, 0, 0] = 11  # a pancreas voxel predicted where there is none: counted as 0
    assert class_scores(extra, label, names)["dice_pancreas"] == 0
    # MONAI's DiceMetric in validation follows the same convention
    onehot = torch.nn.functional.one_hot(label.long(), 14).movedim(-1, 1).float()
    metric = OrganDiceMetric()
    metric(onehot, onehot)
    assert float(metric.aggregate()) == 1.0


def test_evaluation_report_has_a_column_per_organ(tmp_path):
    names = get_class_set("transunet8").names
    label = torch.zeros(1, 8, 8, 2)
    label[0, :4], label[0, 4:6] = 5, 1  # liver (index 5), spleen
    pred = label.clone()
    pred[0, 4:6] = 0  # spleen missed
    report = SegmentationReport(str(tmp_path), hd95=True, class_names=names)
    from monai.data import MetaTensor

    report.reset()
    report.add(
        {"image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": "img0001.nii.gz"}), "pred": pred, "label": label}
    )
    summary = report.completed(None)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["name", "dice", "iou", "hd95"] and "dice_liver" in header and "hd95_pancreas" in header
    assert summary["dice_liver"]["mean"] == 1 and summary["dice_spleen"]["mean"] == 0
    assert summary["dice_pancreas"]["n"] == 0 and summary["organ_mean_dice"] == 0.5 == summary["dice"]["mean"]


def test_class_absent_from_every_training_volume_is_a_warning(demo_volumes, tmp_path, caplog):
    item = {
        "image": str(demo_volumes / "btcv" / "img" / "img0005.nii.gz"),
        "label": str(tmp_path / "label0005.nii.gz"),
        "name": "img0005",
    }
    src = nib.load(demo_volumes / "btcv" / "label" / "label0005.nii.gz")
    data = np.asarray(src.dataobj).copy()
    data[data == 12] = 0  # no right adrenal gland
    nib.save(nib.Nifti1Image(data, src.affine, src.header), item["label"])
    chain = volume_transforms("btcv", (-175, 250), 32, classes="all13")
    with caplog.at_level(logging.WARNING):
        VolumeCacheDataset(
            [item],
            Compose([LoadCachedd(["image", "label"])]),
            chain,
            str(tmp_path / "c"),
            class_names=get_class_set("all13").names,
        )
    assert "no training volume holds adrenal_gland_right" in caplog.text and "adrenal_gland_left" not in caplog.text


# ---- the bundle, as users run it ------------------------------------------------------------------
AE = ["train.yaml", "train_autoencoder.yaml", "ct.yaml", "tiny.yaml"]
TRAIN = ["train.yaml", "ct.yaml", "tiny.yaml"]
EVAL = ["inference.yaml", "evaluate.yaml", "ct.yaml", "tiny.yaml"]
INFER = ["inference.yaml", "ct.yaml", "tiny.yaml"]


@pytest.mark.parametrize("classes, encoding", [("all13", "onehot"), ("transunet8", "colour")])
def test_multiclass_run_trains_evaluates_and_infers_label_maps(demo_volumes, tmp_path, classes, encoding):
    root, c = tmp_path, get_class_set(classes)
    common = [
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(demo_volumes / "btcv"),
        "--classes",
        classes,
        "--mask_encoding",
        encoding,
        "--image_size",
        "32",
    ]
    run_bundle("training", AE, root, *common, "--autoencoder_max_iterations", "2", "--autoencoder_val_interval", "2")
    run_bundle("training", TRAIN, root, *common, "--max_iterations", "2", "--val_interval", "2", "--batch_size", "4")
    ckpt = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["_extra_state"]["mask_codec"] == f"{encoding}:{classes}"
    proc = run_bundle("evaluate", EVAL, root, *common, "--save_score", "True")
    rows = (root / "eval" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("name,dice,iou,hd95,") and [f"dice_{n}" in rows[0] for n in c.organs] == [True] * len(
        c.organs
    )
    assert len(rows) == 3 and "2 cases: dice" in proc.stdout
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert 0 <= summary["organ_mean_dice"] <= 1 and f"dice_{c.organs[-1]}" in summary
    src = nib.load(demo_volumes / "btcv" / "img" / "img0001.nii.gz")
    mask, score = nib.load(root / "eval" / "masks" / "img0001.nii.gz"), nib.load(
        root / "eval" / "masks" / "scores" / "img0001.nii.gz"
    )
    assert mask.shape == src.shape and np.array_equal(mask.affine, src.affine) and mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= set(c.values)  # BTCV ids, not class indices
    assert score.shape == (*src.shape, c.num_classes)
    out = root / "infer"
    run_bundle(
        "inference", INFER, root, *common, "--input_dir", str(demo_volumes / "btcv" / "img"), "--output_dir", str(out)
    )
    assert len(list(out.glob("*.nii.gz"))) == 6


def test_multiclass_bundle_fails_clearly_on_bad_classes_and_label_values(demo_volumes, tmp_path):
    common = ["--bundle_root", str(tmp_path), "--dataset_dir", str(demo_volumes / "btcv")]
    with pytest.raises(AssertionError, match="unknown --classes 'organs'"):
        run_bundle("training", AE, tmp_path, *common, "--classes", "organs")
    bad = tmp_path / "bad"
    for sub in ("img", "label"):
        (bad / sub).mkdir(parents=True)
        for f in (demo_volumes / "btcv" / sub).iterdir():
            (bad / sub / f.name).symlink_to(f)
    lab = nib.load(demo_volumes / "btcv" / "label" / "label0006.nii.gz")
    data = np.asarray(lab.dataobj).copy()
    data[0, 0, 0] = 17
    (bad / "label" / "label0006.nii.gz").unlink()
    nib.save(nib.Nifti1Image(data, lab.affine, lab.header), bad / "label" / "label0006.nii.gz")
    with pytest.raises(AssertionError, match=r"label0006.nii.gz: label value\(s\) \[17.0\] are not in --classes all13"):
        run_bundle(
            "training", AE, tmp_path, "--bundle_root", str(tmp_path), "--dataset_dir", str(bad), "--classes", "all13"
        )


def test_paper_preset_builds_the_colour_path_for_multiclass():
    from scripts.bundle_config import parse_configs

    parser = parse_configs(["train.yaml", "paper.yaml"], classes="all13")
    codec = parser.get_parsed_content("mask_codec")
    assert isinstance(codec, ColourCodec) and parser.get_parsed_content("autoencoder_def#in_channels") == 3


MULTICLASS_32PX = ["--classes", "all13", "--image_size", "32"]


def _best_dice(proc) -> float:
    return float(re.findall(r"val_mean_dice best value: ([0-9.]+)", proc.stdout + proc.stderr)[-1])


@pytest.fixture(scope="module")
def multiclass_autoencoder(demo_volumes, tmp_path_factory):
    """The shipped multi-class mask-autoencoder stage, tiny, 32 px, 400 iterations (~70 CPU-s): its bundle root and
    its best validation reconstruction (mean organ Dice)."""
    root = tmp_path_factory.mktemp("multiclass_recipe")
    data = ["--bundle_root", str(root), "--dataset_dir", str(demo_volumes / "btcv"), *MULTICLASS_32PX]
    iterations = ["--autoencoder_max_iterations", "400", "--autoencoder_val_interval", "400"]
    return root, _best_dice(run_bundle("training", AE, root, *data, *iterations))


def test_multiclass_autoencoder_recipe_reconstructs_most_organs(multiclass_autoencoder):
    """The shipped multi-class mask-autoencoder stage reconstructs the validation volume at mean organ Dice above 0.3
    (0.42-0.48 on the demo's volumes over seeds). The 0.6.0 recipe (soft Dice without the cross-entropy, non-local
    attention) reaches 0.20 on these volumes (0.07-0.14 on the demo's), organs all or nothing: a recipe that stops
    learning fails."""
    assert multiclass_autoencoder[1] > 0.3


def test_multiclass_sdseg_recipe_learns_the_organs(multiclass_autoencoder, demo_volumes):
    """The shipped multi-class SDSeg stage (tiny, 32 px, 600 iterations, ~140 CPU-s) on that autoencoder reaches a
    validation mean organ Dice above 0.25 (0.37-0.38 over two seeds; 0.07 after 300 iterations): a stage that stops
    learning or never sees the image fails. It does not rank recipes: on these easy volumes the 0.7.0 recipe reaches
    0.36 and the shipped one without its mask-space loss 0.37 (real CT ranks them: docs/benchmarks.md)."""
    root = multiclass_autoencoder[0]
    proc = run_bundle(
        "training",
        TRAIN,
        root,
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(demo_volumes / "btcv"),
        *MULTICLASS_32PX,
        "--autoencoder_path",
        str(root / "models" / "autoencoder.pt"),
        "--ckpt_dir",
        str(root / "sdseg"),
        "--max_iterations",
        "600",
        "--val_interval",
        "600",
        "--latent_cache",
        "True",
    )
    assert _best_dice(proc) > 0.25
