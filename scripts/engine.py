"""Training iterations for MONAI's ``SupervisedTrainer`` (``iteration_update``) and checkpoint helpers.

* :class:`SDSegTrainStep`: the SDSeg step: frozen-autoencoder mask latent, random t and noise,
  U-Net on ``cat(z_t, z_c)``, ``L = L1(n~, n) + lambda * L1(z~0, z0)``.
* :class:`AutoencoderTrainStep`: the mask-autoencoder stage: ``L1(D(E(X)), X) + beta * KL``.
* :class:`ReconstructionInferer`: the autoencoder's reconstruction score map, for its validation.
"""

from __future__ import annotations

import glob
import math
import os
import re

import torch
import torch.nn.functional as F
from ignite.handlers import ProgressBar as _IgniteProgressBar
from monai.handlers import CheckpointSaver
from monai.inferers import Inferer

from scripts.networks import SDSeg, ae_output_to_score, mask_to_ae_input

__all__ = [
    "sdseg_loss",
    "SDSegTrainStep",
    "AutoencoderTrainStep",
    "ReconstructionInferer",
    "lr_schedule",
    "masks_as_inputs",
    "AtomicCheckpointSaver",
    "ProgressBar",
    "latest_checkpoint",
]


def sdseg_loss(
    model: SDSeg,
    image: torch.Tensor,
    mask: torch.Tensor,
    loss_weight: float = 1.0,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The SDSeg training loss (paper Eq. 3) for one batch; ``t`` and ``noise`` are drawn when omitted.

    Returns ``loss``, ``loss_noise`` (L1 between predicted and true noise) and ``loss_latent``
    (L1 between z~0 of Eq. 2 and z0).
    """
    z0 = model.encode_mask(mask, sample=True)
    if t is None:
        t = torch.randint(0, model.num_train_timesteps, (z0.shape[0],), device=z0.device)
    if noise is None:
        noise = torch.randn_like(z0)
    z_t = model.add_noise(z0, noise, t)
    noise_pred = model.predict_noise(z_t, t, model.encode_image(image))
    loss_noise = F.l1_loss(noise_pred.float(), noise)
    loss_latent = F.l1_loss(model.estimate_z0(z_t, t, noise_pred.float()), z0)
    return {"loss": loss_noise + loss_weight * loss_latent, "loss_noise": loss_noise, "loss_latent": loss_latent}


def _autocast(engine):
    return torch.autocast(device_type=engine.state.device.type, enabled=bool(engine.amp), **(engine.amp_kwargs or {}))


def _optimise(engine, loss: torch.Tensor) -> None:
    engine.optimizer.zero_grad(set_to_none=True)
    if engine.scaler is not None and engine.state.device.type == "cuda":
        engine.scaler.scale(loss).backward()
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
    else:
        loss.backward()
        engine.optimizer.step()


class SDSegTrainStep:
    """``iteration_update`` for ``SupervisedTrainer`` training :class:`SDSeg`.

    On the first iteration of a model whose ``scale_factor`` is unset (0), it becomes
    ``1 / std(z)`` of that batch's mask latents (as in LDM/SDSeg), and is saved with the weights.
    """

    def __init__(self, loss_weight: float = 1.0):
        self.loss_weight = float(loss_weight)

    def __call__(self, engine, batchdata: dict) -> dict:
        image, mask = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        model: SDSeg = getattr(engine.network, "module", engine.network)
        if float(model.scale_factor) == 0.0:
            model.scale_factor.fill_(1.0)
            z = model.encode_mask(mask, sample=True)
            model.scale_factor.fill_(1.0 / float(z.float().std()))
        engine.network.train()
        with _autocast(engine):
            losses = sdseg_loss(model, image, mask, self.loss_weight)
        _optimise(engine, losses["loss"])
        return {k: v.detach() for k, v in losses.items()}


class AutoencoderTrainStep:
    """``iteration_update`` for the mask autoencoder: ``L1(reconstruction) + kl_weight * KL`` on masks."""

    def __init__(self, kl_weight: float = 1e-6):
        self.kl_weight = float(kl_weight)

    def __call__(self, engine, batchdata: dict) -> dict:
        mask = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[1]
        x = mask_to_ae_input(mask)
        engine.network.train()
        with _autocast(engine):
            recon, z_mu, z_sigma = engine.network(x)
            rec = F.l1_loss(recon.float(), x)
            kl = 0.5 * (z_mu.float() ** 2 + z_sigma.float() ** 2 - torch.log(z_sigma.float() ** 2 + 1e-12) - 1)
            kl = kl.sum(dim=tuple(range(1, kl.dim()))).mean()
        loss = rec + self.kl_weight * kl
        _optimise(engine, loss)
        return {"loss": loss.detach(), "loss_rec": rec.detach(), "loss_kl": kl.detach()}


class ReconstructionInferer(Inferer):
    """Score map of the autoencoder's reconstruction D(mean of E(X)) for a mask batch (B, 1, H, W)."""

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        network = getattr(network, "module", network)
        return ae_output_to_score(network.reconstruct(mask_to_ae_input(inputs)))


def lr_schedule(
    optimizer: torch.optim.Optimizer, total_iterations: int, warmup_iterations: int = 0, decay: str = "none"
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration learning-rate factor: linear warm-up over ``warmup_iterations`` (the authors' code
    uses 10k), then constant (``decay="none"``, the paper) or cosine down to 0 at ``total_iterations``."""
    if decay not in ("none", "cosine"):
        raise ValueError(f"lr decay must be 'none' or 'cosine', got {decay!r}")

    def factor(it: int) -> float:
        if it < warmup_iterations:
            return (it + 1) / warmup_iterations
        if decay == "none":
            return 1.0
        progress = min(1.0, (it - warmup_iterations) / max(1, total_iterations - warmup_iterations))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def masks_as_inputs(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` for the autoencoder's validation: the mask is both input and target."""
    mask = batchdata["label"].to(device=device, non_blocking=non_blocking)
    return mask, mask


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` with atomic writes (temp file + rename): MONAI turns ignite's off,
    so an interrupted save could leave a truncated ``model.pt``; here it never does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler._atomic = True


class ProgressBar(_IgniteProgressBar):
    """ignite's tqdm progress bar (with the running loss when ``show_loss``); ``attach(engine)`` as MONAI handlers do.
    Shown on a terminal only (tqdm ``disable=None``), so logs and CI output keep just the log lines."""

    def __init__(self, show_loss: bool = True, **kwargs):
        kwargs.setdefault("disable", None)
        super().__init__(**kwargs)
        self.show_loss = show_loss

    def attach(self, engine, *args, **kwargs):
        transform = (lambda out: {"loss": float(out["loss"])}) if self.show_loss else None
        super().attach(engine, output_transform=transform)


def latest_checkpoint(ckpt_dir: str, prefix: str = "sdseg") -> str:
    """The newest ``{prefix}_checkpoint_epoch=N.pt`` that ``CheckpointSaver`` wrote in ``ckpt_dir`` (``--resume``)."""
    found = glob.glob(os.path.join(glob.escape(ckpt_dir), f"{prefix}_checkpoint_epoch=*.pt"))
    if not found:
        raise FileNotFoundError(f"{ckpt_dir}: no '{prefix}_checkpoint_epoch=N.pt' checkpoint to resume from")
    return max(found, key=lambda p: int(re.findall(r"=(\d+)\.pt$", p)[0]))
