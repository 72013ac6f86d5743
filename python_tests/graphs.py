"""Video networks with the topologies real ones have — branches of different lags, residuals
around padded temporal convs, strided residuals with a 1x1 strided shortcut, temporal pools
(floor and ceil mode), BatchNorm and pooled heads — each with ``frames(x)``: its per-frame
logits computed offline, independently of the streaming engine (the objective is their mean
loss). Shared by the graph and distributed tests."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DT = torch.float64


def randomize_norms(model: nn.Module) -> nn.Module:
    """BatchNorm with random running statistics and affine parameters, so eval mode is not an
    identity that would hide a wrong pairing."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


class Branches(nn.Module):
    """Inception-like: temporal kernels 1, 3 and 5 ('same' padded) and a dilated 3 (lags 0, 1,
    2, 2), concatenated; then a temporal conv and a per-frame classifier (no head pool)."""

    def __init__(self, c=3, classes=5):
        super().__init__()
        self.b0 = nn.Conv3d(c, 2, 1)
        self.b1 = nn.Conv3d(c, 3, (3, 3, 3), padding=1)
        self.b2 = nn.Sequential(nn.Conv3d(c, 2, (1, 3, 3), padding=(0, 1, 1)), nn.Tanh(),
                                nn.Conv3d(2, 2, (5, 1, 1), padding=(2, 0, 0)))
        self.b3 = nn.Conv3d(c, 2, (3, 1, 1), padding=(2, 0, 0), dilation=(2, 1, 1))
        self.mix = nn.Conv3d(9, 6, (2, 3, 3), padding=(0, 1, 1))
        self.head = nn.Conv3d(6, classes, 1)

    def forward(self, x):
        y = torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x)], dim=1)
        y = torch.tanh(self.mix(F.relu(y)))
        return self.head(F.adaptive_avg_pool3d(y, (None, 1, 1)))

    def frames(self, x):
        out = self(x)
        return [out[:, :, t].flatten(1) for t in range(out.shape[2])]


class TrunkWithPooledHead(nn.Module):
    """A subclass's ``trunk`` and ``fc``: the clip's logits are ``fc`` of the trunk pooled over
    (T, H, W); frame t's are ``fc`` of its frame pooled over (H, W)."""

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool3d(self.trunk(x), 1).flatten(1))

    def frames(self, x):
        f = self.trunk(x)
        return [self.fc(f[:, :, t].mean((2, 3))) for t in range(f.shape[2])]


class FirstTemporalThenLocal(TrunkWithPooledHead):
    """One temporal conv (temporal padding ``pad_t``) first, then a residual of frame-local
    layers with BatchNorm, and a pooled head: oracle 4's single-stage case."""

    def __init__(self, pad_t):
        super().__init__()
        self.t = nn.Conv3d(3, 4, (3, 3, 3), padding=(pad_t, 1, 1))
        self.a, self.b = nn.Conv3d(4, 4, 1), nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))
        self.bn = nn.BatchNorm3d(4)
        self.fc = nn.Linear(4, 5)

    def trunk(self, x):
        x = torch.tanh(self.t(x))
        return torch.tanh(self.bn(self.b(torch.tanh(self.a(x)))) + x)


class Residuals(TrunkWithPooledHead):
    """A residual around two padded temporal convs (its skip delayed 2 frames), then a strided
    residual (3-tap stride-2 conv beside a 1x1x1 stride-2 projection: they emit on different
    ticks), BatchNorm, a max-pool that drops the last frame of an odd length, and a head pool
    with a linear classifier."""

    def __init__(self, c=3, w=4, classes=6):
        super().__init__()
        self.stem = nn.Conv3d(c, w, (1, 3, 3), padding=(0, 1, 1))
        self.c1 = nn.Conv3d(w, w, (3, 3, 3), padding=1)
        self.bn1 = nn.BatchNorm3d(w)
        self.c2 = nn.Conv3d(w, w, (3, 1, 1), padding=(1, 0, 0))
        self.down = nn.Conv3d(w, 2 * w, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm3d(2 * w)
        self.proj = nn.Conv3d(w, 2 * w, 1, stride=2)
        self.pool = nn.MaxPool3d((2, 1, 1))
        self.fc = nn.Linear(2 * w, classes)

    def trunk(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.c2(F.relu(self.bn1(self.c1(x)))))
        x = F.relu(self.bn2(self.down(x)) + self.proj(x))
        return self.pool(x)


class Pools(nn.Module):
    """Temporal pools in the ways PyTorch allows: an average in ceil mode without counting the
    padding, one with a divisor override, a dilated max-pool; pools within a frame (streamed as
    2-D pools) likewise; a mean over time as the head."""

    def __init__(self, c=3, classes=4):
        super().__init__()
        self.conv = nn.Conv3d(c, 5, (2, 3, 3), padding=(1, 1, 1))
        self.avg = nn.AvgPool3d((3, 2, 2), stride=(2, 1, 1), padding=(1, 0, 0), ceil_mode=True,
                                count_include_pad=False)
        self.avg2 = nn.AvgPool3d((2, 1, 1), stride=1, divisor_override=3)
        self.max = nn.MaxPool3d((2, 3, 3), stride=(1, 2, 2), padding=(1, 1, 1), dilation=(2, 1, 1))
        self.frame_max = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1), dilation=(3, 2, 1),
                                      ceil_mode=True)
        self.frame_avg = nn.AvgPool3d((1, 2, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
        self.frame_avg2 = nn.AvgPool3d((1, 2, 1), stride=1, divisor_override=3)
        self.cls = nn.Conv3d(5, classes, 1)

    def trunk(self, x):
        x = self.max(torch.tanh(self.avg2(self.avg(torch.tanh(self.conv(x))))))
        return self.cls(self.frame_avg2(self.frame_avg(self.frame_max(x))))

    def forward(self, x):
        return self.trunk(x).mean(dim=(2, 3, 4))

    def frames(self, x):
        f = self.trunk(x)
        return [f[:, :, t].mean((2, 3)) for t in range(f.shape[2])]


class NoPadding(TrunkWithPooledHead):
    """No temporal padding anywhere (where Sideways is exact on a static video): equal-lag
    branches, a strided residual with a phase offset, BatchNorm, a strided pool (max, or avg: a
    smooth one, whose Sideways gap grows smoothly with a video's drift), a head pool."""

    def __init__(self, c=3, classes=7, pool="max"):
        super().__init__()
        self.a = nn.Conv3d(c, 4, (3, 3, 3), padding=(0, 1, 1))
        self.b1 = nn.Conv3d(c, 2, 1)
        self.b2 = nn.Conv3d(2, 4, (3, 1, 1))
        self.down = nn.Conv3d(8, 6, (2, 3, 3), stride=(2, 2, 2), padding=(0, 1, 1))
        self.short = nn.Conv3d(8, 6, 1, stride=(2, 2, 2))
        self.bn = nn.BatchNorm3d(6)
        self.pool = nn.MaxPool3d((2, 2, 2)) if pool == "max" else nn.AvgPool3d((2, 2, 2))
        self.c = nn.Conv3d(6, 5, (2, 1, 1))
        self.fc = nn.Linear(5, classes)

    def trunk(self, x):
        y = torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b2(torch.tanh(self.b1(x))))], 1)
        z = self.pool(torch.tanh(self.bn(self.down(y)) + self.short(y)))
        return torch.tanh(self.c(z))


def video_resnet_frames(model, x):
    """Per-frame logits of a torchvision-layout VideoResNet: the head (pool, fc) on each frame."""
    f = model.layer4(model.layer3(model.layer2(model.layer1(model.stem(x)))))
    return [model.fc(f[:, :, t].mean((2, 3))) for t in range(f.shape[2])]


def s3d_frames(model, x):
    out = model.classifier(model.avgpool(model.features(x)))
    return [out[:, :, t].mean((2, 3)) for t in range(out.shape[2])]


def objective(frames: list, target, loss_fn=F.cross_entropy, per_frame=False) -> torch.Tensor:
    """The clip loss: mean over output frames of loss_fn(frame logits, target)."""
    return sum(loss_fn(f, target[:, t] if per_frame else target) for t, f in enumerate(frames)) / len(frames)
