"""The authors' U-Net (scripts/ldm_unet.py) and its pretrained start (scripts/weights/unet.py), without any download.

A randomly initialised diffusers ``UNet2DModel`` with the LSUN-Churches LDM structure (5 levels, attention on levels
0-3 and in the mid block, 2 res blocks, res-block up/down-sampling, scale-shift time conditioning; narrower channels)
is saved as diffusers and as a CompVis Lightning checkpoint (keys written here independently of the converter, with
LDM's per-head q/k/v interleaving), converted, and must give diffusers' output. The real LSUN-Churches sizes are
checked key for key and parameter for parameter on the meta device.
"""

import re

import pytest
import torch
from conftest import parse_configs
from monai.networks.nets import DiffusionModelUNet
from test_weights import lightning_checkpoint

from scripts.ldm_unet import LDMUNet, ScaleShiftResnetBlock
from scripts.weights.unet import convert_unet_state_dict, load_unet_weights, prepare_unet_state_dict

diffusers = pytest.importorskip("diffusers")  # requirements-dev.txt

CHANNELS = (32, 64, 64, 128, 128)
HEAD_CHANNELS = 8  # 4, 8, 8, 16 heads per level (LDM's LSUN-Churches: 8 heads everywhere, 24-96 channels each)
TOL = dict(atol=1e-4, rtol=1e-4)
LSUN_PARAMETERS = 294_973_828  # LDM's LSUN-Churches U-Net with 8 input channels (294,966,916 with its own 4)


def lsun_unet(channels=CHANNELS, in_channels=4, scale_shift=True, updown="resnet", **kwargs):
    """diffusers' UNet2DModel with the LSUN-Churches LDM U-Net's structure (diffusers' LDM conversion)."""
    return diffusers.UNet2DModel(
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=channels,
        down_block_types=("AttnDownBlock2D",) * 4 + ("DownBlock2D",),
        up_block_types=("ResnetUpsampleBlock2D" if updown == "resnet" else "UpBlock2D",) + ("AttnUpBlock2D",) * 4,
        layers_per_block=2,
        attention_head_dim=HEAD_CHANNELS if channels == CHANNELS else 24,
        downsample_type=updown,
        upsample_type=updown,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        attn_norm_num_groups=32,  # LDM normalises the mid-block attention input too
        dropout=0.2,
        **kwargs,
    )


def monai_unet(in_channels=4, scale_shift=True, updown=True, **kwargs) -> DiffusionModelUNet:
    args = dict(spatial_dims=2, in_channels=in_channels, out_channels=4, channels=CHANNELS, num_res_blocks=2)
    args.update(attention_levels=(True,) * 4 + (False,), num_head_channels=HEAD_CHANNELS, resblock_updown=updown)
    if scale_shift:
        return LDMUNet(**args, dropout=0.2, **kwargs).eval()
    return DiffusionModelUNet(**args, norm_eps=1e-5, **kwargs).eval()


def randomised(model):
    torch.manual_seed(0)
    model = model.eval()
    with torch.no_grad():  # no parameter keeps its init (zero convs and unit norms would hide swapped weights)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def unet():
    return randomised(lsun_unet())


def assert_same_outputs(monai_model, unet, z_c_channels=0):
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn((2, 4, 16, 16), generator=g), torch.tensor([999, 17])
    with torch.no_grad():
        expected = unet(z, t).sample
        for _ in range(2 if z_c_channels else 1):  # the padded z_c channels do not change the output
            z_c = torch.randn((2, z_c_channels, 16, 16), generator=g) * 3
            torch.testing.assert_close(monai_model(torch.cat([z, z_c], 1), t), expected, **TOL)


def to_compvis(sd: dict, channels=CHANNELS, layers=2, attention=(True,) * 4 + (False,)) -> dict:
    """diffusers UNet2DModel keys -> CompVis ``openaimodel.UNetModel`` keys, block by block as LDM numbers them;
    attention q, k, v as LDM's legacy 1x1-conv ``qkv`` (interleaved per head) and ``proj_out``."""
    out, n_levels = {}, len(channels)

    def move(src, dst, names):
        for key in [k for k in sd if k.startswith(src)]:
            name, _, param = key[len(src) :].rpartition(".")
            out[dst + (names.get(name, name) + "." if name else "") + param] = sd[key].clone()

    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0"}
    res.update({"conv2": "out_layers.3", "conv_shortcut": "skip_connection"})
    down = {**res, "conv": "op"}  # LDM's conv Downsample calls its conv `op`, its Upsample `conv`

    def attn(src, dst):
        width = sd[src + "to_q.weight"].shape[0]
        heads = width // HEAD_CHANNELS
        for param in ("weight", "bias"):
            q, k, v = (sd[f"{src}to_{n}.{param}"].reshape(heads, width // heads, -1) for n in "qkv")
            qkv = torch.cat([q, k, v], dim=1).reshape(3 * width, -1)  # per head: its q rows, k rows, v rows
            out[f"{dst}qkv.{param}"] = qkv[..., None] if param == "weight" else qkv[:, 0]
        out[dst + "norm.weight"], out[dst + "norm.bias"] = sd[src + "group_norm.weight"], sd[src + "group_norm.bias"]
        out[dst + "proj_out.weight"], out[dst + "proj_out.bias"] = (
            sd[src + "to_out.0.weight"][..., None],
            sd[src + "to_out.0.bias"],
        )

    move("conv_in.", "input_blocks.0.0.", {})
    move("time_embedding.linear_1.", "time_embed.0.", {})
    move("time_embedding.linear_2.", "time_embed.2.", {})
    k = 1
    for level in range(n_levels):
        for r in range(layers):
            move(f"down_blocks.{level}.resnets.{r}.", f"input_blocks.{k}.0.", res)
            if attention[level]:
                attn(f"down_blocks.{level}.attentions.{r}.", f"input_blocks.{k}.1.")
            k += 1
        if level < n_levels - 1:
            move(f"down_blocks.{level}.downsamplers.0.", f"input_blocks.{k}.0.", down)
            k += 1
    move("mid_block.resnets.0.", "middle_block.0.", res)
    attn("mid_block.attentions.0.", "middle_block.1.")
    move("mid_block.resnets.1.", "middle_block.2.", res)
    k = 0
    for level in range(n_levels):
        for r in range(layers + 1):
            move(f"up_blocks.{level}.resnets.{r}.", f"output_blocks.{k}.0.", res)
            j = 1
            if attention[n_levels - 1 - level]:
                attn(f"up_blocks.{level}.attentions.{r}.", f"output_blocks.{k}.1.")
                j = 2
            if r == layers and level < n_levels - 1:
                move(f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{k}.{j}.", res)
            k += 1
    move("conv_norm_out.", "out.0.", {})
    move("conv_out.", "out.2.", {})
    n_attn = sum(1 for key in sd if key.endswith("to_q.weight"))
    assert len(out) == len(sd) - 4 * n_attn  # every tensor moved once (q, k, v weights and biases -> one qkv pair)
    return out


# ---- the architecture: LDM's scale-shift res blocks in MONAI's U-Net, at LDM's size -----------------------------
def test_ldm_unet_is_monai_unet_with_scale_shift_blocks():
    plain, ldm = monai_unet(scale_shift=False), randomised(monai_unet())
    blocks = [m for m in ldm.modules() if isinstance(m, ScaleShiftResnetBlock)]
    assert isinstance(ldm, DiffusionModelUNet) and len(blocks) == 5 * 2 + 4 + 2 + 5 * 3 + 4  # down, mid, up
    assert set(ldm.state_dict()) == set(plain.state_dict())  # MONAI's parameter names, only the shapes differ
    assert blocks[0].time_emb_proj.out_features == 2 * blocks[0].out_channels and blocks[0].dropout.p == 0.2
    z, t = torch.randn(3, 4, 16, 16), torch.tensor([5, 500, 999])
    ldm.train()
    with torch.no_grad():
        assert not torch.equal(ldm(z, t), ldm(z, t))  # res-block dropout in training
        ldm.eval()
        assert torch.equal(ldm(z, t), ldm(z, t))


def test_paper_preset_unet_is_the_lsun_churches_ldm_size(capsys):
    """configs/paper.yaml builds LDM's U-Net (8 input channels): same parameters as diffusers' LSUN-Churches LDM."""
    with torch.device("meta"):  # shapes only: 295 M parameters without memory or compute
        ours = parse_configs(["train.yaml", "paper.yaml"]).get_parsed_content("unet_def")
        served = parse_configs(["inference.yaml", "paper.yaml"]).get_parsed_content("unet_def")
        plain = parse_configs(["train.yaml"]).get_parsed_content("unet_def")
        ldm = lsun_unet(channels=(192, 384, 384, 768, 768), in_channels=8)
    count = {
        name: sum(p.numel() for p in m.parameters()) for name, m in [("ours", ours), ("ldm", ldm), ("plain", plain)]
    }
    with capsys.disabled():
        print(
            f"\nSDSeg U-Net parameters: paper preset {count['ours']:,}, LDM LSUN-Churches (8 inputs) {count['ldm']:,},"
            f" MONAI's plain U-Net at the same sizes {count['plain']:,}"
        )
    assert count["ours"] == count["ldm"] == LSUN_PARAMETERS and count["plain"] < count["ours"]
    assert type(ours) is type(served) is LDMUNet and not isinstance(plain, LDMUNet)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in served.state_dict().items()}
    levels = [type(block).__name__ for block in ours.down_blocks]
    assert levels == ["AttnDownBlock"] * 4 + ["DownBlock"]  # attention at latent sizes 32, 16, 8, 4; not at 2
    heads = {m.attn.num_heads for name, m in ours.named_modules() if name.endswith(("attentions.0", "attention"))}
    assert heads == {8} and ours.conv_in.conv.in_channels == 8


# ---- diffusers and CompVis files -> MONAI, same outputs -------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "bin", "folder"])
def test_diffusers_unet_gives_diffusers_outputs(unet, tmp_path, fmt):
    from safetensors.torch import save_file

    path = tmp_path / ("unet" if fmt == "folder" else f"diffusion_pytorch_model.{fmt}")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    elif fmt == "bin":
        torch.save(unet.state_dict(), path)
    else:
        unet.save_pretrained(path)  # config.json + diffusion_pytorch_model.safetensors
    assert_same_outputs(load_unet_weights(path, monai_unet()), unet)


def test_compvis_checkpoint_gives_diffusers_outputs(unet, tmp_path):
    sd = to_compvis(unet.state_dict())
    assert sd["input_blocks.1.1.qkv.weight"].shape == (96, 32, 1) and "output_blocks.2.1.in_layers.0.weight" in sd
    others = {"model_ema.decay": torch.tensor(0.9999), "first_stage_model.encoder.conv_in.weight": torch.zeros(1)}
    others["cond_stage_model.x"], others["betas"] = torch.zeros(1), torch.zeros(1000)
    lightning_checkpoint(sd, tmp_path / "model.ckpt", "model.diffusion_model.", others)
    assert_same_outputs(load_unet_weights(tmp_path / "model.ckpt", monai_unet()), unet)


def test_padded_first_conv_ignores_z_c(unet, tmp_path):
    """The paper pads the 4-channel first convolution to 8 with zeros: the output does not depend on z_c."""
    unet.save_pretrained(tmp_path / "unet")
    model = load_unet_weights(tmp_path / "unet", monai_unet(in_channels=8))
    w = model.conv_in.conv.weight
    assert w.shape[1] == 8 and torch.count_nonzero(w[:, 4:]) == 0
    torch.testing.assert_close(w[:, :4], unet.conv_in.weight)
    assert_same_outputs(model, unet, z_c_channels=4)


@pytest.mark.parametrize("kind", ["plain res blocks, conv up/down", "plain res blocks, res-block up/down"])
def test_plain_monai_unet_takes_plain_ldm_weights(tmp_path, kind):
    """LDM U-Nets without scale-shift norm load into MONAI's own U-Net (diffusers and CompVis keys)."""
    updown = "resnet" if "res-block" in kind else "conv"
    source = randomised(lsun_unet(scale_shift=False, updown=updown))
    for name, sd in [("diffusers.bin", source.state_dict()), ("compvis.ckpt", to_compvis(source.state_dict()))]:
        torch.save(sd, tmp_path / name)
        assert_same_outputs(
            load_unet_weights(tmp_path / name, monai_unet(scale_shift=False, updown=updown == "resnet")), source
        )


def test_full_size_lsun_churches_converts_key_for_key():
    """The real LSUN-Churches LDM (diffusers and CompVis keys) fits the paper preset's U-Net exactly (meta tensors)."""
    with torch.device("meta"):
        target = parse_configs(["train.yaml", "paper.yaml"]).get_parsed_content("unet_def")
        sd = lsun_unet(channels=(192, 384, 384, 768, 768)).state_dict()
    compvis = {k: v for k, v in to_compvis(sd, channels=(192, 384, 384, 768, 768)).items()}
    assert len(compvis) == 520 and compvis["input_blocks.0.0.weight"].shape == (192, 4, 3, 3)
    for source in (sd, compvis):
        converted = prepare_unet_state_dict(source, target)  # raises on any missing, unexpected or misshapen key
        assert converted["conv_in.conv.weight"].shape == (192, 8, 3, 3)
        assert set(converted) == set(target.state_dict())
        assert convert_unet_state_dict(converted) == converted  # MONAI keys come back as they are


# ---- bad input: one error naming the file and the keys -------------------------------------------------------
def test_bad_unet_weights_raise_naming_the_file_and_keys(unet, tmp_path):
    sd = dict(unet.state_dict())
    cases = {
        "missing": (
            {k: v for k, v in sd.items() if k != "up_blocks.1.resnets.2.conv1.weight"},
            monai_unet(),
            r"missing keys \(1\): up_blocks\.1\.resnets\.2\.conv1\.conv\.weight",
        ),
        "unexpected": (
            {**sd, "mid_block.extra.weight": torch.zeros(1)},
            monai_unet(),
            r"unexpected keys.*mid_block\.extra",
        ),
        "architecture": (
            sd,
            monai_unet(scale_shift=False),
            r"shape mismatches.*time_emb_proj.*scripts\.ldm_unet\.LDMUNet",
        ),
        "not a U-Net": ({"weight": torch.zeros(3)}, monai_unet(), "not an LDM or diffusers U-Net"),
    }
    for case, (weights, model, message) in cases.items():
        path = tmp_path / f"{case.replace(' ', '_')}.bin"
        torch.save(weights, path)
        with pytest.raises(ValueError, match=re.escape(str(path))) as err:
            load_unet_weights(path, model)
        assert re.search(message, str(err.value), re.S), (case, str(err.value))
    lightning_checkpoint(to_compvis(sd), tmp_path / "groups.ckpt", "model.diffusion_model.")
    with pytest.raises(ValueError, match="unet_norm_groups: 32"):
        load_unet_weights(tmp_path / "groups.ckpt", monai_unet(norm_num_groups=16))


# ---- the paper preset: models/lsun_churches.ckpt, a flag to train from scratch, SDSeg from the file -------------
def test_paper_preset_reads_lsun_churches_and_can_train_from_scratch():
    parser = parse_configs(["train.yaml", "paper.yaml"])
    assert parser.get_parsed_content("network_def#unet_path").endswith("/models/lsun_churches.ckpt")
    assert (
        parse_configs(["train.yaml", "paper.yaml"], unet_path=None).get_parsed_content("network_def#unet_path") is None
    )
    assert parse_configs(["train.yaml", "paper.yaml"], resume=True).get_parsed_content("network_def#unet_path") is None
    assert parse_configs(["train.yaml", "tiny.yaml"]).get_parsed_content("network_def#unet_path") is None


def test_missing_unet_file_says_where_to_get_it(tmp_path):
    parser = parse_configs(["train.yaml", "tiny.yaml"], autoencoder_path=None, unet_path=str(tmp_path / "lsun.ckpt"))
    with pytest.raises(RuntimeError, match="SDSeg") as err:  # MONAI's config parser wraps the error
        parser.get_parsed_content("network_def")
    assert isinstance(err.value.__cause__, FileNotFoundError)
    assert re.search(r"lsun\.ckpt.*lsun_churches\.zip.*--unet_path None", str(err.value.__cause__))


def test_sdseg_unet_starts_from_the_file(tmp_path):
    """The tiny preset's plain U-Net from a diffusers file: SDSeg's noise estimate is the file's U-Net on z_t."""
    source = randomised(
        diffusers.UNet2DModel(
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 128),
            down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            attention_head_dim=32,
            downsample_type="resnet",
            upsample_type="resnet",
            norm_num_groups=16,
            norm_eps=1e-6,
        )
    )
    source.save_pretrained(tmp_path / "unet")
    torch.manual_seed(0)
    parser = parse_configs(["train.yaml", "tiny.yaml"], autoencoder_path=None, unet_path=str(tmp_path / "unet"))
    model = parser.get_parsed_content("network_def").eval()
    w = model.unet.conv_in.conv.weight
    assert w.shape[1] == 8 and torch.count_nonzero(w[:, 4:]) == 0
    g = torch.Generator().manual_seed(3)
    z_t, z_c, t = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g), torch.tensor([3, 999])
    with torch.no_grad():
        torch.testing.assert_close(model.model_output(z_t, t, z_c), source(z_t, t).sample, **TOL)
