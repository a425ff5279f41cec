"""The inference fast path gives the masks of the plain, one-image-at-a-time path (issue: speed and memory).

Plain path: each image on its own, each of the K noise samples on its own, the vision encoder run again
at every step. Fast path: batches of images, the image latent computed once and reused across steps and
samples, K samples as one batch, channels-last, torch.compile, MetaTensor inputs unwrapped.
"""

import numpy as np
import pytest
import torch
from conftest import build_tiny_sdseg
from monai.data import MetaTensor
from PIL import Image

from scripts.metrics import dice_iou
from scripts.sampler import SDSegInferer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    m = build_tiny_sdseg(seed=5, prediction_type="epsilon").eval()  # the plain path below uses Eq. 2
    m.scale_factor.fill_(0.7)
    with torch.no_grad():  # the U-Net's zero-initialised convolutions (z_c inputs, residual and output convs)
        for p in m.unet.parameters():  # get weights, so the image reaches the score, as after training
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.05)
        m.unet.conv_in.conv.weight[:, 4:].normal_(0, 0.3)
        # a trained mask decoder gives three equal, confident channels: copy channel 0 of the output convolution
        # to the others and sharpen it (x30), so few pixels sit next to the 0.5 threshold, as after training
        out = m.autoencoder.decoder.blocks[-1].conv
        out.weight.copy_(out.weight[:1].expand_as(out.weight) * 30)
        out.bias.copy_(out.bias[:1].expand_as(out.bias) * 30)
    return m


def assert_same_masks(fast, plain, label=""):
    """Identical masks; float32 kernels differ with batch size and memory format only in rounding, so a
    pixel may flip only where the plain score is within 1e-3 of the threshold (rounding x30 through the
    sharpened decoder)."""
    flipped = (fast > 0.5) != (plain > 0.5)
    assert not flipped[(plain - 0.5).abs() > 1e-3].any(), label
    assert int(flipped.sum()) <= 2, label
    assert torch.allclose(fast, plain, atol=1e-3), label


@pytest.fixture(scope="module")
def images(demo_root):
    files = sorted((demo_root / "cvc" / "Original").glob("*.png"))[:6]
    arr = np.stack([np.asarray(Image.open(f).convert("RGB").resize((64, 64), Image.BILINEAR)) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def plain_path(model, images, num_steps, num_samples, seed):
    """One image and one noise sample at a time; z_c recomputed at every step."""
    noise = SDSegInferer(num_steps, num_samples, seed).noise((4, 16, 16), torch.device("cpu"))
    ddim = SDSegInferer(num_steps, num_samples, seed)._ddim(model)
    scores = []
    with torch.no_grad():
        for image in images[:, None]:
            per_sample = []
            for k in range(num_samples):
                if num_steps == 1:
                    per_sample.append(model(image, noise=noise[k : k + 1]))
                    continue
                z = noise[k : k + 1]
                for step in ddim.timesteps:
                    t = torch.full((1,), int(step), dtype=torch.long)
                    z, z0 = ddim.step(model.model_output(z, t, model.encode_image(image)), int(step), z)
                per_sample.append(model.decode_score(z0))
            scores.append(torch.stack(per_sample).mean(0))
    return torch.cat(scores)


@pytest.mark.parametrize("num_steps,num_samples", [(1, 1), (1, 3), (4, 1), (3, 2)])
def test_fast_path_gives_the_plain_path_masks(model, images, num_steps, num_samples):
    plain = plain_path(model, images, num_steps, num_samples, seed=7)
    mask_fraction = float((plain > 0.5).float().mean())
    assert 0.05 < mask_fraction < 0.95, "degenerate test masks"
    assert not torch.allclose(plain[0], plain[1], atol=1e-3), "the image must matter"
    for channels_last in (False, True):
        fast = SDSegInferer(num_steps, num_samples, seed=7, channels_last=channels_last)
        batched = torch.cat([fast(images[:4], model), fast(images[4:], model)])  # batch sizes 4 and 2
        assert_same_masks(batched, plain, f"channels_last={channels_last}")
    model.to(memory_format=torch.contiguous_format)


def test_channels_last_converts_the_network_once(model, images):
    inferer = SDSegInferer(channels_last=True)
    inferer(images[:2], model)
    assert model.unet.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.contiguous_format)


def test_bf16_autocast_keeps_dice(model, images, demo_root):
    """Under bf16 autocast (MONAI's ``amp`` with ``amp_kwargs={'dtype': torch.bfloat16}``) the mask decoder runs
    in bf16, the encoder, U-Net and diffusion algebra in float32. Against the float32 masks the mean Dice is
    0.9977 here (0.9983 with the trained demo model, README); the Dice against the demo labels moves < 0.002."""
    ref = SDSegInferer(seed=2)(images, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = SDSegInferer(seed=2)(images, model)
        assert SDSegInferer()._networks(model)[2](torch.zeros(1, 4, 8, 8)).dtype == torch.bfloat16  # amp is on
    assert low.dtype == torch.float32 and not torch.equal(low, ref)  # bf16 did run
    agreement = [dice_iou(low[i], ref[i])[0] for i in range(len(images))]
    assert sum(agreement) / len(agreement) >= 0.995 and min(agreement) >= 0.99, agreement
    files = sorted((demo_root / "cvc" / "Ground Truth").glob("*.png"))[: len(images)]
    labels = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(f).resize((64, 64), Image.NEAREST)) > 127) for f in files]
    )
    labels = labels[:, None].float()
    dice = [sum(dice_iou(s[i], labels[i])[0] for i in range(len(images))) / len(images) for s in (ref, low)]
    assert abs(dice[0] - dice[1]) <= 0.002, dice


def test_metatensor_in_metatensor_out(model, images):
    """Networks see a plain tensor (no per-op metadata cost); the score keeps the image's metadata and
    applied operations, so ``Invertd`` maps it back to the input's geometry."""
    meta_images = MetaTensor(images[:2], meta={"filename_or_obj": ["a.png", "b.png"]})
    meta_images.applied_operations = [[{"class": "Resized", "id": 1}], [{"class": "Resized", "id": 2}]]
    out = SDSegInferer(seed=1)(meta_images, model)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == ["a.png", "b.png"]
    assert out.applied_operations == meta_images.applied_operations
    assert torch.equal(out.as_tensor(), SDSegInferer(seed=1)(images[:2], model))


def test_compiled_networks_give_the_same_masks(model, images):
    """``compile=True`` wraps the three networks in torch.compile (the 'eager' backend here: graph capture
    of our networks without the minutes of C++ code generation the default backend needs on this CPU)."""
    ref = SDSegInferer(seed=4)(images[:2], model)
    compiled = SDSegInferer(seed=4, compile=True, compile_kwargs={"backend": "eager"})
    assert_same_masks(compiled(images[:2], model), ref)


def test_gradient_checkpointing_gives_the_same_gradients():
    """``gradient_checkpointing=True`` keeps far fewer activations for backward and recomputes them there:
    same loss and gradients."""
    grads, saved = [], []
    for ckpt in (False, True):
        model = build_tiny_sdseg(seed=1, gradient_checkpointing=ckpt, prediction_type="epsilon").train()
        model.scale_factor.fill_(0.8)
        gen = torch.Generator().manual_seed(0)
        image = torch.rand((2, 3, 64, 64), generator=gen) * 2 - 1
        mask = (torch.rand((2, 1, 64, 64), generator=gen) > 0.5).float()
        t, noise = torch.tensor([10, 900]), torch.randn((2, 4, 16, 16), generator=gen)
        nbytes = []

        def pack(x):
            nbytes.append(x.numel() * x.element_size())
            return x

        torch.manual_seed(0)  # the posterior sample of the mask latent
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = model(image, mask=mask, t=t, noise=noise)["loss"]
        saved.append(sum(nbytes))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert saved[1] < 0.25 * saved[0], saved  # activations kept for backward (measured 21.5 MB -> 1.9 MB)
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("vision_encoder") for n in grads[0])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_latent_cache_skips_the_autoencoder_for_masks_seen_before():
    """``latent_cache=True``: masks seen before (bytes equal) are not encoded again; the posterior sample is
    still fresh, so losses equal the uncached model's for the same random stream."""
    gen = torch.Generator().manual_seed(0)
    image = torch.rand((3, 3, 64, 64), generator=gen) * 2 - 1
    mask = (torch.rand((3, 1, 64, 64), generator=gen) > 0.5).float()
    t, noise = torch.tensor([5, 500, 999]), torch.randn((3, 4, 16, 16), generator=gen)
    plain, cached = (build_tiny_sdseg(seed=2, latent_cache=c, prediction_type="epsilon").train() for c in (False, True))
    encoded = []
    cached.autoencoder.encoder.register_forward_hook(lambda _m, inputs, _o: encoded.append(inputs[0].shape[0]))
    for model in (plain, cached):
        model.scale_factor.fill_(0.8)
    batches = [mask, mask, torch.cat([mask[:1], mask[1:].flip(-1)])]  # new, all seen, two flipped ones new
    for batch in batches:
        torch.manual_seed(1)
        want = plain(image, mask=batch, t=t, noise=noise)["loss"]
        torch.manual_seed(1)
        got = cached(image, mask=batch, t=t, noise=noise)["loss"]
        assert torch.allclose(got, want, atol=1e-6)
    assert encoded == [3, 2]  # the first batch, then only the two flipped masks
    assert len(cached.latent_cache) == 5
