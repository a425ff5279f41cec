"""The command-line tools under scripts/tools answer ``--help`` (as ``python -m scripts.tools.<name> --help``), and the
small helpers the method modules share."""

from __future__ import annotations

import json
import math
import runpy
import sys

import pytest
import torch

from scripts.data import natural_key
from scripts.io_utils import atomic_write_csv, atomic_write_json, json_safe
from scripts.metrics import format_table, mean_std, summarise

TOOLS = (
    "benchmark",
    "benchmark_volumes",
    "bundle_check",
    "compare",
    "convert_weights",
    "demo",
    "demo_data",
    "export",
    "figures",
    "metadata",
)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy, a module imported before
@pytest.mark.parametrize("name", TOOLS)
def test_tool_answers_help(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"scripts/tools/{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"scripts.tools.{name}", run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_demo_classes_all13_runs_the_3d_job_with_every_organ():
    """``demo --classes all13``: 3D demo volumes, then both stages and the evaluation through ct.yaml with
    ``--classes all13`` on BTCV; the default stays the 2D binary cvc job."""
    from scripts.tools import demo

    steps = demo.steps(demo._parser().parse_args(["--classes", "all13"]))
    assert [name for name, _ in steps] == ["demo data", "mask autoencoder", "SDSeg training", "evaluation"]
    assert steps[0][1][-1] == "--3d"
    for name, cmd in steps[1:]:
        text = " ".join(cmd)
        assert "'configs/ct.yaml'" in text and "--classes all13" in text and "--dataset btcv" in text, name
    assert "'configs/train_autoencoder.yaml','configs/ct.yaml','configs/tiny.yaml'" in " ".join(steps[1][1])
    assert steps[3][1][4] == "evaluate" and "'configs/evaluate.yaml','configs/ct.yaml'" in steps[3][1][6]

    default = demo.steps(demo._parser().parse_args([]))
    assert "--3d" not in default[0][1]
    for name, cmd in default[1:]:
        text = " ".join(cmd)
        assert "ct.yaml" not in text and "--classes" not in text and "--dataset cvc" in text, name
    with pytest.raises(SystemExit):  # the 3D demo is BTCV's; --dataset picks a 2D one
        demo.main(["--classes", "all13", "--dataset", "kvasir"])


def test_mean_std_and_summaries():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, math.sqrt(1.25))  # population std
    assert all(math.isnan(v) for v in mean_std([]))
    rows = [{"dice": 0.5, "iou": float("nan")}, {"dice": 1.0, "iou": 0.25}]
    s = summarise(rows)
    assert s["dice"] == {"mean": 0.75, "std": 0.25, "n": 2} and s["iou"] == {"mean": 0.25, "std": 0.0, "n": 1}
    assert format_table(rows, ["dice", "iou"], digits=2).splitlines()[2] == "| 0.50 | n/a |"


def test_csv_and_json_writers(tmp_path):
    atomic_write_csv(tmp_path / "a.csv", [{"name": "x", "dice": 0.5}, {"name": "y", "dice": 1.0}])
    assert (tmp_path / "a.csv").read_text().splitlines() == ["name,dice", "x,0.5", "y,1.0"]
    atomic_write_csv(tmp_path / "b.csv", [{"dice": 0.5, "name": "x"}], ["name", "dice"])
    assert (tmp_path / "b.csv").read_text().splitlines()[0] == "name,dice"
    atomic_write_json(tmp_path / "c.json", json_safe({"a": [float("nan"), float("inf"), -float("inf"), 1.5]}))
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": [None, "inf", "-inf", 1.5]}


def test_natural_key_orders_numbers_by_value():
    assert sorted(["img10", "img2", "img1"], key=natural_key) == ["img1", "img2", "img10"]


def test_scheduler_add_noise_is_eq1_in_float32():
    """Eq. 1 by MONAI's ``DDPMScheduler.add_noise`` equals sqrt(a) z0 + sqrt(1 - a) n bit for bit in float32."""
    from monai.networks.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
    g = torch.Generator().manual_seed(0)
    z0, n = torch.randn(8, 4, 4, 4, generator=g), torch.randn(8, 4, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    a = scheduler.alphas_cumprod.clone().float()[t].view(-1, 1, 1, 1)
    z_t = scheduler.add_noise(z0, n, t)
    assert z_t.dtype == torch.float32 and torch.equal(z_t, a.sqrt() * z0 + (1 - a).sqrt() * n)
