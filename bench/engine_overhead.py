"""The engine's own Python time in a Sideways clip of a converted standard network (CPU).

One clip of ``models.r2plus1d_18`` (width 16, BatchNorm per frame) cut into 4 stages by
``SidewaysPipeline.from_model``, batch 4, 32x32 frames, T = 16 and 64, float32, 2 threads.
cProfile attributes each clip's time to: the ops (C++ builtins: the sideways ops, aten ops,
the autograd engine), the engine's own Python (sideways_kernels/*.py), and torch's Python
(nn.Module dispatch, functional wrappers). cProfile inflates Python calls, so the engine's
share is an upper bound. Also: ticks, the network's lag (ticks before its first output).

    python bench/engine_overhead.py            # a markdown table
"""
from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sideways_kernels import SidewaysPipeline, models  # noqa: E402

B, HW, STAGES, CLASSES, WIDTH = 4, 32, 4, 10, 16


def _bucket(filename: str) -> str:
    if filename.startswith("~") or filename.startswith("<built-in"):
        return "ops"
    if "sideways_kernels" in filename:
        return "engine"
    return "torch python"


def measure(frames: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    net = models.r2plus1d_18(CLASSES, width=WIDTH)
    video, target = torch.randn(B, 3, frames, HW, HW), torch.randint(0, CLASSES, (B,))
    pipe = SidewaysPipeline.from_model(net, stages=STAGES, batchnorm="frame", example=video[:1])
    pipe.backward_clip(video, target)  # warm-up (plans cached, buffers allocated)
    begin = time.perf_counter()
    pipe.backward_clip(video, target)
    wall = time.perf_counter() - begin
    profile = cProfile.Profile()
    profile.enable()
    pipe.backward_clip(video, target)
    profile.disable()
    shares = {"ops": 0.0, "engine": 0.0, "torch python": 0.0}
    for (filename, _, _), (_, _, tottime, _, _) in pstats.Stats(profile).stats.items():
        shares[_bucket(filename)] += tottime
    total = sum(shares.values())
    lag = max(pipe.graph.lag)
    return dict(frames=frames, ticks=pipe.last_ticks, lag=lag, wall_ms=1000 * wall,
                ms_per_tick=1000 * wall / pipe.last_ticks,
                **{k: v / total for k, v in shares.items()})


def main() -> None:
    print(f"r2plus1d_18 width {WIDTH}, {STAGES} stages, B{B}, {HW}x{HW}, float32, 2 threads, torch {torch.__version__}")
    print("| T | ticks | lag (frames) | clip (ms) | ms/tick | ops | engine Python | torch Python |")
    print("|---|---|---|---|---|---|---|---|")
    for frames in (16, 64):
        r = measure(frames)
        print(f"| {r['frames']} | {r['ticks']} | {r['lag']} | {r['wall_ms']:.0f} | {r['ms_per_tick']:.2f} | "
              f"{r['ops']:.0%} | {r['engine']:.0%} | {r['torch python']:.0%} |")


if __name__ == "__main__":
    main()
