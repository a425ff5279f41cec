"""Reverse processes for a trained SDSeg: single step at t = T-1 (default) or DDIM with N steps,
each with K noise samples averaged. A MONAI ``Inferer``: ``inferer(images, network)``.
"""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler
from monai.utils import convert_to_dst_type

from scripts.networks import SDSeg

__all__ = ["SDSegInferer"]


class SDSegInferer(Inferer):
    """Segment a batch of images (B, 3, H, W) in [-1, 1]; returns the score map (B, 1, H, W) in [0, 1].

    Not MONAI's ``LatentDiffusionInferer.sample``: that denoises with every step of a scheduler from one noise
    per batch; SDSeg conditions on tau_theta(C), takes one step from t = T-1 (or DDIM), one noise for all images.

    Args:
        num_steps: 1 for SDSeg's single reverse step (z~0 from the noise estimate at t = T-1);
            N > 1 runs DDIM (eta = 0) over N steps of the training schedule, ``T // N`` apart
            (LDM's "uniform" steps: 901, 801, ..., 1 for N = 10, as in the authors' sampler).
        num_samples: K noise samples per image, run as one batch; averaged as ``average`` says.
        average: ``"score"`` (default) decodes each of the K latents and averages the K score maps
            (E + K (U + D)); ``"latent"`` averages the K estimates z~0 and decodes once (E + K U + D).
        seed: seeds the noise. As in the authors' code one noise draw (K tensors) is reused for every
            image of a run, so results do not depend on batch size or order.
        channels_last: run the networks in channels-last memory format (faster convolutions on GPUs
            with tensor cores; the network's parameters are converted once, in place).
        compile: wrap the three networks (vision encoder, U-Net, mask decoder) in ``torch.compile``
            on first use (first batch slow, later batches faster; needs a C++ compiler on the CPU), with
            ``compile_kwargs`` (e.g. ``{"mode": "max-autotune"}``).
        scheduler: the DDIM scheduler for ``num_steps > 1`` (the configs declare it as ``ddim_scheduler``); it must
            hold the network's training schedule (checked) and its ``prediction_type``. Its steps are set here, to
            the uniform steps above. ``None``: one built from ``network.scheduler``'s betas.

    Precision: under ``torch.autocast`` (MONAI engines' ``amp`` with ``amp_kwargs={"dtype": ...}``) only the
    mask decoder, the costliest of the three networks, runs in bf16/fp16. The vision encoder, the U-Net and
    the diffusion algebra stay float32: the single step divides the U-Net's noise estimate error by
    sqrt(alpha_bar_T) (x39 at t = 999), so bf16 there moves masks (measured on the tiny demo model: mask Dice
    against float32 0.98 with everything in bf16, 0.998 with the decoder alone in bf16).
    MetaTensor inputs are unwrapped for the networks (no per-op metadata cost) and the score gets their
    metadata back, so ``Invertd`` can map it to the input's geometry.
    """

    def __init__(
        self,
        num_steps: int = 1,
        num_samples: int = 1,
        seed: int = 0,
        channels_last: bool = False,
        compile: bool = False,
        compile_kwargs: dict | None = None,
        average: str = "score",
        scheduler: DDIMScheduler | None = None,
    ):
        super().__init__()
        if num_steps < 1 or num_samples < 1:
            raise ValueError(f"num_steps and num_samples must be >= 1, got {num_steps} and {num_samples}")
        if average not in ("score", "latent"):
            raise ValueError(f"average must be 'score' or 'latent', got {average!r}")
        self.average = average
        self.num_steps, self.num_samples, self.seed = int(num_steps), int(num_samples), int(seed)
        self.channels_last, self.compile, self.compile_kwargs = bool(channels_last), bool(compile), compile_kwargs or {}
        self.scheduler = scheduler
        self._noise: torch.Tensor | None = None
        self._prepared: tuple[int, tuple] | None = None  # (id of the network, its three callables)

    def variant(self, num_steps: int, num_samples: int, seed: int) -> SDSegInferer:
        """This inferer's other settings (DDIM scheduler, average, fast path) with these steps, samples and seed."""
        return SDSegInferer(
            num_steps,
            num_samples,
            seed,
            channels_last=self.channels_last,
            compile=self.compile,
            compile_kwargs=self.compile_kwargs,
            average=self.average,
            scheduler=self.scheduler,
        )

    def noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The run's K noise tensors (K, c, h, w), drawn once from ``seed`` on the CPU."""
        if self._noise is None or tuple(self._noise.shape[1:]) != tuple(shape):
            gen = torch.Generator().manual_seed(self.seed)
            self._noise = torch.randn((self.num_samples, *shape), generator=gen)
        return self._noise.to(device)

    def _ddim(self, network: SDSeg) -> DDIMScheduler:
        train = network.scheduler
        if self.scheduler is None:
            ddim = DDIMScheduler(
                num_train_timesteps=train.num_train_timesteps,
                clip_sample=False,
                prediction_type=network.prediction_type,
            )
            # same betas as training, whatever schedule built them
            ddim.betas, ddim.alphas, ddim.alphas_cumprod = train.betas, train.alphas, train.alphas_cumprod
            ddim.final_alpha_cumprod = torch.tensor(1.0)
        else:
            ddim = self.scheduler
            # the training scheduler's add_noise moves its alphas_cumprod to the latents' device and dtype
            trained = train.alphas_cumprod.to(ddim.alphas_cumprod.device, ddim.alphas_cumprod.dtype)
            if ddim.num_train_timesteps != train.num_train_timesteps or not torch.equal(ddim.alphas_cumprod, trained):
                raise ValueError(
                    "the inferer's DDIM scheduler (ddim_scheduler in the config) does not hold the network's training "
                    "schedule (noise_scheduler): give both the same num_train_timesteps, schedule and betas"
                )
            if ddim.prediction_type != network.prediction_type:
                raise ValueError(
                    f"the inferer's DDIM scheduler predicts {ddim.prediction_type!r}, the network "
                    f"{network.prediction_type!r}: set ddim_scheduler#prediction_type to @prediction_type"
                )
        ddim.set_timesteps(self.num_steps)
        # MONAI's set_timesteps spaces the steps by linspace(T-1, 0, N) but step() moves by T // N: use the steps
        # step() assumes, LDM's "uniform" discretisation (the authors' DDIM): range(0, T, T // N) + 1, reversed
        stride = train.num_train_timesteps // self.num_steps
        offset = 1 if (self.num_steps - 1) * stride + 1 < train.num_train_timesteps else 0
        ddim.timesteps = (torch.arange(self.num_steps) * stride + offset).flip(0)
        return ddim

    def _networks(self, network: SDSeg) -> tuple:
        """(encode_image, model_output, decode_score) of ``network``, converted/compiled once per network."""
        if self._prepared is None or self._prepared[0] != id(network):
            if float(getattr(network, "scale_factor", 1.0)) == 0.0:  # once per network: no per-batch sync
                raise ValueError(
                    "the network's latent scale_factor is 0: the model was never trained (no training iteration "
                    "ran before its model.pt was written); train it or load another model.pt"
                )
            if self.channels_last:
                network.to(memory_format=torch.channels_last)
            fns = (network.encode_image, network.model_output, network.decode_score)
            if self.compile:
                fns = tuple(torch.compile(f, **self.compile_kwargs) for f in fns)
            self._prepared = (id(network), fns)
        return self._prepared[1]

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor, network: SDSeg, *args, **kwargs) -> torch.Tensor:
        network = getattr(network, "module", network)  # DistributedDataParallel
        encode, model_output, decode = self._networks(network)
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        b, k = x.shape[0], self.num_samples
        with torch.autocast(x.device.type, enabled=False):  # float32 up to z~0 (see the class notes)
            z_c = encode(x.float())  # once per image, reused across steps and samples
            z = self.noise(network.latent_shape(x), x.device).repeat(b, 1, 1, 1)  # (B*K, ...), sample index fastest
            z_c = z_c.repeat_interleave(k, dim=0)
            if self.num_steps == 1:
                t = torch.full((b * k,), network.num_train_timesteps - 1, device=x.device, dtype=torch.long)
                z0 = network.estimate_z0(z, t, model_output(z, t, z_c))
            else:
                ddim = self._ddim(network)
                for step in ddim.timesteps:
                    t = torch.full((b * k,), int(step), device=x.device, dtype=torch.long)
                    z, z0 = ddim.step(model_output(z, t, z_c), int(step), z)
            if self.average == "latent" and k > 1:
                z0, k = z0.view(b, k, *z0.shape[1:]).mean(dim=1), 1
        score = decode(z0).float()
        score = score.view(b, k, *score.shape[1:]).mean(dim=1).contiguous()
        return convert_to_dst_type(score, inputs)[0] if isinstance(inputs, MetaTensor) else score
