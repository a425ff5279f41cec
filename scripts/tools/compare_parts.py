"""The parts of ``python -m scripts.tools.compare``: a training stage run as a user would (its compute measured),
an evaluation through the bundle's ``evaluate.yaml`` chain, and the per-case table that puts the two models side
by side."""

from __future__ import annotations

import json
import math
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from scripts.bundle_config import ROOT, parse_configs
from scripts.evaluation import run_with_inferer
from scripts.metrics import mean_std, summarise

__all__ = ["run_stage", "evaluate", "parse_set", "case_rows", "organ_rows"]


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


def _summary(report) -> dict:
    """Means of the report's columns (``dice``, ``iou`` and, for volumes, ``hd95``), the Dice std, n and the
    per-case rows."""
    s = summarise(report.rows, report.columns)
    out = {c: s[c]["mean"] for c in report.columns}
    out.update(dice_std=s["dice"]["std"], n=s["dice"]["n"], cases=[dict(r) for r in report.rows])
    return out


def evaluate(configs: list[str], overrides: dict, out: Path, samplers: dict | None = None) -> dict:
    """Evaluate with ``inference.yaml`` + ``evaluate.yaml`` + ``configs``: once with the configured inferer when
    ``samplers`` is None, else once per ``{name: SDSegInferer}``. Per-case tables go to ``out/<name>/``."""
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
        results[name] = _summary(report)
    return results


def parse_set(items: list[str]) -> dict:
    """``["key=value", ...]`` (values read as YAML) -> ``{key: value}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def _mean(values) -> float:
    vals = [float(v) for v in values if not math.isnan(float(v))]
    return mean_std(vals)[0]


def case_rows(unet: dict, seeds: list[dict], columns: tuple[str, ...]) -> list[dict]:
    """One row per case: the UNet's ``columns`` beside SDSeg's, averaged over the noise seeds (an HD95 that is
    undefined for a seed, an empty prediction, is left out of that case's mean), and the spread of SDSeg's Dice
    over the seeds (max - min)."""
    by_seed = [{r["name"]: r for r in s["cases"]} for s in seeds]
    rows = []
    for case in unet["cases"]:
        name = case["name"]
        runs = [s[name] for s in by_seed]
        row = {"case": name}
        row.update({f"unet_{c}": float(case[c]) for c in columns})
        row.update({f"sdseg_{c}": _mean(r[c] for r in runs) for c in columns})
        dice = [float(r["dice"]) for r in runs]
        row["sdseg_dice_spread"] = max(dice) - min(dice)
        rows.append(row)
    return rows


def organ_rows(unet_dir: Path, seed_dirs: list[Path], organs: tuple[str, ...]) -> list[dict]:
    """One row per organ, read from the evaluations' own ``summary.json`` files (not recomputed): the UNet's mean
    Dice of that organ beside SDSeg's, averaged over the noise seeds (a seed where the organ is NaN, absent from both
    truth and prediction in every case, is left out), and the spread of SDSeg's over the seeds (max - min); then a
    row ``organ mean``: each summary's ``organ_mean_dice`` (the mean over organs), SDSeg's averaged over the seeds."""
    unet = json.loads((unet_dir / "summary.json").read_text())
    seeds = [json.loads((d / "summary.json").read_text()) for d in seed_dirs]

    def num(v) -> float:  # NaN may be stored as null
        return float("nan") if v is None else float(v)

    def row(name: str, unet_value, seed_values: list) -> dict:
        seed_values = [num(v) for v in seed_values]
        vals = [v for v in seed_values if not math.isnan(v)]
        spread = max(vals) - min(vals) if vals else float("nan")
        return {"organ": name, "unet_dice": num(unet_value), "sdseg_dice": _mean(seed_values), "sdseg_spread": spread}

    rows = [row(o, unet[f"dice_{o}"]["mean"], [s[f"dice_{o}"]["mean"] for s in seeds]) for o in organs]
    rows.append(row("organ mean", unet["organ_mean_dice"], [s["organ_mean_dice"] for s in seeds]))
    return rows
