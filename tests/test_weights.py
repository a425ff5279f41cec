"""Pretrained KL autoencoder import (scripts/weights/, scripts/autoencoder.py), without any download.

A randomly initialised diffusers ``AutoencoderKL`` with the SD/kl-f8 structure (4 levels, 2 encoder / 3 decoder res
blocks, mid attention, double_z, quant convs; narrower channels for speed) is saved as diffusers and as a CompVis
Lightning checkpoint (keys written here independently of the converter), converted, and must give diffusers' encoder
mean and std and decoder output. The real kl-f8 sizes are checked key for key through the paper preset (meta tensors).
"""

import re
import sys
import types

import numpy as np
import pytest
import torch
from conftest import parse_configs
from monai.networks.nets import AutoencoderKL

from scripts.autoencoder import kl_autoencoder
from scripts.tools.convert_weights import main
from scripts.weights.kl import convert_kl_state_dict, load_autoencoder, load_kl_weights

diffusers = pytest.importorskip("diffusers")  # requirements-dev.txt

CHANNELS = (32, 64, 64, 64)
TOL = dict(atol=1e-4, rtol=1e-4)


def sd_vae(channels=CHANNELS, layers=2, groups=32) -> "diffusers.AutoencoderKL":
    """diffusers' AutoencoderKL with Stable Diffusion's (kl-f8) configuration, except the channel widths."""
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
    )


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = sd_vae().eval()
    with torch.no_grad():  # no parameter keeps its init (GroupNorms all 1/0 would hide swapped norms)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def monai_ae(**kwargs) -> AutoencoderKL:
    return kl_autoencoder(channels=CHANNELS, num_res_blocks=2, layout="ldm", **kwargs).eval()


def assert_same_outputs(monai_model, vae):
    g = torch.Generator().manual_seed(1)
    x, z = torch.rand((2, 3, 32, 32), generator=g) * 2 - 1, torch.randn((2, 4, 4, 4), generator=g)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        mu, sigma = monai_model.encode(x)
        torch.testing.assert_close(mu, posterior.mean, **TOL)
        torch.testing.assert_close(sigma, posterior.std, **TOL)
        torch.testing.assert_close(monai_model.decode(z), vae.decode(z).sample, **TOL)


def to_compvis(sd: dict) -> dict:
    """diffusers keys -> CompVis/LDM keys (``ldm.modules.diffusionmodules.model``), attention as 1x1 convs."""
    n_up = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    rules = [
        (r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}."),
        (r"^encoder\.down_blocks\.", "encoder.down."),
        (r"\.resnets\.(\d+)\.", r".block.\1."),
        (r"\.downsamplers\.0\.", ".downsample."),
        (r"\.upsamplers\.0\.", ".upsample."),
        (r"\.mid_block\.block\.0\.", ".mid.block_1."),
        (r"\.mid_block\.block\.1\.", ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.conv_norm_out\.", ".norm_out."),
        (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
        (r"\.attn_1\.to_(q|k|v)\.", r".attn_1.\1."),
        (r"\.attn_1\.to_out\.0\.", ".attn_1.proj_out."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if ".attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[key] = value.clone()
    return out


def lightning_checkpoint(state_dict: dict, path, prefix: str = "", others: dict | None = None) -> None:
    """A PyTorch Lightning-style .ckpt: a callback class from a module that will not exist when it is read."""
    module = types.ModuleType("fake_lightning_callbacks")
    callback = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = callback
    sys.modules[module.__name__] = module
    try:
        torch.save(
            {
                "epoch": 3,
                "global_step": 1000,
                "pytorch-lightning_version": "1.4.2",
                "callbacks": {callback: {"best_model_score": torch.tensor(0.1), "seen": np.float64(2.0)}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6}]}],
                "state_dict": {**{prefix + k: v for k, v in state_dict.items()}, **(others or {})},
            },
            path,
        )
    finally:
        del sys.modules[module.__name__]


# ---- diffusers and CompVis files -> MONAI, same outputs --------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "bin", "folder", "legacy"])
def test_diffusers_weights_give_diffusers_outputs(vae, tmp_path, fmt):
    from safetensors.torch import save_file

    path = tmp_path / ("vae" if fmt == "folder" else f"diffusion_pytorch_model.{fmt}")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    elif fmt == "bin":
        torch.save(vae.state_dict(), path)
    elif fmt == "legacy":  # diffusers < 0.14 attention names (early SD VAE files)
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        pattern = r"\.(to_q|to_k|to_v|to_out\.0)\."
        torch.save({re.sub(pattern, lambda m: f".{old[m[1]]}.", k): v for k, v in vae.state_dict().items()}, path)
    else:
        vae.save_pretrained(path)  # config.json + diffusion_pytorch_model.safetensors
    assert_same_outputs(load_kl_weights(path, monai_ae()), vae)


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_compvis_checkpoint_gives_diffusers_outputs(vae, tmp_path, prefix):
    sd = to_compvis(vae.state_dict())
    assert "encoder.down.0.block.1.conv2.weight" in sd and sd["decoder.mid.attn_1.q.weight"].ndim == 4
    assert "decoder.up.0.upsample.conv.weight" not in sd and "decoder.up.3.upsample.conv.weight" in sd
    if prefix:  # a full LDM checkpoint: U-Net and conditioning model beside the autoencoder
        others = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}
        others["cond_stage_model.proj.weight"] = torch.zeros(2, 2)
    else:  # the autoencoder's own training checkpoint: discriminator and LPIPS weights
        others = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4)}
    lightning_checkpoint(sd, tmp_path / "model.ckpt", prefix, others)
    assert_same_outputs(load_kl_weights(tmp_path / "model.ckpt", monai_ae()), vae)
    assert "fake_lightning_callbacks" not in sys.modules  # read as placeholders, nothing imported


def test_convert_cli_then_load_autoencoder(vae, tmp_path, capsys):
    lightning_checkpoint(to_compvis(vae.state_dict()), tmp_path / "model.ckpt")
    main(["convert", str(tmp_path / "model.ckpt"), str(tmp_path / "models" / "kl-f8.pt")])
    assert "autoencoder_layout ldm" in capsys.readouterr().out
    state = torch.load(tmp_path / "models" / "kl-f8.pt", weights_only=True)  # a plain MONAI state dict
    assert set(state) == set(monai_ae().state_dict())
    assert_same_outputs(load_autoencoder(monai_ae(), tmp_path / "models" / "kl-f8.pt"), vae)


def test_own_autoencoder_files_still_load(tmp_path):
    """layout 'monai' is MONAI's AutoencoderKL itself: the autoencoder stage's files load as before."""
    torch.manual_seed(0)
    own = AutoencoderKL(2, 3, 3, 1, (16, 32), (False, False), 4, 16)
    torch.save({"autoencoder": own.state_dict()}, tmp_path / "autoencoder.pt")
    built = kl_autoencoder(channels=(16, 32), num_res_blocks=1, norm_num_groups=16)
    loaded = load_autoencoder(built, tmp_path / "autoencoder.pt").state_dict()
    assert list(loaded) == list(own.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in own.state_dict().items())


# ---- bad input: clear errors naming the file ---------------------------------------------------------------
def bad_files(vae):
    sd = dict(vae.state_dict())
    missing = {k: v for k, v in sd.items() if k != "decoder.up_blocks.1.resnets.2.conv1.weight"}
    shape = {**sd, "encoder.conv_in.weight": torch.zeros(32, 1, 3, 3)}
    return {
        "missing": (missing, monai_ae(), r"missing keys \(1\): decoder\.blocks\.\d+\.conv1\.conv\.weight"),
        "unexpected": ({**sd, "encoder.extra.weight": torch.zeros(1)}, monai_ae(), r"unexpected keys.*encoder\.extra"),
        "shape": (shape, monai_ae(), r"shape mismatches \(1\): encoder\.blocks\.0\.conv\.weight: file \(32, 1, 3, 3\)"),
        # wrong architecture: 1 res block per level where the model has 2 (and 2 decoder blocks where it has 3)
        "architecture": (
            sd_vae(layers=1).state_dict(),
            monai_ae(),
            r"autoencoder_res_blocks 1, autoencoder_layout ldm",
        ),
        "monai layout": (sd, kl_autoencoder(channels=CHANNELS), "autoencoder_layout: ldm"),
        "not an autoencoder": ({"weight": torch.zeros(3)}, monai_ae(), "not a KL autoencoder"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "unexpected", "shape", "architecture", "monai layout", "not an autoencoder"]
)
def test_bad_weights_raise_naming_the_file(vae, tmp_path, case):
    sd, model, message = bad_files(vae)[case]
    path = tmp_path / f"{case.replace(' ', '_')}.bin"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=re.escape(str(path))) as err:
        load_autoencoder(model, path)
    assert re.search(message, str(err.value)), str(err.value)


def test_compvis_needs_32_norm_groups_and_missing_file_is_named(vae, tmp_path):
    lightning_checkpoint(to_compvis(vae.state_dict()), tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="autoencoder_norm_groups: 32"):
        load_autoencoder(monai_ae(norm_num_groups=16), tmp_path / "model.ckpt")
    with pytest.raises(FileNotFoundError, match="kl-f8.zip"):
        load_autoencoder(monai_ae(), tmp_path / "kl-f8.ckpt")


# ---- the paper preset at the real kl-f8 / SD VAE size, and SDSeg from a converted file ---------------------
def test_paper_preset_takes_real_kl_f8_weights_key_for_key():
    with torch.device("meta"):  # shapes only: 2 x 84 M parameters without memory or compute
        target = parse_configs(["train.yaml", "paper.yaml"]).get_parsed_content("autoencoder_def").state_dict()
        sd = sd_vae(channels=(128, 256, 512, 512)).state_dict()
    assert sum(v.numel() for v in target.values()) == sum(v.numel() for v in sd.values()) == 83_653_863
    for source in (sd, to_compvis(sd)):
        converted = convert_kl_state_dict(source)
        assert set(converted) == set(target)
        assert all(converted[k].shape == v.shape for k, v in target.items())


def test_sdseg_vision_encoder_starts_from_the_converted_encoder(vae, tmp_path):
    vae.save_pretrained(tmp_path / "sd-vae")
    overrides = dict(autoencoder_layout="ldm", autoencoder_channels=list(CHANNELS), autoencoder_res_blocks=2)
    overrides["autoencoder_norm_groups"] = 32
    parser = parse_configs(["train.yaml", "tiny.yaml"], autoencoder_path=str(tmp_path / "sd-vae"), **overrides)
    model = parser.get_parsed_content("network_def").eval()
    assert_same_outputs(model.autoencoder, vae)
    ae, ve = model.autoencoder.encoder.state_dict(), model.vision_encoder.encoder.state_dict()
    assert all(torch.equal(ae[k], ve[k]) for k in ae)
    assert model.vision_encoder.out.in_channels == 8 and model.vision_encoder.out.out_channels == 4  # 2Z -> Z
    model.scale_factor.fill_(0.18215)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_no_import_circle_between_the_autoencoder_and_its_weights():
    """scripts.weights.kl builds on scripts.autoencoder; scripts.autoencoder imports nothing from scripts.weights (at
    module level or inside a function), and each module imports first in a fresh interpreter."""
    import ast
    import subprocess
    from pathlib import Path

    import scripts.autoencoder

    tree = ast.parse(Path(scripts.autoencoder.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not [m for m in imported if m and m.startswith("scripts.weights")]
    for module in ("scripts.weights.kl", "scripts.autoencoder", "scripts.networks"):
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=Path(__file__).parents[1])
