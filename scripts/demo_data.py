"""Synthetic demo datasets written in each real dataset's release layout.

``python -m scripts.demo_data --out data/demo`` writes ``cvc/``, ``kvasir/`` and ``refuge2/``
folders that the loaders in :mod:`scripts.data` read exactly like the real releases:

* CVC-ClinicDB: ``Original/<n>.png`` and ``Ground Truth/<n>.png`` (polyp-like blobs on a
  textured mucosa-like background, 0/255 masks);
* Kvasir-SEG: ``images/<id>.jpg`` and ``masks/<id>.jpg`` (same scenes, JPEG-compressed masks,
  varying image sizes);
* REFUGE2: ``images/<name>.png`` and ``masks/<name>.png`` with the original disc map values
  (0 cup, 128 disc, 255 background); names starting with ``T`` form the test split.

Everything is deterministic from ``--seed``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.io_utils import atomic_save_image

__all__ = ["make_polyp_scene", "make_fundus_scene", "write_demo_datasets"]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.random((max(2, h // scale), max(2, w // scale)))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _blob(rng: np.random.Generator, h: int, w: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """A star-convex blob with a wavy boundary (boolean mask)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = np.arctan2(yy - cy, xx - cx)
    r = radius * (1.0 + 0.25 * rng.uniform(-1, 1) * np.cos(ang - rng.uniform(0, np.pi)))
    for k in (2, 3):
        r = r * (1.0 + rng.uniform(0.0, 0.12) * np.sin(k * ang + rng.uniform(0, 2 * np.pi)))
    aspect = rng.uniform(0.75, 1.3)
    dist = np.hypot((yy - cy) * aspect, (xx - cx) / aspect)
    return dist <= r


def make_polyp_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An endoscopy-like RGB scene (uint8, HxWx3) and its polyp mask (bool, HxW)."""
    base = np.array([200, 110, 100], np.float32) + rng.uniform(-20, 20, 3)
    tex = _smooth_noise(rng, h, w, 8)[..., None] - 0.5
    light = _smooth_noise(rng, h, w, max(h, w) // 2)[..., None]
    img = base * (0.55 + 0.6 * light) + 60 * tex
    mask = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 3)):
        radius = rng.uniform(0.12, 0.25) * min(h, w)
        cy, cx = rng.uniform(radius, h - radius), rng.uniform(radius, w - radius)
        mask |= _blob(rng, h, w, cy, cx, radius)
    polyp = np.array([235, 170, 120], np.float32) + rng.uniform(-15, 15, 3)
    shade = 0.8 + 0.4 * _smooth_noise(rng, h, w, 4)[..., None]
    img = np.where(mask[..., None], polyp * shade, img)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def make_fundus_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A cropped fundus-like optic disc region and its REFUGE disc map (0 cup, 128 disc, 255 bg)."""
    h = w = size
    cy, cx = h / 2 + rng.uniform(-0.08, 0.08) * h, w / 2 + rng.uniform(-0.08, 0.08) * w
    disc = _blob(rng, h, w, cy, cx, rng.uniform(0.28, 0.36) * size)
    cup = _blob(rng, h, w, cy + rng.uniform(-3, 3), cx + rng.uniform(-3, 3), rng.uniform(0.12, 0.2) * size) & disc
    retina = np.array([150, 60, 30], np.float32) * (0.7 + 0.5 * _smooth_noise(rng, h, w, 16)[..., None])
    img = np.where(disc[..., None], np.array([230, 150, 80], np.float32), retina)
    img = np.where(cup[..., None], np.array([250, 220, 170], np.float32), img)
    vessels = _smooth_noise(rng, h, w, 6) > 0.8
    img = np.where(vessels[..., None], img * 0.6, img) + rng.normal(0, 5, img.shape)
    disc_map = np.full((h, w), 255, np.uint8)
    disc_map[disc] = 128
    disc_map[cup] = 0
    return np.clip(img, 0, 255).astype(np.uint8), disc_map


def write_demo_datasets(out: str | os.PathLike, n: int = 60, seed: int = 0) -> dict[str, Path]:
    """Write the three 2D demo datasets under ``out`` and return their folders by dataset name."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    folders = {name: out / name for name in ("cvc", "kvasir", "refuge2")}
    for i in range(1, n + 1):  # CVC-ClinicDB: numbered PNGs of one size
        img, mask = make_polyp_scene(rng, 144, 192)
        atomic_save_image(folders["cvc"] / "Original" / f"{i}.png", img)
        atomic_save_image(folders["cvc"] / "Ground Truth" / f"{i}.png", mask.astype(np.uint8) * 255)
    for i in range(n):  # Kvasir-SEG: hashed-looking ids, JPEG images and masks, varying sizes
        h, w = int(rng.integers(140, 200)), int(rng.integers(160, 240))
        img, mask = make_polyp_scene(rng, h, w)
        name = f"cju{rng.integers(0, 16**8):08x}"
        atomic_save_image(folders["kvasir"] / "images" / f"{name}.jpg", img, quality=90)
        atomic_save_image(folders["kvasir"] / "masks" / f"{name}.jpg", mask.astype(np.uint8) * 255, quality=90)
    n_test = max(1, n // 3)
    for i in range(n):  # REFUGE2: training gNNNN / nNNNN, test TNNNN
        img, disc_map = make_fundus_scene(rng, 160)
        name = f"T{i:04d}" if i < n_test else f"{'gn'[i % 2]}{i:04d}"
        atomic_save_image(folders["refuge2"] / "images" / f"{name}.png", img)
        atomic_save_image(folders["refuge2"] / "masks" / f"{name}.png", disc_map)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--n", type=int, default=60, help="images per dataset (default: 60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, folder in write_demo_datasets(args.out, args.n, args.seed).items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
