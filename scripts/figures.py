"""Pictures, drawn with PIL (no plotting library).

* :func:`case_grid`: one row per case of image | ground truth | prediction | probability map with the case's
  Dice in the caption (drawn by :class:`scripts.handlers.CaseFigures` -> ``cases.png``).
* :func:`line_chart`: a line chart, for the training curves of ``python -m scripts.tools.figures``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["case_grid", "line_chart"]

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


def line_chart(
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
