"""Config consistency: the networks inference builds are the ones training built, for every preset."""

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
    "autoencoder_layout",
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


# what paper.yaml adds to the defaults: SD's pretrained kl-f8 as the mask autoencoder (checked in test_weights.py)
PRETRAINED_AUTOENCODER = {"autoencoder_layout": "ldm", "autoencoder_path": "$@ckpt_dir + '/kl-f8.ckpt'"}


def test_paper_preset_is_the_default():
    """Sizes and recipe of paper.yaml are train.yaml's defaults; it only adds the pretrained kl-f8 autoencoder."""
    train, paper = load("train.yaml"), load("paper.yaml")
    for key, value in paper.items():
        if key not in PRETRAINED_AUTOENCODER:
            assert train[key] == value, key
    assert {k: paper[k] for k in PRETRAINED_AUTOENCODER} == PRETRAINED_AUTOENCODER
    assert train["autoencoder_layout"] == "monai"  # the default trains its own autoencoder (offline)


@pytest.mark.parametrize("preset", ["tiny.yaml", "small.yaml", "paper.yaml"])
def test_presets_only_set_known_keys(preset):
    known = set(load("train.yaml")) | set(load("train_autoencoder.yaml")) | set(load("inference.yaml"))
    assert set(load(preset)) <= known
