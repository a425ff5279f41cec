"""The whole job on generated data, tiny preset, CPU: ``python -m scripts.tools.demo``.

Runs, as separate ``python -m monai.bundle run ...`` commands (printed as they start, so they can be
copied): demo data -> mask autoencoder stage -> SDSeg training -> evaluation on the test split,
then prints the test Dice and the time each stage took.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time

from scripts.bundle_config import ROOT


def bundle(run_id: str, configs: list[str], *args: str) -> list[str]:
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files, *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cvc", choices=["cvc", "kvasir", "refuge2"])
    parser.add_argument("--n", type=int, default=100, help="demo images per dataset (default: 100)")
    parser.add_argument(
        "--iterations",
        type=int,
        default=1000,
        help="SDSeg training iterations (default: 1000; the tiny preset's own 2700 are sized for real images)",
    )
    args = parser.parse_args()
    data = ["--dataset", args.dataset]
    iterations = ["--max_iterations", str(args.iterations), "--val_interval", str(max(1, args.iterations // 4))]
    steps = [
        ("demo data", [sys.executable, "-m", "scripts.tools.demo_data", "--out", "data/demo", "--n", str(args.n)]),
        ("mask autoencoder", bundle("training", ["train.yaml", "train_autoencoder.yaml", "tiny.yaml"], *data)),
        ("SDSeg training", bundle("training", ["train.yaml", "tiny.yaml"], *data, *iterations)),
        ("evaluation", bundle("evaluate", ["inference.yaml", "evaluate.yaml", "tiny.yaml"], *data)),
    ]
    times = {}
    for name, cmd in steps:
        print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        times[name] = time.perf_counter() - start
    summary = json.loads((ROOT / "eval" / "summary.json").read_text())
    print("\n=== demo finished")
    for name, seconds in times.items():
        print(f"{name:>18}: {seconds:7.1f} s")
    print(f"{'total':>18}: {sum(times.values()):7.1f} s")
    d, i = summary["dice"], summary["iou"]
    print(f"test Dice {d['mean']:.4f} ± {d['std']:.4f}, IoU {i['mean']:.4f} ± {i['std']:.4f} over {d['n']} images")
    print(f"masks: {ROOT / 'eval' / 'masks'}, per-image table: {ROOT / 'eval' / 'metrics.csv'}")


if __name__ == "__main__":
    main()
