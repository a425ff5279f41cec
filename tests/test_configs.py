"""Config consistency: the networks inference builds are the ones training built, for every preset."""

import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

CONFIGS = ROOT / "configs"
NETWORK_KEYS = [
    "image_size",
    "latent_channels",
    "autoencoder_channels",
    "autoencoder_res_blocks",
    "autoencoder_norm_groups",
    "unet_channels",
    "unet_attention_levels",
    "unet_res_blocks",
    "unet_head_channels",
    "unet_norm_groups",
    "autoencoder_def",
    "unet_def",
    "noise_scheduler",
    "fusion",
]


def load(name):
    return yaml.safe_load((CONFIGS / name).read_text())


def test_inference_builds_the_training_networks():
    train, infer = load("train.yaml"), load("inference.yaml")
    for key in NETWORK_KEYS:
        assert train[key] == infer[key], key


def test_paper_preset_is_the_default():
    train, paper = load("train.yaml"), load("paper.yaml")
    for key, value in paper.items():
        assert train[key] == value, key


@pytest.mark.parametrize("preset", ["tiny.yaml", "small.yaml", "paper.yaml"])
def test_presets_only_set_known_keys(preset):
    known = set(load("train.yaml")) | set(load("train_autoencoder.yaml")) | set(load("inference.yaml"))
    assert set(load(preset)) <= known


def test_metadata_validates_against_the_zoo_schema(tmp_path):
    schema = ROOT.parent / "shared" / "reference" / "meta_schema_20240725.json"
    assert schema.exists(), f"{schema}: the zoo's schema (shared/ beside the checkout) is missing"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            str(CONFIGS / "metadata.json"),
            "--filepath",
            str(schema),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "metadata is verified with no error" in proc.stdout + proc.stderr
