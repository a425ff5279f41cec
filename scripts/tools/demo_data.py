"""Synthetic demo datasets written in each real dataset's release layout.

``python -m scripts.tools.demo_data --out data/demo`` writes ``cvc/``, ``kvasir/`` and ``refuge2/``
folders that the loaders in :mod:`scripts.data` read exactly like the real releases:

* CVC-ClinicDB: ``Original/<n>.png`` and ``Ground Truth/<n>.png`` (polyp-like blobs on a
  textured mucosa-like background, 0/255 masks);
* Kvasir-SEG: ``images/<id>.jpg`` and ``masks/<id>.jpg`` (same scenes, JPEG-compressed masks,
  varying image sizes);
* REFUGE2: ``images/<name>.png`` and ``masks/<name>.png`` with the original disc map values
  (0 cup, 128 disc, 255 background); names starting with ``T`` form the test split.

``python -m scripts.tools.demo_data --out data/demo --3d`` writes the 3D sets instead (small CT volumes in HU, int16,
anisotropic spacing, non-identity affines, some stored flipped, transposed or slightly rotated, so that
reorientation and restacking are exercised), read by :mod:`scripts.volumes`:

* BTCV: ``img/img00XX.nii.gz`` and ``label/label00XX.nii.gz``: organ-like ellipsoids with labels 1..13 inside a
  body outline; ids 0001 0002 (test) and 0005 0006 0007 0009 (train, the last validates);
* STS-3D: ``image/sts3d_0NN.{nii.gz,mha,nrrd}`` and ``label/sts3d_0NN.nii.gz``: bright teeth (one label per tooth)
  along a bone arch, named as in ``configs/sts3d_split.json``.

Everything is deterministic from ``--seed``.
"""

from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image

from scripts.io_utils import atomic_path, atomic_save_image

__all__ = [
    "make_polyp_scene",
    "make_fundus_scene",
    "write_demo_datasets",
    "make_ct_volume",
    "make_cbct_volume",
    "save_volume",
    "write_demo_volumes",
]


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


# ---- 3D: CT volumes (HU) ------------------------------------------------------------------------
# BTCV organs: label -> (centre x, y as fractions of the grid, z range, radii x, y, HU)
ORGANS = {
    6: ((0.30, 0.45), (0.40, 0.90), (0.14, 0.13), 70),  # liver
    1: ((0.75, 0.60), (0.30, 0.80), (0.07, 0.09), 50),  # spleen
    2: ((0.30, 0.66), (0.15, 0.55), (0.05, 0.07), 160),  # right kidney
    3: ((0.70, 0.66), (0.12, 0.50), (0.05, 0.07), 160),  # left kidney
    7: ((0.62, 0.40), (0.50, 0.85), (0.09, 0.07), 25),  # stomach
    11: ((0.55, 0.52), (0.35, 0.50), (0.09, 0.03), 45),  # pancreas
    4: ((0.36, 0.38), (0.35, 0.55), (0.04, 0.04), 10),  # gallbladder
    5: ((0.52, 0.62), (0.70, 0.90), (0.03, 0.03), 40),  # esophagus
    8: ((0.50, 0.70), (0.10, 0.90), (0.03, 0.03), 220),  # aorta
    9: ((0.42, 0.67), (0.10, 0.80), (0.03, 0.03), 160),  # inferior vena cava
    10: ((0.44, 0.52), (0.45, 0.62), (0.03, 0.025), 190),  # portal / splenic vein
    12: ((0.36, 0.72), (0.55, 0.68), (0.025, 0.02), 35),  # right adrenal gland
    13: ((0.64, 0.72), (0.50, 0.64), (0.025, 0.02), 35),  # left adrenal gland
}


def _ellipsoid(shape, centre, z_range, radii) -> np.ndarray:
    """Boolean ellipsoid in a (x, y, z) grid; centre/radii in fractions of x and y, z_range in fractions of z."""
    nx, ny, nz = shape
    x = (np.arange(nx) + 0.5)[:, None, None] / nx
    y = (np.arange(ny) + 0.5)[None, :, None] / ny
    z = (np.arange(nz) + 0.5)[None, None, :] / nz
    zc, zr = (z_range[0] + z_range[1]) / 2, (z_range[1] - z_range[0]) / 2
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - zc) / zr) ** 2 <= 1


def make_ct_volume(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An abdominal-CT-like volume (int16 HU, RAS voxel order) and its BTCV label volume (uint8, 0..13)."""
    nx, ny, nz = shape
    hu = np.full(shape, -1000.0)
    body = _ellipsoid(shape, (0.5, 0.55), (-1, 2), (0.46, 0.36))
    hu[body] = -90  # fat
    hu[_ellipsoid(shape, (0.5, 0.55), (-1, 2), (0.40, 0.30))] = 30  # muscle / soft tissue
    hu[_ellipsoid(shape, (0.5, 0.80), (-1, 2), (0.05, 0.05))] = 600  # spine
    label = np.zeros(shape, np.uint8)
    for organ, (centre, z_range, radii, value) in ORGANS.items():
        c = [c + rng.uniform(-0.02, 0.02) for c in centre]
        r = [r * rng.uniform(0.85, 1.15) for r in radii]
        z = [z + rng.uniform(-0.03, 0.03) for z in z_range]
        region = _ellipsoid(shape, c, z, r) & body
        hu[region], label[region] = value + rng.uniform(-10, 10), organ
    hu += rng.normal(0, 12, shape)
    return np.round(hu).astype(np.int16), label


def make_cbct_volume(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A dental-CBCT-like volume (int16 HU): soft tissue, a bone arch and bright teeth along it; labels 1..k."""
    nx, ny, nz = shape
    hu = np.full(shape, -1000.0)
    hu[_ellipsoid(shape, (0.5, 0.5), (-1, 2), (0.45, 0.45))] = 40
    label = np.zeros(shape, np.uint8)
    k = int(rng.integers(10, 15))
    angles = np.linspace(0.15 * np.pi, 0.85 * np.pi, k) + rng.uniform(-0.03, 0.03, k)
    arch = (0.5, 0.35, 0.28, 0.30)  # centre x, y and radii of the arch
    for t in np.linspace(0.05 * np.pi, 0.95 * np.pi, 40):  # the jaw bone, a band of overlapping blobs
        c = (arch[0] + arch[2] * np.cos(t), arch[1] + arch[3] * np.sin(t))
        hu[_ellipsoid(shape, c, (0.15, 0.85), (0.06, 0.06))] = 700
    z_top = rng.uniform(0.25, 0.35)
    for i, a in enumerate(angles, start=1):
        c = (arch[0] + arch[2] * np.cos(a), arch[1] + arch[3] * np.sin(a))
        tooth = _ellipsoid(shape, c, (z_top, z_top + rng.uniform(0.35, 0.45)), (0.035, 0.035))
        hu[tooth], label[tooth] = rng.uniform(1500, 2500), i
    hu += rng.normal(0, 30, shape)
    return np.round(hu).astype(np.int16), label


def _orient(array: np.ndarray, affine: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """Store the same world volume another way: flip x and y (``"flip"``), swap x and y (``"transpose"``)."""
    if how == "flip":
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [array.shape[0] - 1, array.shape[1] - 1]
        return array[::-1, ::-1].copy(), affine @ flip
    if how == "transpose":
        swap = np.eye(4)[[1, 0, 2, 3]]
        return array.transpose(1, 0, 2).copy(), affine @ swap
    return array, affine


def save_volume(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a (x, y, z) array with its RAS affine as NIfTI (nibabel) or ``.mha``/``.nrrd`` (SimpleITK, LPS)."""
    path = Path(path)
    if path.name.endswith(".nii.gz"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(gzip.compress(nib.Nifti1Image(array, affine).to_bytes(), compresslevel=1, mtime=0))
        return
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    tmp = path.with_name(f".tmp.{path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(tmp))
    os.replace(tmp, path)


def _affine(rng: np.random.Generator, spacing: tuple[float, float, float], rotate: bool) -> np.ndarray:
    """A BTCV-like affine (x and y axes pointing left/posterior: negative diagonal), origin off zero."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = rng.uniform(-200, 200, 3)
    if rotate:  # a few degrees about z
        a = np.deg2rad(rng.uniform(4, 8))
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        affine[:3, :3] = rot @ affine[:3, :3]
    return affine


def write_demo_volumes(out: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write the two 3D demo datasets (``btcv/``, ``sts3d/``) under ``out``; return their folders."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    folders = {"btcv": out / "btcv", "sts3d": out / "sts3d"}
    hows = ["none", "flip", "transpose", "rotate"]
    for i, case in enumerate([1, 2, 5, 6, 7, 9]):
        shape = (int(rng.choice([64, 72, 80])), int(rng.choice([64, 72, 80])), int(rng.integers(16, 31)))
        image, label = make_ct_volume(rng, shape)
        how = hows[i % len(hows)]
        affine = _affine(rng, (rng.uniform(0.7, 0.9),) * 2 + (rng.uniform(2.5, 3.0),), how == "rotate")
        image, affine_i = _orient(image, affine, how)
        label, _ = _orient(label, affine, how)
        save_volume(folders["btcv"] / "img" / f"img{case:04d}.nii.gz", image, affine_i)
        save_volume(folders["btcv"] / "label" / f"label{case:04d}.nii.gz", label, affine_i)
    for i in range(1, 13):
        shape = (int(rng.choice([48, 56, 64])), int(rng.choice([48, 56, 64])), int(rng.integers(12, 21)))
        image, label = make_cbct_volume(rng, shape)
        how = hows[i % len(hows)]
        affine = _affine(rng, (0.4, 0.4, rng.uniform(0.5, 0.6)), how == "rotate")
        image, affine_i = _orient(image, affine, how)
        label, _ = _orient(label, affine, how)
        suffix = (".nii.gz", ".mha", ".nrrd")[(i - 1) // 4]
        save_volume(folders["sts3d"] / "image" / f"sts3d_{i:03d}{suffix}", image, affine_i)
        save_volume(folders["sts3d"] / "label" / f"sts3d_{i:03d}.nii.gz", label, affine_i)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--n", type=int, default=60, help="images per dataset (default: 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--3d", dest="volumes", action="store_true", help="write the 3D sets (btcv/, sts3d/) instead")
    args = parser.parse_args()
    folders = (
        write_demo_volumes(args.out, args.seed) if args.volumes else write_demo_datasets(args.out, args.n, args.seed)
    )
    for name, folder in folders.items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
