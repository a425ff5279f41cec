"""Per-case Dice and IoU (optionally HD95) and their summaries (mean, std, n; Markdown tables).

:class:`scripts.handlers.SegmentationReport` writes them per case as a CSV table and a JSON summary.

Convention for empty masks (MONAI ``ignore_empty=False``): a case whose ground truth is empty scores
Dice = IoU = 1 when the prediction is empty too and 0 otherwise, so every case counts. HD95 (in world
units, from the label's voxel spacing) is 0 when both are empty and NaN (left out of the summary) when
only one is.

Multi-class (``--classes`` other than binary; :func:`class_scores`, :class:`OrganDiceMetric`): Dice, IoU and HD95 per
organ with MONAI's metrics (``include_background=False``). An organ absent from both truth and prediction scores NaN
(not 0, not 1) and is left out of every mean; an organ absent from the truth but predicted scores 0 (Dice, IoU) and
NaN (HD95). The case's ``dice``/``iou``/``hd95`` are the means over its counted organs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from monai.handlers import IgniteMetricHandler, MeanDice, from_engine
from monai.metrics import DiceMetric, compute_dice, compute_hausdorff_distance, compute_iou
from monai.networks.utils import one_hot

__all__ = [
    "dice_iou",
    "hd95",
    "mean_std",
    "summarise",
    "format_table",
    "class_scores",
    "OrganDiceMetric",
    "val_dice_handler",
]


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


def class_scores(
    pred: torch.Tensor, label: torch.Tensor, names: Sequence[str], spacing: list[float] | None = None, hd: bool = True
) -> dict:
    """Per-organ Dice / IoU (/ HD95) of a class-index prediction against a class-index label (1, *spatial) each:
    ``{"dice": mean, "iou": mean, ["hd95": mean,] "dice_<organ>": ..., ...}`` (conventions: module docstring)."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    c = len(names)
    p, y = (one_hot(x.round().long()[None], c, dim=1) for x in (pred, label))
    dice = compute_dice(p, y, include_background=False, ignore_empty=False)[0]
    iou = compute_iou(p, y, include_background=False, ignore_empty=False)[0]
    absent = (p[0, 1:].flatten(1).sum(1) == 0) & (y[0, 1:].flatten(1).sum(1) == 0)
    dice[absent], iou[absent] = float("nan"), float("nan")
    out = {"dice": dice, "iou": iou}
    if hd:
        out["hd95"] = torch.tensor([hd95(p[0, i : i + 1], y[0, i : i + 1], spacing) for i in range(1, c)])
        out["hd95"][absent] = float("nan")
    row = {k: _nanmean(v.tolist()) for k, v in out.items()}
    for k, v in out.items():
        row.update({f"{k}_{n}": float(x) for n, x in zip(names[1:], v.tolist())})
    return row


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


class OrganDiceMetric(DiceMetric):
    """MONAI's ``DiceMetric`` (``include_background=False``) on one-hot (B, C, ...) inputs, with an organ absent from
    both truth and prediction NaN (left out of the mean) instead of 1; absent from the truth but predicted: 0."""

    def __init__(self, **kwargs):
        super().__init__(include_background=False, reduction="mean", ignore_empty=False, **kwargs)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dice = super()._compute_tensor(y_pred, y)
        absent = (y_pred[:, 1:].flatten(2).sum(-1) == 0) & (y[:, 1:].flatten(2).sum(-1) == 0)
        return torch.where(absent, torch.full_like(dice, float("nan")), dice)


def val_dice_handler(num_outputs: int = 1):
    """The validation key metric: binary (one output channel): MONAI's ``MeanDice`` (include_background=True, as
    ever); multi-class: the mean organ Dice over the validation volumes (:class:`OrganDiceMetric`)."""
    transform = from_engine(["pred", "label"])
    if num_outputs == 1:
        return MeanDice(include_background=True, output_transform=transform)
    return IgniteMetricHandler(metric_fn=OrganDiceMetric(), output_transform=transform)


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
