"""Pure-PyTorch definitions of every sideways op: the oracle the compiled and
Triton kernels are tested against (DESIGN.md §2, oracle 1).

Each function takes the same arguments as the op of the same name in
``torch.ops.sideways`` and mutates the same tensors. They are written from
``nn.Conv3d``'s own definition (a 3-D convolution of the ring's window), not
from the kernels' staging tricks, so that agreeing with them means something.
No argument checking here: the ops and ``sideways_kernels.ops`` do that.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "tap_slots",
    "window",
    "ring_conv_forward",
    "window_input_grad",
    "weight_grad_accumulate",
    "sgd_step",
    "sgd_tick_update",
]


def tap_slots(slot: int, span: int, k_t: int, dilation_t: int) -> list[int]:
    """Ring slot read by each temporal tap ``j`` when the newest frame is in ``slot``."""
    return [(slot - (k_t - 1 - j) * dilation_t) % span for j in range(k_t)]


def window(ring: torch.Tensor, slot: int) -> torch.Tensor:
    """The ring's frames oldest to newest as a clip ``[B, C, span, H, W]``."""
    span = ring.shape[0]
    order = [(slot + 1 + i) % span for i in range(span)]
    return torch.stack([ring[s] for s in order], dim=2)


def _conv3d_args(stride, padding, dilation, dilation_t):
    return (1, *stride), (0, *padding), (dilation_t, *dilation)


def ring_conv_forward(ring, frame, slot, weight, bias, stride, padding, dilation, dilation_t, groups):
    """Write ``frame`` into ``ring[slot]`` (if given); return ``nn.Conv3d`` of the window, [B, C_out, H', W']."""
    if frame is not None:
        ring[slot].copy_(frame)
    s3, p3, d3 = _conv3d_args(stride, padding, dilation, dilation_t)
    b = None if bias is None else bias.to(ring.dtype)
    return F.conv3d(window(ring, slot), weight.to(ring.dtype), b, s3, p3, d3, groups).squeeze(2)


def window_input_grad(grad_out, weight, input_size, stride, padding, dilation, groups):
    """Sum over temporal taps of each tap's input gradient: the Sideways gradient sent down."""
    shape = (grad_out.shape[0], weight.shape[1] * groups, *input_size)
    total = None
    for j in range(weight.shape[2]):
        g = torch.nn.grad.conv2d_input(shape, weight[:, :, j].to(grad_out.dtype), grad_out,
                                       stride, padding, dilation, groups)
        total = g if total is None else total + g
    return total


def _weight_grad(grad_out, ring, slot, weight_shape, stride, padding, dilation, dilation_t, groups):
    s3, p3, d3 = _conv3d_args(stride, padding, dilation, dilation_t)
    return torch.nn.grad.conv3d_weight(window(ring, slot), weight_shape, grad_out.unsqueeze(2),
                                       s3, p3, d3, groups)


def weight_grad_accumulate(grad_weight, grad_bias, grad_out, ring, slot, stride, padding, dilation,
                           dilation_t, groups):
    """``grad_weight += dL/dW`` of this tick's conv (every tap against its ring frame); ``grad_bias += sum(grad_out)``."""
    gw = _weight_grad(grad_out, ring, slot, grad_weight.shape, stride, padding, dilation, dilation_t, groups)
    grad_weight.add_(gw.to(grad_weight.dtype))
    if grad_bias is not None:
        grad_bias.add_(grad_out.sum((0, 2, 3), dtype=grad_bias.dtype))


def sgd_step(param: torch.Tensor, buf: Optional[torch.Tensor], grad: torch.Tensor, lr: float,
             momentum: float, dampening: float, weight_decay: float, nesterov: bool,
             first_step: bool) -> None:
    """One ``torch.optim.SGD`` step of ``param`` (as its documentation defines it), in place."""
    d = grad.to(param.dtype)
    if weight_decay != 0:
        d = d.add(param, alpha=weight_decay)
    if momentum != 0:
        if first_step:
            buf.copy_(d)
        else:
            buf.mul_(momentum).add_(d, alpha=1 - dampening)
        d = d.add(buf, alpha=momentum) if nesterov else buf
    param.add_(d, alpha=-lr)


def sgd_tick_update(weight, momentum_buffer, bias, bias_momentum_buffer, grad_out, ring, slot,
                    stride, padding, dilation, dilation_t, groups, lr, momentum, dampening,
                    weight_decay, nesterov, first_step):
    """The gradient of ``weight_grad_accumulate`` applied to weight (and bias) with momentum SGD."""
    gw = _weight_grad(grad_out, ring, slot, weight.shape, stride, padding, dilation, dilation_t, groups)
    hyper = (lr, momentum, dampening, weight_decay, nesterov, first_step)
    sgd_step(weight, momentum_buffer, gw, *hyper)
    if bias is not None:
        sgd_step(bias, bias_momentum_buffer, grad_out.sum((0, 2, 3), dtype=bias.dtype), *hyper)
