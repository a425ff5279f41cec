"""Shared fixtures: the bundle's own configs (tiny preset), small generated demo data, and one tiny model trained by
the shipped recipe (``trained_bundle``) for the tests that need a model whose masks depend on its input."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from scripts.bundle_config import ROOT, parse_configs


def tiny_parser(**overrides) -> ConfigParser:
    return parse_configs(["train.yaml", "tiny.yaml"], **overrides)


def build_tiny_sdseg(seed: int = 0, **overrides):
    """SDSeg with the tiny preset's networks (random weights, no autoencoder file)."""
    torch.manual_seed(seed)
    parser = tiny_parser(autoencoder_path=None, **overrides)
    parser["network_def"]["autoencoder_path"] = None
    return parser.get_parsed_content("network_def", instantiate=True)


def input_dependent_tiny_sdseg(seed: int = 0, **overrides):
    """A fresh tiny SDSeg whose zero-initialised parts (the U-Net's output convolution, the z_c half of its first
    convolution) get random weights (std 0.1), so that its masks depend on the image without any training; a fresh
    SDSeg gives every image the decoder's answer to one latent. ``scale_factor`` 1."""
    net = build_tiny_sdseg(seed, **overrides)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.unet.out[-1].parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        w = net.unet.conv_in.conv.weight
        w[:, net.autoencoder.latent_channels :] = (
            torch.randn(w[:, net.autoencoder.latent_channels :].shape, generator=gen) * 0.1
        )
        net.scale_factor.fill_(1.0)
    return net


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    from scripts.tools.demo_data import write_demo_datasets

    out = tmp_path_factory.mktemp("demo")
    write_demo_datasets(out, n=24, seed=1)
    return out


def run_bundle(
    run_id: str, configs: list[str], cwd: Path, *args: str, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <run_id> --config_file [...] <args>`` as a user would type it."""
    files = "[" + ",".join(f"'{ROOT / 'configs' / c}'" for c in configs) + "]"
    meta = [
        "--meta_file",
        str(ROOT / "configs" / "metadata.json"),
        "--logging_file",
        str(ROOT / "configs" / "logging.conf"),
    ]
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files, *meta, *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # utf-8 whatever the process locale (a test reading volumes can leave it at C/ASCII): outputs hold ±, ×
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_volumes(tmp_path_factory) -> Path:
    """The 3D demo sets (``btcv/``, ``sts3d/``) written once per session."""
    from scripts.tools.demo_data import write_demo_volumes

    out = tmp_path_factory.mktemp("demo3d")
    write_demo_volumes(out, seed=1)
    return out


# the shipped tiny recipe (train_autoencoder.yaml, then train.yaml, both with tiny.yaml) cut to a short, fixed schedule
RECIPE_DATA = dict(dataset="cvc", num_workers=0)
RECIPE_AUTOENCODER = dict(autoencoder_max_iterations=200, autoencoder_val_interval=200)
RECIPE_SDSEG = dict(max_iterations=120, val_interval=60)


@dataclass
class TrainedBundle:
    root: Path  # bundle_root: models/autoencoder.pt, models/model.pt (best validation Dice, EMA weights)
    dataset_dir: Path  # 48 generated CVC-style images: 38 training, 5 validation, 5 test
    val_dice: float  # the trainer's own best validation Dice (the one model.pt was saved for)
    seconds: float

    def overrides(self) -> dict:
        return dict(bundle_root=str(self.root), dataset_dir=str(self.dataset_dir), **RECIPE_DATA)

    def model(self) -> torch.nn.Module:
        """A fresh SDSeg (tiny preset) with the trained weights of models/model.pt, in eval mode."""
        net = build_tiny_sdseg(seed=0)
        net.load_state_dict(torch.load(self.root / "models" / "model.pt", weights_only=True))
        return net.eval()


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory) -> TrainedBundle:
    """The shipped tiny recipe run in this process, as ``run training`` would, on its own generated data: mask
    autoencoder 200 iterations, SDSeg 120 (batch 8), one thread (about a minute on this CPU). Shared by the test
    that the recipe learns and by every deployment test (export, MONAI Label, volumes, the inference workflow):
    unlike a fresh tiny SDSeg, whose zero-initialised output convolution gives every image the same mask, its masks
    depend on the image."""
    from scripts.tools.demo_data import write_demo_datasets

    work = tmp_path_factory.mktemp("trained")
    data = write_demo_datasets(work / "data", n=48, seed=2)["cvc"]
    bundle = TrainedBundle(work / "bundle", data, 0.0, 0.0)
    threads, start = torch.get_num_threads(), time.perf_counter()
    torch.set_num_threads(1)
    try:
        for files, schedule in (
            (["train.yaml", "train_autoencoder.yaml", "tiny.yaml"], RECIPE_AUTOENCODER),
            (["train.yaml", "tiny.yaml"], RECIPE_SDSEG),
        ):
            parser = parse_configs(files, **bundle.overrides(), **schedule)
            parser.get_parsed_content("initialize")
            parser.get_parsed_content("training")
    finally:
        torch.set_num_threads(threads)
    bundle.val_dice = float(parser.get_parsed_content("validate#evaluator").state.best_metric)
    bundle.seconds = time.perf_counter() - start
    return bundle
