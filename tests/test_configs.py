"""Config consistency: the networks inference builds are the ones training built, for every preset; the configs
are declarative (named lists, no positional slicing, no look at the Python environment)."""

import re

import pytest
import yaml
from conftest import ROOT

from scripts.bundle_config import parse_configs

CONFIGS = ROOT / "configs"
NETWORK_KEYS = [
    "image_size",
    "latent_channels",
    "condition_channels",
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
    "ddim_scheduler",
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
    # what the pretrained kl-f8 is, whatever --classes: non-local attention, 3 channels (multi-class: the colour codes)
    "autoencoder_nonlocal_attn": True,
    "mask_encoding": "colour",
    "condition_channels": "@latent_channels",
}


def test_paper_preset_is_the_default():
    """Sizes and recipe of paper.yaml are train.yaml's defaults; it adds the pretrained parts and LDM's U-Net."""
    train, paper = load("train.yaml"), load("paper.yaml")
    for key, value in paper.items():
        if key not in PAPER_PARTS and not key.startswith("unet_def#"):
            assert train[key] == value, key
    assert {k: paper[k] for k in PAPER_PARTS} == PAPER_PARTS
    assert train["autoencoder_layout"] == "monai" and train["unet_path"] is None  # the default trains offline
    unet = parse_configs(["train.yaml", "paper.yaml"])["unet_def"]
    assert unet["_target_"] == "scripts.ldm_unet.LDMUNet"
    plain = {k: v for k, v in train["unet_def"].items() if k != "_target_"}
    assert {k: v for k, v in unet.items() if k in plain} == plain  # same sizes, LDM's res blocks
    assert train["unet_attention_levels"] == [True, True, True, True, False]  # LDM's 32, 16, 8, 4 of a 32 latent


@pytest.mark.parametrize("preset", ["tiny.yaml", "small.yaml", "paper.yaml"])
def test_presets_only_set_known_keys(preset):
    known = set(load("train.yaml")) | set(load("train_autoencoder.yaml")) | set(load("inference.yaml"))
    assert {key.split("#")[0] for key in load(preset)} <= known


YAMLS = sorted(p.name for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("name", YAMLS)
def test_configs_select_nothing_by_position_and_never_look_at_imports(name):
    """Lists are reused by name (``@train#load_transforms``), never sliced or indexed (``transforms[:5]``,
    ``[-1:]``, ``#0``); nothing depends on which modules are imported (``sys.modules``): overlays switch behaviour."""
    text = (CONFIGS / name).read_text()
    code = "\n".join(line.split(" #")[0] for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\[\s*-?\d*\s*:", code), f"{name}: list slicing by position"
    assert not re.search(r"@[\w#]+(\.\w+)*\[", code), f"{name}: an item of a referenced list by index"
    assert not re.search(r"#-?\d+\b", code), f"{name}: list item by its position in an id"
    assert "sys.modules" not in code and "import sys" not in code, f"{name}: tests the imported modules"


def test_unet_def_describes_the_concat_model():
    """train.yaml / inference.yaml build SDSeg's concat U-Net; only ablation_crossattn_frozen.yaml changes it."""
    for name in ("train.yaml", "inference.yaml"):
        unet = load(name)["unet_def"]
        assert not any("@fusion" in str(v) for v in unet.values()), name
        assert "with_conditioning" not in unet and "cross_attention_dim" not in unet
    touching = {n for n in YAMLS if any(k == "unet_def" or k.startswith("unet_def#") for k in load(n))}
    assert touching == {"train.yaml", "inference.yaml", "paper.yaml", "ablation_crossattn_frozen.yaml"}


def test_monailabel_overlay_is_what_monailabel_serves():
    """inference.yaml alone writes the masks; with configs/monailabel.yaml the mask writer is off and the last
    post-transform gives MONAI Label's writer a (W, H) uint8 array."""
    import torch

    def post(files):
        return parse_configs(files, device="cpu").get_parsed_content("postprocessing").transforms

    plain, served = post(["inference.yaml", "tiny.yaml"]), post(["inference.yaml", "monailabel.yaml", "tiny.yaml"])
    names = [type(t).__name__ for t in plain]
    assert names == ["Invertd", "CopyItemsd", "AsDiscreted", "SaveMaskd"]
    assert [type(t).__name__ for t in served] == ["Invertd", "CopyItemsd", "AsDiscreted", "Lambdad"]
    out = served[-1]({"pred": torch.zeros(1, 3, 5)})["pred"]
    assert out.shape == (5, 3) and out.dtype == torch.uint8
