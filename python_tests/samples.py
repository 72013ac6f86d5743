"""Sample inputs of the sideways ops: odd shapes (not multiples of 8/16), batch 1,
k_t 1-3 with temporal dilation, groups, strided/padded/dilated space, and
non-contiguous / channels-last layouts. Shared by the op tests and benchmarks."""
from __future__ import annotations

import dataclasses
import random

import torch


@dataclasses.dataclass
class Geometry:
    batch: int
    channels: int
    out_channels: int
    height: int
    width: int
    k_t: int
    k_hw: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    dilation_t: int = 1
    groups: int = 1
    layout: str = "contiguous"  # or "strided", "channels_last", "ring" (ops.empty_ring's layout)

    @property
    def span(self) -> int:
        return self.dilation_t * (self.k_t - 1) + 1

    @property
    def conv_args(self):
        return self.stride, self.padding, self.dilation

    def out_hw(self):
        from sideways_kernels.ops import conv_output_size
        return tuple(conv_output_size(s, k, st, p, d) for s, k, st, p, d in
                     zip((self.height, self.width), self.k_hw, self.stride, self.padding, self.dilation))


GEOMETRIES = [
    Geometry(1, 3, 5, 7, 9, 1, (3, 3), padding=(1, 1)),
    Geometry(2, 5, 7, 11, 6, 2, (3, 1), stride=(2, 1), padding=(1, 0)),
    Geometry(3, 6, 9, 9, 13, 3, (3, 3), padding=(1, 2), dilation=(1, 2), groups=3),
    Geometry(1, 4, 3, 10, 7, 3, (1, 3), dilation_t=2, stride=(1, 2), layout="strided"),
    Geometry(2, 7, 5, 8, 9, 2, (2, 3), dilation_t=3, padding=(1, 1), layout="channels_last"),
    Geometry(5, 3, 11, 5, 5, 3, (3, 3), padding=(1, 1), layout="channels_last"),
    # the ring layout the layers allocate (ops.empty_ring): the no-gather slot-order path ...
    Geometry(2, 5, 7, 11, 6, 2, (3, 1), stride=(2, 1), padding=(1, 0), layout="ring"),
    Geometry(3, 4, 5, 9, 8, 3, (3, 3), padding=(1, 1), dilation=(2, 1), layout="ring"),
    # ... and where it must fall back to gathering (temporal dilation, groups)
    Geometry(1, 4, 6, 7, 9, 2, (3, 3), dilation_t=2, padding=(1, 1), layout="ring"),
    Geometry(2, 6, 4, 7, 5, 3, (1, 3), groups=2, padding=(0, 1), layout="ring"),
    # 5 channels in and 7 out per group: the Triton kernels' group offsets unfolded (more than 4 per group)
    Geometry(1, 10, 14, 4, 5, 2, (3, 3), groups=2, padding=(1, 1), layout="ring"),
]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (values, not zeros, so a kernel that
    ignores strides gets them wrong)."""
    if layout == "strided":
        big = torch.full(t.shape[:-1] + (2 * t.shape[-1] + 1,), float("nan"), dtype=t.dtype)
        view = big[..., 1::2]
        view.copy_(t)
        return view
    if layout == "channels_last":
        if t.dim() == 5 and t.shape[0] > 0:
            # channels-last frames: C innermost for every [.., C, H, W]
            perm = list(range(t.dim() - 3)) + [t.dim() - 2, t.dim() - 1, t.dim() - 3]
            inv = [perm.index(i) for i in range(t.dim())]
            return t.permute(perm).contiguous().permute(inv)
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
    return t


def make(geom: Geometry, dtype=torch.float64, param_dtype=None, bias=True):
    """Random tensors for one geometry: ring, frame, slot, weight, bias, grad_out."""
    param_dtype = param_dtype or dtype
    g = geom
    ring = torch.randn(g.span, g.batch, g.channels, g.height, g.width, dtype=dtype)
    if g.layout == "ring":
        from sideways_kernels.ops import empty_ring
        ring = empty_ring(*ring.shape, dtype=dtype).copy_(ring)
    else:
        ring = _layout(ring, g.layout)
    frame = _layout(torch.randn(g.batch, g.channels, g.height, g.width, dtype=dtype), g.layout)
    weight = torch.randn(g.out_channels, g.channels // g.groups, g.k_t, *g.k_hw, dtype=param_dtype) / 3
    if g.layout == "channels_last":
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
    b = torch.randn(g.out_channels, dtype=param_dtype) if bias else None
    grad_out = _layout(torch.randn(g.batch, g.out_channels, *g.out_hw(), dtype=dtype), g.layout)
    slot = random.randrange(g.span)
    return dict(ring=ring, frame=frame, slot=slot, weight=weight, bias=b, grad_out=grad_out)


def geometry_id(g: Geometry) -> str:
    return (f"B{g.batch}C{g.channels}to{g.out_channels}_{g.height}x{g.width}_kt{g.k_t}dt{g.dilation_t}"
            f"_k{g.k_hw[0]}{g.k_hw[1]}s{g.stride[0]}{g.stride[1]}p{g.padding[0]}{g.padding[1]}"
            f"d{g.dilation[0]}{g.dilation[1]}g{g.groups}_{g.layout}")


# torch.optim.SGD settings the fused update is checked against: plain, momentum, dampening with
# weight decay, nesterov
SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2),
    dict(lr=0.02, momentum=0.8, nesterov=True, weight_decay=5e-3),
]


def sgd_id(hyper: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in hyper.items())
