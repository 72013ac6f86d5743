"""Fused Sideways weight update vs the unfused PyTorch path a user has today, at a
C3D-like layer (64->128 channels, 3x3x3, batch 8, 28x28, float32, CPU).

    make bench        (or: pytest bench/bench_ops.py --benchmark-only)

Groups pair each fused op with its unfused baseline, measured side by side in one run.
"""
import pytest
import torch

from sideways_kernels import ops, reference

B, C_IN, C_OUT, K, HW = 8, 64, 128, 3, 28
STRIDE, PAD, DIL = [1, 1], [1, 1], [1, 1]
HYPER = dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False)


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    ring = torch.randn(K, B, C_IN, HW, HW)
    weight = torch.randn(C_OUT, C_IN, K, K, K) * 0.05
    bias = torch.randn(C_OUT)
    grad_out = torch.randn(B, C_OUT, HW, HW)
    slot = 1
    # The fused ops get the ring as the layers allocate it (ops.empty_ring); the baselines get
    # the contiguous NCDHW-style frames a user has from nn.Conv3d code, and channels-last ones.
    # The pipeline hands the fused ops channels-last errors (what its ops return).
    return dict(ring=ring, ring_fast=ops.empty_ring(*ring.shape).copy_(ring),
                grad_out_fast=grad_out.contiguous(memory_format=torch.channels_last),
                ring_channels_last=ring.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3),
                weight=weight, bias=bias, grad_out=grad_out, slot=slot)


def _unfused_grads(t, grad_w, grad_b):
    """Per tap: conv backward for the weight, then add_ (what chaining PyTorch ops gives)."""
    slots = reference.tap_slots(t["slot"], K, K, 1)
    for j, s in enumerate(slots):
        g = torch.ops.aten.convolution_backward(t["grad_out"], t["ring"][s], t["weight"][:, :, j], None, STRIDE, PAD,
                                                DIL, False, [0, 0], 1, [False, True, False])[1]
        grad_w[:, :, j].add_(g)
    grad_b.add_(t["grad_out"].sum((0, 2, 3)))


def _extra(benchmark, t):
    flops = 2 * B * HW * HW * C_OUT * C_IN * K ** 3
    benchmark.extra_info.update(shape=f"{C_IN}->{C_OUT} k{K} B{B} {HW}x{HW} float32", gflop=flops / 1e9,
                                threads=torch.get_num_threads())


@pytest.mark.benchmark(group="weight-grad-accumulate")
def test_accumulate_unfused_per_tap(benchmark, layer):
    grad_w, grad_b = torch.zeros_like(layer["weight"]), torch.zeros_like(layer["bias"])
    _extra(benchmark, layer)
    benchmark(_unfused_grads, layer, grad_w, grad_b)


@pytest.mark.benchmark(group="weight-grad-accumulate")
def test_accumulate_unfused_per_tap_channels_last(benchmark, layer):
    grad_w, grad_b = torch.zeros_like(layer["weight"]), torch.zeros_like(layer["bias"])
    _extra(benchmark, layer)
    benchmark(_unfused_grads, dict(layer, ring=layer["ring_channels_last"], grad_out=layer["grad_out_fast"]), grad_w, grad_b)


@pytest.mark.benchmark(group="weight-grad-accumulate")
def test_accumulate_unfused_conv3d_weight(benchmark, layer):
    """torch.nn.grad.conv3d_weight on the stacked window + add_."""
    grad_w, grad_b = torch.zeros_like(layer["weight"]), torch.zeros_like(layer["bias"])
    _extra(benchmark, layer)

    def step():
        window = reference.window(layer["ring"], layer["slot"])
        grad_w.add_(torch.nn.grad.conv3d_weight(window, grad_w.shape, layer["grad_out"].unsqueeze(2), 1, [0, 1, 1]))
        grad_b.add_(layer["grad_out"].sum((0, 2, 3)))

    benchmark(step)


@pytest.mark.benchmark(group="weight-grad-accumulate")
def test_accumulate_fused_op(benchmark, layer):
    grad_w, grad_b = torch.zeros_like(layer["weight"]), torch.zeros_like(layer["bias"])
    _extra(benchmark, layer)
    benchmark(ops.weight_grad_accumulate, grad_w, grad_b, layer["grad_out_fast"], layer["ring_fast"], layer["slot"],
              STRIDE, PAD, DIL, 1, 1)


@pytest.mark.benchmark(group="tick-update")
def test_tick_update_unfused(benchmark, layer):
    """Per-tap conv backward + add_ into .grad + torch.optim.SGD.step (+ zero_grad)."""
    w = layer["weight"].clone().requires_grad_()
    b = layer["bias"].clone().requires_grad_()
    opt = torch.optim.SGD([w, b], **HYPER)
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    _extra(benchmark, layer)

    def step():
        t = dict(layer, weight=w.detach())
        _unfused_grads(t, w.grad, b.grad)
        opt.step()
        w.grad.zero_()
        b.grad.zero_()

    benchmark(step)


@pytest.mark.benchmark(group="tick-update")
def test_tick_update_unfused_conv3d_weight(benchmark, layer):
    """torch.nn.grad.conv3d_weight on the stacked window into .grad + torch.optim.SGD.step."""
    w = layer["weight"].clone().requires_grad_()
    b = layer["bias"].clone().requires_grad_()
    opt = torch.optim.SGD([w, b], **HYPER)
    _extra(benchmark, layer)

    def step():
        window = reference.window(layer["ring"], layer["slot"])
        w.grad = torch.nn.grad.conv3d_weight(window, w.shape, layer["grad_out"].unsqueeze(2), 1, [0, 1, 1])
        b.grad = layer["grad_out"].sum((0, 2, 3))
        opt.step()

    benchmark(step)


@pytest.mark.benchmark(group="tick-update")
def test_tick_update_fused_op(benchmark, layer):
    w, b = layer["weight"].clone(), layer["bias"].clone()
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    _extra(benchmark, layer)
    benchmark(ops.sgd_tick_update, w, buf_w, b, buf_b, layer["grad_out_fast"], layer["ring_fast"], layer["slot"], STRIDE, PAD,
              DIL, 1, 1, **HYPER)
