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


# what paper.yaml adds to the defaults: SD's pretrained kl-f8 as the mask autoencoder (checked in test_weights.py),
# the authors' U-Net and its LSUN-Churches start (test_unet_weights.py)
PAPER_PARTS = {
    "autoencoder_layout": "ldm",
    "autoencoder_path": "$@ckpt_dir + '/kl-f8.ckpt'",
    "unet_path": "$@ckpt_dir + '/lsun_churches.ckpt'",
}


def test_paper_preset_is_the_default():
    """Sizes and recipe of paper.yaml are train.yaml's defaults; it adds the pretrained parts and LDM's U-Net."""
    train, paper = load("train.yaml"), load("paper.yaml")
    for key, value in paper.items():
        if key not in PAPER_PARTS and key != "unet_def":
            assert train[key] == value, key
    assert {k: paper[k] for k in PAPER_PARTS} == PAPER_PARTS
    assert train["autoencoder_layout"] == "monai" and train["unet_path"] is None  # the default trains offline
    assert paper["unet_def"]["_target_"] == "scripts.ldm_unet.LDMUNet"
    plain = {k: v for k, v in train["unet_def"].items() if k != "_target_"}
    assert {k: v for k, v in paper["unet_def"].items() if k in plain} == plain  # same sizes, LDM's res blocks
    assert train["unet_attention_levels"] == [True, True, True, True, False]  # LDM's 32, 16, 8, 4 of a 32 latent


@pytest.mark.parametrize("preset", ["tiny.yaml", "small.yaml", "paper.yaml"])
def test_presets_only_set_known_keys(preset):
    known = set(load("train.yaml")) | set(load("train_autoencoder.yaml")) | set(load("inference.yaml"))
    assert set(load(preset)) <= known
