"""Evaluation beyond one Dice figure: the bundle's own MONAI ``SupervisedEvaluator`` (``configs/inference.yaml``)
run several times on the same trained model, its :class:`~scripts.sampler.SDSegInferer` swapped between runs
(:func:`run_with_inferer`), and the reverse-process sweep (paper Table 4, Figure 3).

* :class:`ReverseSweep` (run id ``reverse_sweep``): the evaluation (``configs/evaluate.yaml``: per-image
  Dice/IoU at each image's own resolution) once per ``steps x samples`` setting, with the time spent
  inside the inferer as slices/s.
* The stability evaluation (Table 5) is in :mod:`scripts.stability`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.inferers import Inferer

from scripts.io_utils import atomic_write_csv, atomic_write_json, json_safe
from scripts.metrics import format_table, summarise
from scripts.sampler import SDSegInferer

__all__ = ["configured_sampler", "run_with_inferer", "ReverseSweep"]

logger = logging.getLogger(__name__)


class _TimedInferer(Inferer):
    """Wraps an inferer; adds up the seconds spent in it (device synchronised) and the slices it saw."""

    def __init__(self, inferer: Inferer):
        super().__init__()
        self.inferer, self.seconds, self.slices = inferer, 0.0, 0

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        sync = torch.cuda.synchronize if inputs.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = self.inferer(inputs, network, *args, **kwargs)
        sync()
        self.seconds += time.perf_counter() - start
        self.slices += int(inputs.shape[0])
        return out


def _swap_sampler(inferer: Inferer | None, sampler: Inferer) -> Inferer:
    """``inferer`` with its :class:`SDSegInferer` replaced by ``sampler``; wrappers that keep theirs in an
    ``inferer`` attribute (such as the 3D slice-by-slice inferer) are copied and kept."""
    if inferer is None or isinstance(inferer, (SDSegInferer, _TimedInferer)):
        return sampler
    inner = getattr(inferer, "inferer", None)
    if not isinstance(inner, Inferer):
        raise TypeError(f"no SDSegInferer found in the evaluator's inferer {type(inferer).__name__}")
    outer = copy.copy(inferer)
    outer.inferer = _swap_sampler(inner, sampler)
    return outer


def configured_sampler(inferer: Inferer | None) -> SDSegInferer:
    """The :class:`SDSegInferer` inside ``inferer`` (through wrappers' ``inferer`` attributes), so that runs with
    other steps, samples or seeds keep the configured scheduler, averaging and fast path; a default one if none."""
    while inferer is not None and not isinstance(inferer, SDSegInferer):
        inferer = getattr(inferer, "inferer", None)
    return inferer if inferer is not None else SDSegInferer()


def run_with_inferer(evaluator, sampler: SDSegInferer) -> tuple[float, int]:
    """Run ``evaluator`` once over its data with ``sampler`` in place of the :class:`SDSegInferer` of its
    inferer (wrappers kept, see :func:`_swap_sampler`). Returns the seconds spent inside ``sampler`` and the
    number of 2D slices it segmented; the evaluator's inferer is restored afterwards."""
    original = evaluator.inferer
    timed = _TimedInferer(sampler)
    evaluator.inferer = _swap_sampler(original, timed)
    try:
        evaluator.run()
    finally:
        evaluator.inferer = original
    return timed.seconds, timed.slices


# ---- reverse-process sweep -----------------------------------------------------------------------
class ReverseSweep:
    """Evaluate the same model with each ``(steps, samples)`` setting: Dice/IoU and slices/s in one table.

    ``report`` is the evaluator's :class:`~scripts.handlers.SegmentationReport`; each setting writes its
    per-image table under ``<output_dir>/steps<N>_samples<K>/``. ``n`` counts cases (images or volumes),
    ``slices`` the 2D slices segmented; slices/s counts only the time inside the 2D reverse process
    (encoder, U-Net steps, decoder), not loading, resampling or writing.
    """

    def __init__(self, evaluator, report, output_dir: str, settings: Sequence[Sequence[int]], seed: int = 0):
        self.evaluator, self.report, self.output_dir = evaluator, report, Path(output_dir)
        self.settings = [(int(s), int(k)) for s, k in settings]
        self.seed = int(seed)

    def run(self) -> list[dict]:
        rows = []
        for steps, samples in self.settings:
            self.report.output_dir = self.output_dir / f"steps{steps}_samples{samples}"
            sampler = configured_sampler(self.evaluator.inferer).variant(steps, samples, self.seed)
            seconds, slices = run_with_inferer(self.evaluator, sampler)
            s = summarise(self.report.rows)
            rows.append(
                {
                    "reverse_process": "single step" if steps == 1 else f"DDIM {steps} steps",
                    "steps": steps,
                    "samples": samples,
                    "dice": s["dice"]["mean"],
                    "dice_std": s["dice"]["std"],
                    "iou": s["iou"]["mean"],
                    "n": s["dice"]["n"],
                    "slices": slices,
                    "seconds": seconds,
                    "slices_per_s": slices / seconds if seconds > 0 else float("nan"),
                }
            )
        atomic_write_csv(self.output_dir / "reverse_sweep.csv", rows)
        atomic_write_json(self.output_dir / "reverse_sweep.json", json_safe(rows))
        print("reverse-process sweep (steps x samples):\n" + format_table(rows, list(rows[0]), digits=4))
        logger.info(f"reverse sweep -> {self.output_dir / 'reverse_sweep.json'}")
        return rows
