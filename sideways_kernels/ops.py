"""Typed, documented wrappers of the ``torch.ops.sideways`` ops, each beside its
fake (meta) kernel so ``torch.compile`` and ``opcheck`` can trace them.

Shapes (all ops):
    ring    ``[R, B, C, H, W]``, the layer's last ``R = dilation_t*(k_t-1)+1`` inputs
    slot    index of the newest frame in the ring
    weight  ``[C_out, C/groups, k_t, k_h, k_w]``; temporal tap ``j`` reads ring slot
            ``(slot - (k_t-1-j)*dilation_t) % R``
    stride, padding, dilation: spatial ``(h, w)`` pairs.

The wrappers check what Python can cheaply check and name the argument; the
ops check everything again in C++, so calling ``torch.ops.sideways.*`` directly
with nonsense is refused too.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch

from ._loader import cpp_available

__all__ = [
    "empty_ring",
    "empty_frame",
    "aligned_channels",
    "row_length",
    "zero_image_pad",
    "ring_conv_forward",
    "window_input_grad",
    "weight_grad_accumulate",
    "sgd_tick_update",
    "conv_output_size",
    "ring_output_hw",
]

Pair = Sequence[int]


def _pair(value, name: str, minimum: int) -> list[int]:
    if isinstance(value, int):
        value = (value, value)
    value = list(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or a pair of ints (h, w), got {value!r}")
    if any(v < minimum for v in value):
        raise ValueError(f"{name} must be >= {minimum} in each entry, got {value!r}")
    return value


def _tensor(t, name: str, dim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {what}, got shape {tuple(t.shape)}")


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one dimension."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_ring_conv(ring, slot, weight, stride, padding, dilation, dilation_t, groups):
    """Python-side checks shared by the wrappers and fakes; returns normalized args."""
    _tensor(ring, "ring", 5, "[R, B, C, H, W]")
    _tensor(weight, "weight", 5, "[C_out, C/groups, k_t, k_h, k_w]")
    if not isinstance(slot, int) or not 0 <= slot < ring.shape[0]:
        raise ValueError(f"slot must be an int in [0, {ring.shape[0]}), got {slot!r}")
    if not isinstance(dilation_t, int) or dilation_t < 1:
        raise ValueError(f"dilation_t must be an int >= 1, got {dilation_t!r}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    span = dilation_t * (weight.shape[2] - 1) + 1
    if ring.shape[0] != span:
        raise ValueError(f"ring.shape[0] must be dilation_t*(k_t-1)+1 = {span}, got {ring.shape[0]}")
    return _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)


def ring_output_hw(ring, weight, stride, padding, dilation) -> list:
    """``[H_out, W_out]`` of a ring op's output frame (``ring`` ``[R, B, C, H, W]``, ``weight``
    ``[C_out, C/groups, k_t, k_h, k_w]``)."""
    return [conv_output_size(ring.shape[3 + i], weight.shape[3 + i], stride[i], padding[i], dilation[i])
            for i in range(2)]


def empty_ring(span: int, batch: int, channels: int, height: int, width: int, *, dtype=None, device=None,
               aligned: bool = False, image_pad: int = 0) -> torch.Tensor:
    """A zeroed ring ``[span, B, C, H, W]`` in the layout the CPU kernels run fastest on:
    memory ordered ``[B, H, W, span, C]``, so the whole ring is one channels-last image with
    ``span*C`` channels and a window conv needs no gather. Any layout is accepted by the ops.
    ``aligned``: every row of C channels starts on a 16-byte boundary (:func:`aligned_channels`).
    ``image_pad``: that many zero channels after each position's ``span*C``, which no op writes, so
    the ring also reads as one image of ``span*C + image_pad`` channels (:func:`zero_image_pad`:
    the torch backend's padded stem image on CUDA, without a copy)."""
    for name, value, least in (("span", span, 1), ("batch", batch, 1), ("channels", channels, 1),
                               ("height", height, 1), ("width", width, 1), ("image_pad", image_pad, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"empty_ring: {name} must be an int >= {least}, got {value!r}")
    row = row_length(channels, dtype, aligned)
    memory = torch.zeros(batch, height, width, span * row + image_pad, dtype=dtype, device=device)
    ring = memory[..., :span * row].unflatten(-1, (span, row))[..., :channels].permute(3, 0, 4, 1, 2)
    if image_pad:
        _ZERO_PADDED[id(ring)] = ring
    return ring


# rings of empty_ring(image_pad=...) whose pad channels are known zero, by id (the ring itself as
# the value, so that a reused id of a dead ring never matches)
_ZERO_PADDED: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def zero_image_pad(ring: torch.Tensor) -> int:
    """The zero channels :func:`empty_ring` put after each position of ``ring`` (0 for any other
    tensor, a view of one included: only the ring itself vouches for its padding)."""
    return ring.stride(4) - ring.shape[0] * ring.stride(0) if _ZERO_PADDED.get(id(ring)) is ring else 0


def empty_frame(batch: int, channels: int, height: int, width: int, *, dtype=None, device=None,
                aligned: bool = False) -> torch.Tensor:
    """An uninitialised channels-last frame ``[B, C, H, W]``; ``aligned`` as in :func:`empty_ring`."""
    frame = torch.empty(batch, height, width, row_length(channels, dtype, aligned), dtype=dtype, device=device)
    return frame[..., :channels].permute(0, 3, 1, 2)


def row_length(channels: int, dtype=None, aligned: bool = False) -> int:
    """The elements a position's row of ``channels`` takes in :func:`empty_ring` and
    :func:`empty_frame`: the stride between neighbouring positions (a ring's, between slots)."""
    return aligned_channels(channels, dtype) if aligned else channels


def aligned_channels(channels: int, dtype=None) -> int:
    """``channels`` rounded up to whole 16-byte rows: what a tensor of few channels (the RGB stem's
    3) is stored with where TMA descriptors read it (Triton's box kernels: every stride but the
    channels' a multiple of 16 bytes). The channels past ``channels`` are never read: a descriptor
    of ``channels`` zero-fills them."""
    per_row = 16 // torch.empty((), dtype=dtype).element_size()
    return -(-channels // per_row) * per_row


# --- op 1: streaming forward -------------------------------------------------

def ring_conv_forward(ring: torch.Tensor, frame: Optional[torch.Tensor], slot: int, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], stride: Pair = (1, 1), padding: Pair = (0, 0),
                      dilation: Pair = (1, 1), dilation_t: int = 1, groups: int = 1) -> torch.Tensor:
    """One tick of a streaming Conv3d: write ``frame`` ``[B, C, H, W]`` into ``ring[slot]``
    in place (skipped when ``frame`` is None: the ring is used as it is), and return the
    convolution of the window that ends at ``slot``: ``[B, C_out, H_out, W_out]`` (channels-last
    memory), equal to ``nn.Conv3d`` (temporal stride 1, no temporal padding) applied to the window."""
    stride, padding, dilation = _check_ring_conv(ring, slot, weight, stride, padding, dilation, dilation_t, groups)
    if frame is not None:
        _tensor(frame, "frame", 4, "[B, C, H, W]")
    return torch.ops.sideways.ring_conv_forward(ring, frame, slot, weight, bias, stride, padding, dilation,
                                                dilation_t, groups)


# --- op 2: Sideways input gradient --------------------------------------------

def window_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, input_size: Pair, stride: Pair = (1, 1),
                      padding: Pair = (0, 0), dilation: Pair = (1, 1), groups: int = 1) -> torch.Tensor:
    """The gradient a Sideways layer sends down: ``grad_out`` ``[B, C_out, H_out, W_out]`` pushed
    through the transpose of every temporal tap and summed over the window, ``[B, C, H, W]``
    (channels-last memory) with ``(H, W) = input_size``. Exact when the frames in the window
    are equal."""
    _tensor(grad_out, "grad_out", 4, "[B, C_out, H_out, W_out]")
    _tensor(weight, "weight", 5, "[C_out, C/groups, k_t, k_h, k_w]")
    return torch.ops.sideways.window_input_grad(grad_out, weight, _pair(input_size, "input_size", 1),
                                                _pair(stride, "stride", 1), _pair(padding, "padding", 0),
                                                _pair(dilation, "dilation", 1), groups)


# --- op 3: fused weight-gradient accumulate -----------------------------------

def weight_grad_accumulate(grad_weight: torch.Tensor, grad_bias: Optional[torch.Tensor], grad_out: torch.Tensor,
                           ring: torch.Tensor, slot: int, stride: Pair = (1, 1), padding: Pair = (0, 0),
                           dilation: Pair = (1, 1), dilation_t: int = 1, groups: int = 1) -> None:
    """In place, for every temporal tap ``j``: ``grad_weight[:, :, j] += err ⊗ ring[tap j]`` (the
    conv weight gradient of that frame pair, ``err = grad_out``), and ``grad_bias += err`` summed
    over batch and space. Stale activation × fresh error, in one op."""
    stride, padding, dilation = _check_ring_conv(ring, slot, grad_weight, stride, padding, dilation,
                                                 dilation_t, groups)
    _tensor(grad_out, "grad_out", 4, "[B, C_out, H_out, W_out]")
    torch.ops.sideways.weight_grad_accumulate(grad_weight, grad_bias, grad_out, ring, slot, stride, padding,
                                              dilation, dilation_t, groups)


# --- op 4: fused per-tick SGD update ------------------------------------------

def sgd_tick_update(weight: torch.Tensor, momentum_buffer: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    bias_momentum_buffer: Optional[torch.Tensor], grad_out: torch.Tensor, ring: torch.Tensor,
                    slot: int, stride: Pair = (1, 1), padding: Pair = (0, 0), dilation: Pair = (1, 1),
                    dilation_t: int = 1, groups: int = 1, *, lr: float, momentum: float = 0.0,
                    dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                    first_step: bool = False) -> None:
    """The weight gradient of :func:`weight_grad_accumulate` applied straight into ``weight``
    (and ``bias``) with momentum SGD, in place, exactly as ``torch.optim.SGD.step`` would apply
    it; the gradient is never materialised as a parameter's ``.grad``. ``first_step=True``
    means the momentum buffers are fresh (``torch.optim.SGD`` then sets ``buf = grad``)."""
    stride, padding, dilation = _check_ring_conv(ring, slot, weight, stride, padding, dilation, dilation_t, groups)
    _tensor(grad_out, "grad_out", 4, "[B, C_out, H_out, W_out]")
    if momentum != 0 and momentum_buffer is None:
        raise ValueError("momentum_buffer is required when momentum != 0")
    torch.ops.sideways.sgd_tick_update(weight, momentum_buffer, bias, bias_momentum_buffer, grad_out, ring, slot,
                                       stride, padding, dilation, dilation_t, groups, float(lr), float(momentum),
                                       float(dampening), float(weight_decay), bool(nesterov), bool(first_step))


# --- fake kernels: shapes only, for torch.compile / FakeTensor tracing --------

def _check_devices(ref: torch.Tensor, ref_name: str, **tensors) -> None:
    for name, t in tensors.items():
        torch._check(t is None or t.device == ref.device,
                     lambda: f"{name} must be on {ref.device} like {ref_name}, got {t.device}")


if cpp_available():

    @torch.library.register_fake("sideways::ring_conv_forward")
    def _ring_conv_forward_fake(ring, frame, slot, weight, bias, stride, padding, dilation, dilation_t, groups):
        torch._check(ring.dim() == 5 and weight.dim() == 5, lambda: "ring and weight must be 5-D")
        _check_devices(ring, "ring", frame=frame, weight=weight, bias=bias)
        h, w = ring_output_hw(ring, weight, stride, padding, dilation)
        return torch.empty((ring.shape[1], weight.shape[0], h, w), dtype=ring.dtype, device=ring.device,
                           memory_format=torch.channels_last)

    @torch.library.register_fake("sideways::window_input_grad")
    def _window_input_grad_fake(grad_out, weight, input_size, stride, padding, dilation, groups):
        torch._check(grad_out.dim() == 4 and weight.dim() == 5, lambda: "grad_out must be 4-D, weight 5-D")
        _check_devices(grad_out, "grad_out", weight=weight)
        return torch.empty((grad_out.shape[0], weight.shape[1] * groups, *input_size), dtype=grad_out.dtype,
                           device=grad_out.device, memory_format=torch.channels_last)

    @torch.library.register_fake("sideways::weight_grad_accumulate")
    def _weight_grad_accumulate_fake(grad_weight, grad_bias, grad_out, ring, slot, stride, padding, dilation,
                                     dilation_t, groups):
        _check_devices(ring, "ring", grad_weight=grad_weight, grad_bias=grad_bias, grad_out=grad_out)
        return None

    @torch.library.register_fake("sideways::sgd_tick_update")
    def _sgd_tick_update_fake(weight, momentum_buffer, bias, bias_momentum_buffer, grad_out, ring, slot, stride,
                              padding, dilation, dilation_t, groups, lr, momentum, dampening, weight_decay,
                              nesterov, first_step):
        _check_devices(ring, "ring", weight=weight, momentum_buffer=momentum_buffer, bias=bias,
                       bias_momentum_buffer=bias_momentum_buffer, grad_out=grad_out)
        return None
