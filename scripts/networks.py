"""The SDSeg module: frozen mask autoencoder, trainable vision encoder, concat-conditioned U-Net.

Shapes follow the paper: an image ``C`` (B, 3, H, W) in [-1, 1] and a binary mask (B, 1, H, W)
in {0, 1}, shown to the autoencoder as 3 channels in [-1, 1]; latents are (B, 4, H/8, W/8) for the
f = 8 presets. All networks are MONAI core parts (``AutoencoderKL``, ``DiffusionModelUNet``); this
module only wires them together and holds the diffusion algebra (Eq. 1 and Eq. 2).
"""

from __future__ import annotations

import copy
import functools
import hashlib

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from torch import nn
from torch.utils.checkpoint import checkpoint

from scripts.mask_codec import BinaryCodec, ae_output_to_score, mask_to_ae_input
from scripts.weights.kl import load_autoencoder

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

__all__ = ["SDSeg", "VisionEncoder", "mask_to_ae_input", "ae_output_to_score"]


class VisionEncoder(nn.Module):
    """tau_theta: a copy of the mask autoencoder's encoder followed by a new 1x1 conv (paper, Appendix C).

    An encoder whose first convolution takes other than ``image_channels`` inputs (the one-hot mask codec's C) gets a
    first convolution for the image, its kernels the mean of E's over E's input channels (biases E's).

    ``out_channels`` is z_c's channels (the paper: the latent's 4). Where it is more than E's last convolution gives,
    that convolution is widened to ``out_channels`` (E's kernels first, the new ones initialised as PyTorch does), so
    the image reaches the U-Net through more channels than the mask latent has (``condition_channels``)."""

    def __init__(self, encoder: nn.Module, out_channels: int, image_channels: int = 3):
        super().__init__()
        blocks = getattr(encoder, "blocks", [None])
        first = getattr(blocks[0], "conv", None)
        if isinstance(first, nn.Conv2d) and first.in_channels != image_channels:
            conv = nn.Conv2d(image_channels, first.out_channels, first.kernel_size, first.stride, first.padding)
            with torch.no_grad():
                conv.weight.copy_(first.weight.mean(dim=1, keepdim=True).expand_as(conv.weight))
                conv.bias.copy_(first.bias)
            encoder.blocks[0].conv = conv
        features = getattr(encoder, "out_channels", out_channels)
        last = getattr(blocks[-1], "conv", None)
        if isinstance(last, nn.Conv2d) and last.out_channels < out_channels:
            conv = nn.Conv2d(last.in_channels, out_channels, last.kernel_size, last.stride, last.padding)
            with torch.no_grad():
                conv.weight[: last.out_channels].copy_(last.weight)
                conv.bias[: last.out_channels].copy_(last.bias)
            encoder.blocks[-1].conv, features = conv, out_channels
        self.encoder = encoder
        self.out = nn.Conv2d(features, out_channels, kernel_size=1)

    gradient_checkpointing = False  # SDSeg(gradient_checkpointing=True) sets it: recompute each block in backward

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        blocks = getattr(self.encoder, "blocks", None)  # MONAI's Encoder.forward runs its blocks in turn
        if not (self.gradient_checkpointing and torch.is_grad_enabled() and blocks is not None):
            return self.out(self.encoder(image))
        x = image
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return self.out(x)


class SDSeg(nn.Module):
    """Stable Diffusion Segmentation with a single-step reverse process.

    Args:
        autoencoder: MONAI ``AutoencoderKL`` for masks; frozen here (no gradients, always eval mode).
        unet: MONAI ``DiffusionModelUNet`` with ``2 * latent_channels`` inputs and ``latent_channels`` outputs
            (``fusion="crossattn"``: ``latent_channels`` inputs, ``with_conditioning=True`` and
            ``cross_attention_dim=latent_channels``).
        scheduler: the training noise schedule (T steps, epsilon prediction).
        autoencoder_path: optional weights for ``autoencoder``, loaded before the vision encoder is copied
            from its encoder (so tau_theta starts from E's weights, as in the paper).
        unet_path: optional pretrained weights for ``unet`` (the paper: LDM's LSUN-Churches U-Net), its first
            convolution zero-padded from 4 to 8 input channels (``scripts.weights.unet.load_unet_weights``).
        trainable_encoder: ``False`` freezes the vision encoder (ablation, paper Table 6).
        scale_factor: latent scale; ``0`` means "not set yet": the trainer sets ``1 / std(z)`` from the
            mask latents of 64 training masks before the first step (``scripts.engine.SDSegTrainStep``). Saved with
            the weights.
        fusion: how z_c reaches the U-Net: ``"concat"`` (SDSeg: channel concatenation at the input) or
            ``"crossattn"`` (ablation baseline, paper Table 6: z_c flattened to h*w tokens of ``latent_channels``
            features, fed to the U-Net's cross-attention as context).
        gradient_checkpointing: recompute activations in the backward pass instead of keeping them (each block
            of the vision encoder, the U-Net as a whole): less memory for the paper preset at batch 4 on a
            16 GB GPU, at the cost of a second forward pass. Same gradients.
        prediction_type: what the U-Net outputs (its training target's parametrisation): ``"epsilon"`` (the
            noise, SDSeg and LDM), ``"sample"`` (z0 itself) or ``"v_prediction"`` (v = sqrt(a) n - sqrt(1-a) z0).
            The losses are the same for all three (L1 on the implied noise and on the implied z~0). With
            ``"epsilon"`` the single step at t = T-1 divides the U-Net's error by sqrt(a_T) (x39); with
            ``"sample"`` or ``"v_prediction"`` z~0 is (nearly) the network's own output.
        latent_cache: keep the frozen autoencoder's posterior (mean, std) of every training mask seen, keyed by
            the mask's bytes, so a mask seen before (the same image, or the same flip of it) is not encoded
            again; the posterior sample is still drawn fresh each time. Memory grows with the number of
            distinct masks (2 x 4 x h/8 x w/8 floats each: 32 KB at 256 px). Same results as without.
        codec: the mask codec (:mod:`scripts.mask_codec`): how a mask becomes the autoencoder's input and its decoded
            output the probabilities (B, C, H, W). ``None``: the paper's binary codec. Recorded with the weights.
    """

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        unet: DiffusionModelUNet,
        scheduler: DDPMScheduler,
        autoencoder_path: str | None = None,
        trainable_encoder: bool = True,
        scale_factor: float = 0.0,
        fusion: str = "concat",
        gradient_checkpointing: bool = False,
        latent_cache: bool = False,
        prediction_type: str = "epsilon",
        unet_path: str | None = None,
        codec: BinaryCodec | None = None,
    ):
        super().__init__()
        self.codec = BinaryCodec() if codec is None else codec
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.prediction_type = prediction_type
        if fusion not in ("concat", "crossattn"):
            raise ValueError(f"fusion must be 'concat' or 'crossattn', got {fusion!r}")
        self.fusion = fusion
        if autoencoder_path:
            load_autoencoder(autoencoder, autoencoder_path)
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        latent_channels = autoencoder.latent_channels
        if unet_path:
            from scripts.weights.unet import load_unet_weights

            load_unet_weights(unet_path, unet)
        condition_channels = latent_channels
        if fusion == "concat":
            condition_channels = unet.in_channels - latent_channels
            if condition_channels < latent_channels or unet.out_channels != latent_channels:
                raise ValueError(
                    f"the U-Net must take at least {2 * latent_channels} input channels (cat of z_t and z_c: "
                    f"{latent_channels} + condition_channels >= {latent_channels}) and return {latent_channels}; "
                    f"got {unet.in_channels} -> {unet.out_channels}"
                )
            with torch.no_grad():  # the z_c half of the first conv starts at zero (paper, Sec. 3.2)
                unet.conv_in.conv.weight[:, latent_channels:] = 0
        elif unet.in_channels != latent_channels or unet.out_channels != latent_channels or not unet.with_conditioning:
            raise ValueError(
                f"fusion 'crossattn' needs a U-Net with {latent_channels} input and output channels and "
                f"with_conditioning=True (cross_attention_dim={latent_channels}); got {unet.in_channels} -> "
                f"{unet.out_channels}, with_conditioning={unet.with_conditioning}"
            )
        self.unet = unet
        self.vision_encoder = VisionEncoder(copy.deepcopy(autoencoder.encoder), condition_channels)
        self.vision_encoder.requires_grad_(trainable_encoder)
        self.vision_encoder.gradient_checkpointing = self.gradient_checkpointing = bool(gradient_checkpointing)
        self.latent_cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] | None = {} if latent_cache else None
        self.scheduler = scheduler
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)

    def get_extra_state(self) -> dict:
        """Saved with the weights (``_extra_state``): what the U-Net was trained to output."""
        state = {"prediction_type": self.prediction_type}
        if self.codec.multiclass:  # binary weights keep their state as it was
            state["mask_codec"] = self.codec.extra_state()
        return state

    def set_extra_state(self, state: dict) -> None:
        saved = state.get("prediction_type", "epsilon")
        if saved != self.prediction_type:
            raise ValueError(
                f"these weights were trained with prediction_type {saved!r}, but the configuration builds "
                f"{self.prediction_type!r}: pass --prediction_type {saved}"
            )
        codec = state.get("mask_codec", "binary")
        if codec != self.codec.extra_state():
            raise ValueError(
                f"these weights were trained with the mask codec {codec!r} (--mask_encoding:--classes), but the "
                f"configuration builds {self.codec.extra_state()!r}: pass the --classes and --mask_encoding of training"
            )

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.num_train_timesteps

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen: never in training mode
        return self

    # --- the three networks -------------------------------------------------------------------
    @torch.no_grad()
    def encode_mask(self, mask: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """z0 = scale_factor * E(X): a posterior sample in training, the mean when ``sample=False``."""
        z_mu, z_sigma = self._mask_posterior(mask)
        z = self.autoencoder.sampling(z_mu, z_sigma) if sample else z_mu
        return z * self.scale_factor

    def _mask_posterior(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E's posterior (mean, std) of each mask, from ``latent_cache`` where the same mask was seen before."""
        if self.latent_cache is None:
            return self.autoencoder.encode(self.codec.encode(mask))
        keys = [self._mask_key(m) for m in mask]
        new = [i for i, k in enumerate(keys) if k not in self.latent_cache]
        if new:
            z_mu, z_sigma = self.autoencoder.encode(self.codec.encode(mask[new]))
            for i, mu, sigma in zip(new, z_mu.float(), z_sigma.float()):
                self.latent_cache[keys[i]] = (mu, sigma)
        z_mu, z_sigma = (torch.stack([self.latent_cache[k][j] for k in keys]) for j in (0, 1))
        return z_mu, z_sigma

    @staticmethod
    def _mask_key(mask: torch.Tensor) -> bytes:
        data = mask.detach().float().cpu().numpy()
        return hashlib.blake2b(str(data.shape).encode() + data.tobytes(), digest_size=16).digest()

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """z_c = tau_theta(C) (not scaled)."""
        return self.vision_encoder(image)

    def model_output(self, z_t: torch.Tensor, t: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
        """f(z_t; z_c): the U-Net on the channel concatenation, z_t first (or z_c as cross-attention tokens).
        What it estimates (noise, z0 or v) is ``prediction_type``; :meth:`estimate_z0` turns it into z~0."""
        unet = self.unet
        if self.gradient_checkpointing and torch.is_grad_enabled():
            unet = functools.partial(checkpoint, self.unet, use_reentrant=False)
        if self.fusion == "crossattn":
            return unet(z_t, timesteps=t, context=z_c.flatten(2).transpose(1, 2))
        return unet(torch.cat([z_t, z_c], dim=1), timesteps=t)

    def decode_score(self, z0: torch.Tensor) -> torch.Tensor:
        """Probability map (B, 1, H, W) from D(z0 / scale_factor); multi-class codecs: (B, C, H, W)."""
        return self.codec.decode(self.autoencoder.decode(z0 / self.scale_factor))

    # --- diffusion algebra ----------------------------------------------------------------------
    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(like.device)[t].view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 1: z_t = sqrt(a_t) z0 + sqrt(1 - a_t) n, by the scheduler's own ``add_noise`` (MONAI), in z0's dtype
        (float32 in :meth:`training_loss`, also under autocast)."""
        return self.scheduler.add_noise(z0, noise, t)

    def estimate_z0(self, z_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """z~0 from the U-Net's ``output``: Eq. 2, z~0 = (z_t - sqrt(1 - a_t) n~) / sqrt(a_t), for ``epsilon``;
        the output itself for ``sample``; sqrt(a_t) z_t - sqrt(1 - a_t) v~ for ``v_prediction``.
        Not a MONAI scheduler's ``step``: that computes z~0 only on the way to z_{t-1}, in the scheduler's dtype."""
        if self.prediction_type == "sample":
            return output
        a = self._alpha_bar(t, z_t)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * z_t - (1 - a).sqrt() * output
        return (z_t - (1 - a).sqrt() * output) / a.sqrt()

    def estimate_noise(self, z_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """n~ from the U-Net's ``output``: the output itself for ``epsilon``; (z_t - sqrt(a_t) z~0) / sqrt(1 - a_t)
        for ``sample``; sqrt(1 - a_t) z_t + sqrt(a_t) v~ for ``v_prediction``."""
        if self.prediction_type == "epsilon":
            return output
        a = self._alpha_bar(t, z_t)
        if self.prediction_type == "v_prediction":
            return (1 - a).sqrt() * z_t + a.sqrt() * output
        return (z_t - a.sqrt() * output) / (1 - a).sqrt()

    def latent_shape(self, image: torch.Tensor) -> tuple[int, ...]:
        factor = 2 ** (len(self.autoencoder.encoder.channels) - 1)
        return (self.autoencoder.latent_channels, image.shape[-2] // factor, image.shape[-1] // factor)

    def training_loss(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        loss_weight: float = 1.0,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The SDSeg training loss (paper Eq. 3) for one batch; ``t`` and ``noise`` are drawn when omitted.

        Returns ``loss``, ``loss_noise`` (L1 between predicted and true noise), ``loss_latent`` (L1 between z~0
        and z0) and ``z0_pred`` (z~0 itself, for extra terms). Under ``torch.autocast`` only the three networks
        (mask encoder, vision encoder, U-Net) run in reduced precision: z0, the noise, z_t, z~0 and the losses
        stay float32, since z~0 divides errors by sqrt(a_t) (x39 at t = T-1).
        """
        z_mu, z_sigma = self._mask_posterior(mask)
        with torch.autocast(mask.device.type, enabled=False):
            z0 = self.autoencoder.sampling(z_mu.float(), z_sigma.float()) * self.scale_factor
            if t is None:
                t = torch.randint(0, self.num_train_timesteps, (z0.shape[0],), device=z0.device)
            noise = torch.randn_like(z0) if noise is None else noise.float()
            z_t = self.add_noise(z0, noise, t)
        output = self.model_output(z_t, t, self.encode_image(image))
        with torch.autocast(mask.device.type, enabled=False):
            output = output.float()
            loss_noise = F.l1_loss(self.estimate_noise(z_t, t, output), noise)
            z0_pred = self.estimate_z0(z_t, t, output)
            loss_latent = F.l1_loss(z0_pred, z0)
        loss = loss_noise + loss_weight * loss_latent
        return {"loss": loss, "loss_noise": loss_noise, "loss_latent": loss_latent, "z0_pred": z0_pred}

    def forward(
        self,
        image: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        loss_weight: float = 1.0,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Single-step segmentation: image (B, 3, H, W) in [-1, 1] -> probability map (B, 1, H, W).

        ``noise`` (B or 1, 4, h, w) is z_T; a fresh standard normal draw when omitted.
        With a ``mask`` (B, 1, H, W) it is the training iteration instead: :meth:`training_loss` (``noise``
        is then the noise added to z0, ``t`` the time steps). Training goes through ``forward`` so that a
        ``DistributedDataParallel`` wrapper, which synchronises gradients only for its own forward, sees it.
        """
        if mask is not None:
            return self.training_loss(image, mask, loss_weight, t=t, noise=noise)
        if t is not None:
            raise ValueError("t is for the training loss (with a mask); segmentation always starts at t = T - 1")
        z_c = self.encode_image(image)
        shape = (image.shape[0], *self.latent_shape(image))  # z_c may have more channels (condition_channels)
        if noise is None:
            noise = torch.randn_like(z_c[:, : shape[1]])  # z_c's memory layout: the draws of a given seed as before
        z_t = noise.expand(shape).to(z_c.dtype)
        t = torch.full((image.shape[0],), self.num_train_timesteps - 1, device=image.device, dtype=torch.long)
        return self.decode_score(self.estimate_z0(z_t, t, self.model_output(z_t, t, z_c)))
