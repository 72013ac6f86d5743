"""End-to-end: one training clip through a 4-stage C3D-like network (B=4, 3x56x56,
T=16, float32, CPU): the Sideways pipeline vs clip-level BP with nn.Conv3d + autograd
(the baseline), and the same pipeline in bp mode. frames/s in extra_info.

    pytest bench/bench_pipeline.py --benchmark-only
Peak memory vs T: python bench/pipeline_memory.py (fresh processes, a plot).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sideways_kernels import SidewaysPipeline, models

B, HW, T, CLASSES, STAGES = 4, 56, 16, 10, 4


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return torch.randn(B, 3, T, HW, HW), torch.randint(0, CLASSES, (B,))


def _net(conv):
    torch.manual_seed(1)
    return models.c3d(CLASSES, widths=(16, 32, 64, 128), conv=conv)


def _report(benchmark, net, video):
    benchmark.extra_info.update(frames_per_clip=T * B, shape=f"B{B} 3x{T}x{HW}x{HW} c3d(16,32,64,128) {STAGES} stages",
                                threads=torch.get_num_threads())


def _frames_per_second(benchmark):
    benchmark.extra_info["frames_per_s"] = B * T / benchmark.stats.stats.median


@pytest.mark.benchmark(group="train-clip")
def test_clip_bp_nn_conv3d(benchmark, clip):
    net = _net(nn.Conv3d)
    video, target = clip

    def step():
        out = net(video)
        loss = sum(F.cross_entropy(out[:, :, t].flatten(1), target) for t in range(out.shape[2])) / out.shape[2]
        loss.backward()

    _report(benchmark, net, video)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    _frames_per_second(benchmark)


@pytest.mark.parametrize("mode", ["sideways", "bp"])
@pytest.mark.benchmark(group="train-clip")
def test_pipeline(benchmark, clip, mode):
    from sideways_kernels import SidewaysConv3d
    net = _net(SidewaysConv3d)
    pipe = SidewaysPipeline(models.stages(net, STAGES), mode=mode)
    video, target = clip
    _report(benchmark, net, video)
    benchmark.pedantic(pipe.backward_clip, (video, target), rounds=5, warmup_rounds=1)
    _frames_per_second(benchmark)


# --- a converted standard network: R(2+1)D-18 (residuals, temporal strides, BatchNorm, pooled head) ---

R2_B, R2_HW, R2_T, R2_WIDTH = 4, 32, 16, 16


@pytest.fixture(scope="module")
def r2_clip():
    torch.manual_seed(0)
    return torch.randn(R2_B, 3, R2_T, R2_HW, R2_HW), torch.randint(0, CLASSES, (R2_B,))


def _r2_report(benchmark):
    benchmark.extra_info.update(frames_per_clip=R2_T * R2_B, threads=torch.get_num_threads(),
                                shape=f"B{R2_B} 3x{R2_T}x{R2_HW}x{R2_HW} r2plus1d_18(width {R2_WIDTH}) {STAGES} stages")


@pytest.mark.benchmark(group="train-clip-r2plus1d_18")
def test_r2plus1d_18_clip_bp_nn_conv3d(benchmark, r2_clip):
    torch.manual_seed(1)
    net = models.r2plus1d_18(CLASSES, width=R2_WIDTH)
    video, target = r2_clip

    def step():
        F.cross_entropy(net(video), target).backward()

    _r2_report(benchmark)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    benchmark.extra_info["frames_per_s"] = R2_B * R2_T / benchmark.stats.stats.median


@pytest.mark.parametrize("mode", ["sideways", "bp"])
@pytest.mark.benchmark(group="train-clip-r2plus1d_18")
def test_r2plus1d_18_pipeline(benchmark, r2_clip, mode):
    torch.manual_seed(1)
    net = models.r2plus1d_18(CLASSES, width=R2_WIDTH)
    video, target = r2_clip
    pipe = SidewaysPipeline.from_model(net, stages=STAGES, mode=mode, batchnorm="frame", example=video[:1])
    _r2_report(benchmark)
    benchmark.pedantic(pipe.backward_clip, (video, target), rounds=5, warmup_rounds=1)
    benchmark.extra_info["frames_per_s"] = R2_B * R2_T / benchmark.stats.stats.median
    benchmark.extra_info["ticks"] = pipe.last_ticks
