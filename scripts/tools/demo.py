"""The whole job on generated data, tiny preset, CPU: ``python -m scripts.tools.demo``.

Runs, as separate ``python -m monai.bundle run ...`` commands (printed as they start, so they can be
copied): demo data -> mask autoencoder stage -> SDSeg training -> evaluation on the test split,
then prints the test Dice and the time each stage took.

``--classes all13`` (or ``transunet8``) runs the 3D job instead, every organ its own class: BTCV-like demo volumes
(``demo_data --3d``: all 13 organs, the small ones included), both stages and the per-volume evaluation through
``configs/ct.yaml`` with ``--classes``, then prints the mean organ Dice and each organ's Dice. ``--classes disc_cup``
runs the 2D REFUGE2-like job with optic disc and cup as two classes (label maps 0 / 1 disc / 2 cup) and prints each
class's Dice.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time

from scripts.bundle_config import ROOT
from scripts.classes import get_class_set
from scripts.volumes.datalist import DATASETS as VOLUME_DATASETS


def bundle(run_id: str, configs: list[str], *args: str) -> list[str]:
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files, *args]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None, choices=["cvc", "kvasir", "refuge2"], help="2D (default: cvc)")
    parser.add_argument(
        "--classes",
        default="binary",
        choices=["binary", "all13", "transunet8", "disc_cup"],
        help="all13 | transunet8: the 3D demo on BTCV-like volumes (configs/ct.yaml), every organ its own class; "
        "disc_cup: the 2D REFUGE2 demo, optic disc and cup",
    )
    parser.add_argument("--n", type=int, default=100, help="demo images per dataset (default: 100; 2D only)")
    parser.add_argument(
        "--iterations",
        type=int,
        default=1000,
        help="SDSeg training iterations (default: 1000; the tiny preset's own 2700 are sized for real images)",
    )
    return parser


def steps(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The demo's commands, ``(name, argv)`` in order."""
    iterations = ["--max_iterations", str(args.iterations), "--val_interval", str(max(1, args.iterations // 4))]
    class_set = get_class_set(args.classes)
    if class_set.binary:
        data, ct = ["--dataset", args.dataset or "cvc"], []
    else:  # dataset_dir: data/demo/<dataset>, the configs' default
        data = ["--dataset", class_set.datasets[0], "--classes", args.classes]
        ct = ["ct.yaml"] if _volumes(args.classes) else []
    make_data = [sys.executable, "-m", "scripts.tools.demo_data", "--out", "data/demo"]
    make_data += ["--3d"] if ct else ["--n", str(args.n)]
    return [
        ("demo data", make_data),
        ("mask autoencoder", bundle("training", ["train.yaml", "train_autoencoder.yaml", *ct, "tiny.yaml"], *data)),
        ("SDSeg training", bundle("training", ["train.yaml", *ct, "tiny.yaml"], *data, *iterations)),
        ("evaluation", bundle("evaluate", ["inference.yaml", "evaluate.yaml", *ct, "tiny.yaml"], *data)),
    ]


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    datasets = get_class_set(args.classes).datasets
    if datasets and args.dataset and args.dataset not in datasets:
        raise SystemExit(f"--classes {args.classes} runs the {datasets[0]} demo; --dataset chooses a binary 2D one")
    times = {}
    for name, cmd in steps(args):
        print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        times[name] = time.perf_counter() - start
    report(json.loads((ROOT / "eval" / "summary.json").read_text()), times, args.classes)


def report(summary: dict, times: dict, classes: str = "binary") -> None:
    """Print the stage times and the test scores of ``summary`` (the evaluation's summary.json); multi-class: the
    mean organ Dice and each organ's Dice too."""
    print("\n=== demo finished")
    for name, seconds in times.items():
        print(f"{name:>18}: {seconds:7.1f} s")
    print(f"{'total':>18}: {sum(times.values()):7.1f} s")
    d, i = summary["dice"], summary["iou"]
    unit = "volumes" if _volumes(classes) else "images"
    print(f"test Dice {d['mean']:.4f} ± {d['std']:.4f}, IoU {i['mean']:.4f} ± {i['std']:.4f} over {d['n']} {unit}")
    if classes != "binary":
        print(f"mean organ Dice {summary['organ_mean_dice']:.4f} (--classes {classes}); per organ:")
        for organ in get_class_set(classes).organs:
            s = summary[f"dice_{organ}"]
            print(f"{organ:>30}: {s['mean']:.4f} ± {s['std']:.4f} over {s['n']} {unit}")
    print(f"masks: {ROOT / 'eval' / 'masks'}, per-{unit[:-1]} table: {ROOT / 'eval' / 'metrics.csv'}")


def _volumes(classes: str) -> bool:
    """Whether ``--classes`` is a 3D class set (its dataset is a volume dataset: configs/ct.yaml)."""
    return any(d in VOLUME_DATASETS for d in get_class_set(classes).datasets)


if __name__ == "__main__":
    main()
