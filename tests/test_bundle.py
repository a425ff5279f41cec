"""The bundle as users run it: `python -m monai.bundle run ...` subprocesses on the tiny preset."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, build_tiny_sdseg, run_bundle
from PIL import Image

AE = ["train.yaml", "train_autoencoder.yaml", "tiny.yaml"]
TRAIN = ["train.yaml", "tiny.yaml"]
INFER = ["inference.yaml", "tiny.yaml"]
EVAL = ["inference.yaml", "evaluate.yaml", "tiny.yaml"]


@pytest.mark.parametrize(
    "prediction_type, share, steps, factor", [("epsilon", 0.0, [100, 600], 0.7), ("sample", 0.5, [999, 999], 0.97)]
)
def test_short_training_lowers_the_loss(demo_root, prediction_type, share, steps, factor):
    """The paper's parametrisation at mid t; the tiny preset's z0 target, half of each batch at T-1, at T-1 (where a
    random autoencoder's wide posterior leaves most of the L1 loss irreducible: a smaller drop)."""
    from conftest import tiny_parser

    from scripts.engine import SDSegTrainStep

    parser = tiny_parser(dataset="cvc", dataset_dir=str(demo_root / "cvc"), num_workers=0)
    items = [parser.get_parsed_content("validate#dataset")[i] for i in range(2)]
    image = torch.stack([d["image"] for d in items])
    mask = torch.stack([d["label"] for d in items])
    model = build_tiny_sdseg(seed=0, prediction_type=prediction_type)
    model.scale_factor.fill_(1.0)
    t, noise = torch.tensor(steps), torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def fixed_loss():
        torch.manual_seed(0)
        with torch.no_grad():
            return float(model(image, mask=mask, t=t, noise=noise)["loss"])

    before = fixed_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(1)
    step = SDSegTrainStep(final_step_share=share)
    for _ in range(100):
        loss = model(image, mask=mask, t=step.timesteps(2, 1000, "cpu"))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < factor * before, (before, after)


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """Autoencoder stage, then SDSeg training, each a few iterations, in a fresh bundle_root."""
    root = tmp_path_factory.mktemp("bundle")
    common = ["--bundle_root", str(root), "--dataset", "cvc", "--dataset_dir", str(demo_root / "cvc")]
    run_bundle("training", AE, root, *common, "--autoencoder_max_iterations", "8", "--autoencoder_val_interval", "4")
    run_bundle("training", TRAIN, root, *common, "--max_iterations", "8", "--val_interval", "4", "--batch_size", "4")
    return root, common


def test_training_writes_best_last_and_logs(trained):
    root, _ = trained
    models = sorted(p.name for p in (root / "models").iterdir())
    assert "autoencoder.pt" in models and "model.pt" in models and "sdseg_checkpoint_epoch=2.pt" in models
    ckpt = torch.load(root / "models" / "sdseg_checkpoint_epoch=2.pt", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 8
    assert set(ckpt) == {"network", "ema", "optimizer", "lr_scheduler", "trainer", "run_state"}
    assert float(ckpt["network"]["scale_factor"]) > 0
    assert list((root / "eval" / "logs").glob("events.out.tfevents.*"))
    assert not list((root / "models").glob("*.tmp")) and not list((root / "models").glob("tmp*"))


def test_resume_continues_from_last_checkpoint(trained, tmp_path):
    root, common = trained
    run_bundle(
        "training",
        TRAIN,
        root,
        *common,
        "--max_iterations",
        "12",
        "--val_interval",
        "4",
        "--batch_size",
        "4",
        "--resume",
    )
    ckpt = torch.load(root / "models" / "sdseg_checkpoint_epoch=3.pt", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 12  # 8 resumed + 4 new, not 12 from scratch


def test_inference_writes_one_mask_per_input_deterministically(trained, demo_root):
    root, common = trained
    test_names = sorted(["23", "24", "22"])  # last 10% of 24 demo images, rounded up -> 3
    out1, out2, out3 = root / "masks1", root / "masks2", root / "masks3"
    run_bundle(
        "inference", INFER, root, *common, "--output_dir", str(out1), "--save_score", "True", "--batch_size", "2"
    )
    run_bundle("inference", INFER, root, *common, "--output_dir", str(out2), "--batch_size", "2")
    run_bundle("inference", INFER, root, *common, "--output_dir", str(out3), "--batch_size", "3")
    assert sorted(p.stem for p in out1.glob("*.png")) == test_names
    for name in test_names:
        src = Image.open(demo_root / "cvc" / "Original" / f"{name}.png")
        mask = np.asarray(Image.open(out1 / f"{name}.png"))
        assert mask.shape == (src.height, src.width) and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask, np.asarray(Image.open(out2 / f"{name}.png")))  # same seed: identical
        # another batch size: the same noise draw, only float rounding differs (kernels depend on batch size)
        assert (mask == np.asarray(Image.open(out3 / f"{name}.png"))).mean() > 0.99
        score = np.asarray(Image.open(out1 / "scores" / f"{name}.png"))
        assert score.shape == mask.shape and np.array_equal(score > 127.5, mask > 0)


def test_inference_on_a_folder_of_images(trained, demo_root, tmp_path):
    root, common = trained
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("1", "5"):
        Image.open(
            demo_root / "kvasir" / "images" / sorted((demo_root / "kvasir" / "images").iterdir())[int(name)].name
        ).save(folder / f"case{name}.jpg")
    run_bundle("inference", INFER, root, *common, "--input_dir", str(folder), "--output_dir", str(tmp_path / "out"))
    for name in ("case1", "case5"):
        assert (
            np.asarray(Image.open(tmp_path / "out" / f"{name}.png")).shape
            == np.asarray(Image.open(folder / f"{name}.jpg")).shape[:2]
        )


def test_inference_workflow_gives_the_eager_masks_of_a_trained_model(trained_bundle, tmp_path):
    """`run inference` with the recipe-trained model (``trained_bundle``): different images get different masks, and
    each mask is the eager single step's (score at 64 px, resized back bilinearly, thresholded) but for rounding."""
    import shutil

    import torch.nn.functional as F

    from scripts.bundle_config import parse_configs
    from scripts.sampler import SDSegInferer

    folder = tmp_path / "in"
    folder.mkdir()
    names = ["45", "46", "47", "48"]
    for name in names:
        shutil.copy(trained_bundle.dataset_dir / "Original" / f"{name}.png", folder)
    root = trained_bundle.root
    run_bundle(
        "inference",
        INFER,
        root,
        "--bundle_root",
        str(root),
        "--input_dir",
        str(folder),
        "--output_dir",
        str(tmp_path / "out"),
    )
    masks = [np.asarray(Image.open(tmp_path / "out" / f"{n}.png")) > 127 for n in names]
    assert all((m != masks[0]).mean() > 0.01 for m in masks[1:]), "two images got (nearly) the same mask"
    preprocessing = parse_configs(INFER).get_parsed_content("preprocessing")
    model = trained_bundle.model()
    for name, mask in zip(names, masks):
        image = torch.as_tensor(preprocessing({"image": str(folder / f"{name}.png")})["image"]).float()[None]
        score = F.interpolate(SDSegInferer(seed=0)(image, model), size=mask.shape, mode="bilinear")
        assert (mask == (score[0, 0] > 0.5).numpy()).mean() > 0.99, name


def test_evaluate_writes_per_image_table_and_summary(trained):
    root, common = trained
    proc = run_bundle("evaluate", EVAL, root, *common)
    summary = json.loads((root / "eval" / "summary.json").read_text())
    rows = (root / "eval" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "name,dice,iou" and len(rows) == 1 + 3
    assert summary["dice"]["n"] == 3 and 0 <= summary["dice"]["mean"] <= 1 and 0 <= summary["iou"]["mean"] <= 1
    assert "3 cases: dice" in proc.stdout


def test_missing_dataset_fails_before_training(tmp_path):
    files = "[" + ",".join(f"'{ROOT / 'configs' / c}'" for c in TRAIN) + "]"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        files,
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(tmp_path / "missing"),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode != 0
    assert f"{tmp_path / 'missing'}: dataset folder not found" in proc.stderr
    assert not (tmp_path / "models" / "model.pt").exists()
