"""Peak memory of one training clip, Sideways pipeline vs clip-level BP (nn.Conv3d +
autograd), for growing clip lengths T, on two networks:

- ``c3d``: the 4-stage C3D-like chain (widths 16/32/64/128), batch 4, 56x56, T = 8..256;
- ``r2plus1d_18``: the standard R(2+1)D-18 (residuals, temporal strides, BatchNorm per frame, a
  pooled head) at width 8, converted and cut into 4 stages by ``SidewaysPipeline.from_model``,
  batch 2, 32x32, T = 16..128;
- ``r3d_18``: ResNet-3D-18 (3x3x3 convs throughout) at width 8, converted the same way.

Each figure is measured in a fresh process: one warm-up clip of the same length (so one-time
costs are not counted: library start-up, e.g. oneDNN's, and the pipeline's tick plans, which it
builds once per clip length and keeps, about 4 KB a tick), then the peak-RSS mark is reset
(/proc/self/clear_refs) and the measured clip's peak RSS growth is read from VmHWM; the clip
itself exists before the reset.
Alongside it, the bytes each method holds by construction: Sideways' rings, FIFO slots, waiting
errors and double buffers (``Engine.held_bytes``, by kind in the JSON: ``Engine.held_by_kind``),
BP's tensors saved for backward (counted with saved_tensors_hooks). Writes bench/memory_vs_T.png
and markdown tables.

    python bench/pipeline_memory.py                      # every network, plot + tables
    python bench/pipeline_memory.py --child c3d sideways 16   # one measurement, JSON
    python bench/pipeline_memory.py --allocations r3d_18|s3d|graphs   # exact bytes, JSON (below)

``--allocations`` counts bytes exactly from the profiler's allocation events (CPU), after a
warm-up: ``r3d_18`` — a converted r3d_18 (width 8, B4, 64x64, T48, BatchNorm per frame): a
clip's peak above what it starts with, the engine's held bytes by kind, and clip BP's peak;
``s3d`` — S3D (width x0.25, B2, 64x64, T16; temporal max-pools): bytes still allocated after each
of four clips (a leak shows as growth); ``graphs`` — the r3d_18 with emulated CUDA graphs in
update="clip": the peak of clip + optimizer step + zero_grad, and the replays.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

NETWORKS = {  # name: (batch, frame size, T values)
    "c3d": (4, 56, (8, 16, 32, 64, 128, 256)),
    "r2plus1d_18": (2, 32, (16, 32, 64, 128)),
    "r3d_18": (2, 32, (16, 32, 64, 128)),
}
STAGES, CLASSES = 4, 10


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _network(name: str, sideways: bool):
    import torch.nn as nn

    from sideways_kernels import SidewaysConv3d, models
    if name == "c3d":
        return models.c3d(CLASSES, widths=(16, 32, 64, 128), conv=SidewaysConv3d if sideways else nn.Conv3d)
    return models.GRAPHS[name](CLASSES, width=8)


def child(name: str, method: str, frames: int) -> dict:
    import torch
    import torch.nn.functional as F

    from sideways_kernels import SidewaysPipeline, models

    torch.manual_seed(0)
    batch, hw, _ = NETWORKS[name]
    net = _network(name, method == "sideways")
    target = torch.randint(0, CLASSES, (batch,))
    pipe = None
    if method == "sideways":
        pipe = SidewaysPipeline(models.stages(net, STAGES)) if name == "c3d" else \
            SidewaysPipeline.from_model(net, stages=STAGES, batchnorm="frame")
    held = 0

    def bp_clip(video, count_saved=False):
        nonlocal held
        seen = set()

        def pack(t):
            nonlocal held
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if count_saved and key not in seen:
                seen.add(key)
                held += key[1]
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(video)
            if out.dim() == 2:  # a pooled head
                loss = F.cross_entropy(out, target)
            else:
                loss = sum(F.cross_entropy(out[:, :, t].flatten(1), target) for t in range(out.shape[2])) / out.shape[2]
        loss.backward()

    run = (lambda v, **kw: pipe.backward_clip(v, target)) if pipe else bp_clip
    video = torch.randn(batch, 3, frames, hw, hw)
    run(video)  # warm-up: library start-up, rings, buffers, tick plans
    net.zero_grad(set_to_none=False)
    _reset_peak()
    before = _status_bytes("VmRSS")
    run(video, count_saved=True)
    peak = _status_bytes("VmHWM")
    by_kind = None
    if pipe:
        held, by_kind = pipe.engine.held_bytes(), pipe.engine.held_by_kind()
    return dict(network=name, method=method, frames=frames, peak_rss_growth=max(0, peak - before), held_bytes=held,
                held_by_kind=by_kind, clip_bytes=video.numel() * video.element_size())


def measure(name: str, method: str, frames: int) -> dict:
    # glibc keeps freed heap blocks in RSS (its mmap threshold grows with use); these
    # settings make it return them, so RSS follows the bytes actually live.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, method, str(frames)],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    mib = lambda b: b / 2**20
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(NETWORKS), figsize=(5.5 * len(NETWORKS), 4))
    for ax, (name, (batch, hw, t_values)) in zip(axes, NETWORKS.items()):
        by = {(m, t): measure(name, m, t) for t in t_values for m in ("sideways", "bp")}
        print(f"\n{name}, batch {batch}, {hw}x{hw}, {STAGES} stages")
        print("| T | clip (MiB) | Sideways peak RSS growth (MiB) | Sideways held by construction (MiB) | "
              "BP peak RSS growth (MiB) | BP saved activations (MiB) |")
        print("|---|---|---|---|---|---|")
        for t in t_values:
            s, b = by[("sideways", t)], by[("bp", t)]
            print(f"| {t} | {mib(s['clip_bytes']):.1f} | {mib(s['peak_rss_growth']):.1f} | {mib(s['held_bytes']):.2f} | "
                  f"{mib(b['peak_rss_growth']):.1f} | {mib(b['held_bytes']):.1f} |")
        for method, label in (("sideways", "Sideways"), ("bp", "clip BP (nn.Conv3d + autograd)")):
            ax.plot(t_values, [mib(by[(method, t)]["peak_rss_growth"]) for t in t_values], "o-",
                    label=f"{label}: peak RSS growth")
            ax.plot(t_values, [mib(by[(method, t)]["held_bytes"]) for t in t_values], "x--",
                    label=f"{label}: {'held by construction' if method == 'sideways' else 'saved activations'}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("clip length T (frames)")
        ax.set_ylabel("MiB")
        ax.set_title(f"{name}, B={batch}, {hw}x{hw}, CPU", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle("Memory of one training clip (the clip itself not counted)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_vs_T.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def allocations(which: str) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from sideways_kernels import SidewaysPipeline, models
    from sideways_kernels.cuda_graphs import TickGraphs

    def counted(fn):  # (peak above the start, bytes left at the end)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        now = peak = 0
        for e in events:
            now += e.nbytes()
            peak = max(peak, now)
        return peak, now

    mib = lambda b: round(b / 2**20, 2)
    torch.manual_seed(0)
    probe = torch.zeros(1, 3, 16, 64, 64)
    if which == "s3d":
        net = models.s3d(CLASSES, width_mult=0.25, frame_size=64, dropout=0.0)
        pipe = SidewaysPipeline.from_model(net, stages=STAGES, batchnorm="frame", example=probe)
        video, target = torch.randn(2, 3, 16, 64, 64), torch.randint(0, CLASSES, (2,))
        pipe.backward_clip(video, target)
        net.zero_grad(set_to_none=True)
        left = [mib(counted(lambda: (pipe.backward_clip(video, target), net.zero_grad(set_to_none=True)))[1])
                for _ in range(4)]
        return dict(network="s3d x0.25 B2 64x64 T16", mib_still_allocated_after_each_clip=left)
    net = models.r3d_18(CLASSES, width=8)
    if which == "graphs":
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        pipe = SidewaysPipeline.from_model(net, stages=STAGES, batchnorm="frame", example=probe, cuda_graph=True)
        pipe._graphs = TickGraphs(emulate=True)
        video, target = torch.randn(4, 3, 16, 64, 64), torch.randint(0, CLASSES, (4,))

        def step():
            pipe.backward_clip(video, target)
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(3):
            step()
        peak, left = counted(step)
        return dict(network="r3d_18 w8 B4 64x64 T16, emulated graphs, update=clip", mib_peak=mib(peak),
                    mib_left=mib(left), mib_gradients=mib(sum(p.numel() * 4 for p in net.parameters())),
                    replays=pipe._graphs.replays)
    pipe = SidewaysPipeline.from_model(net, stages=STAGES, batchnorm="frame", example=probe)
    video, target = torch.randn(4, 3, 48, 64, 64), torch.randint(0, CLASSES, (4,))
    pipe.backward_clip(video, target)
    net.zero_grad(set_to_none=True)
    peak, _ = counted(lambda: pipe.backward_clip(video, target))
    held = pipe.engine.held_bytes()
    by_kind = getattr(pipe.engine, "held_by_kind", lambda: None)()

    def bp():
        F.cross_entropy(net(video), target).backward()
    net.zero_grad(set_to_none=True)
    bp()
    net.zero_grad(set_to_none=True)
    bp_peak, _ = counted(bp)
    return dict(network="r3d_18 w8 B4 64x64 T48", mib_sideways_peak=mib(peak), mib_held=mib(held),
                held_by_kind=by_kind and {k: mib(v) for k, v in by_kind.items()}, mib_clip_bp_peak=mib(bp_peak),
                sideways_over_bp=round((peak + held) / bp_peak, 3))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--allocations":
        print(json.dumps(allocations(sys.argv[2])))
    elif len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main()
