"""Small video classifiers whose every temporal layer streams: a C3D-like network and an
R(2+1)D-like one (factorised space/time convolutions). Each is an ``nn.Sequential`` of
blocks, so :func:`stages` cuts it at block boundaries; ``conv=nn.Conv3d`` builds the same
network with plain convolutions (same state dict)."""
from __future__ import annotations

from typing import Sequence, Type

import torch.nn as nn

from .nn import SidewaysConv3d
from .pipeline import split_sequential

__all__ = ["c3d", "r2plus1d", "stages", "MODELS"]


def _head(channels: int, num_classes: int, conv: Type[nn.Conv3d]) -> nn.Sequential:
    """Per-frame classifier: spatial average, then a 1x1x1 conv (logits per frame)."""
    return nn.Sequential(nn.AdaptiveAvgPool3d((None, 1, 1)), conv(channels, num_classes, 1))


def c3d(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64, 128),
        temporal_kernel: int = 3, conv: Type[nn.Conv3d] = SidewaysConv3d) -> nn.Sequential:
    """C3D-like: per block a k_t x 3 x 3 conv ('same' padding), ReLU, 1x2x2 spatial max-pool."""
    blocks, c = [], in_channels
    for w in widths:
        blocks.append(nn.Sequential(conv(c, w, (temporal_kernel, 3, 3), padding=(temporal_kernel // 2, 1, 1)),
                                    nn.ReLU(inplace=True), nn.MaxPool3d((1, 2, 2))))
        c = w
    return nn.Sequential(*blocks, _head(c, num_classes, conv))


def r2plus1d(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64, 128),
             temporal_kernel: int = 3, conv: Type[nn.Conv3d] = SidewaysConv3d) -> nn.Sequential:
    """R(2+1)D-like: per block a 1x3x3 spatial conv, ReLU, a k_t x 1 x 1 temporal conv, ReLU,
    1x2x2 spatial max-pool (no residual: a skip around a delayed temporal conv cannot stream)."""
    blocks, c = [], in_channels
    for w in widths:
        mid = max(w, c)
        blocks.append(nn.Sequential(conv(c, mid, (1, 3, 3), padding=(0, 1, 1)), nn.ReLU(inplace=True),
                                    conv(mid, w, (temporal_kernel, 1, 1), padding=(temporal_kernel // 2, 0, 0)),
                                    nn.ReLU(inplace=True), nn.MaxPool3d((1, 2, 2))))
        c = w
    return nn.Sequential(*blocks, _head(c, num_classes, conv))


MODELS = {"c3d": c3d, "r2plus1d": r2plus1d}


def stages(model: nn.Sequential, n_stages: int) -> list[nn.Sequential]:
    """Cut a model of this module into ``n_stages`` stages of consecutive blocks, as evenly
    as the block count allows (the head joins the last stage)."""
    n_blocks = len(model) - 1
    if not 1 <= n_stages <= n_blocks:
        raise ValueError(f"n_stages must be in [1, {n_blocks}] for a model of {n_blocks} blocks, got {n_stages}")
    cuts = [round(i * n_blocks / n_stages) for i in range(1, n_stages)]
    return split_sequential(model, cuts) if cuts else [model]
