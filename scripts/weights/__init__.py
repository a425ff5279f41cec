"""Checkpoint import: pretrained KL autoencoders (LDM kl-f8, the Stable Diffusion VAE) into MONAI's AutoencoderKL, and
pretrained LDM diffusion U-Nets (LSUN-Churches, the paper's start) into MONAI's DiffusionModelUNet / LDMUNet.

Reads local files only: a CompVis/LDM Lightning ``.ckpt`` (``loss.*`` dropped, ``first_stage_model.`` stripped from a
full LDM/SD checkpoint), a diffusers ``AutoencoderKL`` ``.safetensors`` / ``.bin`` or model folder, or a MONAI state
dict (the autoencoder stage's ``autoencoder.pt``, or a file converted by ``python -m scripts.tools.convert_weights``).

* :mod:`scripts.weights.reading`: weight files, the tensors of one part in them, fit checks that name the file.
* :mod:`scripts.weights.kl`: KL autoencoder keys -> MONAI ``AutoencoderKL`` keys (built in LDM's layout by
  :func:`scripts.autoencoder.kl_autoencoder`); encoder mean and std and decoder output then match diffusers' to
  float precision (tests/test_weights.py).
* :mod:`scripts.weights.unet`: LDM ``openaimodel.UNetModel`` / diffusers ``UNet2DModel`` keys -> MONAI
  ``DiffusionModelUNet`` keys (scale-shift res blocks need :class:`scripts.ldm_unet.LDMUNet`).
"""

from scripts.weights import kl, reading, unet  # noqa: F401
