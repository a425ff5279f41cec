"""The metrics of the stability run (:mod:`scripts.stability`): PSNR, SSIM and MS-SSIM per image and LPIPS per run,
between every run's maps and the first run's, streamed (:class:`StabilityAccumulator`; the first run's maps wait on
disk, :mod:`scripts.reference_store`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

from scripts import channel_ssim
from scripts.metrics import mean_std, summarise
from scripts.reference_store import ReferenceStore

__all__ = ["ms_ssim_settings", "load_lpips", "StabilityAccumulator"]

logger = logging.getLogger(__name__)

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # MONAI's (and Wang et al.'s) 5 scales
KINDS = ("seg", "score")
INSTANCE_METRICS = ("psnr", "ssim", "ms_ssim")
LPIPS_IMAGES = 64  # 2D images (a slice's channel each) per LPIPS forward pass


def ms_ssim_settings(
    size: int, kernel_size: int = 11, weights: Sequence[float] = MS_SSIM_WEIGHTS
) -> tuple[int, tuple[float, ...], str]:
    """MS-SSIM kernel and scale weights that fit images whose smaller side is ``size`` px.

    MONAI's ``MultiScaleSSIMMetric`` needs ``size // (scales - 1) ** 2 > kernel_size - 1`` (5 scales with
    kernel 11: more than 160 px). Smaller images drop the coarsest scales (the remaining weights renormalised
    to sum to 1), then shrink the kernel. Returns ``(kernel_size, weights, note)``; the note is empty when
    the standard setting fits, and otherwise says what was used.
    """

    def fits(n: int, k: int) -> bool:
        return size // max(1, n - 1) ** 2 > k - 1 and size // 2 ** (n - 1) >= k

    n = next((n for n in range(len(weights), 0, -1) if fits(n, kernel_size)), 0)
    kernel = kernel_size
    if n == 0:  # not even one scale: the largest odd kernel that fits
        n, kernel = 1, max(1, size - 1 if size % 2 == 0 else size)
    used = tuple(w / sum(weights[:n]) for w in weights[:n]) if n < len(weights) else tuple(weights)
    note = ""
    if n < len(weights) or kernel != kernel_size:
        note = (
            f"MS-SSIM on {size} px images: {n} scale(s) (weights {', '.join(f'{w:.4f}' for w in used)}) and "
            f"kernel {kernel}, since {len(weights)} scales with kernel {kernel_size} need images larger than "
            f"{(kernel_size - 1) * (len(weights) - 1) ** 2} px"
        )
    return kernel, used, note


def load_lpips(net: str | None = "alex", pnet_rand: bool = False):
    """``(lpips.LPIPS model or None, status)``. The model is built only when its torchvision backbone weights
    are already in the torch hub cache (nothing is downloaded); ``pnet_rand=True`` builds it with a random
    backbone, which measures nothing meaningful: for tests only."""
    if not net or str(net).lower() == "none":
        return None, "unavailable: switched off (lpips_net: none)"
    try:
        import lpips
        import torchvision.models as tvm
    except ImportError as e:
        return None, f"unavailable: {e}"
    weights = {"alex": tvm.AlexNet_Weights, "vgg": tvm.VGG16_Weights, "squeeze": tvm.SqueezeNet1_1_Weights}
    if net not in weights:
        raise ValueError(f"lpips_net must be one of {sorted(weights)} or none, got {net!r}")
    if not pnet_rand:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights[net].IMAGENET1K_V1.url)
        if not cached.is_file():
            return None, f"unavailable: {net} backbone weights not found at {cached} (offline; nothing is downloaded)"
    with warnings.catch_warnings():  # lpips 0.1.4 uses torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=pnet_rand, verbose=False).eval().requires_grad_(False)
    version = importlib.metadata.version("lpips")
    return model, f"lpips {version}, {net}" + (" with a RANDOM backbone (tests only)" if pnet_rand else "")


class StabilityAccumulator:
    """Stability of M runs against the first one, fed a run at a time or a case at a time.

    Per case (what :class:`StabilityEvaluation` does): :meth:`start_run`, then :meth:`add_items` with some of the run's
    ``{name: score map}`` as they are produced (each compared with the reference and dropped), then :meth:`end_run`.
    Whole runs: ``add(run)``, the same three steps. Maps are ``(C, H, W)`` or ``(C, H, W, D)`` in [0, 1] (C = 1:
    binary; otherwise class probabilities); the first run is the reference. Masks ("seg") are ``score > threshold``
    (C > 1: the one-hot argmax). Maps of different sizes are fine (each name keeps its size across runs).

    Memory: the reference run's maps go to disk (:class:`~scripts.reference_store.ReferenceStore`, float32, in
    ``scratch_dir`` or a temporary folder) and each later map is compared with its reference as it arrives, so the
    accumulator holds no map between calls, only per-image sums. :meth:`close` deletes the reference's files.

    Args:
        psnr_cap: identical maps have PSNR = inf; values are capped at this many dB (``None``: keep inf,
            and any identical pair makes the mean inf). The number of identical pairs is reported either way.
        lpips_net: ``alex`` | ``vgg`` | ``squeeze`` | ``none``; see :func:`load_lpips`.
        lpips_pnet_rand: random LPIPS backbone (tests only).
        chunk: at most this many equally sized maps per metric call.
        scratch_dir: the folder for the reference's ``.npy`` files (``None``: a temporary folder).
    """

    def __init__(
        self,
        psnr_cap: float | None = 100.0,
        lpips_net: str | None = "alex",
        lpips_pnet_rand: bool = False,
        threshold: float = 0.5,
        ms_ssim_kernel: int = 11,
        chunk: int = 64,
        scratch_dir: str | Path | None = None,
    ):
        self.psnr_cap = None if psnr_cap is None else float(psnr_cap)
        self.threshold, self.ms_ssim_kernel, self.chunk = float(threshold), int(ms_ssim_kernel), int(chunk)
        self.lpips, self.lpips_status = load_lpips(lpips_net, lpips_pnet_rand)
        self.reference = ReferenceStore(scratch_dir)
        self.spatial_dims: int | None = None
        self.sums: dict[str, dict[str, float]] = {}  # name -> "psnr_seg" ... -> sum over runs
        self.identical = dict.fromkeys(KINDS, 0)
        self.lpips_runs: dict[str, list[float]] = {k: [] for k in KINDS}
        self.num_runs = 0
        self.ms_ssim_note = ""
        self._run: dict | None = None  # the run being added: its per-image values (numbers only), until end_run

    # ---- feeding ---------------------------------------------------------------------------------------------
    def add(self, run: Mapping[str, torch.Tensor]) -> None:
        """One whole run ``{name: map}``."""
        self.start_run()
        self.add_items(run)
        self.end_run()

    def start_run(self) -> None:
        self._run = {
            "values": {},
            "extra": [],
            "identical": dict.fromkeys(KINDS, 0),
            "lpips": dict.fromkeys(KINDS, 0.0),
        }

    def add_items(self, items: Mapping[str, torch.Tensor]) -> None:
        """Maps of the current run: the first run's are written to the reference store, a later run's are compared
        with the reference at once. None is kept."""
        if self._run is None:
            raise RuntimeError("start_run() before add_items()")
        seen = self._run["values"]
        for name in items:
            if name in seen or name in self._run["extra"]:
                raise ValueError(f"two inputs named {name}: runs are paired by file name, names must be unique")
        items = {n: torch.as_tensor(v).detach().cpu().as_subclass(torch.Tensor).float() for n, v in items.items()}
        if self.num_runs == 0:
            for name, value in items.items():
                self._check_dims(value)
                self.reference.put(name, value)
                seen[name] = None
            return
        groups = defaultdict(list)  # metrics run on stacks of equally sized maps
        for name, value in items.items():
            if name not in self.reference:
                self._run["extra"].append(name)
                continue
            if tuple(value.shape) != self.reference.shapes[name]:
                raise ValueError(
                    f"{name}: size {tuple(value.shape)} differs from the first run's {self.reference.shapes[name]}"
                )
            groups[tuple(value.shape)].append(name)
        for part in (g[i : i + self.chunk] for g in groups.values() for i in range(0, len(g), self.chunk)):
            self._compare(
                part, torch.stack([self.reference.get(n) for n in part]), torch.stack([items[n] for n in part])
            )

    def end_run(self) -> None:
        """Close the current run: the reference's MS-SSIM settings, or a later run's values (when it covered the
        reference's images exactly)."""
        run, self._run = self._run, None
        if run is None:
            raise RuntimeError("start_run() before end_run()")
        if self.num_runs == 0:
            if not self.reference:
                raise ValueError("stability: the first run produced no predictions")
            self._set_metrics()
            self.num_runs = 1
            return
        missing, extra = sorted(set(self.reference) - set(run["values"])), sorted(run["extra"])
        if missing or extra:
            raise ValueError(
                f"run {self.num_runs + 1} does not cover the first run's images: missing {missing}, extra {extra}"
            )
        for name, values in run["values"].items():
            row = self.sums.setdefault(name, {})
            for column, v in values.items():
                row[column] = row.get(column, 0.0) + v
        for kind in KINDS:
            self.identical[kind] += run["identical"][kind]
            if self.lpips is not None:
                self.lpips_runs[kind].append(run["lpips"][kind] / len(self.reference))
        self.num_runs += 1

    def close(self) -> None:
        """Delete the reference run's files."""
        self.reference.remove()

    # ---- metrics ---------------------------------------------------------------------------------------------
    def _check_dims(self, value: torch.Tensor) -> None:
        dims = {value.ndim - 1} | ({self.spatial_dims} if self.spatial_dims is not None else set())
        if len(dims) != 1 or not dims <= {2, 3}:
            raise ValueError(f"stability expects (C, H, W) or (C, H, W, D) maps, got {sorted(dims)} spatial dims")
        self.spatial_dims = dims.pop()

    def _set_metrics(self) -> None:
        size = min(min(shape[1:]) for shape in self.reference.shapes.values())
        self.kernel, self.weights, self.ms_ssim_note = ms_ssim_settings(size, self.ms_ssim_kernel)
        sd = self.spatial_dims
        self.metrics = {
            "psnr": PSNRMetric(max_val=1.0, reduction="none"),
            "ssim": SSIMMetric(spatial_dims=sd, data_range=1.0, reduction="none"),
            "ms_ssim": MultiScaleSSIMMetric(
                spatial_dims=sd, data_range=1.0, kernel_size=self.kernel, weights=self.weights, reduction="none"
            ),
        }

    def _metric(self, metric: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One value per map: MONAI's metric, or for C-class maps SSIM / MS-SSIM channel by channel
        (:mod:`scripts.channel_ssim`: the same figure, a dozen fewer volume-sized temporaries)."""
        if metric != "psnr" and pred.shape[1] > 1:
            if metric == "ssim":
                return channel_ssim.ssim(pred, target, self.spatial_dims).view(-1)
            return channel_ssim.ms_ssim(pred, target, self.spatial_dims, 1.0, self.kernel, self.weights).view(-1)
        fn = self.metrics[metric]
        values = fn(pred, target).view(-1)
        fn.reset()
        return values

    def _compare(self, names: list[str], ref: torch.Tensor, other: torch.Tensor) -> None:
        """Per-image metrics of a stack of a later run's maps against the reference's, into the current run."""
        run = self._run
        for kind, (a, b) in zip(KINDS, (self._seg(ref, other), (ref, other))):
            run["identical"][kind] += int(sum(torch.equal(x, y) for x, y in zip(a, b)))
            for metric in INSTANCE_METRICS:
                values = self._metric(metric, b, a)
                if metric == "psnr" and self.psnr_cap is not None:
                    values = values.clamp(max=self.psnr_cap)
                for name, v in zip(names, values.tolist()):
                    run["values"].setdefault(name, {})[f"{metric}_{kind}"] = v
            if self.lpips is not None:
                run["lpips"][kind] += self._lpips(a, b)

    def _lpips(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Sum over the batch of LPIPS(a, b); (B, C, H, W) maps in [0, 1], each channel as 3 channels (an image's
        value: the mean over its C channels); volumes slice by slice along the last axis (the mean over its slices).
        At most ``LPIPS_IMAGES`` 2D images per forward pass (the network's activations of a whole volume's slices
        and channels at once would be tens of volumes)."""
        depth, channels = (a.shape[-1] if a.ndim == 5 else 1), a.shape[1]
        step = max(1, LPIPS_IMAGES // channels)
        if a.ndim == 5:  # (B, C, H, W, D) -> k slices of every case: (B * k * C, 1, H, W)
            parts = [
                [x[..., k : k + step].permute(0, 4, 1, 2, 3).reshape(-1, 1, *x.shape[2:4]) for x in (a, b)]
                for k in range(0, depth, step)
            ]
        else:
            parts = [[x[i : i + step].reshape(-1, 1, *x.shape[2:]) for x in (a, b)] for i in range(0, len(a), step)]
        total = 0.0
        with torch.no_grad():  # normalize=True: the package maps [0, 1] to its [-1, 1] input
            for x, y in parts:
                total += float(self.lpips(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1), normalize=True).sum())
        return total / depth / channels

    def _seg(self, *maps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if maps[0].shape[1] > 1:  # class probabilities (B, C, ...): the one-hot argmax
            c = maps[0].shape[1]
            return tuple(torch.nn.functional.one_hot(m.argmax(1), c).movedim(-1, 1).float() for m in maps)
        return tuple((m > self.threshold).float() for m in maps)

    def per_image(self) -> list[dict]:
        """One row per image: each metric averaged over the runs compared with the first."""
        pairs, columns = max(1, self.num_runs - 1), [f"{m}_{k}" for m in INSTANCE_METRICS for k in KINDS]
        return [{"name": n, **{c: self.sums[n][c] / pairs for c in columns}} for n in sorted(self.sums)]

    def result(self, method: str = "SDSeg") -> dict:
        """The Table 5 row (``table``), its spread (``summary``), per-image rows and the notes."""
        if self.num_runs < 2:
            raise ValueError("stability needs at least 2 runs")
        rows = self.per_image()
        columns = tuple(f"{m}_{k}" for m in INSTANCE_METRICS for k in KINDS)
        summary = summarise(rows, columns)
        for kind in KINDS:
            runs = self.lpips_runs[kind]
            mean, std = mean_std(runs)
            summary[f"lpips_{kind}"] = {"mean": mean, "std": std, "n": len(runs)}
        order = [f"lpips_{k}" for k in KINDS] + list(columns)
        table = {"method": method, **{c: summary[c]["mean"] for c in order}}
        pairs = len(rows) * (self.num_runs - 1)
        notes = {
            "runs": self.num_runs,
            "images": len(rows),
            "lpips": self.lpips_status,
            "ms_ssim": self.ms_ssim_note or f"{len(self.weights)} scales, kernel {self.kernel}",
            "psnr_cap_db": self.psnr_cap,
            "identical_pairs": {k: f"{v} of {pairs}" for k, v in self.identical.items()},
        }
        return {"table": table, "summary": {c: summary[c] for c in order}, "notes": notes, "per_image": rows}
