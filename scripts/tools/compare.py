"""SDSeg beside a plain MONAI UNet given the same compute: ``python -m scripts.tools.compare --dataset kvasir ...``.

1. Trains SDSeg as a user would (``python -m monai.bundle run training``: the mask autoencoder stage, unless
   ``--autoencoder_path`` gives one, then SDSeg) with the ``--configs`` overlays (preset last) and any
   ``--set key=value`` overrides, and measures the compute both stages took: the CPU time of all their
   threads (``--clock cpu``, the default without a GPU: robust to other load on the machine) or wall time
   (``--clock wall``, the default with one).
2. Trains the plain UNet of ``configs/baseline_unet.yaml`` (DiceCE, same split, transforms, flips and image
   size) until the same amount of compute is spent (``--budget_s`` to set another), choosing its checkpoint
   on the validation split as SDSeg does.
3. Evaluates both on ``--split`` (``test``; ``val`` to choose settings without looking at test) through the
   same ``evaluate.yaml`` chain: per image, at each image's own resolution. SDSeg runs its single step with
   ``--seeds`` noise seeds (mean and spread, max - min, of the per-seed mean Dice) and with ``--samples``
   noise draws averaged.

Prints one table and writes ``<out>/compare_<split>.json`` (every figure) and ``compare_<split>.md`` (the table);
models and per-image tables under ``<out>/sdseg`` and ``<out>/baseline``. ``--skip_training`` evaluates the
models already in ``<out>`` (budgets from its ``timings.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from scripts.bundle_config import ROOT, parse_configs
from scripts.evaluation import run_with_inferer
from scripts.io_utils import atomic_write_json, atomic_write_text
from scripts.metrics import format_table, summarise
from scripts.sampler import SDSegInferer

__all__ = ["main", "run_stage", "evaluate"]


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(configs: list[str], overrides: dict, log: Path) -> dict:
    """``python -m monai.bundle run training`` with ``configs`` and ``--key value`` ``overrides``; its output goes to
    ``log``. Returns the command and the wall and CPU seconds it took (CPU: all threads of the process)."""
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", files]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]  # Python literals, as the CLI reads
    print(f"=== {shlex.join(cmd)}\n    (log: {log})", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    cpu, wall = _children_cpu_s(), time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    result = {"command": shlex.join(cmd), "wall_s": time.perf_counter() - wall, "cpu_s": _children_cpu_s() - cpu}
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"training failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    print(f"    {result['wall_s'] / 60:.1f} min wall, {result['cpu_s'] / 60:.1f} CPU-min", flush=True)
    return result


def _mean_dice(report) -> dict:
    s = summarise(report.rows)
    return {"dice": s["dice"]["mean"], "dice_std": s["dice"]["std"], "iou": s["iou"]["mean"], "n": s["dice"]["n"]}


def evaluate(configs: list[str], overrides: dict, out: Path, samplers: dict | None = None) -> dict:
    """Evaluate with ``inference.yaml`` + ``evaluate.yaml`` + ``configs``: once with the configured inferer when
    ``samplers`` is None, else once per ``{name: SDSegInferer}``. Per-image tables go to ``out/<name>/``."""
    parser = parse_configs(["inference.yaml", "evaluate.yaml", *configs], **overrides)
    parser["eval_dir"] = str(out)
    evaluator, report = parser.get_parsed_content("evaluator"), parser.get_parsed_content("report")
    results = {}
    for name, sampler in (samplers or {"": None}).items():
        report.output_dir = out / name
        if sampler is None:
            evaluator.run()
        else:
            run_with_inferer(evaluator, sampler)
        results[name] = _mean_dice(report)
    return results


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cvc", choices=["cvc", "kvasir", "refuge2"])
    p.add_argument("--dataset_dir", default=None, help="default: data/demo/<dataset>")
    p.add_argument("--split_file", default=None)
    p.add_argument("--configs", nargs="+", default=["tiny.yaml"], help="SDSeg overlays of train.yaml, preset last")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="SDSeg overrides (YAML values)")
    p.add_argument("--autoencoder_path", default=None, help="a trained mask autoencoder: skip that stage")
    p.add_argument("--out", default="eval/compare")
    p.add_argument("--clock", choices=["cpu", "wall"], default="wall" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget_s", type=float, default=None, help="the UNet's budget (default: what SDSeg took)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--samples", type=int, default=25)
    p.add_argument("--skip_training", action="store_true", help="evaluate the models already in --out")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    data = {"dataset": args.dataset, "split_file": args.split_file}
    if args.dataset_dir:
        data["dataset_dir"] = str(Path(args.dataset_dir).resolve())
    data = {k: v for k, v in data.items() if v is not None}
    sdseg = {**data, **_parse_set(args.set), "ckpt_dir": str(out / "sdseg" / "models")}
    preset = args.configs[-1:]
    baseline_configs = [*preset, "baseline_unet.yaml"]
    baseline = {**data, "ckpt_dir": str(out / "baseline" / "models")}

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
                ["train.yaml", "train_autoencoder.yaml", *args.configs],
                {**sdseg, "output_dir": str(out / "sdseg" / "logs")},
                out / "sdseg" / "autoencoder.log",
            )
            ae_path = str(out / "sdseg" / "models" / "autoencoder.pt")
        sdseg["autoencoder_path"] = str(Path(ae_path).resolve())
        timings["sdseg"] = run_stage(
            ["train.yaml", *args.configs],
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
    average = parse_configs(["inference.yaml", *args.configs], **sdseg_eval).get_parsed_content("average")
    samplers = {f"seed{s}": SDSegInferer(1, 1, seed=s) for s in range(args.seeds)}
    if args.samples > 1:
        samplers[f"samples{args.samples}"] = SDSegInferer(1, args.samples, seed=0, average=average)
    print(f"=== evaluating SDSeg on the {args.split} split: {', '.join(samplers)}", flush=True)
    sd = evaluate(args.configs, {**sdseg_eval, **split}, out / "sdseg" / args.split, samplers)
    print(f"=== evaluating the UNet on the {args.split} split", flush=True)
    unet = evaluate(baseline_configs, {**baseline, **split}, out / "baseline" / args.split)[""]

    seeds = [sd[f"seed{s}"]["dice"] for s in range(args.seeds)]
    mean = sum(seeds) / len(seeds)

    def minutes(stages: list[str], key: str) -> float:
        return sum(timings[s][key] for s in stages if s in timings) / 60

    stages = ["autoencoder", "sdseg"]
    rows = [
        {
            "method": "plain MONAI UNet",
            "dice": unet["dice"],
            "spread": 0.0,
            "iou": unet["iou"],
            "cpu_min": minutes(["baseline"], "cpu_s"),
            "wall_min": minutes(["baseline"], "wall_s"),
        },
        {
            "method": f"SDSeg 1 step, mean of {args.seeds} seeds",
            "dice": mean,
            "spread": max(seeds) - min(seeds),
            "iou": sum(sd[f"seed{s}"]["iou"] for s in range(args.seeds)) / args.seeds,
            "cpu_min": minutes(stages, "cpu_s"),
            "wall_min": minutes(stages, "wall_s"),
        },
    ]
    if args.samples > 1:
        k = sd[f"samples{args.samples}"]
        rows.append(
            {
                "method": f"SDSeg 1 step, K = {args.samples} ({average})",
                "dice": k["dice"],
                "spread": 0.0,
                "iou": k["iou"],
                "cpu_min": rows[1]["cpu_min"],
                "wall_min": rows[1]["wall_min"],
            }
        )
    n = unet["n"]
    table = format_table(rows, ["method", "dice", "spread", "iou", "cpu_min", "wall_min"], digits=3)
    seeds_line = "SDSeg Dice by seed: " + " / ".join(f"{d:.3f}" for d in seeds)
    text = f"{args.dataset}, {args.split} split ({n} images), SDSeg overlays {args.configs}\n{table}\n{seeds_line}\n"
    print(text)
    result = {
        "dataset": args.dataset,
        "split": args.split,
        "configs": args.configs,
        "overrides": _parse_set(args.set),
        "clock": args.clock,
        "timings": timings,
        "rows": rows,
        "sdseg": sd,
        "baseline": unet,
        "seed_dice": seeds,
    }
    atomic_write_json(out / f"compare_{args.split}.json", {k: _finite(v) for k, v in result.items()})
    atomic_write_text(out / f"compare_{args.split}.md", text)
    return result


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


if __name__ == "__main__":
    main()
