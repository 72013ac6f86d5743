"""Small random networks and videos with odd shapes, shared by the layer and pipeline tests."""
from __future__ import annotations

import torch
import torch.nn as nn

from sideways_kernels import SidewaysConv3d, split_sequential

DT = torch.float64


def classifier_net(temporal, channels=(3, 5, 6, 4), classes=7, dtype=DT, act=nn.ReLU) -> nn.Sequential:
    """A per-frame classifier with one SidewaysConv3d per entry of ``temporal``
    (each ``(k_t, pad_t, dil_t)``), activations ``act`` between, spatial pooling and a 1x1x1 head."""
    layers = []
    for i, (k_t, pad_t, dil_t) in enumerate(temporal):
        c_in, c_out = channels[i % len(channels)], channels[(i + 1) % len(channels)]
        space_pad = (1, 0) if i % 2 == 0 else (0, 1)  # shrink H and W in turn: odd, uneven shapes
        layers += [SidewaysConv3d(c_in, c_out, (k_t, 3, 3), padding=(pad_t, *space_pad), dilation=(dil_t, 1, 1)), act()]
    c_last = channels[len(temporal) % len(channels)]
    layers += [nn.AdaptiveAvgPool3d((None, 1, 1)), SidewaysConv3d(c_last, classes, 1)]
    return nn.Sequential(*layers).to(dtype)


def stages_of(net: nn.Sequential, n_stages: int) -> list[nn.Sequential]:
    """Cut after activations into ``n_stages`` stages (as evenly as they allow)."""
    relus = [i + 1 for i, m in enumerate(net) if isinstance(m, (nn.ReLU, nn.Tanh))]
    step = max(1, len(relus) // n_stages)
    cuts = sorted(set(relus[step - 1::step][:n_stages - 1]))
    return split_sequential(net, cuts)


def clip_loss(net, video, target, loss_fn=None, per_frame=False):
    """The clip loss as DESIGN.md defines it, by autograd on the whole clip."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    out = net(video)
    T = out.shape[2]
    return sum(loss_fn(out[:, :, t].flatten(1), target[:, t] if per_frame else target) for t in range(T)) / T


def grads(net) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in net.parameters()]


def rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max over tensors of |a - b|_max / |b|_max (0 where both are all zeros: the ratio is taken in
    float64, where 1e-300 is not 0 as it is in float32)."""
    return max(((x - y).abs().max().double() / y.abs().max().double().clamp_min(1e-300)).item() for x, y in zip(a, b))
