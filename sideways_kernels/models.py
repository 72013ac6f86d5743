"""Video classifiers.

- ``c3d`` and ``r2plus1d``: small chains whose every temporal layer streams (an ``nn.Sequential``
  of blocks, so :func:`stages` cuts it at block boundaries; ``conv=nn.Conv3d`` builds the same
  network with plain convolutions, same state dict).
- ``r3d_18``, ``mc3_18``, ``r2plus1d_18`` and ``s3d``: the standard networks, written here with
  state dicts that are key for key those of ``torchvision.models.video`` (Kinetics-400 weights
  saved from torchvision load with ``strict=True``) and the same outputs; ``width`` (and, for
  S3D, ``width_mult``) makes smaller ones for a CPU. They have residuals, branches, temporal
  strides and pools, BatchNorm and pooled heads: train them with
  :meth:`SidewaysPipeline.from_model`.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence, Type

import torch
import torch.nn as nn

from .nn import SidewaysConv3d
from .pipeline import split_sequential

__all__ = ["c3d", "r2plus1d", "r3d_18", "mc3_18", "r2plus1d_18", "s3d", "stages", "MODELS", "CHAINS", "GRAPHS"]


def _head(channels: int, num_classes: int, conv: Type[nn.Conv3d], dropout: float = 0.0) -> nn.Sequential:
    """Per-frame classifier: spatial average, (dropout,) then a 1x1x1 conv (logits per frame)."""
    drop = [nn.Dropout(dropout)] if dropout > 0 else []  # only then: the state dict keys stay the same
    return nn.Sequential(nn.AdaptiveAvgPool3d((None, 1, 1)), *drop, conv(channels, num_classes, 1))


def c3d(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64, 128),
        temporal_kernel: int = 3, conv: Type[nn.Conv3d] = SidewaysConv3d, dropout: float = 0.0) -> nn.Sequential:
    """C3D-like: per block a k_t x 3 x 3 conv ('same' padding), ReLU, 1x2x2 spatial max-pool."""
    blocks, c = [], in_channels
    for w in widths:
        blocks.append(nn.Sequential(conv(c, w, (temporal_kernel, 3, 3), padding=(temporal_kernel // 2, 1, 1)),
                                    nn.ReLU(inplace=True), nn.MaxPool3d((1, 2, 2))))
        c = w
    return nn.Sequential(*blocks, _head(c, num_classes, conv, dropout))


def r2plus1d(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64, 128),
             temporal_kernel: int = 3, conv: Type[nn.Conv3d] = SidewaysConv3d, dropout: float = 0.0) -> nn.Sequential:
    """R(2+1)D-like: per block a 1x3x3 spatial conv, ReLU, a k_t x 1 x 1 temporal conv, ReLU,
    1x2x2 spatial max-pool (no residual: a skip around a delayed temporal conv cannot stream)."""
    blocks, c = [], in_channels
    for w in widths:
        mid = max(w, c)
        blocks.append(nn.Sequential(conv(c, mid, (1, 3, 3), padding=(0, 1, 1)), nn.ReLU(inplace=True),
                                    conv(mid, w, (temporal_kernel, 1, 1), padding=(temporal_kernel // 2, 0, 0)),
                                    nn.ReLU(inplace=True), nn.MaxPool3d((1, 2, 2))))
        c = w
    return nn.Sequential(*blocks, _head(c, num_classes, conv, dropout))


# --- the standard networks (torchvision.models.video's layouts) ----------------------------------

class _Conv3DSimple(nn.Conv3d):
    """3x3x3 (torchvision's Conv3DSimple)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: Optional[int] = None, stride: int = 1,
                 padding: int = 1):
        super().__init__(in_planes, out_planes, (3, 3, 3), stride=stride, padding=padding, bias=False)

    @staticmethod
    def downsample_stride(stride: int) -> tuple:
        return stride, stride, stride


class _Conv3DNoTemporal(nn.Conv3d):
    """1x3x3 (torchvision's Conv3DNoTemporal)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: Optional[int] = None, stride: int = 1,
                 padding: int = 1):
        super().__init__(in_planes, out_planes, (1, 3, 3), stride=(1, stride, stride), padding=(0, padding, padding),
                         bias=False)

    @staticmethod
    def downsample_stride(stride: int) -> tuple:
        return 1, stride, stride


class _Conv2Plus1D(nn.Sequential):
    """1x3x3 spatial, BatchNorm, ReLU, 3x1x1 temporal (torchvision's Conv2Plus1D)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1, padding: int = 1):
        super().__init__(
            nn.Conv3d(in_planes, midplanes, (1, 3, 3), stride=(1, stride, stride), padding=(0, padding, padding),
                      bias=False),
            nn.BatchNorm3d(midplanes), nn.ReLU(inplace=True),
            nn.Conv3d(midplanes, out_planes, (3, 1, 1), stride=(stride, 1, 1), padding=(padding, 0, 0), bias=False))

    @staticmethod
    def downsample_stride(stride: int) -> tuple:
        return stride, stride, stride


class _BasicBlock(nn.Module):
    """Two convs with BatchNorm and a residual (a 1x1x1 strided projection when the shape changes)."""

    def __init__(self, inplanes: int, planes: int, conv: Callable, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        midplanes = (inplanes * planes * 3 * 3 * 3) // (inplanes * 3 * 3 + 3 * planes)
        self.conv1 = nn.Sequential(conv(inplanes, planes, midplanes, stride), nn.BatchNorm3d(planes), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(conv(planes, planes, midplanes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + residual)


class VideoResNet(nn.Module):
    """torchvision's VideoResNet with BasicBlocks: stem, four layers of ``blocks`` blocks
    (widths ``width·(1, 2, 4, 8)``, the last three with stride 2), a pool over all frames and
    pixels, and a linear classifier."""

    def __init__(self, convs: Sequence[Callable], stem: str, num_classes: int = 400, width: int = 64,
                 blocks: Sequence[int] = (2, 2, 2, 2), dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)  # before the classifier; no state, so torchvision's keys stay
        if stem == "r2plus1d":
            mid = max(1, 45 * width // 64)
            self.stem = nn.Sequential(
                nn.Conv3d(3, mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False), nn.BatchNorm3d(mid),
                nn.ReLU(inplace=True),
                nn.Conv3d(mid, width, (3, 1, 1), padding=(1, 0, 0), bias=False), nn.BatchNorm3d(width),
                nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv3d(3, width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
                                      nn.BatchNorm3d(width), nn.ReLU(inplace=True))
        self._inplanes = width
        self.layer1 = self._layer(convs[0], width, blocks[0], 1)
        self.layer2 = self._layer(convs[1], 2 * width, blocks[1], 2)
        self.layer3 = self._layer(convs[2], 4 * width, blocks[2], 2)
        self.layer4 = self._layer(convs[3], 8 * width, blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def _layer(self, conv, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes:
            downsample = nn.Sequential(nn.Conv3d(self._inplanes, planes, 1, stride=conv.downsample_stride(stride),
                                                 bias=False), nn.BatchNorm3d(planes))
        layers = [_BasicBlock(self._inplanes, planes, conv, stride, downsample)]
        self._inplanes = planes
        layers += [_BasicBlock(planes, planes, conv) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.dropout(self.avgpool(x).flatten(1)))


def r3d_18(num_classes: int = 400, width: int = 64, dropout: float = 0.0) -> VideoResNet:
    """ResNet-3D 18 (3x3x3 convs throughout); torchvision's r3d_18 at ``width=64``."""
    return VideoResNet([_Conv3DSimple] * 4, "basic", num_classes, width, dropout=dropout)


def mc3_18(num_classes: int = 400, width: int = 64, dropout: float = 0.0) -> VideoResNet:
    """Mixed convolutions: 3x3x3 in layer1, 1x3x3 after; torchvision's mc3_18 at ``width=64``."""
    return VideoResNet([_Conv3DSimple] + [_Conv3DNoTemporal] * 3, "basic", num_classes, width, dropout=dropout)


def r2plus1d_18(num_classes: int = 400, width: int = 64, dropout: float = 0.0) -> VideoResNet:
    """(2+1)D: every 3x3x3 conv factorised into 1x3x3 then 3x1x1; torchvision's r2plus1d_18 at
    ``width=64``."""
    return VideoResNet([_Conv2Plus1D] * 4, "r2plus1d", num_classes, width, dropout=dropout)


def _conv_bn_relu(c_in: int, c_out: int, kernel, stride=1, padding=0, norm=nn.BatchNorm3d) -> nn.Sequential:
    """torchvision's Conv3dNormActivation: conv (no bias), norm, ReLU."""
    return nn.Sequential(nn.Conv3d(c_in, c_out, kernel, stride, padding, bias=False), norm(c_out), nn.ReLU(inplace=True))


def _sep_conv(c_in: int, c_out: int, k: int, stride: int, pad: int, norm) -> nn.Sequential:
    """torchvision's TemporalSeparableConv: 1xkxk then kx1x1."""
    return nn.Sequential(_conv_bn_relu(c_in, c_out, (1, k, k), (1, stride, stride), (0, pad, pad), norm),
                         _conv_bn_relu(c_out, c_out, (k, 1, 1), (stride, 1, 1), (pad, 0, 0), norm))


class _SepInception(nn.Module):
    """torchvision's SepInceptionBlock3D: four branches (1x1x1; 1x1x1 then separable 3x3x3, twice;
    3x3x3 max-pool then 1x1x1) concatenated."""

    def __init__(self, c_in: int, b0: int, b1_mid: int, b1: int, b2_mid: int, b2: int, b3: int, norm):
        super().__init__()
        self.branch0 = _conv_bn_relu(c_in, b0, 1, norm=norm)
        self.branch1 = nn.Sequential(_conv_bn_relu(c_in, b1_mid, 1, norm=norm), _sep_conv(b1_mid, b1, 3, 1, 1, norm))
        self.branch2 = nn.Sequential(_conv_bn_relu(c_in, b2_mid, 1, norm=norm), _sep_conv(b2_mid, b2, 3, 1, 1, norm))
        self.branch3 = nn.Sequential(nn.MaxPool3d(3, stride=1, padding=1), _conv_bn_relu(c_in, b3, 1, norm=norm))
        self.out_channels = b0 + b1 + b2 + b3

    def forward(self, x):
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)), 1)


class S3D(nn.Module):
    """torchvision's S3D (separable 3-D Inception): every channel count times ``width_mult``;
    ``frame_size`` sets the final pool's spatial window (``frame_size // 32``, 7 at 224)."""

    _BLOCKS = [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), "pool", (192, 96, 208, 16, 48, 64),
               (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64),
               (256, 160, 320, 32, 128, 128), "pool2", (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128)]

    def __init__(self, num_classes: int = 400, dropout: float = 0.2, width_mult: float = 1.0, frame_size: int = 224):
        super().__init__()
        norm = partial(nn.BatchNorm3d, eps=0.001, momentum=0.001)
        c = lambda n: max(1, int(round(n * width_mult)))
        layers = [_sep_conv(3, c(64), 7, 2, 3, norm), nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
                  _conv_bn_relu(c(64), c(64), 1, norm=norm), _sep_conv(c(64), c(192), 3, 1, 1, norm),
                  nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))]
        channels = c(192)
        for block in self._BLOCKS:
            if block == "pool":
                layers.append(nn.MaxPool3d(3, stride=2, padding=1))
            elif block == "pool2":
                layers.append(nn.MaxPool3d(2, stride=2))
            else:
                layers.append(_SepInception(channels, *(c(n) for n in block), norm))
                channels = layers[-1].out_channels
        self.features = nn.Sequential(*layers)
        k = max(1, frame_size // 32)
        self.avgpool = nn.AvgPool3d((2, k, k), stride=1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Conv3d(channels, num_classes, 1))

    def forward(self, x):
        return torch.mean(self.classifier(self.avgpool(self.features(x))), dim=(2, 3, 4))


def s3d(num_classes: int = 400, width_mult: float = 1.0, frame_size: int = 224, dropout: float = 0.2) -> S3D:
    """S3D; torchvision's s3d at ``width_mult=1`` and 224x224 frames."""
    return S3D(num_classes, dropout, width_mult, frame_size)


CHAINS = {"c3d": c3d, "r2plus1d": r2plus1d}  # nn.Sequential of blocks: stages cut at blocks
GRAPHS = {"r3d_18": r3d_18, "mc3_18": mc3_18, "r2plus1d_18": r2plus1d_18, "s3d": s3d}  # SidewaysPipeline.from_model
MODELS = {**CHAINS, **GRAPHS}


def stages(model: nn.Sequential, n_stages: int) -> list[nn.Sequential]:
    """Cut a model of this module into ``n_stages`` stages of consecutive blocks, as evenly
    as the block count allows (the head joins the last stage)."""
    n_blocks = len(model) - 1
    if not 1 <= n_stages <= n_blocks:
        raise ValueError(f"n_stages must be in [1, {n_blocks}] for a model of {n_blocks} blocks, got {n_stages}")
    cuts = [round(i * n_blocks / n_stages) for i in range(1, n_stages)]
    return split_sequential(model, cuts) if cuts else [model]
