"""Shared fixtures: the bundle's own configs (tiny preset) and small generated demo data."""

from __future__ import annotations

import os
import subprocess
import sys
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
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
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
