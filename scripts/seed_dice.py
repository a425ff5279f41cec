"""Dice per noise seed for the stability run (run id ``stability``): how much the single step's segmentation moves
with the noise, in the evaluation's own figures.

:class:`SeedDice` is an evaluator handler: for each case that carries a label (the CT test split through
``configs/ct.yaml``; 2D inference reads no labels and is skipped) it maps the probability map back onto the label's
grid (``Invertd`` with the preprocessing chain, as ``ct.yaml``'s post-processing does), takes the mask codec's
prediction (binary: score > 0.5; ``--classes all13|transunet8``: argmax) and scores it with
:class:`~scripts.handlers.SegmentationReport` (per-case Dice / IoU; multi-class: a column per organ and the mean organ
Dice, exactly as ``evaluate`` reports them). :func:`seed_spread` turns the runs' summaries into one row per seed and
the spread of every column over the seeds: ``spread`` = max - min (as ``compare`` reports its seeds), with the
mean and std beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine
from monai.transforms import Invertd

from scripts.handlers import CaseHandler, SegmentationReport
from scripts.metrics import mean_std

__all__ = ["SeedDice", "seed_rows", "seed_spread"]

BINARY_NAMES = ("background", "foreground")


class SeedDice(CaseHandler):
    """Per-case Dice of one run, written to ``<output_dir>/metrics.csv`` / ``summary.json`` (:meth:`set_output_dir`
    before each run); ``summary`` is the latest run's (``None`` when no case had a label).

    Args:
        transform: the evaluator's preprocessing chain (``@preprocessing``), to invert ``pred`` with.
        codec: the mask codec (``@mask_codec``): its ``prediction`` and its ``class_names`` (``None``: binary).
    """

    def __init__(self, transform, codec, output_dir: str = ".", pred_key: str = "pred", label_key: str = "label"):
        self.invert = Invertd("seed_pred", transform=transform, orig_keys="image", nearest_interp=False)
        self.discrete = codec.prediction("seed_pred")
        self.class_names = tuple(codec.class_names or BINARY_NAMES)
        self.multiclass = codec.class_names is not None
        self.pred_key, self.label_key = pred_key, label_key
        self.report = SegmentationReport(
            output_dir, pred_key="seed_pred", label_key=label_key, class_names=codec.class_names
        )
        self.summary: dict | None = None

    def set_output_dir(self, output_dir: str | Path) -> None:
        self.report.output_dir = Path(output_dir)

    def reset(self) -> None:
        self.report.reset()
        self.summary = None

    def add(self, item: Mapping) -> None:
        if not isinstance(item.get(self.label_key), torch.Tensor):
            return
        d = self.discrete(self.invert({**item, "seed_pred": item[self.pred_key]}))
        self.report.add(d)

    def completed(self, engine: Engine) -> None:
        self.summary = self.report.completed(engine) if self.report.rows else None


def seed_rows(summaries: Sequence[tuple[int, dict]], class_names: Sequence[str], multiclass: bool) -> list[dict]:
    """One row per seed from its evaluation summary: ``dice``, ``iou`` (means over the cases) and, multi-class,
    ``organ_mean_dice`` and ``dice_<organ>`` (each organ's mean over the cases)."""
    rows = []
    for seed, s in summaries:
        row = {"seed": seed, "dice": s["dice"]["mean"], "iou": s["iou"]["mean"], "n": s["dice"]["n"]}
        if multiclass:
            row["organ_mean_dice"] = s["organ_mean_dice"]
            row.update({f"dice_{n}": s[f"dice_{n}"]["mean"] for n in class_names[1:]})
        rows.append(row)
    return rows


def seed_spread(rows: Sequence[Mapping]) -> dict:
    """``{column: {"mean", "std", "min", "max", "spread"}}`` over the seeds (``spread`` = max - min; NaN seeds, an
    organ absent from every case of a run, are left out)."""
    out = {}
    for c in [k for k in rows[0] if k not in ("seed", "n")]:
        vals = [float(r[c]) for r in rows if r[c] == r[c]]
        mean, std = mean_std(vals)
        lo, hi = (min(vals), max(vals)) if vals else (float("nan"), float("nan"))
        out[c] = {"mean": mean, "std": std, "min": lo, "max": hi, "spread": hi - lo, "n": len(vals)}
    return out
