"""GPU benchmarks (skipped without a GPU), all ratios side by side in one run:
the fused Sideways weight update (accumulate, and the per-tick SGD step) vs the unfused
cuDNN path (aten.convolution_backward for the weight + add_ + torch.optim.SGD(fused=True))
at C3D shapes in bf16 activations with fp32 master weights; end-to-end frames/s of a
Sideways pipeline vs clip-level BP with nn.Conv3d.

    pytest bench/bench_gpu.py --benchmark-only    (bench/run_gpu.sh runs it)
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sideways_kernels import SidewaysConv3d, SidewaysPipeline, models, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (C_in, C_out, batch, spatial) C3D layers; 3x3x3 kernels, 'same' padding
SHAPES = [(64, 128, 8, 56), (128, 256, 16, 28), (256, 256, 32, 14)]
ARGS = ([1, 1], [1, 1], [1, 1], 1, 1)
HYPER = dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False)


def _timed(benchmark, fn, flops):
    def run():
        fn()
        torch.cuda.synchronize()  # the timed call includes the GPU work

    for _ in range(3):
        run()
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(tflops=flops / median / 1e12, peak_mib=torch.cuda.max_memory_allocated() / 2**20)


def _layer(c_in, c_out, batch, hw):
    torch.manual_seed(0)
    ring = ops.empty_ring(3, batch, c_in, hw, hw, dtype=torch.bfloat16, device="cuda").copy_(
        torch.randn(3, batch, c_in, hw, hw))
    weight = torch.randn(c_out, c_in, 3, 3, 3, device="cuda") * 0.02
    grad_out = torch.randn(batch, c_out, hw, hw, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    flops = 2 * batch * hw * hw * c_out * c_in * 27
    return ring, weight, grad_out, flops


def _unfused(ring, weight, grad_out, grad):
    for j in range(3):  # slot 2 is newest: tap j reads slot j
        g = torch.ops.aten.convolution_backward(grad_out, ring[j], weight[:, :, j].to(ring.dtype), None, [1, 1], [1, 1],
                                                [1, 1], False, [0, 0], 1, [False, True, False])[1]
        grad[:, :, j].add_(g)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}-B{s[2]}-{s[3]}")
@pytest.mark.parametrize("impl", ["unfused", "fused"])
def test_tick_update(benchmark, shape, impl):
    ring, weight, grad_out, flops = _layer(*shape)
    benchmark.group = f"gpu-tick-update-{shape}"
    benchmark.extra_info["shape"] = f"{shape[0]}->{shape[1]} k3 B{shape[2]} {shape[3]}^2 bf16 act, fp32 master"
    if impl == "fused":
        buf = torch.zeros_like(weight)
        _timed(benchmark, lambda: ops.sgd_tick_update(weight, buf, None, None, grad_out, ring, 2, *ARGS, **HYPER), flops)
    else:
        w = weight.clone().requires_grad_()
        opt = torch.optim.SGD([w], fused=True, **HYPER)
        w.grad = torch.zeros_like(w)

        def step():
            _unfused(ring, w.detach(), grad_out, w.grad)
            opt.step()
            w.grad.zero_()

        _timed(benchmark, step, flops)


@pytest.mark.parametrize("T", [8, 16, 32])
@pytest.mark.parametrize("impl", ["clip_bp", "sideways"])
def test_end_to_end(benchmark, impl, T):
    """frames/s and peak memory (extra_info peak_mib) against the clip length."""
    benchmark.group = f"gpu-train-clip-T{T}"
    B, HW = 8, 112
    video, target = torch.randn(B, 3, T, HW, HW, device="cuda"), torch.randint(0, 10, (B,), device="cuda")
    net = models.c3d(10, widths=(64, 128, 256, 256), conv=nn.Conv3d if impl == "clip_bp" else SidewaysConv3d).cuda()
    if impl == "clip_bp":
        def step():
            out = net(video)
            (sum(F.cross_entropy(out[:, :, t].flatten(1), target) for t in range(T)) / T).backward()
    else:
        pipe = SidewaysPipeline(models.stages(net, 4))
        step = lambda: pipe.backward_clip(video, target)
    _timed(benchmark, step, 1)
    benchmark.extra_info["frames_per_s"] = B * T / benchmark.stats.stats.median
    benchmark.extra_info["shape"] = f"c3d(64,128,256,256) B{B} T{T} {HW}^2 fp32, 4 stages"


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda_graph"])
def test_tick(benchmark, graphs):
    """Pipeline ticks at batch 8, eager vs replayed from CUDA graphs: a whole 64-frame clip
    (of its ~80 ticks, all but the fill and drain ones are steady, i.e. replays) after the
    warm-up clips, reported per tick."""
    benchmark.group = "gpu-tick"
    B, T, HW = 8, 64, 56
    torch.manual_seed(0)
    net = models.c3d(10, widths=(64, 128, 256, 256), conv=SidewaysConv3d).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    pipe = SidewaysPipeline(models.stages(net, 4), update="tick", optimizer=opt, cuda_graph=graphs)
    video, target = torch.randn(B, 3, T, HW, HW, device="cuda"), torch.randint(0, 10, (B,), device="cuda")
    step = lambda: pipe.backward_clip(video, target)
    _timed(benchmark, step, 1)
    if graphs:
        assert pipe._graphs.replays > 0 and not pipe._graphs.failed, pipe._graphs.failed
    benchmark.extra_info["ms_per_tick"] = benchmark.stats.stats.median / pipe.last_ticks * 1e3
    benchmark.extra_info["shape"] = f"c3d(64,128,256,256) B{B} T{T} {HW}^2 fp32, 4 stages, per-tick SGD"


def test_end_to_end_sideways_at_equal_memory(benchmark):
    """Sideways at the largest batch whose peak memory stays within clip BP's at batch 8
    (T = 16): frames/s at equal memory. Compare frames_per_s with gpu-train-clip-T16's clip_bp."""
    benchmark.group = "gpu-train-clip-equal-memory"
    T, HW = 16, 112
    make = lambda conv: models.c3d(10, widths=(64, 128, 256, 256), conv=conv).cuda()

    def peak(step):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    net = make(nn.Conv3d)
    video, target = torch.randn(8, 3, T, HW, HW, device="cuda"), torch.randint(0, 10, (8,), device="cuda")

    def bp():
        out = net(video)
        (sum(F.cross_entropy(out[:, :, t].flatten(1), target) for t in range(T)) / T).backward()
    bp()
    budget = peak(bp)
    del net, video, target
    sideways = make(SidewaysConv3d)
    pipe = SidewaysPipeline(models.stages(sideways, 4))
    batch = 8
    while True:  # double while it fits
        clip = (torch.randn(batch * 2, 3, T, HW, HW, device="cuda"), torch.randint(0, 10, (batch * 2,), device="cuda"))
        if batch >= 512 or peak(lambda: pipe.backward_clip(*clip)) > budget:
            break
        batch *= 2
    video, target = torch.randn(batch, 3, T, HW, HW, device="cuda"), torch.randint(0, 10, (batch,), device="cuda")
    _timed(benchmark, lambda: pipe.backward_clip(video, target), 1)
    benchmark.extra_info["frames_per_s"] = batch * T / benchmark.stats.stats.median
    benchmark.extra_info["shape"] = f"c3d(64,128,256,256) B{batch} (BP's memory at B8: {budget / 2**20:.0f} MiB) T{T} {HW}^2"
