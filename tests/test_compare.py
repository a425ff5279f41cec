"""The comparison command (SDSeg beside a plain MONAI UNet at the same compute) and its baseline parts."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from ignite.engine import Engine, Events

from scripts import baseline
from scripts.baseline import ProbabilityInferer, TimeBudget


def test_time_budget_cuts_the_epoch_then_stops_after_its_handlers(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(baseline, "process_seconds", lambda c="cpu": clock["t"])
    engine = Engine(lambda e, b: clock.__setitem__("t", clock["t"] + 1.0))
    validated = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: validated.append(e.state.iteration))
    TimeBudget(budget_s=7.5).attach(engine)  # attached after "validation", as in train.yaml
    engine.run(range(5), max_epochs=10)
    assert engine.state.iteration == 8 and validated == [5, 8]  # 8 s spent: epoch 2 cut short, still validated
    clock["t"] = 0.0
    free = Engine(lambda e, b: clock.__setitem__("t", clock["t"] + 1.0))
    TimeBudget(budget_s=0).attach(free)  # 0: no limit
    free.run(range(5), max_epochs=3)
    assert free.state.iteration == 15
    with pytest.raises(ValueError, match="clock"):
        TimeBudget(10, clock="gpu")


def test_probability_inferer_is_the_sigmoid_of_the_logits():
    net = torch.nn.Conv2d(3, 1, 1)
    x = torch.randn(2, 3, 8, 8)
    out = ProbabilityInferer()(x, net)
    assert torch.allclose(out, torch.sigmoid(net(x))) and 0 < float(out.min()) and float(out.max()) < 1


def test_compare_command_trains_both_and_reports_seeds_and_samples(demo_root, tmp_path):
    """End to end on demo data: both stages of SDSeg, the UNet on the same CPU budget, one table and JSON."""
    out = tmp_path / "cmp"
    tiny = ["max_iterations=4", "val_interval=2", "autoencoder_max_iterations=4", "autoencoder_val_interval=2"]
    cmd = [
        sys.executable,
        "-m",
        "scripts.tools.compare",
        "--dataset",
        "kvasir",
        "--dataset_dir",
        str(demo_root / "kvasir"),
    ]
    cmd += ["--out", str(out), "--seeds", "3", "--samples", "4", "--budget_s", "1", "--split", "val", "--set", *tiny]
    cmd += ["prediction_type=sample", "batch_size=4"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "compare_val.json").read_text())
    assert [r["method"] for r in res["rows"]] == [
        "plain MONAI UNet",
        "SDSeg 1 step, mean of 3 seeds",
        "SDSeg 1 step, K = 4 (score)",
    ]
    seeds = res["seed_dice"]
    assert len(seeds) == 3 and all(0 <= d <= 1 for d in seeds)
    assert res["rows"][1]["dice"] == pytest.approx(sum(seeds) / 3)
    assert res["rows"][1]["spread"] == pytest.approx(max(seeds) - min(seeds))
    assert res["baseline"]["n"] == res["sdseg"]["seed0"]["n"] > 0  # the same validation images
    t = res["timings"]
    assert t["autoencoder"]["cpu_s"] > 0 and t["sdseg"]["cpu_s"] > 0 and t["baseline"]["budget_s"] == 1
    assert "--prediction_type sample" in t["sdseg"]["command"]
    assert (out / "baseline" / "models" / "baseline_unet.pt").is_file()
    assert (out / "sdseg" / "val" / "seed2" / "metrics.csv").is_file()
    assert "plain MONAI UNet" in proc.stdout and (out / "compare_val.md").is_file()
    # evaluating again reuses the trained models and their timings
    proc = subprocess.run(cmd + ["--skip_training"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "compare_val.json").read_text())
    assert again["seed_dice"] == seeds and again["timings"] == t


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "sts3d", "--classes", "all13"], "needs --dataset btcv"),
        (["--dataset", "kvasir", "--classes", "transunet8"], "needs --dataset btcv"),
        (["--dataset", "btcv", "--classes", "all13", "--foreground", "transunet8"], "segments every organ"),
    ],
)
def test_compare_classes_refused_where_it_cannot_apply(argv, message, tmp_path):
    """``--classes`` other than binary is BTCV's organs and replaces ``--foreground``: refused before any training."""
    from scripts.tools import compare

    with pytest.raises(SystemExit, match=message):
        compare.main([*argv, "--out", str(tmp_path / "cmp")])
    assert not (tmp_path / "cmp").exists()
