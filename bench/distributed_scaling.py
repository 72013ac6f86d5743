"""Throughput of the depth-parallel pipeline across processes on gloo (CPU): 1, 2 and 4
ranks, one thread each, on a network of 4 stages of about equal cost (C -> C channels,
3x3x3, 28x28), batch 4, T = 16, Sideways mode, for C = 32 and 64 (the compute per tick grows
as C², a boundary message as C). Each rank times backward_clip (median of 5 clips after a
warm-up one); the clip's time is the slowest rank's. Prints a markdown table.

    python bench/distributed_scaling.py            # CHANNELS=32,64 FRAMES=16 to choose
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import statistics
import sys
import time

import torch
import torch.nn as nn

B, HW, STAGES, CLIPS = 4, 28, 4, 5


def _network(C):
    """Four stages of about equal cost per tick: each a 32 -> 32 conv; the first also holds
    the cheap 3 -> 32 input conv (which sends no gradient down), the last the small head."""
    from sideways_kernels import SidewaysConv3d
    torch.manual_seed(0)
    conv = lambda c_in: [SidewaysConv3d(c_in, C, 3, padding=1), nn.ReLU()]
    blocks = [nn.Sequential(*conv(C)) for _ in range(STAGES)]
    blocks[0] = nn.Sequential(*conv(3), *conv(C))
    blocks[-1].extend([nn.AdaptiveAvgPool3d((None, 1, 1)), SidewaysConv3d(C, 10, 1)])
    return blocks


def _rank(rank, world, port, queue, C, T):
    torch.set_num_threads(1)
    from sideways_kernels import SidewaysPipeline
    from sideways_kernels.distributed import DistributedSidewaysPipeline
    video, target = torch.randn(B, 3, T, HW, HW), torch.randint(0, 10, (B,))
    if world == 1:
        pipe = SidewaysPipeline(_network(C))
    else:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=datetime.timedelta(seconds=120))
        pipe = DistributedSidewaysPipeline(_network(C))
    pipe.backward_clip(video, target)  # warm-up
    times = []
    for _ in range(CLIPS):
        start = time.perf_counter()
        pipe.backward_clip(video, target)
        times.append(time.perf_counter() - start)
    queue.put((rank, statistics.median(times)))
    if world > 1:
        torch.distributed.barrier()  # gloo aborts a rank whose peer tore down first
        torch.distributed.destroy_process_group()


def measure(world: int, C: int, T: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, queue, C, T)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return max(t for _, t in results)


if __name__ == "__main__":
    frames = int(os.environ.get("FRAMES", 16))
    print("| channels | ranks (1 thread each) | clip time (s) | frames/s | speed-up vs 1 rank |")
    print("|---|---|---|---|---|")
    for C in map(int, os.environ.get("CHANNELS", "32,64").split(",")):
        base = None
        for world in (1, 2, 4):
            t = measure(world, C, frames)
            base = base or t
            print(f"| {C} | {world} | {t:.3f} | {B * frames / t:.0f} | {base / t:.2f}x |", flush=True)
    print(f"\n{os.cpu_count()} CPU cores; torch {torch.__version__}; T={frames}; {datetime.date.today()}",
          file=sys.stderr)
