"""The SDSeg module and its loss: the paper's algebra, checked by hand on fixed tensors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_sdseg
from monai.engines import SupervisedTrainer

from scripts.engine import SDSegTrainStep
from scripts.networks import mask_to_ae_input


@pytest.fixture(scope="module")
def model():
    m = build_tiny_sdseg(prediction_type="epsilon")  # the paper's algebra
    m.scale_factor.fill_(0.5)
    return m


def batch(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand((b, 3, size, size), generator=g) * 2 - 1
    mask = (torch.rand((b, 1, size, size), generator=g) > 0.5).float()
    return image, mask


def test_schedule_matches_ldm_linear(model):
    betas = torch.linspace(0.0015**0.5, 0.0155**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert torch.allclose(model.alphas_cumprod.double(), alpha_bar, rtol=1e-5)
    assert abs(float(model.alphas_cumprod[999]) - 6.69e-4) < 0.01e-4


def test_zero_initialised_condition_channels(model):
    """At init the U-Net output does not depend on z_c (its input-conv weights are zero)."""
    conv = model.unet.conv_in.conv
    assert conv.in_channels == 8 and torch.count_nonzero(conv.weight[:, 4:]) == 0
    assert torch.count_nonzero(conv.weight[:, :4]) > 0
    z_t = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 999])
    with torch.no_grad():
        a = model.model_output(z_t, t, torch.randn(2, 4, 8, 8))
        b = model.model_output(z_t, t, torch.randn(2, 4, 8, 8) * 5)
    assert torch.equal(a, b)


def test_vision_encoder_starts_from_autoencoder_encoder(model):
    ae, ve = model.autoencoder.encoder.state_dict(), model.vision_encoder.encoder.state_dict()
    assert ae.keys() == ve.keys() and all(torch.equal(ae[k], ve[k]) for k in ae)
    assert model.vision_encoder.out.kernel_size == (1, 1) and model.vision_encoder.out.in_channels == 4
    assert model.vision_encoder.encoder is not model.autoencoder.encoder  # a copy: E stays frozen


def test_condition_channels_widen_the_image_way_into_the_unet():
    """condition_channels 16: z_c has 16 channels, E's last convolution is widened with E's 4 kernels first, the
    U-Net takes 4 + 16 inputs (the z_c part zero at init), and every z_c channel reaches the output once trained."""
    model = build_tiny_sdseg(condition_channels=16)
    model.scale_factor.fill_(1.0)
    ve, ae = model.vision_encoder.encoder, model.autoencoder.encoder
    last, e_last = ve.blocks[-1].conv, ae.blocks[-1].conv
    assert (last.out_channels, e_last.out_channels) == (16, 4)
    assert torch.equal(last.weight[:4], e_last.weight) and torch.equal(last.bias[:4], e_last.bias)
    assert torch.count_nonzero(last.weight[4:]) > 0  # the new kernels are not dead
    conv = model.unet.conv_in.conv
    assert conv.in_channels == 20 and torch.count_nonzero(conv.weight[:, 4:]) == 0
    image, _ = batch()
    z_c = model.encode_image(image)
    assert z_c.shape == (2, 16, 16, 16)
    with torch.no_grad():
        conv.weight[:, 4:].normal_(0, 0.1)
        model.unet.out[-1].conv.weight.normal_(0, 0.1)
    z_t, t = torch.randn(2, 4, 16, 16), torch.tensor([999, 999])
    for c in (5, 19):  # a change in any one z_c channel, the widened ones included, changes the output
        shifted = z_c.clone()
        shifted[:, c - 4] += 1
        with torch.no_grad():
            assert not torch.allclose(model.model_output(z_t, t, z_c), model.model_output(z_t, t, shifted))
    from scripts.sampler import SDSegInferer

    with torch.no_grad():  # the single step, the sampler (1 and 2 steps) and the training loss draw 4-channel z_t
        assert model(image).shape == (2, 1, 64, 64)
        assert model(image, mask=batch()[1])["z0_pred"].shape == (2, 4, 16, 16)
    assert SDSegInferer(1, 1, seed=0)(image, model).shape == SDSegInferer(2, 1, seed=0)(image, model).shape
    default = build_tiny_sdseg()
    assert default.vision_encoder.encoder.blocks[-1].conv.out_channels == 4 and default.unet.in_channels == 8
    with pytest.raises(RuntimeError) as err:  # MONAI's config parser wraps the network's ValueError
        build_tiny_sdseg(condition_channels=2)
    assert "condition_channels >= 4" in str(err.value.__cause__)


def test_oracle_noise_recovers_z0_exactly(model):
    z0 = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    noise = torch.randn_like(z0)
    t = torch.tensor([0, 500, 999])
    m = copy.deepcopy(model).double()
    z_t = m.add_noise(z0, noise, t)
    assert torch.allclose(m.estimate_z0(z_t, t, noise), z0, atol=1e-10)
    assert not torch.allclose(m.estimate_z0(z_t, t, noise + 0.01), z0, atol=1e-3)


@pytest.mark.parametrize("loss_weight", [0.0, 1.0])
def test_loss_matches_hand_computation(model, loss_weight):
    image, mask = batch()
    t = torch.tensor([3, 999])
    noise = torch.randn(2, 4, 16, 16)
    torch.manual_seed(7)  # the posterior sample inside encode_mask
    out = model(image, mask=mask, loss_weight=loss_weight, t=t, noise=noise)

    torch.manual_seed(7)
    with torch.no_grad():
        mu, sigma = model.autoencoder.encode(mask_to_ae_input(mask))
        z0 = 0.5 * (mu + sigma * torch.randn_like(sigma))
        a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        zc = model.vision_encoder.out(model.vision_encoder.encoder(image))
        n_hat = model.unet(torch.cat([z_t, zc], 1), timesteps=t)
        z0_hat = (z_t - (1 - a).sqrt() * n_hat) / a.sqrt()
        noise_term = (n_hat - noise).abs().mean()
        latent_term = (z0_hat - z0).abs().mean()
    assert torch.allclose(out["loss_noise"], noise_term, rtol=1e-5)
    assert torch.allclose(out["loss_latent"], latent_term, rtol=1e-5)
    assert torch.allclose(out["loss"], noise_term + loss_weight * latent_term, rtol=1e-5)
    assert float(latent_term) > 0


def test_training_steps_freeze_autoencoder_and_train_the_rest(demo_root):
    model = build_tiny_sdseg(seed=3)
    before = copy.deepcopy(model.state_dict())
    images, masks = batch(4, seed=3)
    loader = [{"image": images, "label": masks}] * 3
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=model,
        optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3),
        loss_function=F.l1_loss,
        iteration_update=SDSegTrainStep(loss_weight=1.0),
        decollate=False,
    )
    trainer.run()
    after = model.state_dict()
    ae_keys = [k for k in after if k.startswith("autoencoder.")]
    assert ae_keys and all(torch.equal(before[k], after[k]) for k in ae_keys)
    for prefix in ("vision_encoder.", "unet."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    assert float(model.scale_factor) > 0  # set from the training masks before the first step
    assert not model.autoencoder.training and all(not p.requires_grad for p in model.autoencoder.parameters())


def train_counting_encoded_masks(model, dataset, batch_size=4, iterations=2):
    """Train ``iterations`` steps; return how many masks the autoencoder encoded before the first optimiser step."""
    from monai.data import DataLoader

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    steps, seen, encode = [0], [], model._mask_posterior  # the frozen encoder's one entry point
    optimizer.register_step_pre_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    model._mask_posterior = lambda mask: seen.append((steps[0], mask.shape[0])) or encode(mask)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        epoch_length=iterations,
        train_data_loader=DataLoader(dataset, batch_size=batch_size, shuffle=False),
        network=model,
        optimizer=optimizer,
        loss_function=F.l1_loss,
        iteration_update=SDSegTrainStep(loss_weight=1.0),
        decollate=False,
    )
    trainer.run()
    return sum(n for step, n in seen if step == 0)


def test_scale_factor_comes_from_64_training_masks_before_the_first_step():
    """1 / std(z) from at least 64 training masks, not from the first batch (here 4 empty masks, as a CT run's first
    slices can be: their latents alone would set it far off)."""
    model = build_tiny_sdseg(seed=4)
    with torch.no_grad():  # a narrow posterior, as a trained autoencoder has (sigma = exp(-5)): z varies with the mask
        model.autoencoder.quant_conv_log_sigma.conv.weight.zero_()
        model.autoencoder.quant_conv_log_sigma.conv.bias.fill_(-10.0)
    images, masks = batch(64, seed=4)
    masks[:4] = 0  # the first batch
    dataset = [{"image": images[i], "label": masks[i]} for i in range(64)]
    assert train_counting_encoded_masks(model, dataset) == 64 + 4  # 64 for the scale, then the first step's batch
    with torch.no_grad():  # std of z = mu + sigma * eps over the 64 masks (sampling noise negligible here)
        mu, sigma = model.autoencoder.encode(mask_to_ae_input(masks))
        expected = 1 / ((mu**2 + sigma**2).mean() - mu.mean() ** 2).sqrt()
        mu4, sigma4 = mu[:4], sigma[:4]
        first_batch_only = 1 / ((mu4**2 + sigma4**2).mean() - mu4.mean() ** 2).sqrt()
    assert float(model.scale_factor) == pytest.approx(float(expected), rel=0.005)
    assert abs(float(first_batch_only) / float(expected) - 1) > 0.05, "the test data must tell the two apart"


def test_fixed_scale_factor_from_the_config_is_kept():
    model = build_tiny_sdseg(seed=4, scale_factor=0.1145)
    images, masks = batch(8, seed=5)
    dataset = [{"image": images[i], "label": masks[i]} for i in range(8)]
    assert train_counting_encoded_masks(model, dataset) == 4  # only the first step's batch: no estimate
    assert float(model.scale_factor) == pytest.approx(0.1145)


def test_frozen_encoder_switch():
    model = build_tiny_sdseg(trainable_encoder=False)
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    assert any(p.requires_grad for p in model.unet.parameters())


def test_unet_channel_check():
    from monai.networks.nets import DiffusionModelUNet

    model = build_tiny_sdseg()
    bad = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=4,
        out_channels=4,
        channels=(32, 64),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=16,
    )
    with pytest.raises(ValueError, match="8 input channels"):
        type(model)(model.autoencoder, bad, model.scheduler)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_prediction_types_recover_z0_and_noise_from_their_oracle(model, prediction_type):
    """Each parametrisation's exact output gives back z0 and the noise; the single step reads z~0 from it."""
    m = copy.deepcopy(model).double()
    m.prediction_type = prediction_type
    z0 = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    noise = torch.randn_like(z0)
    t = torch.tensor([0, 500, 999])
    z_t = m.add_noise(z0, noise, t)
    a = m.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    oracle = {"epsilon": noise, "sample": z0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * z0}[prediction_type]
    assert torch.allclose(m.estimate_z0(z_t, t, oracle), z0, atol=1e-9)
    assert torch.allclose(m.estimate_noise(z_t, t, oracle), noise, atol=1e-9)
    # at t = T-1 an error in the output reaches z~0 amplified x39 for epsilon, not for sample or v
    err = (m.estimate_z0(z_t, t, oracle + 0.01) - z0)[2].abs().max()
    assert (float(err) > 0.3) == (prediction_type == "epsilon")


def test_unknown_prediction_type_and_mismatched_weights_are_clear_errors(model):
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        type(model)(model.autoencoder, model.unet, model.scheduler, prediction_type="x0")
    trained = build_tiny_sdseg(prediction_type="sample").state_dict()
    assert trained["_extra_state"] == {"prediction_type": "sample"}
    with pytest.raises(ValueError, match="trained with prediction_type 'sample'.*--prediction_type sample"):
        build_tiny_sdseg(prediction_type="epsilon").load_state_dict(trained)
    build_tiny_sdseg(prediction_type="sample").load_state_dict(trained)


class _PerfectNoise(torch.nn.Module):
    """A U-Net stand-in that returns the noise the loss will add (in the autocast dtype of a real network)."""

    in_channels, out_channels, with_conditioning = 8, 4, False

    def __init__(self, unet, noise):
        super().__init__()
        self.conv_in, self.noise = unet.conv_in, noise

    def forward(self, x, timesteps):
        return self.noise.to(self.conv_in(x).dtype) + 0 * self.conv_in(x).mean()


def test_amp_keeps_the_diffusion_algebra_in_float32(model):
    """Under bf16 autocast only the networks run in bf16: with a perfect noise predictor the loss is the
    float32 one (0 up to the predictor's own bf16 rounding), not z_t's bf16 rounding amplified x39."""
    image, mask = batch(4)
    noise = torch.randn(4, 4, 16, 16)
    t = torch.tensor([0, 10, 500, 999])
    m = copy.deepcopy(model)
    m.unet = _PerfectNoise(m.unet, noise.to(torch.bfloat16).float())  # exactly representable in bf16
    losses = {}
    for amp in (False, True):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            losses[amp] = m(image, mask=mask, t=t, noise=noise.to(torch.bfloat16).float())
    assert float(losses[False]["loss"]) < 1e-5
    for key in ("loss", "loss_noise", "loss_latent"):
        assert abs(float(losses[True][key]) - float(losses[False][key])) < 1e-4, key
        assert losses[True][key].dtype == torch.float32


def test_final_step_share_puts_that_share_of_each_batch_at_t_max():
    step = SDSegTrainStep(final_step_share=0.5)
    torch.manual_seed(0)
    draws = torch.stack([step.timesteps(8, 1000, "cpu") for _ in range(200)])
    assert (draws[:, :4] == 999).all()
    rest = draws[:, 4:].float()
    assert (rest < 999).float().mean() > 0.99 and abs(float(rest.mean()) - 499.5) < 40  # 4 std of the mean of 800 draws
    assert (SDSegTrainStep().timesteps(8, 1000, "cpu") == 999).sum() <= 1
    with pytest.raises(ValueError, match="final_step_share"):
        SDSegTrainStep(final_step_share=1.5)


@pytest.mark.parametrize("share, paired", [(0.5, 2), (0.25, 1), (0.0, 1)])
def test_consistency_term_sees_the_final_step_items_twice_and_compares_their_estimates(share, paired):
    """The items at T-1 come again at the end of the batch with their own noise draw; the term is the L1 between the
    two z0 estimates of each pair. Every pair is at t = T-1, also with final_step_share 0 (then item 0 alone)."""
    model = build_tiny_sdseg(seed=6, prediction_type="epsilon")  # a "sample" U-Net outputs 0 at init (zero out conv)
    model.scale_factor.fill_(1.0)
    images, masks = batch(4, seed=6)
    seen = []
    forward = model.forward

    def spy(image, **kw):
        out = forward(image, **kw)
        seen.append((image.clone(), kw["t"].clone(), out["z0_pred"].detach().clone()))
        return out

    model.forward = spy
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": images, "label": masks}],
        network=model,
        optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3),
        loss_function=F.l1_loss,
        iteration_update=SDSegTrainStep(final_step_share=share, consistency_weight=2.0),
        decollate=False,
    )
    torch.manual_seed(0)
    trainer.run()
    (image, t, z0), out = seen[0], trainer.state.output
    assert image.shape[0] == 4 + paired and torch.equal(image[4:], images[:paired])  # the first items again
    assert (t[:paired] == 999).all() and (t[4:] == 999).all()  # both members of every pair at T-1
    assert (t[paired:4] < 999).all()  # the others uniform (seeded draw: none of them at T-1 here)
    assert float(out["loss_consistency"]) > 0
    assert torch.allclose(out["loss_consistency"], F.l1_loss(z0[:paired], z0[4:]))
    total = out["loss_noise"] + out["loss_latent"] + 2.0 * out["loss_consistency"]
    assert torch.allclose(out["loss"], total) and out["image"].shape[0] == 4
    assert SDSegTrainStep(final_step_share=share).paired_items(4) == 0  # no term, no pairs
