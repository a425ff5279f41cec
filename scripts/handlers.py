"""Engine handlers: the evaluator's per-case handlers, the trainer's progress bar, checkpoint saver and schedule.

* :class:`CaseHandler`: the base of the evaluator handlers: ``attach`` wires a run's start (:meth:`~CaseHandler.reset`),
  each decollated case of each iteration (:meth:`~CaseHandler.add`) and its end (:meth:`~CaseHandler.completed`).
* :class:`SegmentationReport`: per-case Dice / IoU (/ HD95) -> ``metrics.csv`` and ``summary.json``.
* :class:`CaseFigures`: the first cases as a picture grid -> ``cases.png``.
* :class:`OutputFeed`: each iteration's ``{file name: output}`` handed on and dropped (stability, paired by name).
* :class:`ProgressBar`, :class:`AtomicCheckpointSaver`, :class:`EMAFromNetwork`, :func:`lr_schedule`: for the trainer.
"""

from __future__ import annotations

import glob
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as _IgniteProgressBar
from monai.handlers import CheckpointSaver, from_engine
from monai.utils import ImageMetaKey

from scripts.checkpoints import AtomicDiskSaver
from scripts.figures import case_grid
from scripts.io_utils import atomic_save_image, atomic_write_csv, atomic_write_json, remove_stale_temporaries
from scripts.metrics import class_scores, dice_iou, hd95, summarise

__all__ = [
    "case_name",
    "CaseHandler",
    "SegmentationReport",
    "CaseFigures",
    "OutputFeed",
    "ProgressBar",
    "AtomicCheckpointSaver",
    "EMAFromNetwork",
    "lr_schedule",
]

logger = logging.getLogger(__name__)


def case_name(item: Mapping, key: str = "image") -> str:
    """The input file name of one decollated case: the ``filename_or_obj`` of ``item[key]``."""
    return Path(str(item[key].meta[ImageMetaKey.FILENAME_OR_OBJ])).name


class CaseHandler:
    """Evaluator handler over the decollated cases of a run. ``attach(engine)`` calls :meth:`reset` when a run
    starts, :meth:`add` for every case of every iteration's output and :meth:`completed` when the run ends.

    Not MONAI's ``IterationEvents``/metric handlers: those reduce a metric over the run, these keep the cases."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration_completed(self, engine: Engine) -> None:
        for item in engine.state.output:
            self.add(item)

    def reset(self) -> None:
        raise NotImplementedError

    def add(self, item: Mapping) -> None:
        raise NotImplementedError

    def completed(self, engine: Engine):
        """Nothing by default."""


class SegmentationReport(CaseHandler):
    """Per-case Dice/IoU of ``pred`` vs ``label`` (decollated, original resolution), written on completion to
    ``<output_dir>/metrics.csv`` and ``<output_dir>/summary.json`` (mean, std, n of each column).
    ``hd95=True`` adds an ``hd95`` column, using the label's voxel spacing (from its affine) when it has one.
    ``class_names`` (multi-class, index order, background first): ``pred`` and ``label`` hold class indices; ``dice``,
    ``iou`` (, ``hd95``) are the means over the organs and ``dice_<organ>`` ... one column per organ
    (:func:`scripts.metrics.class_scores`: an organ absent from both is NaN, left out of the means).

    Not MONAI's ``MetricsSaver``: that writes one tab-separated file per metric with per-class columns and
    percentile summaries, not this one table per case that compare and the reverse sweep read; the values are
    MONAI's own (``compute_dice``, ``compute_iou``, ``compute_hausdorff_distance``, see :mod:`scripts.metrics`).
    """

    def __init__(
        self,
        output_dir: str,
        name_key: str = "image",
        pred_key: str = "pred",
        label_key: str = "label",
        hd95: bool = False,
        class_names: list[str] | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.name_key, self.pred_key, self.label_key = name_key, pred_key, label_key
        self.hd95 = bool(hd95)
        self.columns = ("dice", "iou", "hd95") if self.hd95 else ("dice", "iou")
        self.class_names = tuple(class_names) if class_names else None
        if self.class_names:
            self.columns += tuple(f"{m}_{n}" for m in self.columns for n in self.class_names[1:])
        self.rows: list[dict] = []

    def reset(self) -> None:
        self.rows.clear()

    def add(self, item: Mapping) -> None:
        pred, label = item[self.pred_key].cpu(), item[self.label_key].cpu()
        affine = getattr(label, "affine", None)
        spacing = (
            None
            if affine is None
            else torch.linalg.norm(affine[: label.dim() - 1, : label.dim() - 1].double(), dim=0).tolist()
        )
        name = case_name(item, self.name_key)
        if self.class_names:
            self.rows.append({"name": name, **class_scores(pred, label, self.class_names, spacing, self.hd95)})
            return
        dice, iou = dice_iou(pred, label)
        row = {"name": name, "dice": dice, "iou": iou}
        if self.hd95:
            row["hd95"] = hd95(pred, label, spacing)
        self.rows.append(row)

    def completed(self, engine: Engine) -> dict:
        summary = summarise(self.rows, self.columns)
        if self.class_names:  # the mean over organs of each organ's mean over cases (NaN organs left out)
            for m in ("dice", "iou", "hd95")[: 3 if self.hd95 else 2]:
                organs = [summary[f"{m}_{n}"]["mean"] for n in self.class_names[1:]]
                organs = [v for v in organs if not math.isnan(v)]
                summary[f"organ_mean_{m}"] = sum(organs) / len(organs) if organs else float("nan")
        atomic_write_csv(self.output_dir / "metrics.csv", self.rows, ["name", *self.columns])
        atomic_write_json(self.output_dir / "summary.json", summary)
        text = ", ".join(
            f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in summary.items() if k in ("dice", "iou", "hd95")
        )
        logger.info(f"{len(self.rows)} cases: {text} -> {self.output_dir / 'summary.json'}")
        print(f"{len(self.rows)} cases: {text}")
        return summary


class CaseFigures(CaseHandler):
    """:func:`scripts.figures.case_grid` of the first ``num_cases`` 2D cases -> ``<output_dir>/cases.png``.

    Needs ``image``, ``label``, ``pred`` (binary) and ``score`` (probability map) in the decollated output,
    as ``configs/evaluate.yaml`` produces them (``pred``/``score`` at the label's resolution). It keeps only those
    cases, so it stays out of the hot path. Multi-class (``score`` with C > 1 channels, ``pred``/``label`` class
    indices): label and prediction as gray levels (index / (C - 1): ``disc_cup`` disc gray, cup white), the first three
    class probabilities as RGB, and the mean Dice over the foreground classes in the caption.
    """

    def __init__(self, output_dir: str, num_cases: int = 4, height: int = 128):
        self.output_dir, self.num_cases, self.height = Path(output_dir), int(num_cases), int(height)
        self.cases: list[dict] = []

    def reset(self) -> None:
        self.cases.clear()

    def add(self, item: Mapping) -> None:
        if len(self.cases) >= self.num_cases or item["pred"].ndim != 3:  # 2D cases only
            return
        pred, label = item["pred"].detach().cpu(), item["label"].detach().cpu()
        keep = {k: item[k].detach().cpu() for k in ("image", "score")}
        classes = keep["score"].shape[0]
        if classes > 1:  # multi-class: class indices shown as gray levels, the mean Dice over the classes
            dice = class_scores(pred, label, [str(c) for c in range(classes)], hd=False)["dice"]
            pred, label = pred / (classes - 1), label / (classes - 1)
        else:
            dice = dice_iou(pred, label)[0]
        self.cases.append({"name": case_name(item), "dice": dice, "label": label, "pred": pred, **keep})

    def completed(self, engine: Engine) -> None:
        if self.cases:
            atomic_save_image(self.output_dir / "cases.png", case_grid(self.cases, self.height))


class OutputFeed(CaseHandler):
    """Hands each iteration's ``{image file name: output[key] on the CPU}`` to ``sink`` (a callable; ``None``: nothing
    is done) and keeps nothing (the stability run compares each map with its reference as soon as it is produced;
    ``sink=outputs.update`` collects a run)."""

    def __init__(self, key: str = "pred", name_key: str = "image", sink=None):
        self.key, self.name_key, self.sink = key, name_key, sink

    def reset(self) -> None:
        """Nothing is kept between iterations."""

    def iteration_completed(self, engine: Engine) -> None:
        self.feed(engine.state.output)

    def add(self, item: Mapping) -> None:
        self.feed([item])

    def feed(self, items) -> None:
        batch: dict[str, torch.Tensor] = {}
        for item in items:
            name = case_name(item, self.name_key)
            if name in batch:
                raise ValueError(f"two inputs named {name}: runs are paired by file name, names must be unique")
            batch[name] = torch.as_tensor(item[self.key]).detach().float().cpu()
        if self.sink is not None and batch:
            self.sink(batch)


class ProgressBar(_IgniteProgressBar):
    """ignite's tqdm progress bar (with the running loss when ``show_loss``); ``attach(engine)`` as MONAI handlers do.
    Shown on a terminal only (tqdm ``disable=None``), so logs and CI output keep just the log lines."""

    def __init__(self, show_loss: bool = True, **kwargs):
        kwargs.setdefault("disable", None)
        super().__init__(**kwargs)
        self.show_loss = show_loss

    def attach(self, engine, *args, **kwargs):
        transform = (lambda out: {"loss": float(from_engine(["loss"], first=True)(out))}) if self.show_loss else None
        super().attach(engine, output_transform=transform)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose files survive a kill at any moment: each is written completely (temporary
    file, fsync, rename; :class:`scripts.checkpoints.AtomicDiskSaver`) before the file it replaces goes, so there
    is always a complete ``model.pt`` (once one was written) and a complete last checkpoint.

    ``n_saved`` interval checkpoints are kept: after each save the older ones of the same name pattern are removed,
    including those a resumed run started from, and any with a larger number, which an earlier run left (they
    would shadow this run's on ``--resume``). Stale temporaries of killed runs in ``save_dir`` are removed at once.
    """

    def __init__(self, save_dir: str, save_dict: dict, *args, n_saved: int | None = None, **kwargs):
        super().__init__(save_dir, save_dict, *args, n_saved=None, **kwargs)  # pruning is done here, after saving
        self.keep = n_saved
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler = AtomicDiskSaver(save_dir, ckpt.save_handler.filename)
        remove_stale_temporaries(save_dir)
        for path in sorted(Path(save_dir).glob("tmp????????")):  # ignite's atomic saves of earlier versions
            if path.is_file():
                self.logger.warning(
                    f"{path}: {path.stat().st_size / 1e6:.0f} MB left by an interrupted save; delete it"
                )

    def interval_completed(self, engine) -> None:
        super().interval_completed(engine)
        saved = self._interval_checkpoint._saved
        m = re.fullmatch(r"(.+=)(\d+)\.pt", saved[-1].filename) if saved else None
        if m is None:
            return
        current = int(m[2])
        found = sorted(
            (int(n[1]), path)
            for path in Path(self.save_dir).glob(glob.escape(m[1]) + "*.pt")
            if (n := re.fullmatch(re.escape(m[1]) + r"(\d+)\.pt", path.name))
        )
        older = [path for n, path in found if n < current]
        stale = [path for n, path in found if n > current]
        remove = stale + (older[: max(0, len(older) - (self.keep - 1))] if self.keep else [])
        for path in remove:
            path.unlink(missing_ok=True)
        if stale:
            self.logger.info(f"removed {len(stale)} later-numbered checkpoint(s) of an earlier run: {stale}")


class EMAFromNetwork:
    """When a run starts, the EMA weights (what validation scores and ``model.pt`` holds) become the network's.

    Ignite's ``EMAHandler`` copies the network when the config is parsed, before any ``CheckpointLoader`` attached
    ahead of this handler runs (MONAI Label inserts one for its pretrained ``model.pt``): without this, training
    from such weights would average from the untrained network. ``--resume`` loads its EMA after this (its loader
    is attached after the trainer's handlers), so a resumed run keeps its own."""

    def __init__(self, ema):
        self.ema = ema

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.ema.ema_model.load_state_dict(self.ema.model.state_dict())


def lr_schedule(
    optimizer: torch.optim.Optimizer, total_iterations: int, warmup_iterations: int = 0, decay: str = "none"
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration learning-rate factor: linear warm-up over ``warmup_iterations`` (the authors' code
    uses 10k), then constant (``decay="none"``, the paper) or cosine down to 0 at ``total_iterations``.

    A ``LambdaLR``, since MONAI's ``WarmupCosineSchedule`` warms up from 0 (here from 1 / warmup) and has no
    constant variant."""
    if decay not in ("none", "cosine"):
        raise ValueError(f"lr decay must be 'none' or 'cosine', got {decay!r}")

    def factor(it: int) -> float:
        if it < warmup_iterations:
            return (it + 1) / warmup_iterations
        if decay == "none":
            return 1.0
        progress = min(1.0, (it - warmup_iterations) / max(1, total_iterations - warmup_iterations))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
