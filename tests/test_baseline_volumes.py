"""The plain-UNet baseline on CT volumes (configs/ct.yaml + configs/baseline_unet.yaml) as users run it: training
with per-volume validation that learns, evaluation and inference on the input grid, overlays it cannot work with
refused at start, and ``compare --dataset btcv`` end to end."""

import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, parse_configs, run_bundle

from scripts.baseline import ProbabilityInferer, check_overlays
from scripts.classes import get_class_set
from scripts.volumes.inference import VolumeInferer

TRAIN = ["train.yaml", "ct.yaml", "tiny.yaml", "baseline_unet.yaml"]
EVAL = ["inference.yaml", "evaluate.yaml", "ct.yaml", "tiny.yaml", "baseline_unet.yaml"]
INFER = ["inference.yaml", "ct.yaml", "tiny.yaml", "baseline_unet.yaml"]
# a short run that moves the Dice: a faster learning rate and a short EMA (the tiny preset's 0.99 over 150 steps
# keeps two thirds of the random start)
SHORT = ["--max_iterations", "150", "--val_interval", "50", "--batch_size", "4"]
SHORT += ["--baseline_learning_rate", "0.003", "--ema_decay", "0.5"]


def _mean_dice(root, **overrides) -> float:
    parse_configs(EVAL, bundle_root=str(root), device="$torch.device('cpu')", **overrides).get_parsed_content(
        "evaluate"
    )
    return json.loads((root / "eval" / "summary.json").read_text())["dice"]["mean"]


def test_baseline_trains_on_volumes_learns_evaluates_and_infers(demo_volumes, tmp_path, monkeypatch):
    """Training validates per volume (the 2D UNet over every axial slice), its Dice rises above an untrained UNet's
    on the test volumes (0.08 -> 0.25 here), and evaluate / inference write one NIfTI mask per volume on the input
    grid."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CLI runs: one thread is far faster on a shared, loaded CPU
    root, btcv = tmp_path / "bundle", demo_volumes / "btcv"
    common = ["--bundle_root", str(root), "--dataset_dir", str(btcv)]
    proc = run_bundle("training", TRAIN, tmp_path, *common, *SHORT)
    val = [float(v) for v in re.findall(r"Epoch\[\d+\] Metrics -- val_mean_dice: ([\d.]+)", proc.stdout + proc.stderr)]
    assert len(val) == 3 and all(0 <= v <= 1 for v in val)  # one validation volume, every 50 iterations
    assert (root / "models" / "baseline_unet.pt").is_file() and not (root / "models" / "model.pt").exists()

    proc = run_bundle("evaluate", EVAL, tmp_path, *common)
    rows = (root / "eval" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "name,dice,iou,hd95" and [r.split(",")[0] for r in rows[1:]] == [
        "img0001.nii.gz",
        "img0002.nii.gz",
    ]
    for case in ("0001", "0002"):
        src, mask = nib.load(btcv / "img" / f"img{case}.nii.gz"), nib.load(
            root / "eval" / "masks" / f"img{case}.nii.gz"
        )
        assert mask.shape == src.shape and np.array_equal(mask.affine, src.affine)
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}
    trained = json.loads((root / "eval" / "summary.json").read_text())["dice"]["mean"]

    # the same UNet untrained, through the same evaluation
    untrained = tmp_path / "untrained"
    torch.manual_seed(0)
    net = parse_configs(EVAL, device="cpu").get_parsed_content("network_def")
    (untrained / "models").mkdir(parents=True)
    torch.save({"model": net.state_dict()}, untrained / "models" / "baseline_unet.pt")
    at_start = _mean_dice(untrained, dataset_dir=str(btcv))
    assert trained > at_start + 0.05, (at_start, trained, val)

    # inference on STS-3D's .nrrd / .mha test volumes: NIfTI masks on their grids
    out = tmp_path / "sts_masks"
    sts = demo_volumes / "sts3d"
    run_bundle(
        "inference",
        INFER,
        tmp_path,
        *common[:2],
        "--dataset",
        "sts3d",
        "--dataset_dir",
        str(sts),
        "--output_dir",
        str(out),
    )
    names = sorted(p.name for p in out.glob("*.nii.gz"))
    assert names == ["sts3d_010.nii.gz", "sts3d_011.nii.gz", "sts3d_012.nii.gz"]
    for name in names:
        label = nib.load(sts / "label" / name)
        written = nib.load(out / name)
        assert written.shape == label.shape
        np.testing.assert_allclose(written.affine, label.affine, atol=1e-4)


@pytest.mark.parametrize(
    "files",
    [
        ["train.yaml", "ct.yaml", "tiny.yaml", "baseline_unet.yaml"],
        ["train.yaml", "baseline_unet.yaml", "ct.yaml", "tiny.yaml"],
        ["inference.yaml", "evaluate.yaml", "ct.yaml", "tiny.yaml", "baseline_unet.yaml"],
        ["inference.yaml", "evaluate.yaml", "baseline_unet.yaml", "ct.yaml", "tiny.yaml"],
    ],
)
def test_baseline_runs_slice_by_slice_under_ct_whatever_the_order(files):
    inferer = parse_configs(files, device="cpu").get_parsed_content("inferer")
    assert isinstance(inferer, VolumeInferer) and isinstance(inferer.inferer, ProbabilityInferer)


SDSEG_ONLY = {  # files -> the SDSeg-only overlay the message must name
    "train_autoencoder.yaml": ["train.yaml", "train_autoencoder.yaml", "ct.yaml", "tiny.yaml", "baseline_unet.yaml"],
    "ablation_concat_frozen.yaml": ["train.yaml", "ablation_concat_frozen.yaml", "tiny.yaml", "baseline_unet.yaml"],
    "ablation_crossattn_frozen.yaml": [
        "train.yaml",
        "tiny.yaml",
        "baseline_unet.yaml",
        "ablation_crossattn_frozen.yaml",
    ],
    "reverse_sweep.yaml": ["inference.yaml", "evaluate.yaml", "reverse_sweep.yaml", "tiny.yaml", "baseline_unet.yaml"],
    "stability.yaml": ["inference.yaml", "stability.yaml", "tiny.yaml", "baseline_unet.yaml"],
}


@pytest.mark.parametrize("other", SDSEG_ONLY)
def test_baseline_with_an_sdseg_only_overlay_is_refused_at_start(other, tmp_path):
    parser = parse_configs(SDSEG_ONLY[other], bundle_root=str(tmp_path), device="cpu")
    with pytest.raises(RuntimeError) as err:  # MONAI's "Failed to evaluate", from the ValueError
        parser.get_parsed_content("initialize")
    cause = err.value.__cause__
    assert isinstance(cause, ValueError) and f"configs/{other} (" in str(cause)
    assert str(cause).startswith("configs/baseline_unet.yaml replaces SDSeg's networks")
    assert not (tmp_path / "models").exists()  # refused before anything is made


def test_refusal_reaches_the_user_before_training(demo_volumes, tmp_path):
    """As typed: the stage that trains SDSeg's mask autoencoder, with the baseline overlay, stops at start."""
    files = "[" + ",".join(f"'{ROOT / 'configs' / c}'" for c in SDSEG_ONLY["train_autoencoder.yaml"]) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", files]
    cmd += ["--bundle_root", str(tmp_path), "--dataset_dir", str(demo_volumes / "btcv")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, encoding="utf-8", timeout=300)
    assert proc.returncode != 0
    assert "configs/baseline_unet.yaml replaces SDSeg's networks and cannot be combined with" in proc.stderr
    assert "configs/train_autoencoder.yaml" in proc.stderr and "Epoch" not in proc.stdout + proc.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "data" / "cache").exists()
    check_overlays(None, ["train_autoencoder.yaml: x"])  # SDSeg's own runs pass
    check_overlays("baseline_unet.yaml", [])


@pytest.mark.parametrize(
    "files", [["train.yaml", "paper.yaml", "baseline_unet.yaml"], ["inference.yaml", "monailabel.yaml", "tiny.yaml"]]
)
def test_other_combinations_start(files, tmp_path):
    parse_configs(files, bundle_root=str(tmp_path), device="cpu").get_parsed_content("initialize")


def _compare(demo_volumes, tmp_path, *extra: str):
    """``compare --dataset btcv`` on tiny settings (one volume per split, 32 px, 4 iterations a stage): its output
    folder and the finished process."""
    split = tmp_path / "split.json"
    split.write_text('{"train": ["0005"], "val": ["0009"], "test": ["0001"]}')
    out = tmp_path / "cmp"
    cmd = [
        sys.executable,
        "-m",
        "scripts.tools.compare",
        "--dataset",
        "btcv",
        "--dataset_dir",
        str(demo_volumes / "btcv"),
    ]
    cmd += ["--split_file", str(split), *extra, "--cache_dir", str(tmp_path / "cache")]
    cmd += ["--out", str(out), "--seeds", "2", "--samples", "1", "--budget_s", "1"]
    cmd += ["--set", "max_iterations=4", "val_interval=2", "autoencoder_max_iterations=4", "autoencoder_val_interval=2"]
    cmd += ["batch_size=4", "image_size=32", "--baseline_set", "val_interval=2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, encoding="utf-8", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_compare_on_ct_volumes_per_volume_side_by_side(demo_volumes, tmp_path):
    """``compare --dataset btcv`` with a split file (one volume per split) and --foreground: both models through
    ct.yaml, scored per volume with Dice, IoU and HD95, SDSeg over its seeds."""
    out, proc = _compare(demo_volumes, tmp_path, "--foreground", "all13")
    res = json.loads((out / "compare_test.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["plain MONAI UNet", "SDSeg 1 step, mean of 2 seeds"]
    assert all({"dice", "iou", "hd95"} <= set(r) for r in res["rows"])
    assert res["configs"] == ["ct.yaml", "tiny.yaml"] and res["image_size"] == 32
    assert [c["case"] for c in res["cases"]] == ["img0001.nii.gz"]  # the split file's test volume
    case = res["cases"][0]
    assert {"unet_dice", "sdseg_dice", "unet_iou", "sdseg_iou", "unet_hd95", "sdseg_hd95"} <= set(case)
    seeds = [res["sdseg"][f"seed{s}"]["cases"][0]["dice"] for s in range(2)]
    assert case["sdseg_dice"] == pytest.approx(sum(seeds) / 2) and case["unet_dice"] == res["baseline"]["dice"]
    t = res["timings"]
    assert "configs/ct.yaml" in t["baseline"]["command"] and "configs/baseline_unet.yaml" in t["baseline"]["command"]
    assert "--image_size 32" in t["baseline"]["command"] and "--foreground all13" in t["baseline"]["command"]
    assert res["baseline_overrides"] == {"image_size": 32, "val_interval": 2}  # shared size, the UNet's own
    assert "--split_file" in t["sdseg"]["command"] and t["baseline"]["budget_s"] == 1
    mask = nib.load(out / "baseline" / "test" / "masks" / "img0001.nii.gz")
    assert mask.shape == nib.load(demo_volumes / "btcv" / "img" / "img0001.nii.gz").shape
    assert "per volume" in proc.stdout and "hd95" in (out / "compare_test.md").read_text()
    assert res["classes"] == "binary" and res["organs"] == [] and "--classes" not in t["sdseg"]["command"]
    assert "--classes" not in t["baseline"]["command"] and "per organ" not in proc.stdout


def test_compare_all13_per_organ_table_from_each_summary(demo_volumes, tmp_path):
    """``compare --dataset btcv --classes all13``: both models segment the 13 organs, and the per-organ table holds,
    per organ, the UNet's Dice and SDSeg's mean over the seeds exactly as each evaluation's summary.json has them,
    then the mean over organs (their ``organ_mean_dice``)."""
    out, proc = _compare(demo_volumes, tmp_path, "--classes", "all13")
    res = json.loads((out / "compare_test.json").read_text())
    t = res["timings"]
    assert "--classes all13" in t["autoencoder"]["command"] and "--classes all13" in t["sdseg"]["command"]
    assert "--classes all13" in t["baseline"]["command"] and "configs/baseline_unet.yaml" in t["baseline"]["command"]
    organs = list(get_class_set("all13").organs)  # the one class-set definition
    assert res["classes"] == "all13" and [r["organ"] for r in res["organs"]] == [*organs, "organ mean"]
    assert all(set(r) == {"organ", "unet_dice", "sdseg_dice", "sdseg_spread"} for r in res["organs"])
    unet = json.loads((out / "baseline" / "test" / "summary.json").read_text())
    seeds = [json.loads((out / "sdseg" / "test" / f"seed{s}" / "summary.json").read_text()) for s in range(2)]

    def seed_mean(key):
        vals = [s[key]["mean"] if isinstance(s[key], dict) else s[key] for s in seeds]
        vals = [v for v in vals if v is not None and not np.isnan(v)]
        return sum(vals) / len(vals) if vals else float("nan")

    rows = {r["organ"]: r for r in res["organs"]}
    for organ in organs:
        assert rows[organ]["unet_dice"] == pytest.approx(unet[f"dice_{organ}"]["mean"], nan_ok=True), organ
        assert rows[organ]["sdseg_dice"] == pytest.approx(seed_mean(f"dice_{organ}"), nan_ok=True), organ
    assert rows["organ mean"]["unet_dice"] == pytest.approx(unet["organ_mean_dice"], nan_ok=True)
    assert rows["organ mean"]["sdseg_dice"] == pytest.approx(seed_mean("organ_mean_dice"), nan_ok=True)
    assert any(not np.isnan(rows[o]["unet_dice"]) for o in organs)  # the test volume holds organs
    md = (out / "compare_test.md").read_text()
    assert "per organ" in md and "| liver" in md and "| adrenal_gland_left" in md and "| organ mean" in md
    assert "per organ" in proc.stdout
