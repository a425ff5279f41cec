"""Convert a pretrained KL autoencoder (LDM kl-f8 ``.ckpt``, SD VAE diffusers files) to a MONAI state dict, once:

    python -m scripts.tools.convert_weights convert kl-f8/model.ckpt models/kl-f8.pt

It prints the autoencoder settings the file needs (``autoencoder_channels``, ``autoencoder_layout`` ...).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from scripts.autoencoder import kl_autoencoder
from scripts.io_utils import atomic_path
from scripts.weights.kl import check_kl_fit, config_hint, convert_kl_state_dict, describe_autoencoder
from scripts.weights.reading import read_state_dict, resolve

__all__ = ["convert_file", "main"]


def convert_file(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Convert ``src`` to a MONAI state dict at ``dst`` (atomically); returns the :func:`kl_autoencoder` arguments."""
    file, _ = resolve(Path(src))
    raw = read_state_dict(file)
    try:
        sd = convert_kl_state_dict(raw)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    arch = describe_autoencoder(sd)
    if arch is None:
        raise ValueError(f"{file}: not a complete KL autoencoder (first keys: {list(sd)[:5]})")
    with torch.device("meta"):  # check against the model the file describes, without memory or compute
        model = kl_autoencoder(norm_num_groups=math.gcd(*arch["channels"]), **arch)
    check_kl_fit(model.state_dict(), sd, str(file))
    with atomic_path(dst) as tmp:
        torch.save({k: v.contiguous().clone() for k, v in sd.items()}, tmp)
    return arch


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.tools.convert_weights", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="write a MONAI AutoencoderKL state dict (atomically)")
    conv.add_argument("input", help="kl-f8 .ckpt, diffusers .safetensors/.bin or model folder")
    conv.add_argument("output", help="MONAI state dict (.pt), e.g. models/kl-f8.pt")
    args = parser.parse_args(argv)
    try:
        arch = convert_file(args.input, args.output)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.output}; configure the autoencoder with: {config_hint(arch)}")


if __name__ == "__main__":
    main()
