"""Where one training clip's time goes on a GPU (issue 19): torch.profiler over one clip.

The clip is bench_gpu.py's end-to-end step (B8, 112², bf16 autocast), profiled after two warm-up
clips (autotuning, the graphs' capture). Prints the wall time, the GPU's busy time (the union
of every kernel's interval: what a faster host path could at most recover is the rest), the
kernel time summed (more than busy where stages' streams overlap), the kernel count, and the
kernels by total time, each's share of the summed time. CUDA-graph replays are traced kernel by kernel but
not by the op that launched them: ``--eager`` (no graphs) adds the GPU time per aten op.
``--memory`` instead lists what stays allocated after a clip, by the line that allocated it.

    python bench/profile_clip.py --network r3d_18 --padding causal --frames 48 [--impl clip_bp] [--eager]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))


def short_name(kernel: str, width: int = 110) -> str:
    """A kernel's name without the namespaces and qualifiers that fill its first 90 characters,
    so the functor (which copy, which binary op) shows."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::", "c10::", "at::", "std::"):
        kernel = kernel.replace(noise, "")
    return kernel[:width]


def busy_us(intervals) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", choices=["c3d", "r3d_18"], default="c3d")
    p.add_argument("--impl", choices=["sideways", "clip_bp"], default="sideways")
    p.add_argument("--backend", default=None, help="the pipeline's backend (default: the dispatch)")
    p.add_argument("--padding", choices=["same", "causal"], default="same")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs: kernels attributed to their aten ops")
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--device", default="cuda", help="cpu: a check that it runs (no kernels are traced)")
    p.add_argument("--memory", action="store_true",
                   help="instead of timing: what stays allocated after a clip, by the line of ours that allocated it (CUDA)")
    a = p.parse_args(argv)
    import bench_gpu
    from torch.profiler import ProfilerActivity, profile

    step, _, _, pipe = bench_gpu.training_step(a.network, a.impl, a.frames, backend=a.backend,
                                               graphs=False if a.eager else None, temporal_padding=a.padding,
                                               batch=a.batch, size=a.size, width=a.width, device=a.device)
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        step()
    sync()
    if a.memory:
        return _memory_after_clip(step, a.top) if cuda else 0
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        step()
        sync()
        wall = (time.perf_counter() - start) * 1e6
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = busy_us([(e.time_range.start, e.time_range.end) for e in kernels]) or float("nan")
    summed = sum(e.time_range.elapsed_us() for e in kernels) or float("nan")  # more than busy where streams overlap
    graphs = getattr(pipe, "_graphs", None)
    print(f"{a.network} {a.impl} T{a.frames} ({a.padding}), backend {a.backend or 'default'}"
          f"{', eager' if a.eager else ''}: "
          f"wall {wall / 1e3:.2f} ms (under the profiler), GPU busy {busy / 1e3:.2f} ms ({busy / wall:.0%}), "
          f"kernel time summed over streams {summed / 1e3:.2f} ms, {len(kernels)} kernels, ticks {getattr(pipe, 'last_ticks', None)}, "
          f"graph replays so far {getattr(graphs, 'replays', None)}")
    by_name = {}
    for e in kernels:
        n, t = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (n + 1, t + e.time_range.elapsed_us())
    print(f"{'kernel':110} {'calls':>6} {'total ms':>9} {'share':>6} {'mean us':>8}")
    for name, (n, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:a.top]:
        print(f"{short_name(name):110} {n:6d} {t / 1e3:9.3f} {t / summed:6.1%} {t / n:8.1f}")
    if a.eager:  # the GPU time of the kernels each op launched itself
        ops = [(e.key, e.count, getattr(e, "self_device_time_total", 0)) for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CPU]
        print(f"{'aten op (its own kernels)':60} {'calls':>6} {'GPU ms':>9} {'share':>6}")
        for name, n, t in sorted(ops, key=lambda o: -o[2])[:a.top]:
            print(f"{name[:60]:60} {n:6d} {t / 1e3:9.3f} {t / summed:6.1%}")
    return 0


def _memory_after_clip(step, top: int) -> int:
    """One clip with the CUDA allocator's history on, then every block still allocated grouped by
    the innermost frame of this repository's code that allocated it (graph pools included)."""
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=200_000)
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    ours = lambda f: "sideways_kernels" in f["filename"] or "/bench/" in f["filename"]
    by_site, total = {}, 0
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            total += block["size"]
            frames = [f for f in block.get("frames", []) if ours(f)]
            site = (f"{frames[0]['filename'].split('/')[-1]}:{frames[0]['line']} {frames[0]['name']}" if frames
                    else "(before the history or outside this repository)")
            n, b = by_site.get(site, (0, 0))
            by_site[site] = (n + 1, b + block["size"])
    mib = 2 ** 20
    print(f"allocated after the clip {torch.cuda.memory_allocated() / mib:.0f} MiB (before it {before / mib:.0f}); "
          f"blocks active in the snapshot {total / mib:.0f} MiB")
    for site, (n, b) in sorted(by_site.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{b / mib:9.1f} MiB {n:6d} blocks  {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
