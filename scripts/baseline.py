"""The plain-UNet baseline that every SDSeg figure is set beside (nnU-Net's habit: always show the baseline).

``configs/baseline_unet.yaml`` trains a MONAI ``UNet`` with ``DiceCELoss`` on the same split, transforms and
flips as SDSeg, and evaluates it through the same ``evaluate.yaml`` chain (per image, at each image's own
resolution). Two small parts MONAI does not have:

* :class:`ProbabilityInferer`: ``sigmoid(network(x))`` (multi-class: softmax over its C outputs), so the UNet's
  output is the same kind of probability map SDSeg's sampler returns and the rest of the evaluation chain
  (``Invertd``, threshold 0.5 or argmax) is shared.
* :class:`TimeBudget`: stops training once a compute budget is spent, counted as the process's CPU time
  (``clock="cpu"``: all threads, robust to other load on a shared machine) or wall time (``clock="wall"``,
  for GPUs), from process start, so it counts start-up, data loading and validation as SDSeg's budget does.
  ignite's ``TimeLimit`` counts wall time only and stops mid-epoch, before the last validation.
"""

from __future__ import annotations

import logging
import time

import torch
from ignite.engine import Engine, Events
from monai.inferers import SimpleInferer

__all__ = ["ProbabilityInferer", "TimeBudget", "check_overlays", "process_seconds"]

logger = logging.getLogger(__name__)
_WALL_START = time.perf_counter()


def process_seconds(clock: str = "cpu") -> float:
    """Seconds this process has used so far: CPU time of all its threads (``cpu``) or wall time (``wall``)."""
    if clock == "cpu":
        return time.process_time()
    if clock == "wall":
        return time.perf_counter() - _WALL_START
    raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")


class ProbabilityInferer(SimpleInferer):
    """``sigmoid(network(inputs))``: a logit network's output as a probability map (B, 1, H, W); ``softmax=True``
    (multi-class, one output per class): ``softmax`` over the C channels, (B, C, H, W)."""

    def __init__(self, softmax: bool = False):
        super().__init__()
        self.softmax = bool(softmax)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        logits = super().__call__(inputs, network, *args, **kwargs)
        return torch.softmax(logits, dim=1) if self.softmax else torch.sigmoid(logits)


class TimeBudget:
    """Trainer handler: end training once ``budget_s`` seconds of ``clock`` are spent.

    When the budget runs out mid-epoch the epoch is cut short, so its ``EPOCH_COMPLETED`` handlers (validation,
    checkpoints) still run, and the run then stops. ``budget_s`` <= 0 or ``None``: no limit.
    """

    def __init__(self, budget_s: float | None, clock: str = "cpu"):
        if clock not in ("cpu", "wall"):
            raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
        self.budget_s = float(budget_s) if budget_s else 0.0
        self.clock = clock

    def spent(self) -> bool:
        return self.budget_s > 0 and process_seconds(self.clock) >= self.budget_s

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _iteration_completed(self, engine: Engine) -> None:
        if self.spent():
            engine.terminate_epoch()

    def _epoch_completed(self, engine: Engine) -> None:
        if self.spent():
            logger.info(
                f"{self.clock} time budget of {self.budget_s:.0f} s spent after {engine.state.iteration} iterations"
            )
            engine.terminate()


def check_overlays(replaces_sdseg: str | None, sdseg_only: list[str]) -> None:
    """Refuse, at start, an overlay that replaces SDSeg's network (``replaces_sdseg``, e.g. ``baseline_unet.yaml``)
    together with overlays that only work on SDSeg's own networks (``sdseg_only`` items: ``"name: what it is"``)."""
    if replaces_sdseg and sdseg_only:
        names = "; ".join("configs/{} ({})".format(*s.partition(": ")[::2]) for s in sdseg_only)
        raise ValueError(
            f"configs/{replaces_sdseg} replaces SDSeg's networks and cannot be combined with {names}. "
            f"The baseline runs with train.yaml (training) or inference.yaml [+ evaluate.yaml] (inference, "
            f"evaluation), [ct.yaml], the preset, then {replaces_sdseg}; run the others without it."
        )
