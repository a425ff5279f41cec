"""Per-case Dice and IoU (optionally HD95) and their summaries (mean, std, n; Markdown tables).

:class:`scripts.handlers.SegmentationReport` writes them per case as a CSV table and a JSON summary.

Convention for empty masks (MONAI ``ignore_empty=False``): a case whose ground truth is empty scores
Dice = IoU = 1 when the prediction is empty too and 0 otherwise, so every case counts. HD95 (in world
units, from the label's voxel spacing) is 0 when both are empty and NaN (left out of the summary) when
only one is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

__all__ = ["dice_iou", "hd95", "mean_std", "summarise", "format_table"]


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
        mean, std = mean_std(vals)
        out[c] = {"mean": mean, "std": std, "n": len(vals)}
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and population std of ``values`` (NaN, NaN when there are none)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))


def format_table(rows: list[dict], columns: Sequence[str], digits: int = 4) -> str:
    """A Markdown table of ``rows`` (floats rounded to ``digits``; NaN shown as n/a)."""

    def cell(v) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
