"""The torch backend: each sideways op as the fewest ATen calls (cuDNN on CUDA), for where
those win (``dispatch.json``) and for machines without our kernels.

The ring (``ops.empty_ring``) is one channels-last image of ``span*C`` channels, slot after
slot, so a window's convolution is a 2-D convolution of that image with the weight's taps laid
along the channels in slot order — the taps rotated by where the window starts. No window is
gathered (reference.py stacks the window's frames for ``conv3d`` on every call: three strided
copies of activations per op on a GPU). The input gradient sums the taps' weights once
instead of running one transposed convolution per tap, and the SGD step is one fused
``torch._fused_sgd_`` call. On CUDA in 16 bits the RGB stem's small image gets zero channels
to a multiple of 8 (:func:`channel_pad`), which the layers' rings hold as zeros of their own
(:func:`ring_image_pad`). A temporally dilated or grouped conv does not fold
that way and runs reference.py's definition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import forms, ops, reference

__all__ = ["ring_conv_forward", "window_input_grad", "weight_grad_accumulate", "sgd_tick_update"]


def _folds(ring: torch.Tensor, dilation_t: int, groups: int) -> bool:
    """Whether the window is the whole ring, every slot a tap (no temporal dilation), and the
    taps can share one channel axis (no groups)."""
    return groups == 1 and (dilation_t == 1 or ring.shape[0] == 1)


def channel_pad(ring: torch.Tensor) -> int:
    """Zero channels appended to a small ring image (the RGB stem's: 3 channels × 3 slots) on
    CUDA in 16 bits, to a multiple of 8: cuDNN's tensor-core kernels read 8 channels at a time,
    and the stem ran in its generic kernel (15% of C3D's and r3d_18's GPU time per tick as 3-D
    convs on the H100, 2026-11-28). Larger images keep their channels (a copy would cost more)."""
    return _pad(ring.shape[0] * ring.shape[2], ring.is_cuda, ring.dtype)


def ring_image_pad(span: int, frame: torch.Tensor) -> int:
    """The zero channels a layer's ring of ``span`` frames like ``frame`` is made with for this
    backend (``ops.empty_ring``'s ``image_pad``): :func:`channel_pad`'s, so the padded image is a
    view of the ring."""
    return _pad(span * frame.shape[1], frame.is_cuda, frame.dtype)


def _pad(channels: int, cuda: bool, dtype: torch.dtype) -> int:
    if cuda and dtype in (torch.float16, torch.bfloat16) and channels < 32:
        return -channels % 8
    return 0


def _ring_image(ring: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """``[B, span*C (+ pad), H, W]``, channel ``s*C + c`` = channel ``c`` of slot ``s``: a view of
    a ring in ``ops.empty_ring``'s layout (a copy of any other), or with ``pad`` zero channels
    after them: a view of a ring ``empty_ring`` padded so (the layers' rings where this backend
    pads), else a copy."""
    if pad and ops.zero_image_pad(ring) == pad and ring.stride(0) == ring.shape[2]:
        span, b, c, h, w = ring.shape
        return ring.as_strided((b, span * c + pad, h, w), (ring.stride(1), 1, ring.stride(3), ring.stride(4)))
    image = ring.transpose(0, 1).flatten(1, 2)
    if not pad:
        return image
    b, c, h, w = image.shape
    padded = image.new_zeros((b, h, w, c + pad)).permute(0, 3, 1, 2)
    padded[:, :c].copy_(image)
    return padded


def _folded_weight(weight: torch.Tensor, slot: int, dtype: torch.dtype, pad: int = 0) -> torch.Tensor:
    """``[C_out, span*C (+ pad), k_h, k_w]`` in ``dtype``, channels-last, whose channels ``s*C..``
    hold the tap that reads slot ``s`` when the window's newest frame is in ``slot``: tap ``j``
    reads slot ``(slot + 1 + j) % span`` (``reference.tap_slots``); the ``pad`` channels zero.
    In a run that holds it (:mod:`.forms`), the form made at the run's start."""
    held = forms.get(weight, ("folded", slot, dtype, pad))
    return held if held is not None else _fold(weight, slot, dtype, pad)


def _fold(weight: torch.Tensor, slot: int, dtype: torch.dtype, pad: int) -> torch.Tensor:
    c_out, c_in, span, kh, kw = weight.shape
    taps = _dense(weight.permute(0, 3, 4, 2, 1), dtype)  # [o, kh, kw, t, c]
    slots = torch.roll(taps, (slot + 1) % span, dims=3) if (slot + 1) % span else taps
    folded = slots.view(c_out, kh, kw, span * c_in)
    if pad:
        folded = torch.cat((folded, folded.new_zeros((c_out, kh, kw, pad))), dim=3)
    return folded.permute(0, 3, 1, 2)


def _dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a contiguous tensor of ``dtype``, in one copy (``.to`` keeps a permuted layout)."""
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


def _unfolded_grad(grad2d: torch.Tensor, slot: int, span: int, c_in: int) -> torch.Tensor:
    """The weight gradient of :func:`_folded_weight`'s layout back in the weight's taps,
    ``[C_out, C, span, k_h, k_w]`` (a view of a fresh tensor in the dtype of ``grad2d``; the pad
    channels' gradient dropped)."""
    c_out, _, kh, kw = grad2d.shape
    slots = grad2d[:, :span * c_in].permute(0, 2, 3, 1).reshape(c_out, kh, kw, span, c_in)
    taps = torch.roll(slots, -((slot + 1) % span), dims=3) if (slot + 1) % span else slots
    return taps.permute(0, 4, 3, 1, 2)


def ring_conv_forward(ring, frame, slot, weight, bias, stride, padding, dilation, dilation_t, groups):
    """``reference.ring_conv_forward``: one 2-D convolution of the ring image."""
    if not _folds(ring, dilation_t, groups):
        return reference.ring_conv_forward(ring, frame, slot, weight, bias, stride, padding, dilation, dilation_t,
                                           groups)
    if frame is not None:
        ring[slot].copy_(frame)
    pad = channel_pad(ring)
    out = F.conv2d(_ring_image(ring, pad), _folded_weight(weight, slot, ring.dtype, pad), None, stride, padding,
                   dilation)
    if bias is not None:  # in the output's dtype as nn.Conv3d adds it; one kernel, no cast of the bias first
        out.add_(bias.view(1, -1, 1, 1))
    return out


def window_input_grad(grad_out, weight, input_size, stride, padding, dilation, groups):
    """``reference.window_input_grad``: every tap sends ``grad_out`` through its transpose onto
    the same frame, so the sum over taps is one transposed convolution with the summed taps
    (in a run that holds it, :mod:`.forms`, the sum made at the run's start)."""
    shape = (grad_out.shape[0], weight.shape[1] * groups, *input_size)
    summed = forms.get(weight, ("summed", grad_out.dtype))
    summed = summed if summed is not None else _summed(weight, grad_out.dtype)
    return torch.nn.grad.conv2d_input(shape, summed, grad_out, stride, padding, dilation, groups)


def _summed(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.sum(2, dtype=torch.promote_types(weight.dtype, torch.float32)).to(dtype)


def _weight_grad(grad_out, ring, slot, weight_shape, stride, padding, dilation):
    """dL/dW of the window's convolution, ``[C_out, C, span, k_h, k_w]`` in the activations' dtype."""
    c_out, c_in, span, kh, kw = weight_shape
    pad = channel_pad(ring)
    image = _ring_image(ring, pad)
    if image.device.type == "cpu" and kh == kw == 1 and list(stride) != [1, 1]:
        # oneDNN's CPU weight gradient of a strided 1x1 kernel on channels-last input writes past
        # its workspace when the input has few channels (oneDNN issue 6035: hangs, crashes, wrong
        # numbers). A 1x1 kernel reads exactly the strided positions: slice them, stride 1; with
        # padding, the NCHW layout (another path). As csrc/aten_ops.cpp's window_weight_grad.
        if list(padding) == [0, 0]:
            image, stride = image[:, :, ::stride[0], ::stride[1]], [1, 1]
        else:
            image = image.contiguous()
    grad2d = torch.nn.grad.conv2d_weight(image, (c_out, span * c_in + pad, kh, kw), grad_out, stride, padding,
                                         dilation)
    return _unfolded_grad(grad2d, slot, span, c_in)


def _bias_grad(grad_out, dtype):
    from . import backend  # (it imports this module)
    return backend.bias_grad(grad_out, dtype)


def weight_grad_accumulate(grad_weight, grad_bias, grad_out, ring, slot, stride, padding, dilation, dilation_t,
                           groups):
    """``reference.weight_grad_accumulate`` through one 2-D weight gradient of the ring image."""
    if not _folds(ring, dilation_t, groups):
        return reference.weight_grad_accumulate(grad_weight, grad_bias, grad_out, ring, slot, stride, padding,
                                                dilation, dilation_t, groups)
    grad_weight.add_(_weight_grad(grad_out, ring, slot, grad_weight.shape, stride, padding, dilation))
    if grad_bias is not None:
        grad_bias.add_(_bias_grad(grad_out, grad_bias.dtype))


def sgd_tick_update(weight, momentum_buffer, bias, bias_momentum_buffer, grad_out, ring, slot, stride, padding,
                    dilation, dilation_t, groups, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """``reference.sgd_tick_update``: the gradient as above, then torch.optim.SGD's own fused step
    (``SGD(fused=True)``'s kernel) over the weight and bias together."""
    if not _folds(ring, dilation_t, groups):
        return reference.sgd_tick_update(weight, momentum_buffer, bias, bias_momentum_buffer, grad_out, ring, slot,
                                         stride, padding, dilation, dilation_t, groups, lr, momentum, dampening,
                                         weight_decay, nesterov, first_step)
    grad = _weight_grad(grad_out, ring, slot, weight.shape, stride, padding, dilation)
    params, grads, bufs = [weight], [_dense(grad, weight.dtype)], [momentum_buffer]
    if bias is not None:
        params.append(bias)
        grads.append(_bias_grad(grad_out, bias.dtype))
        bufs.append(bias_momentum_buffer)
    used_bufs = bufs if momentum != 0 else []
    # SGD(fused=True)'s kernel walks each tensor's memory in order: only for contiguous ones of one dtype
    if all(t.is_contiguous() for t in params + used_bufs) and len({(p.dtype, p.device) for p in params}) == 1:
        torch._fused_sgd_(params, grads, used_bufs, weight_decay=weight_decay, momentum=momentum, lr=lr,
                          dampening=dampening, nesterov=nesterov, maximize=False, is_first_step=first_step)
        # it writes without bumping the versions, which autograd's saved-tensor check and the
        # kernels' caches of the 16-bit weight rely on (ATen's in-place ops bump them)
        torch.autograd.graph.increment_version(params + used_bufs)
    else:
        for p, g, b in zip(params, grads, bufs):
            reference.sgd_step(p, b, g, lr, momentum, dampening, weight_decay, nesterov, first_step)


def forms_of(weight: torch.Tensor, dtype: torch.dtype, forward: bool, input_grad: bool) -> list:
    """(weight, key, make) of the forms this backend's ``forward`` (folded, one per ring slot)
    and ``input_grad`` (the taps' sum) read, for a run that holds them (:mod:`.forms`)."""
    span, pad = weight.shape[2], _pad(weight.shape[2] * weight.shape[1], weight.is_cuda, dtype)
    made = [(weight, ("folded", slot, dtype, pad), lambda slot=slot: _fold(weight, slot, dtype, pad))
            for slot in range(span)] if forward else []
    return made + ([(weight, ("summed", dtype), lambda: _summed(weight, dtype))] if input_grad else [])
