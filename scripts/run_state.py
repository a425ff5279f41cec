"""The state of a run beyond weights and optimiser, so that a resumed run continues exactly.

* :class:`RunState`: what a checkpoint holds besides weights, optimiser, schedule and iteration so that a resumed
  run makes the same decisions as an uninterrupted one: the best validation metric, the EMA warm-up position,
  the random states (torch, CUDA, numpy, Python, the training transforms) and the position in the shuffled pass.
* :class:`ResumableRandomSampler`: ``RandomSampler`` (the same draws) that can restart a pass part-way through.
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from monai.utils import ensure_tuple

__all__ = ["ResumableRandomSampler", "RunState"]

logger = logging.getLogger(__name__)


class ResumableRandomSampler(torch.utils.data.Sampler):
    """``torch.utils.data.RandomSampler`` (same draws from the global torch generator, so the same order) that
    remembers the seed of the pass under way and can restart a pass part-way through (:meth:`resume`)."""

    def __init__(self, data_source):
        self.data_source = data_source
        self.seed: int | None = None  # of the pass under way
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.data_source)

    def resume(self, seed: int, start: int) -> None:
        """The next pass is the pass drawn with ``seed``, from its ``start``-th sample."""
        self._resume = (int(seed), int(start))

    def __iter__(self):
        n = len(self.data_source)
        if self._resume is not None:
            (seed, start), self._resume = self._resume, None
        else:
            seed, start = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        self.seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        yield from torch.randperm(n, generator=generator).tolist()[start:]


def _randomizables(obj, found: list | None = None, seen: set | None = None) -> list:
    """The ``Randomizable`` objects in a dataset and its transforms, in a fixed order."""
    found = [] if found is None else found
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return found
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, (list, tuple, Transform, torch.utils.data.Dataset)):
                _randomizables(item, found, seen)
    elif isinstance(obj, (Transform, torch.utils.data.Dataset)):
        if isinstance(obj, Randomizable):
            found.append(obj)
        for key, value in vars(obj).items():
            if key not in ("data", "_cache") and isinstance(value, (list, tuple, Transform, torch.utils.data.Dataset)):
                _randomizables(value, found, seen)
    return found


def _numpy_state(rs: np.random.RandomState) -> dict:
    name, keys, pos, has_gauss, gauss = rs.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": gauss,
    }


def _set_numpy_state(rs: np.random.RandomState, state: dict) -> None:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    rs.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["gauss"]))


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _global_rng() -> dict:
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_state(np.random.mtrand._rand),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }


def _set_global_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    _set_numpy_state(np.random.mtrand._rand, state["numpy"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))


class RunState:
    """Checkpoint entry (``state_dict`` / ``load_state_dict``) that makes a resumed run continue as the uninterrupted
    one would: the best validation metric and the file it went to (so ``model.pt`` is replaced only by a better
    model), the EMA warm-up position, the random states of torch, CUDA, numpy, Python and of the training
    transforms, and the seed and position of the shuffled pass under way (with :class:`ResumableRandomSampler`).

    Exact on one process with ``num_workers: 0``. With worker processes the random flips after resuming differ
    (their random states live in the workers); under ``torch.distributed`` each rank keeps its own random stream,
    so the random states are not restored (the rest is).

    Args:
        trainer: the ``SupervisedTrainer`` (its data loader, sampler and dataset are read from it).
        evaluator: the validation evaluator (its ``best_metric``).
        handlers: the evaluator's handlers: the ``CheckpointSaver`` with a key metric among them writes ``model.pt``.
        ema: the ignite ``EMAHandler``.
    """

    def __init__(self, trainer, evaluator=None, handlers=(), ema=None):
        self.trainer, self.evaluator, self.ema = trainer, evaluator, ema
        self.savers = [h for h in ensure_tuple(handlers) if getattr(h, "_key_metric_checkpoint", None) is not None]

    @property
    def _loader(self):
        return getattr(self.trainer, "data_loader", None)

    def _pass_position(self) -> tuple[int | None, int]:
        """(seed, start) of the pass under way; (None, 0) when the last pass is complete."""
        loader = self._loader
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, ResumableRandomSampler) or sampler.seed is None or not len(loader):
            return None, 0
        batches = self.trainer.state.iteration % len(loader)
        return (sampler.seed, batches * loader.batch_size) if batches else (None, 0)

    def state_dict(self) -> dict:
        state = {"world_size": _world_size(), "best": [], "best_metric": -1.0, "best_metric_epoch": -1}
        if self.evaluator is not None:
            state["best_metric"] = float(self.evaluator.state.best_metric)
            state["best_metric_epoch"] = int(self.evaluator.state.best_metric_epoch)
        for saver in self.savers:
            state["best"] = [[float(item.priority), str(item.filename)] for item in saver._key_metric_checkpoint._saved]
        scheduler = getattr(self.ema, "momentum_scheduler", None)
        state["ema_updates"] = int(scheduler.event_index) if scheduler is not None else -1
        state["rng"] = _global_rng()
        loader = self._loader
        dataset = getattr(loader, "dataset", None)
        state["transforms"] = [_numpy_state(r.R) for r in _randomizables(dataset)] if dataset is not None else []
        seed, start = self._pass_position()
        state["pass"] = {"seed": -1 if seed is None else seed, "start": start}
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.evaluator is not None:
            self.evaluator.state.best_metric = state["best_metric"]
            self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        for saver in self.savers:
            checkpoint = saver._key_metric_checkpoint
            fixed = getattr(checkpoint.save_handler, "filename", None)  # model.pt, whatever ignite calls it
            kept = [(p, f) for p, f in state["best"] if os.path.isfile(os.path.join(saver.save_dir, fixed or f))]
            if len(kept) < len(state["best"]):
                logger.warning(f"{saver.save_dir}: the best model file is gone; the next validation writes a new one")
            checkpoint.load_state_dict({"_saved": kept})
        scheduler = getattr(self.ema, "momentum_scheduler", None)
        if scheduler is not None and state["ema_updates"] >= 0:
            scheduler.event_index = state["ema_updates"]
        if state["world_size"] != 1 or _world_size() != 1:
            logger.info("distributed run: each rank's random stream starts afresh on resuming")
            return
        _set_global_rng(state["rng"])
        loader = self._loader
        dataset = getattr(loader, "dataset", None)
        randomizables = _randomizables(dataset) if dataset is not None else []
        if len(randomizables) == len(state["transforms"]):
            for r, s in zip(randomizables, state["transforms"]):
                _set_numpy_state(r.R, s)
        else:
            logger.warning("the training transforms differ from the checkpoint's: their random states start afresh")
        sampler = getattr(loader, "sampler", None)
        if state["pass"]["seed"] >= 0 and isinstance(sampler, ResumableRandomSampler):
            sampler.resume(state["pass"]["seed"], state["pass"]["start"])
            # the data loader draws a seed from the global generator when it starts the resumed pass, where the
            # uninterrupted run, in the middle of that pass, draws none: restore it once more before the next step
            rng = state["rng"]
            from ignite.engine import Events

            def restore(engine):
                _set_global_rng(rng)
                engine.remove_event_handler(restore, Events.ITERATION_STARTED)

            self.trainer.add_event_handler(Events.ITERATION_STARTED, restore)
