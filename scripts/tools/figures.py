"""Training curves from the TensorBoard logs of a run, drawn with PIL:

    python -m scripts.tools.figures --log_dir eval/logs --out eval/figures/training_curves.png

Training loss (per iteration, with a moving average) and validation Dice (per validation round) side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from scripts.figures import line_chart
from scripts.io_utils import atomic_save_image

__all__ = ["read_scalars", "training_curves", "main"]


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in the TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points) for tag, points in out.items()}


def training_curves(log_dir: str, out: str, loss_tag: str = "train_loss", dice_tag: str = "val_mean_dice") -> Path:
    """Training loss (per iteration, with a moving average) and validation Dice (per validation round,
    one trainer epoch = ``val_interval`` iterations) side by side -> ``out`` (PNG)."""
    scalars = read_scalars(log_dir)
    if loss_tag not in scalars and dice_tag not in scalars:
        raise FileNotFoundError(f"{log_dir}: no '{loss_tag}' or '{dice_tag}' scalars in TensorBoard event files")
    left = line_chart(scalars.get(loss_tag, []), f"training loss ({loss_tag})", "iteration", smooth=0.9)
    right = line_chart(scalars.get(dice_tag, []), f"validation Dice ({dice_tag})", "validation round (epoch)")
    atomic_save_image(out, np.concatenate([np.asarray(left), np.asarray(right)], axis=1))
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log_dir", default="eval/logs", help="TensorBoard log folder of the training run")
    parser.add_argument("--out", default="eval/figures/training_curves.png")
    args = parser.parse_args()
    print(training_curves(args.log_dir, args.out))


if __name__ == "__main__":
    main()
