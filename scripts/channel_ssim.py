"""SSIM and MS-SSIM of multi-channel maps, a few channels at a time (the stability run's C-class probability volumes).

MONAI's ``SSIMMetric`` and ``MultiScaleSSIMMetric`` reduce a ``(B, C, ...)`` pair to the mean over channels and
voxels, and hold about a dozen map-sized tensors at their peak (the five convolutions and their products): a dozen
whole C-class volumes. Every channel has as many voxels, so the mean over channels of each channel's mean is the same
figure (up to float rounding): :func:`ssim` and :func:`ms_ssim` compute ``CHANNELS`` channels at a time with MONAI's
``compute_ssim_and_cs`` and average (weighted by each call's channels), holding those channels' temporaries only.
Same settings and output as the metrics with ``reduction="none"``: a ``(B, 1)`` tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.metrics.regression import compute_ssim_and_cs

__all__ = ["ssim", "ms_ssim"]

SIGMA = 1.5  # MONAI's default Gaussian kernel sigma
CHANNELS = 4  # channels per call: about 12 x 4 channels of temporaries (a 1-channel call runs ~10x slower per channel)


def _parts(channels: int) -> list[slice]:
    return [slice(c, min(c + CHANNELS, channels)) for c in range(0, channels, CHANNELS)]


def _settings(spatial_dims: int, kernel_size: int, data_range: float) -> dict:
    return dict(
        spatial_dims=spatial_dims,
        kernel_size=(kernel_size,) * spatial_dims,
        kernel_sigma=(SIGMA,) * spatial_dims,
        data_range=data_range,
    )


def ssim(
    y_pred: torch.Tensor, y: torch.Tensor, spatial_dims: int, data_range: float = 1.0, kernel_size: int = 11
) -> torch.Tensor:
    """``SSIMMetric(spatial_dims, data_range, win_size=kernel_size, reduction="none")(y_pred, y)``, a few channels
    at a time."""
    settings = _settings(spatial_dims, kernel_size, data_range)
    total = 0
    for part in _parts(y_pred.shape[1]):
        s = compute_ssim_and_cs(y_pred[:, part], y[:, part], **settings)[0]
        total = total + s.flatten(1).mean(1) * (part.stop - part.start)
    return (total / y_pred.shape[1]).view(-1, 1)


def ms_ssim(
    y_pred: torch.Tensor,
    y: torch.Tensor,
    spatial_dims: int,
    data_range: float = 1.0,
    kernel_size: int = 11,
    weights: Sequence[float] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333),
) -> torch.Tensor:
    """``MultiScaleSSIMMetric(spatial_dims, data_range, kernel_size, weights=weights, reduction="none")(y_pred, y)``,
    a few channels at a time: each scale's contrast sensitivity (the last scale's SSIM) is the mean over the channels
    of their means, then MONAI's product of the scales' powers."""
    settings = _settings(spatial_dims, kernel_size, data_range)
    pool = getattr(F, f"avg_pool{spatial_dims}d")
    scales = torch.zeros(len(weights), y_pred.shape[0])
    for part in _parts(y_pred.shape[1]):
        a, b = y_pred[:, part], y[:, part]
        for i in range(len(weights)):
            s, cs = compute_ssim_and_cs(a, b, **settings)
            scales[i] += (s if i == len(weights) - 1 else cs).flatten(1).mean(1) * (part.stop - part.start)
            if i < len(weights) - 1:
                a, b = pool(a, kernel_size=2), pool(b, kernel_size=2)
    scales = torch.relu(scales / y_pred.shape[1])
    weights_tensor = torch.tensor(weights, dtype=torch.float)
    return torch.prod(scales ** weights_tensor.view(-1, 1), dim=0).view(-1, 1)
