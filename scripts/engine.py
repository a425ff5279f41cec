"""Training iterations for MONAI's ``SupervisedTrainer`` (``iteration_update``).

* :class:`SDSegTrainStep`: the SDSeg step: frozen-autoencoder mask latent, random t and noise,
  U-Net on ``cat(z_t, z_c)``, ``L = L1(n~, n) + lambda * L1(z~0, z0)`` (multi-class: + a DiceCE of the decoded z~0
  at t = T-1, ``mask_loss_weight``).
* :class:`AutoencoderTrainStep`: the mask-autoencoder stage: ``L1(D(E(X)), X) + beta * KL`` (multi-class: + a
  per-class soft Dice and a cross-entropy of the decoded class logits, so small organs reconstruct).
* :class:`ReconstructionInferer`: the autoencoder's reconstruction score map, for its validation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.losses import DiceCELoss

from scripts.mask_codec import BinaryCodec
from scripts.networks import SDSeg

logger = logging.getLogger(__name__)

__all__ = [
    "SDSegTrainStep",
    "latent_std",
    "AutoencoderTrainStep",
    "ReconstructionInferer",
    "masks_as_inputs",
]


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


def _output(engine, output: dict):
    """End an iteration as ``SupervisedTrainer``'s own does: the output is ``engine.state.output`` when
    ``MODEL_COMPLETED`` fires, so MONAI decollates it (``decollate=True``: one dict per item, each with the
    losses) and the default handler transforms such as ``from_engine(['loss'], first=True)`` apply."""
    engine.state.output = output
    engine.fire_event(IterationEvents.MODEL_COMPLETED)
    return engine.state.output


class SDSegTrainStep:
    """``iteration_update`` for ``SupervisedTrainer`` training :class:`SDSeg`. Not MONAI's
    ``DiffusionPrepareBatch`` with the default step: SDSeg's loss adds L1(z~0, z0) and runs through SDSeg's forward.

    On the first iteration of a model whose ``scale_factor`` is unset (0), before the first step, it becomes
    ``1 / std(z)`` of the mask latents of ``scale_masks`` training masks spread evenly over the training set (all of
    them when fewer; LDM/SDSeg use the first batch, 4 masks in the paper's setup), and is saved with the weights;
    under ``torch.distributed`` the ranks share the masks out and pool the std, so every rank gets the same value.
    The loss goes through ``engine.network``'s forward, so a ``DistributedDataParallel`` network all-reduces the
    gradients.

    Time steps are uniform on {0, ..., T-1} (the paper), except that a share ``final_step_share`` of each
    batch (rounded) is put at t = T-1, where the single reverse step is taken: more training signal where
    inference lives.

    ``consistency_weight`` > 0 adds ``consistency_weight * L1(z~0(n1), z~0(n2))``: the items at t = T-1 are seen
    twice in the batch, with two noise draws, and their two estimates must agree, so the single step depends less on
    the noise draw. At least one item is paired, and every paired item is at t = T-1 (with ``final_step_share`` 0,
    the first item of each batch is put there for it).

    ``mask_loss_weight`` > 0 (multi-class codecs only) adds ``mask_loss_weight`` x MONAI's ``DiceCELoss`` of the
    decoded class logits of z~0 (the frozen decoder, :meth:`codec.logits`) against the classes, on the items at
    t = T-1: the mask the single step gives is then trained in mask space too, not only through L1 in latent space.
    """

    def __init__(
        self,
        loss_weight: float = 1.0,
        final_step_share: float = 0.0,
        scale_masks: int = 64,
        consistency_weight: float = 0.0,
        mask_loss_weight: float = 0.0,
    ):
        if not 0.0 <= final_step_share <= 1.0:
            raise ValueError(f"final_step_share must be in [0, 1], got {final_step_share}")
        self.loss_weight, self.final_step_share = float(loss_weight), float(final_step_share)
        self.scale_masks, self.consistency_weight = int(scale_masks), float(consistency_weight)
        self.mask_loss_weight = float(mask_loss_weight)
        self.mask_loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True) if self.mask_loss_weight else None

    def timesteps(self, batch_size: int, num_train_timesteps: int, device) -> torch.Tensor:
        """t for one batch: uniform, with the first ``round(final_step_share * B)`` entries at T-1."""
        t = torch.randint(0, num_train_timesteps, (batch_size,), device=device)
        t[: round(self.final_step_share * batch_size)] = num_train_timesteps - 1
        return t

    def paired_items(self, batch_size: int) -> int:
        """How many items of a batch the consistency term sees twice: those at T-1, at least one (0: no term)."""
        return max(1, round(self.final_step_share * batch_size)) if self.consistency_weight > 0 else 0

    def __call__(self, engine, batchdata: dict) -> dict:
        image, mask = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        model: SDSeg = getattr(engine.network, "module", engine.network)
        if float(model.scale_factor) == 0.0:
            model.scale_factor.fill_(1.0)
            z = torch.cat([model.encode_mask(m, sample=True) for m in training_masks(engine, self.scale_masks, mask)])
            model.scale_factor.fill_(1.0 / latent_std(z))
            logger.info(f"scale_factor = 1 / std(z) = {float(model.scale_factor):.5f} from {len(z)} training masks")
        engine.network.train()
        b = image.shape[0]
        t = self.timesteps(b, model.num_train_timesteps, image.device)
        m = self.paired_items(b)
        if m:  # the first m items, at T-1, again with their own noise draw
            t[:m] = model.num_train_timesteps - 1
            image, mask, t = (torch.cat([x, x[:m]]) for x in (image, mask, t))
        with _autocast(engine):
            losses = engine.network(image, mask=mask, t=t, loss_weight=self.loss_weight)  # forward: DDP syncs
        z0_pred = losses.pop("z0_pred")
        if m:
            losses["loss_consistency"] = F.l1_loss(z0_pred[:m], z0_pred[b:])
            losses["loss"] = losses["loss"] + self.consistency_weight * losses["loss_consistency"]
        final = t == model.num_train_timesteps - 1
        if self.mask_loss is not None and model.codec.multiclass and final.any():
            with _autocast(engine):
                decoded = model.autoencoder.decode(z0_pred[final] / model.scale_factor)
            losses["loss_mask"] = self.mask_loss(model.codec.logits(decoded.float()), mask[final].round())
            losses["loss"] = losses["loss"] + self.mask_loss_weight * losses["loss_mask"]
        _optimise(engine, losses["loss"])
        return _output(engine, {"image": image[:b], "label": mask[:b], **{k: v.detach() for k, v in losses.items()}})


def training_masks(engine, n: int, first: torch.Tensor) -> list[torch.Tensor]:
    """Batches of this rank's share of ``n`` training masks spread evenly over ``engine.data_loader``'s dataset (its
    transforms applied, ``engine.prepare_batch``'s masks); the batches of a list of batches; else ``[first]``."""
    loader, device = engine.data_loader, engine.state.device
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "__len__") and not isinstance(dataset, torch.utils.data.IterableDataset):
        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        m = min(n, len(dataset))
        index = [round(i * (len(dataset) - 1) / max(m - 1, 1)) for i in range(m)][rank::world]
        size = loader.batch_size or 1
        batches = [loader.collate_fn([dataset[i] for i in index[j : j + size]]) for j in range(0, len(index), size)]
    elif isinstance(loader, Sequence):
        batches = list(loader)
    else:
        return [first]
    return [engine.prepare_batch(b, device, engine.non_blocking)[1] for b in batches] or [first[:0]]


def latent_std(z: torch.Tensor) -> float:
    """The (unbiased) std of ``z``, pooled over all ranks when ``torch.distributed`` is initialised."""
    z = z.detach().double()
    stats = torch.stack([z.new_tensor(z.numel()), z.sum(), (z * z).sum()])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    n, total, squares = stats.tolist()
    return math.sqrt((squares - total * total / n) / (n - 1))


class AutoencoderTrainStep:
    """``iteration_update`` for the mask autoencoder: ``L1(D(E(X)), X) + kl_weight * KL`` on masks, X the ``codec``'s
    encoding of the mask (:mod:`scripts.mask_codec`; default the paper's binary one).

    Multi-class codecs add MONAI's ``DiceCELoss`` of the decoded class logits (:meth:`codec.logits`) against the
    classes: ``dice_weight`` x soft Dice, one per class over the batch, background included (every organ weighs the
    same, whatever its size), plus ``ce_weight`` x cross-entropy. The cross-entropy keeps a gradient on an organ the
    decoder has not yet drawn: the softmax of the codec is saturated there (its temperature is small), and the Dice
    alone then leaves small organs at 0. Binary: L1 + KL only.
    """

    def __init__(
        self,
        kl_weight: float = 1e-6,
        codec: BinaryCodec | None = None,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
    ):
        self.kl_weight, self.dice_weight, self.ce_weight = float(kl_weight), float(dice_weight), float(ce_weight)
        self.codec = BinaryCodec() if codec is None else codec
        self.seg_loss = None
        if self.codec.multiclass and (self.dice_weight or self.ce_weight):
            self.seg_loss = DiceCELoss(
                to_onehot_y=True, softmax=True, batch=True, lambda_dice=self.dice_weight, lambda_ce=self.ce_weight
            )

    def __call__(self, engine, batchdata: dict) -> dict:
        mask = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[1]
        x = self.codec.encode(mask)
        engine.network.train()
        with _autocast(engine):
            recon, z_mu, z_sigma = engine.network(x)
            rec = F.l1_loss(recon.float(), x)
            kl = 0.5 * (z_mu.float() ** 2 + z_sigma.float() ** 2 - torch.log(z_sigma.float() ** 2 + 1e-12) - 1)
            kl = kl.sum(dim=tuple(range(1, kl.dim()))).mean()
        loss = rec + self.kl_weight * kl
        out = {"label": mask, "loss_rec": rec.detach(), "loss_kl": kl.detach()}
        if self.seg_loss is not None:
            seg = self.seg_loss(self.codec.logits(recon.float()), mask.round())
            loss = loss + seg
            out["loss_seg"] = seg.detach()
        _optimise(engine, loss)
        return _output(engine, {**out, "loss": loss.detach()})


class ReconstructionInferer(Inferer):
    """Probabilities of the autoencoder's reconstruction D(mean of E(X)) for a mask batch (B, 1, H, W): the
    binary score map (B, 1, H, W), or (B, C, H, W) for a multi-class ``codec``."""

    def __init__(self, codec: BinaryCodec | None = None):
        super().__init__()
        self.codec = BinaryCodec() if codec is None else codec

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        network = getattr(network, "module", network)
        return self.codec.decode(network.reconstruct(self.codec.encode(inputs)))


def masks_as_inputs(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` for the autoencoder's validation: the mask is both input and target."""
    mask = batchdata["label"].to(device=device, non_blocking=non_blocking)
    return mask, mask
