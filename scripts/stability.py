"""Stability under different noise (paper Sec. 3.3, Table 5, Appendix A), run id ``stability``.

:class:`StabilityEvaluation` runs the bundle's evaluator M times with seeds ``seed, seed + 1, ...``
(:func:`scripts.evaluation.run_with_inferer`), pairs the outputs by image file name (never by the order files were
listed or loaded) and compares every run with the first one, each map as soon as it is produced: the first run's
maps wait on disk (:mod:`scripts.reference_store`), so memory stays at about one evaluator batch of maps (CT: one
volume's). Instance level: PSNR, SSIM and MS-SSIM (MONAI metrics, data range 1) per image between the first and
each other run, on the binary masks ("Seg") and on the probability maps ("Score") at the network's resolution,
averaged per image and then over images. Dataset level: LPIPS between each run's predictions and the first run's
(mean over images, then over runs), with the ``lpips`` package when its backbone weights are on disk; otherwise
reported as unavailable.

Multi-class (``--classes all13|transunet8``): the maps are the C class probabilities; "Seg" is the one-hot argmax,
"Score" the probabilities, each metric taken over the C channels (LPIPS: the mean over the channels).

Where the cases carry labels (CT volumes through ``configs/ct.yaml``), each run is also scored as ``evaluate`` scores
it (:class:`scripts.seed_dice.SeedDice`): Dice per seed (multi-class: per organ and the mean organ Dice) and the
spread over the seeds (max - min, with mean and std) -> ``stability_seeds.csv`` and ``stability.json``'s ``seeds``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from scripts.evaluation import configured_sampler, run_with_inferer
from scripts.handlers import OutputFeed
from scripts.io_utils import atomic_write_csv, atomic_write_json, json_safe
from scripts.metrics import format_table
from scripts.seed_dice import SeedDice, seed_rows, seed_spread
from scripts.stability_metrics import StabilityAccumulator

__all__ = ["StabilityEvaluation"]

logger = logging.getLogger(__name__)

SCRATCH = "stability_reference.tmp"  # under output_dir: the first run's maps while the runs go on


class StabilityEvaluation:
    """Run ``evaluator`` ``num_runs`` times with noise seeds ``seed + m`` and report Table 5.

    Writes ``<output_dir>/stability.csv`` (the table row), ``stability.json`` (mean, std, n of each column and
    the notes) and ``stability_per_image.csv``, atomically, and prints the table. The evaluator's
    ``pred`` must be the probability map at the network's resolution (no post-processing).

    Memory: each iteration's maps go to the accumulator (:class:`~scripts.handlers.OutputFeed`) and are dropped; the
    first run's maps wait on disk in ``<output_dir>/stability_reference.tmp/`` (float32 ``.npy``, one per case),
    which is deleted when the runs end, also when they fail (and cleared at start, after a killed run).

    ``seed_dice`` (:class:`~scripts.seed_dice.SeedDice`, optional): when the cases carry labels, each run's
    evaluation goes to ``<output_dir>/seeds/seed<S>/`` and the Dice per seed and its spread to
    ``stability_seeds.csv`` (one row per seed, then ``spread``, ``mean``, ``std``) and ``stability.json``'s
    ``seeds`` (``per_seed``, ``spread``, ``key``: ``organ_mean_dice`` multi-class, ``dice`` binary).
    """

    def __init__(
        self,
        evaluator,
        output_dir: str,
        num_runs: int = 10,
        seed: int = 0,
        num_steps: int = 1,
        num_samples: int = 1,
        psnr_cap: float | None = 100.0,
        lpips_net: str | None = "alex",
        lpips_pnet_rand: bool = False,
        threshold: float = 0.5,
        seed_dice: SeedDice | None = None,
    ):
        if num_runs < 2:
            raise ValueError(f"stability needs num_runs >= 2, got {num_runs}")
        self.evaluator, self.output_dir = evaluator, Path(output_dir)
        self.num_runs, self.seed, self.num_steps, self.num_samples = int(num_runs), int(seed), num_steps, num_samples
        self.accumulator_args = dict(
            psnr_cap=psnr_cap, lpips_net=lpips_net, lpips_pnet_rand=lpips_pnet_rand, threshold=threshold
        )
        self.feed = OutputFeed("pred")
        self.feed.attach(evaluator)
        self.seed_dice = seed_dice
        if seed_dice is not None:
            seed_dice.attach(evaluator)

    def run(self) -> dict:
        acc = StabilityAccumulator(**self.accumulator_args, scratch_dir=self.output_dir / SCRATCH)
        configured = configured_sampler(self.evaluator.inferer)
        summaries = []
        self.feed.sink = acc.add_items
        try:
            for m in range(self.num_runs):
                if self.seed_dice is not None:
                    self.seed_dice.set_output_dir(self.output_dir / "seeds" / f"seed{self.seed + m}")
                acc.start_run()
                run_with_inferer(self.evaluator, configured.variant(self.num_steps, self.num_samples, self.seed + m))
                acc.end_run()
                if self.seed_dice is not None and self.seed_dice.summary is not None:
                    summaries.append((self.seed + m, self.seed_dice.summary))
        finally:
            self.feed.sink = None
            acc.close()
        result = acc.result(method=f"SDSeg {self.num_steps}x{self.num_samples}")
        if summaries:
            result["seeds"] = self._seeds(summaries)
        atomic_write_csv(self.output_dir / "stability.csv", [result["table"]])
        atomic_write_csv(self.output_dir / "stability_per_image.csv", result["per_image"])
        atomic_write_json(
            self.output_dir / "stability.json",
            json_safe({k: result[k] for k in ("table", "summary", "notes", "seeds") if k in result}),
        )
        text = format_table([result["table"]], list(result["table"]))
        notes = "\n".join(f"  {k}: {v}" for k, v in result["notes"].items())
        seeds = f"seeds {self.seed}..{self.seed + self.num_runs - 1}"
        print(f"stability over {self.num_runs} runs ({seeds}):\n{text}\n{notes}")
        if "seeds" in result:
            self._print_seeds(result["seeds"])
        logger.info(f"stability -> {self.output_dir / 'stability.json'}")
        return result

    def _seeds(self, summaries: list[tuple[int, dict]]) -> dict:
        """Dice per seed and its spread; ``stability_seeds.csv``: the seeds' rows, then spread, mean and std."""
        sd = self.seed_dice
        rows = seed_rows(summaries, sd.class_names, sd.multiclass)
        spread = seed_spread(rows)
        stats = [{"seed": stat, **{c: v[stat] for c, v in spread.items()}} for stat in ("spread", "mean", "std")]
        per_seed = [{k: v for k, v in r.items() if k != "n"} for r in rows]
        atomic_write_csv(self.output_dir / "stability_seeds.csv", per_seed + stats)
        return {"key": "organ_mean_dice" if sd.multiclass else "dice", "per_seed": rows, "spread": spread}

    @staticmethod
    def _print_seeds(seeds: dict) -> None:
        key, spread = seeds["key"], seeds["spread"]
        columns = ["seed", key, *(c for c in spread if c.startswith("dice_"))]
        rows = seeds["per_seed"] + [{"seed": "spread", **{c: v["spread"] for c, v in spread.items()}}]
        print(f"Dice per seed ({key}; spread = max - min over the seeds):\n" + format_table(rows, columns))
        print(f"seed spread of {key}: {spread[key]['spread']:.4f} (std {spread[key]['std']:.4f})")
