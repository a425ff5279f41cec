"""Reverse processes, metrics conventions and atomic writing."""

import math

import numpy as np
import pytest
import torch
from conftest import build_tiny_sdseg
from PIL import Image

from scripts.io_utils import atomic_path, atomic_save_image
from scripts.metrics import dice_iou, summarise
from scripts.sampler import SDSegInferer


@pytest.fixture(scope="module")
def model():
    m = build_tiny_sdseg(seed=5, prediction_type="epsilon").eval()
    m.scale_factor.fill_(0.7)
    return m


@pytest.fixture(scope="module")
def images():
    return torch.rand((5, 3, 64, 64), generator=torch.Generator().manual_seed(2)) * 2 - 1


def test_single_step_is_the_paper_formula(model, images):
    inferer = SDSegInferer(seed=11)
    out = inferer(images, model)
    assert out.shape == (5, 1, 64, 64) and 0 <= float(out.min()) and float(out.max()) <= 1
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert torch.allclose(model(images, noise=noise), out, atol=1e-5)


def test_same_seed_same_masks_any_batching(model, images):
    a = SDSegInferer(seed=3)(images, model)
    b = torch.cat([SDSegInferer(seed=3)(images[:2], model), SDSegInferer(seed=3)(images[2:], model)])
    assert torch.allclose(a, b, atol=1e-6)
    c = SDSegInferer(seed=4)(images, model)
    assert not torch.allclose(a, c)


def test_k_samples_average_the_single_sample_runs(model, images):
    k = 3
    avg = SDSegInferer(num_samples=k, seed=9)(images, model)
    noise = torch.randn((k, 4, 16, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        singles = torch.stack([model(images, noise=noise[i : i + 1]) for i in range(k)]).mean(0)
    assert torch.allclose(avg, singles, atol=1e-5)


def test_ddim_uses_the_training_schedule(model, images):
    """DDIM over N steps of the training schedule, at LDM's "uniform" steps 1000 // N apart (the stride of step())."""
    ddim = SDSegInferer(num_steps=5, seed=1)
    out = ddim(images, model)
    assert out.shape == (5, 1, 64, 64) and torch.isfinite(out).all()
    sched = ddim._ddim(model)
    assert sched.timesteps.tolist() == [801, 601, 401, 201, 1]  # range(0, 1000, 200) + 1, reversed (authors' DDIM)
    assert torch.allclose(sched.alphas_cumprod, model.scheduler.alphas_cumprod)
    assert SDSegInferer(num_steps=10)._ddim(model).timesteps.tolist() == list(range(901, 0, -100))
    assert SDSegInferer(num_steps=3)._ddim(model).timesteps.tolist() == [667, 334, 1]  # N steps, stride 333
    assert SDSegInferer(num_steps=1000)._ddim(model).timesteps.tolist() == list(range(999, -1, -1))


def test_declared_ddim_scheduler_gives_the_same_steps_and_numbers(model, images):
    """inference.yaml's ``ddim_scheduler`` (the training schedule's parameters) in the inferer: the same steps and
    masks as the scheduler built from the network's betas; a different schedule or target is refused."""
    from monai.networks.schedulers import DDIMScheduler

    from scripts.bundle_config import parse_configs

    parser = parse_configs(["inference.yaml", "tiny.yaml"], prediction_type="epsilon")
    declared = parser.get_parsed_content("inferer")
    assert isinstance(declared.scheduler, DDIMScheduler)
    for n in (2, 5, 10):
        ours = SDSegInferer(num_steps=n, seed=1, scheduler=declared.scheduler)
        assert ours._ddim(model).timesteps.tolist() == SDSegInferer(num_steps=n)._ddim(model).timesteps.tolist()
        assert torch.equal(ours(images, model), SDSegInferer(num_steps=n, seed=1)(images, model))
    other = DDIMScheduler(1000, schedule="linear_beta", clip_sample=False)
    with pytest.raises(ValueError, match="training schedule"):
        SDSegInferer(num_steps=5, scheduler=other)(images, model)
    sample = parse_configs(["inference.yaml", "tiny.yaml"]).get_parsed_content("ddim_scheduler")  # tiny: sample
    with pytest.raises(ValueError, match="prediction_type"):
        SDSegInferer(num_steps=5, scheduler=sample)(images, model)


class GaussianPriorOracle(torch.nn.Module):
    """Latents z0 ~ N(mean, std^2) elementwise and the exact posterior-mean noise predictor E[n | z_t] for them:
    a perfectly trained model of that prior, on latents of ``shape``."""

    def __init__(self, scheduler, mean=1.0, std=0.1, shape=(4, 16, 16)):
        super().__init__()
        self.scheduler, self.mean, self.std, self.shape = scheduler, mean, std, shape
        self.alphas_cumprod = scheduler.alphas_cumprod.double()

    num_train_timesteps = 1000
    prediction_type = "epsilon"

    def encode_image(self, image):
        return torch.zeros(image.shape[0], *self.shape)

    def latent_shape(self, image):
        return self.shape

    def model_output(self, z_t, t, z_c):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        z = z_t.double()
        return ((1 - a).sqrt() * (z - a.sqrt() * self.mean) / (a * self.std**2 + 1 - a)).to(z_t.dtype)

    def estimate_z0(self, z_t, t, noise_pred):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(z_t.dtype)
        return (z_t - (1 - a).sqrt() * noise_pred) / a.sqrt()

    def decode_score(self, z0):
        return z0


def ddim_gain(alphas: list[float], std: float) -> float:
    """The factor by which N exact DDIM steps (eta 0) over noise levels ``alphas`` (alpha_bar of the sampler's steps,
    in order), then the last step's z0 estimate, scale a latent's deviation from sqrt(alpha_bar) * mean, for the
    Gaussian prior's exact predictor: with v = a s^2 + 1 - a, z0~ - mean = sqrt(a) s^2 / v * d and the step to a'
    maps d to (sqrt(a a') s^2 + sqrt((1 - a)(1 - a'))) / v * d. Float64."""
    v = [a * std**2 + 1 - a for a in alphas]
    gain = math.sqrt(alphas[-1]) * std**2 / v[-1]
    for i in range(len(alphas) - 1):
        a, b = alphas[i], alphas[i + 1]
        gain *= (math.sqrt(a * b) * std**2 + math.sqrt((1 - a) * (1 - b))) / v[i]
    return gain


@pytest.mark.parametrize("num_steps", [2, 5, 10, 50])
def test_ddim_with_an_exact_noise_predictor_gives_the_closed_form(model, num_steps):
    """With the exact noise predictor of a Gaussian prior every DDIM step is linear, so the sampler's output is known in
    closed form from the alpha_bar of its actual steps: z0~ = mean + (z_T - sqrt(a_1) mean) * gain. Its spread (not the
    prior's 0.1: N discrete steps from z_T ~ N(0, 1) shrink it, to 0.049-0.072 for N = 2-50) must match within 4
    standard errors of a std of n = 262,144 draws (s / sqrt(2n), 0.14 %), and every element its own closed form. A
    step that reads alpha_bar half a stride off, at the step where it matters most, moves the spread by 20-77 %
    (each element's closed form catches far smaller misreads)."""
    mean, std, shape = 1.0, 0.1, (4, 256, 256)
    oracle = GaussianPriorOracle(model.scheduler, mean, std, shape)
    inferer = SDSegInferer(num_steps=num_steps, num_samples=1, seed=0)
    z0 = inferer(torch.zeros(1, 3, 64, 64), oracle).double()
    steps = inferer._ddim(model).timesteps.tolist()
    A = model.scheduler.alphas_cumprod.double()
    alphas = [float(A[t]) for t in steps]
    gain = ddim_gain(alphas, std)
    n = z0.numel()
    assert abs(float(z0.std()) - gain) < 4 * gain / math.sqrt(2 * n), (float(z0.std()), gain)
    expected_mean = mean * (1 - math.sqrt(alphas[0]) * gain)
    assert abs(float(z0.mean()) - expected_mean) < 4 * gain / math.sqrt(n), (float(z0.mean()), expected_mean)
    z_T = inferer.noise(shape, torch.device("cpu")).double()
    assert torch.allclose(z0, mean + (z_T - math.sqrt(alphas[0]) * mean) * gain, atol=1e-5)
    # one step's alpha_bar read half a stride off: outside the std's tolerance (4 standard errors) by far
    stride = 1000 // num_steps
    shifted = [alphas[:j] + [float(A[steps[j] + stride // 2])] + alphas[j + 1 :] for j in range(1, num_steps)]
    misread = max(abs(ddim_gain(a, std) / gain - 1) for a in shifted)
    assert misread > 10 * 4 / math.sqrt(2 * n), misread  # ten times the tolerance


def test_bad_inferer_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        SDSegInferer(num_steps=0)


def test_dice_iou_hand_values_and_empty_convention():
    pred = torch.zeros(1, 4, 4)
    label = torch.zeros(1, 4, 4)
    pred[0, :2, :2] = 1  # 4 pixels
    label[0, :2, :] = 1  # 8 pixels, 4 shared
    dice, iou = dice_iou(pred, label)
    assert dice == pytest.approx(2 * 4 / 12) and iou == pytest.approx(4 / 8)
    assert dice_iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)) == (1.0, 1.0)  # both empty: perfect
    assert dice_iou(pred, torch.zeros(1, 4, 4)) == (0.0, 0.0)  # false positives on an empty label
    assert dice_iou(torch.zeros(1, 4, 4), label) == (0.0, 0.0)
    with pytest.raises(ValueError, match="differs"):
        dice_iou(pred, torch.zeros(1, 4, 5))
    s = summarise([{"dice": 1.0, "iou": 0.5}, {"dice": 0.5, "iou": 0.5}])
    assert s["dice"] == {"mean": 0.75, "std": 0.25, "n": 2} and s["iou"]["std"] == 0.0


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "mask.png"
    atomic_save_image(target, np.full((4, 4), 255, np.uint8))
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert np.asarray(Image.open(target)).min() == 255
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]  # no temp file left behind


def test_latent_average_decodes_the_mean_latent_once(model, images):
    k = 4
    calls = []
    decode = model.decode_score
    model.decode_score = lambda z0: calls.append(z0.shape[0]) or decode(z0)
    try:
        out = SDSegInferer(num_samples=k, seed=2, average="latent")(images, model)
    finally:
        del model.decode_score
    assert calls == [images.shape[0]]  # one decoder pass per image, not K
    noise = torch.randn((k, 4, 16, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z_c = model.encode_image(images)
        t = torch.full((1,), 999)
        z0 = torch.stack(
            [
                torch.stack(
                    [model.estimate_z0(n[None], t, model.model_output(n[None], t, z[None]))[0] for n in noise]
                ).mean(0)
                for z in z_c
            ]
        )
        assert torch.allclose(out, model.decode_score(z0), atol=1e-5)
    score = SDSegInferer(num_samples=k, seed=2)(images, model)
    assert not torch.allclose(out, score, atol=1e-3)  # the other average differs
    with pytest.raises(ValueError, match="average"):
        SDSegInferer(average="median")


def test_untrained_scale_factor_is_an_error(images):
    """A model whose scale_factor was never set (0: no training iteration ran) cannot decode: a clear error."""
    untrained = build_tiny_sdseg(seed=5).eval()
    assert float(untrained.scale_factor) == 0
    with pytest.raises(ValueError, match="scale_factor is 0: the model was never trained"):
        SDSegInferer()(images[:1], untrained)
