"""Per-case Dice and IoU (optionally HD95), written as a CSV table and a JSON summary (mean, std, n).

Convention for empty masks (MONAI ``ignore_empty=False``): a case whose ground truth is empty scores
Dice = IoU = 1 when the prediction is empty too and 0 otherwise, so every case counts. HD95 (in world
units, from the label's voxel spacing) is 0 when both are empty and NaN (left out of the summary) when
only one is.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

from scripts.io_utils import atomic_write_json, atomic_write_text

__all__ = ["dice_iou", "hd95", "summarise", "SegmentationReport"]

logger = logging.getLogger(__name__)


def dice_iou(pred: torch.Tensor, label: torch.Tensor) -> tuple[float, float]:
    """Dice and IoU of one binary prediction against one binary label (same shape, channel first)."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    p, y = (pred > 0.5).float()[None], (label > 0.5).float()[None]
    dice = compute_dice(p, y, include_background=True, ignore_empty=False)
    iou = compute_iou(p, y, include_background=True, ignore_empty=False)
    return float(dice.mean()), float(iou.mean())


def hd95(pred: torch.Tensor, label: torch.Tensor, spacing: list[float] | None = None) -> float:
    """95th-percentile Hausdorff distance between binary ``pred`` and ``label`` (same shape, channel first)."""
    p, y = (pred > 0.5)[None], (label > 0.5)[None]
    if not p.any() or not y.any():
        return 0.0 if not p.any() and not y.any() else float("nan")
    dist = compute_hausdorff_distance(p.float(), y.float(), include_background=True, percentile=95, spacing=spacing)
    return float(dist.reshape(-1)[0])


def summarise(rows: list[dict], columns: tuple[str, ...] = ("dice", "iou")) -> dict:
    """``{column: {"mean", "std", "n"}}`` over the rows (population std; NaN-free columns only)."""
    out = {}
    for c in columns:
        vals = [float(r[c]) for r in rows if not math.isnan(float(r[c]))]
        mean = sum(vals) / len(vals) if vals else float("nan")
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)) if vals else float("nan")
        out[c] = {"mean": mean, "std": std, "n": len(vals)}
    return out


class SegmentationReport:
    """Evaluator handler: per-case Dice/IoU of ``pred`` vs ``label`` (decollated, original resolution),
    written on completion to ``<output_dir>/metrics.csv`` and ``<output_dir>/summary.json``.
    ``hd95=True`` adds an ``hd95`` column, using the label's voxel spacing (from its affine) when it has one."""

    def __init__(
        self,
        output_dir: str,
        name_key: str = "image",
        pred_key: str = "pred",
        label_key: str = "label",
        hd95: bool = False,
    ):
        self.output_dir = Path(output_dir)
        self.name_key, self.pred_key, self.label_key = name_key, pred_key, label_key
        self.hd95 = bool(hd95)
        self.columns = ("dice", "iou", "hd95") if self.hd95 else ("dice", "iou")
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration_completed(self, engine: Engine) -> None:
        for item in engine.state.output:
            name = Path(str(item[self.name_key].meta["filename_or_obj"])).name
            pred, label = item[self.pred_key].cpu(), item[self.label_key].cpu()
            dice, iou = dice_iou(pred, label)
            row = {"name": name, "dice": dice, "iou": iou}
            if self.hd95:
                affine = getattr(label, "affine", None)
                spacing = (
                    None
                    if affine is None
                    else torch.linalg.norm(affine[: label.dim() - 1, : label.dim() - 1].double(), dim=0).tolist()
                )
                row["hd95"] = hd95(pred, label, spacing)
            self.rows.append(row)

    def completed(self, engine: Engine) -> dict:
        summary = summarise(self.rows, self.columns)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["name", *self.columns])
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.output_dir / "metrics.csv", buf.getvalue())
        atomic_write_json(self.output_dir / "summary.json", summary)
        text = ", ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in summary.items())
        logger.info(f"{len(self.rows)} cases: {text} -> {self.output_dir / 'summary.json'}")
        print(f"{len(self.rows)} cases: {text}")
        return summary
