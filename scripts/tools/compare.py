"""SDSeg beside a plain MONAI UNet given the same compute: ``python -m scripts.tools.compare --dataset kvasir ...``.

1. Trains SDSeg as a user would (``python -m monai.bundle run training``: the mask autoencoder stage, unless
   ``--autoencoder_path`` gives one, then SDSeg) with the ``--configs`` overlays (preset last) and any
   ``--set key=value`` overrides, and measures the compute both stages took: the CPU time of all their
   threads (``--clock cpu``, the default without a GPU: robust to other load on the machine) or wall time
   (``--clock wall``, the default with one).
2. Trains the plain UNet of ``configs/baseline_unet.yaml`` (DiceCE, same split, transforms, flips and image
   size) until the same amount of compute is spent (``--budget_s`` to set another), choosing its checkpoint
   on the validation split as SDSeg does. Of ``--set``, the data and size keys (``image_size``, ...) apply to
   the UNet too; ``--baseline_set`` overrides the UNet's own settings.
3. Evaluates both on ``--split`` (``test``; ``val`` to choose settings without looking at test) through the
   same ``evaluate.yaml`` chain: per image, at each image's own resolution. SDSeg runs its single step with
   ``--seeds`` noise seeds (mean and spread, max - min, of the per-seed mean Dice) and with ``--samples``
   noise draws averaged (``--samples 1``: none).

CT volumes (``--dataset btcv|sts3d``): both models add ``configs/ct.yaml`` (same windows, axial slices, slice
cache ``--cache_dir`` and split ``--split_file``; ``--foreground all13|transunet8`` for BTCV), validate and are
scored per volume on the input grid, and the table gains HD95 (mm) and a per-volume table: the UNet's Dice, IoU,
HD95 beside SDSeg's (mean over the seeds, and the spread of its Dice). ``--classes all13|transunet8`` (btcv; default
binary) segments every organ as its own class in both models (SDSeg's mask codec, the UNet's softmax outputs), and
adds a per-organ table read from each evaluation's ``summary.json``: per organ the UNet's mean Dice beside SDSeg's
(mean over the seeds, and its spread), then the mean over organs (``organ_mean_dice``); Dice/IoU/HD95 above are
then the means over organs.

Prints the tables and writes ``<out>/compare_<split>.json`` (every figure, per-case rows included) and
``compare_<split>.md`` (the tables); models and per-case tables under ``<out>/sdseg`` and ``<out>/baseline``.
``--skip_training`` evaluates the models already in ``<out>`` (budgets from its ``timings.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from scripts.bundle_config import parse_configs
from scripts.classes import get_class_set
from scripts.io_utils import atomic_write_json, atomic_write_text
from scripts.metrics import format_table
from scripts.sampler import SDSegInferer
from scripts.tools.compare_parts import case_rows, evaluate, organ_rows, parse_set, run_stage

__all__ = ["main", "run_stage", "evaluate"]

VOLUMES = ("btcv", "sts3d")
# --set keys that describe the data and its size rather than SDSeg: the UNet gets them too
SHARED_KEYS = ("image_size", "val_fraction", "test_fraction", "skip_empty", "hu_window", "num_workers", "cache_rate")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cvc", choices=["cvc", "kvasir", "refuge2", *VOLUMES])
    p.add_argument("--dataset_dir", default=None, help="default: data/demo/<dataset>")
    p.add_argument("--split_file", default=None, help='a JSON {"train": [...], "val": [...], "test": [...]}')
    p.add_argument("--foreground", default=None, help="btcv, binary: all13 (default) | transunet8")
    p.add_argument(
        "--classes",
        default="binary",
        choices=["binary", "all13", "transunet8"],
        help="btcv: every organ its own class, for both models; adds a per-organ Dice table",
    )
    p.add_argument("--cache_dir", default=None, help="btcv/sts3d: the slice cache (default: ct.yaml's data/cache)")
    p.add_argument("--configs", nargs="+", default=["tiny.yaml"], help="SDSeg overlays of train.yaml, preset last")
    shared = ", ".join(SHARED_KEYS)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=f"SDSeg overrides (YAML); {shared}: both")
    p.add_argument("--baseline_set", nargs="*", default=[], metavar="KEY=VALUE", help="the UNet's overrides")
    p.add_argument("--autoencoder_path", default=None, help="a trained mask autoencoder: skip that stage")
    p.add_argument("--out", default="eval/compare")
    p.add_argument("--clock", choices=["cpu", "wall"], default="wall" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget_s", type=float, default=None, help="the UNet's budget (default: what SDSeg took)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--samples", type=int, default=25, help="noise draws averaged in one more SDSeg row (1: none)")
    p.add_argument("--skip_training", action="store_true", help="evaluate the models already in --out")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    volumes = args.dataset in VOLUMES
    if args.foreground and args.dataset != "btcv":
        raise SystemExit("--foreground chooses BTCV's organs (all13 | transunet8); it needs --dataset btcv")
    multi = args.classes != "binary"
    if multi and args.dataset != "btcv":
        raise SystemExit(f"--classes {args.classes} is for BTCV's organs; it needs --dataset btcv")
    if multi and args.foreground:
        raise SystemExit(f"--foreground is the binary foreground; --classes {args.classes} segments every organ")
    if args.cache_dir and not volumes:
        raise SystemExit(f"--cache_dir is the slice cache of CT volumes ({' | '.join(VOLUMES)})")
    out = Path(args.out).resolve()
    data = {"dataset": args.dataset, "split_file": args.split_file, "foreground": args.foreground}
    data["classes"] = args.classes if multi else None  # binary: the commands stay as they were
    if args.dataset_dir:
        data["dataset_dir"] = str(Path(args.dataset_dir).resolve())
    if args.cache_dir:
        data["cache_dir"] = str(Path(args.cache_dir).resolve())
    data = {k: v for k, v in data.items() if v is not None}
    ct = ["ct.yaml"] if volumes else []
    sd_set = parse_set(args.set)
    sdseg = {**data, **sd_set, "ckpt_dir": str(out / "sdseg" / "models")}
    sdseg_configs = [*ct, *args.configs]
    baseline_configs = [*ct, *args.configs[-1:], "baseline_unet.yaml"]
    shared = {k: v for k, v in sd_set.items() if k in SHARED_KEYS}
    baseline = {**data, **shared, **parse_set(args.baseline_set), "ckpt_dir": str(out / "baseline" / "models")}

    timings_file = out / "timings.json"
    if args.skip_training:
        if not timings_file.is_file():
            raise SystemExit(f"{timings_file}: not found; run without --skip_training first")
        timings = json.loads(timings_file.read_text())
    else:
        timings = {}
        ae_path = args.autoencoder_path
        if ae_path is None:
            timings["autoencoder"] = run_stage(
                ["train.yaml", "train_autoencoder.yaml", *sdseg_configs],
                {**sdseg, "output_dir": str(out / "sdseg" / "logs")},
                out / "sdseg" / "autoencoder.log",
            )
            ae_path = str(out / "sdseg" / "models" / "autoencoder.pt")
        sdseg["autoencoder_path"] = str(Path(ae_path).resolve())
        timings["sdseg"] = run_stage(
            ["train.yaml", *sdseg_configs],
            {**sdseg, "output_dir": str(out / "sdseg" / "logs")},
            out / "sdseg" / "train.log",
        )
        key = f"{args.clock}_s"
        budget = args.budget_s or sum(t[key] for t in timings.values())
        timings["baseline"] = run_stage(
            ["train.yaml", *baseline_configs],
            {
                **baseline,
                "output_dir": str(out / "baseline" / "logs"),
                "time_budget_s": budget,
                "budget_clock": args.clock,
            },
            out / "baseline" / "train.log",
        )
        timings["baseline"]["budget_s"], timings["baseline"]["clock"] = budget, args.clock
        atomic_write_json(timings_file, timings)

    split = {"eval_split": args.split}
    sdseg_eval = {k: v for k, v in sdseg.items() if k != "autoencoder_path"}
    sd_parser = parse_configs(["inference.yaml", *sdseg_configs], **sdseg_eval)
    average, image_size = sd_parser.get_parsed_content("average"), sd_parser.get_parsed_content("image_size")
    samplers = {f"seed{s}": SDSegInferer(1, 1, seed=s) for s in range(args.seeds)}
    if args.samples > 1:
        samplers[f"samples{args.samples}"] = SDSegInferer(1, args.samples, seed=0, average=average)
    print(f"=== evaluating SDSeg on the {args.split} split: {', '.join(samplers)}", flush=True)
    sd = evaluate(sdseg_configs, {**sdseg_eval, **split}, out / "sdseg" / args.split, samplers)
    print(f"=== evaluating the UNet on the {args.split} split", flush=True)
    unet = evaluate(baseline_configs, {**baseline, **split}, out / "baseline" / args.split)[""]

    columns = ("dice", "iou", "hd95") if volumes else ("dice", "iou")
    seed_runs = [sd[f"seed{s}"] for s in range(args.seeds)]
    seeds = [r["dice"] for r in seed_runs]

    def minutes(stages: list[str], key: str) -> float:
        return sum(timings[s][key] for s in stages if s in timings) / 60

    def row(method: str, res: dict | list[dict], stages: list[str], spread: float = 0.0) -> dict:
        runs = res if isinstance(res, list) else [res]
        r = {"method": method, "spread": spread}
        r.update({c: sum(x[c] for x in runs) / len(runs) for c in columns})
        r.update(cpu_min=minutes(stages, "cpu_s"), wall_min=minutes(stages, "wall_s"))
        return r

    stages = ["autoencoder", "sdseg"]
    rows = [
        row("plain MONAI UNet", unet, ["baseline"]),
        row(f"SDSeg 1 step, mean of {args.seeds} seeds", seed_runs, stages, max(seeds) - min(seeds)),
    ]
    if args.samples > 1:
        rows.append(row(f"SDSeg 1 step, K = {args.samples} ({average})", sd[f"samples{args.samples}"], stages))
    n, unit = unet["n"], "volumes" if volumes else "images"
    table = format_table(rows, ["method", "dice", "spread", "iou", *columns[2:], "cpu_min", "wall_min"], digits=3)
    seeds_line = "SDSeg Dice by seed: " + " / ".join(f"{d:.3f}" for d in seeds)
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    conditions = f"{image_size} px, {args.clock} clock, OMP_NUM_THREADS {threads}"
    text = f"{args.dataset}, {args.split} split ({n} {unit}), SDSeg overlays {sdseg_configs}, {conditions}\n"
    text += f"{table}\n{seeds_line}\n"
    cases = case_rows(unet, seed_runs, columns) if volumes else []
    if cases:
        names = ["case", *(f"{m}_{c}" for c in columns for m in ("unet", "sdseg")), "sdseg_dice_spread"]
        text += f"\nper volume (SDSeg: mean over the {args.seeds} seeds; HD95 in mm)\n"
        text += format_table(cases, names, digits=3) + "\n"
    organs = []
    if multi:  # the per-organ means each evaluation wrote to its summary.json
        seed_dirs = [out / "sdseg" / args.split / f"seed{s}" for s in range(args.seeds)]
        organs = organ_rows(out / "baseline" / args.split, seed_dirs, get_class_set(args.classes).organs)
        text += f"\nper organ, Dice (--classes {args.classes}; SDSeg: mean over the {args.seeds} seeds)\n"
        text += format_table(organs, ["organ", "unet_dice", "sdseg_dice", "sdseg_spread"], digits=3) + "\n"
    print(text)
    result = {
        "dataset": args.dataset,
        "split": args.split,
        "split_file": args.split_file,
        "foreground": args.foreground,
        "classes": args.classes,
        "configs": sdseg_configs,
        "overrides": sd_set,
        "baseline_overrides": {k: v for k, v in baseline.items() if k not in data and k != "ckpt_dir"},
        "image_size": image_size,
        "threads": threads,
        "clock": args.clock,
        "timings": timings,
        "rows": rows,
        "cases": cases,
        "organs": organs,
        "sdseg": sd,
        "baseline": unet,
        "seed_dice": seeds,
    }
    atomic_write_json(out / f"compare_{args.split}.json", _finite(result))
    atomic_write_text(out / f"compare_{args.split}.md", text)
    return result


def _finite(v):
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


if __name__ == "__main__":
    main()
