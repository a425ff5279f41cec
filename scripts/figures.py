"""Pictures, drawn with PIL (no plotting library): a per-case grid from the evaluation and training curves.

* :class:`CaseFigures` (evaluator handler, wired in ``configs/evaluate.yaml``): for the first ``num_cases``
  test cases, one row each of image | ground truth | prediction | probability map with the case's Dice in
  the caption -> ``<output_dir>/cases.png``. It keeps only those cases, so it stays out of the hot path.
* :func:`training_curves`: training loss and validation Dice from the TensorBoard logs (``eval/logs``)
  -> a PNG; ``python -m scripts.figures --log_dir eval/logs --out eval/figures/training_curves.png``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image, ImageDraw

from scripts.io_utils import atomic_save_image
from scripts.metrics import dice_iou

__all__ = ["CaseFigures", "case_grid", "training_curves", "read_scalars"]

COLUMNS = ("image", "ground truth", "prediction", "probability")
CAPTION = 14  # px of caption strip


def _to_uint8(x: torch.Tensor, low: float, high: float) -> np.ndarray:
    """(C, H, W) in [low, high] -> (H, W, 3) uint8."""
    a = ((torch.as_tensor(x).detach().float().cpu() - low) / (high - low)).clamp(0, 1).numpy()
    a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a[:3]
    return np.round(a.transpose(1, 2, 0) * 255).astype(np.uint8)


def case_grid(cases: Sequence[dict], height: int = 128) -> np.ndarray:
    """Rows of image | ground truth | prediction | probability (each panel ``height`` px high, the label's
    aspect ratio) with ``"<name>  Dice <d>"`` above each row. ``cases``: dicts with ``name``, ``dice``,
    ``image`` (3, h, w) in [-1, 1], ``label``, ``pred``, ``score`` (1, H, W) in [0, 1]."""
    rows = []
    for case in cases:
        h, w = case["label"].shape[-2:]
        size = (max(1, round(height * w / h)), height)
        panels = [_to_uint8(case["image"], -1, 1)] + [_to_uint8(case[k], 0, 1) for k in ("label", "pred", "score")]
        strip = np.concatenate([np.asarray(Image.fromarray(p).resize(size, Image.BILINEAR)) for p in panels], axis=1)
        canvas = Image.new("RGB", (strip.shape[1], height + CAPTION), "white")
        canvas.paste(Image.fromarray(strip), (0, CAPTION))
        ImageDraw.Draw(canvas).text((2, 1), f"{case['name']}  Dice {case['dice']:.3f}", fill="black")
        rows.append(np.asarray(canvas))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    header = Image.new("RGB", (width, CAPTION), "white")
    panel_w = max(1, round(height * cases[0]["label"].shape[-1] / cases[0]["label"].shape[-2]))  # first row's
    for i, title in enumerate(COLUMNS):
        ImageDraw.Draw(header).text((i * panel_w + 2, 1), title, fill="black")
    return np.concatenate([np.asarray(header)] + rows, axis=0)


class CaseFigures:
    """Evaluator handler: :func:`case_grid` of the first ``num_cases`` cases -> ``<output_dir>/cases.png``.

    Needs ``image``, ``label``, ``pred`` (binary) and ``score`` (probability map) in the decollated output,
    as ``configs/evaluate.yaml`` produces them (``pred``/``score`` at the label's resolution).
    """

    def __init__(self, output_dir: str, num_cases: int = 4, height: int = 128):
        self.output_dir, self.num_cases, self.height = Path(output_dir), int(num_cases), int(height)
        self.cases: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.cases.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration_completed(self, engine: Engine) -> None:
        for item in engine.state.output[: max(0, self.num_cases - len(self.cases))]:
            if item["pred"].ndim != 3:  # 2D cases only
                continue
            pred, label = item["pred"].detach().cpu(), item["label"].detach().cpu()
            name = Path(str(item["image"].meta["filename_or_obj"])).name
            keep = {k: item[k].detach().cpu() for k in ("image", "score")}
            self.cases.append({"name": name, "dice": dice_iou(pred, label)[0], "label": label, "pred": pred, **keep})

    def completed(self, engine: Engine) -> None:
        if self.cases:
            atomic_save_image(self.output_dir / "cases.png", case_grid(self.cases, self.height))


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


def _chart(
    points: list[tuple[int, float]], title: str, xlabel: str, size=(420, 300), smooth: float = 0.0
) -> Image.Image:
    """A line chart of ``points`` (light raw line; dark exponential moving average when ``smooth`` > 0)."""
    w, h = size
    left, right, top, bottom = 58, 12, 22, 34
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 4), title, fill="black")
    draw.rectangle((left, top, w - right, h - bottom), outline="black")
    if not points:
        draw.text((left + 8, top + 8), "no data", fill="black")
        return img
    xs, ys = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    x0, x1 = xs.min(), max(xs.max(), xs.min() + 1)
    y0, y1 = ys.min(), ys.max()
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y0 == y1 else (y0, y1)

    def xy(x, y):
        return [
            (left + (a - x0) / (x1 - x0) * (w - left - right), h - bottom - (b - y0) / (y1 - y0) * (h - top - bottom))
            for a, b in zip(x, y)
        ]

    lines = [(ys, (150, 170, 220) if smooth else (30, 60, 160))]
    if smooth:
        ema = np.empty_like(ys)
        for i, y in enumerate(ys):
            ema[i] = y if i == 0 else smooth * ema[i - 1] + (1 - smooth) * y
        lines.append((ema, (30, 60, 160)))
    for values, colour in lines:
        pts = xy(xs, values)
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=1)
        if len(pts) < 30:
            for px, py in pts:
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
    for y, py in ((y1, top), (y0, h - bottom - 10)):
        draw.text((2, py), f"{y:.4g}", fill="black")
    draw.text((left, h - bottom + 4), f"{x0:.0f}", fill="black")
    draw.text((w - right - 40, h - bottom + 4), f"{x1:.0f}", fill="black")
    draw.text((left + (w - left - right) // 2 - 30, h - bottom + 18), xlabel, fill="black")
    return img


def training_curves(log_dir: str, out: str, loss_tag: str = "train_loss", dice_tag: str = "val_mean_dice") -> Path:
    """Training loss (per iteration, with a moving average) and validation Dice (per validation round,
    one trainer epoch = ``val_interval`` iterations) side by side -> ``out`` (PNG)."""
    scalars = read_scalars(log_dir)
    if loss_tag not in scalars and dice_tag not in scalars:
        raise FileNotFoundError(f"{log_dir}: no '{loss_tag}' or '{dice_tag}' scalars in TensorBoard event files")
    left = _chart(scalars.get(loss_tag, []), f"training loss ({loss_tag})", "iteration", smooth=0.9)
    right = _chart(scalars.get(dice_tag, []), f"validation Dice ({dice_tag})", "validation round (epoch)")
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
