"""Reverse processes for a trained SDSeg: single step at t = T-1 (default) or DDIM with N steps,
each with K noise samples averaged. A MONAI ``Inferer``: ``inferer(images, network)``.
"""

from __future__ import annotations

import torch
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler

from scripts.networks import SDSeg

__all__ = ["SDSegInferer"]


class SDSegInferer(Inferer):
    """Segment a batch of images (B, 3, H, W) in [-1, 1]; returns the score map (B, 1, H, W) in [0, 1].

    Args:
        num_steps: 1 for SDSeg's single reverse step (z~0 from the noise estimate at t = T-1);
            N > 1 runs DDIM (eta = 0) over N steps of the training schedule.
        num_samples: K noise samples per image, run as one batch; their score maps are averaged.
        seed: seeds the noise. As in the authors' code one noise draw (K tensors) is reused for every
            image of a run, so results do not depend on batch size or order.
    """

    def __init__(self, num_steps: int = 1, num_samples: int = 1, seed: int = 0):
        super().__init__()
        if num_steps < 1 or num_samples < 1:
            raise ValueError(f"num_steps and num_samples must be >= 1, got {num_steps} and {num_samples}")
        self.num_steps, self.num_samples, self.seed = int(num_steps), int(num_samples), int(seed)
        self._noise: torch.Tensor | None = None

    def noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The run's K noise tensors (K, c, h, w), drawn once from ``seed`` on the CPU."""
        if self._noise is None or tuple(self._noise.shape[1:]) != tuple(shape):
            gen = torch.Generator().manual_seed(self.seed)
            self._noise = torch.randn((self.num_samples, *shape), generator=gen)
        return self._noise.to(device)

    def _ddim(self, network: SDSeg) -> DDIMScheduler:
        train = network.scheduler
        ddim = DDIMScheduler(num_train_timesteps=train.num_train_timesteps, clip_sample=False)
        # same betas as training, whatever schedule built them
        ddim.betas, ddim.alphas, ddim.alphas_cumprod = train.betas, train.alphas, train.alphas_cumprod
        ddim.final_alpha_cumprod = torch.tensor(1.0)
        ddim.set_timesteps(self.num_steps)
        return ddim

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor, network: SDSeg, *args, **kwargs) -> torch.Tensor:
        network = getattr(network, "module", network)  # DistributedDataParallel
        b, k = inputs.shape[0], self.num_samples
        z_c = network.encode_image(inputs)  # once per image, reused across steps and samples
        z = self.noise(tuple(z_c.shape[1:]), inputs.device).to(z_c.dtype)
        z = z.repeat(b, 1, 1, 1)  # (B*K, ...), sample index fastest
        z_c = z_c.repeat_interleave(k, dim=0)
        if self.num_steps == 1:
            t = torch.full((b * k,), network.num_train_timesteps - 1, device=inputs.device, dtype=torch.long)
            z0 = network.estimate_z0(z, t, network.predict_noise(z, t, z_c))
        else:
            ddim = self._ddim(network)
            for step in ddim.timesteps:
                t = torch.full((b * k,), int(step), device=inputs.device, dtype=torch.long)
                z, z0 = ddim.step(network.predict_noise(z, t, z_c), int(step), z)
        score = network.decode_score(z0)
        return score.view(b, k, *score.shape[1:]).mean(dim=1)
