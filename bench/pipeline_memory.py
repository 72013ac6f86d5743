"""Peak memory of one training clip, Sideways pipeline vs clip-level BP (nn.Conv3d +
autograd), on a 4-stage C3D-like network, batch 4, 56x56, for T = 8..64 frames.

Each figure is measured in a fresh process: one warm-up clip of 4 frames (so one-time
library start-up, e.g. oneDNN's, is not counted), then the peak-RSS mark is reset
(/proc/self/clear_refs) and the measured clip's peak RSS growth is read from VmHWM.
Alongside it, the bytes each method holds by construction: Sideways' rings and double
buffers, BP's tensors saved for backward (counted with saved_tensors_hooks). Writes
bench/memory_vs_T.png and a markdown table.

    python bench/pipeline_memory.py            # all T, both methods, plot + table
    python bench/pipeline_memory.py --child sideways 16   # one measurement, JSON
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

BATCH, HW, STAGES, CLASSES = 4, 56, 4, 10
T_VALUES = (8, 16, 32, 64)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def child(method: str, frames: int) -> dict:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from sideways_kernels import SidewaysConv3d, SidewaysPipeline, models

    torch.manual_seed(0)
    conv = nn.Conv3d if method == "bp" else SidewaysConv3d
    net = models.c3d(CLASSES, widths=(16, 32, 64, 128), conv=conv)
    target = torch.randint(0, CLASSES, (BATCH,))
    pipe = SidewaysPipeline(models.stages(net, STAGES)) if method == "sideways" else None
    held = 0

    def bp_clip(video, count_saved=False):
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
            loss = sum(F.cross_entropy(out[:, :, t].flatten(1), target) for t in range(out.shape[2])) / out.shape[2]
        loss.backward()

    run = (lambda v, **kw: pipe.backward_clip(v, target)) if pipe else bp_clip
    run(torch.randn(BATCH, 3, 4, HW, HW))  # warm-up: library start-up, rings, buffers
    net.zero_grad(set_to_none=False)
    video = torch.randn(BATCH, 3, frames, HW, HW)
    _reset_peak()
    before = _status_bytes("VmRSS")
    run(video, count_saved=True)
    peak = _status_bytes("VmHWM")
    if pipe:
        rings = sum(m._ring.untyped_storage().nbytes() for m in net.modules() if isinstance(m, SidewaysConv3d))
        held = rings + sum(b.untyped_storage().nbytes() for b in pipe.engine.buffers.values())
    return dict(method=method, frames=frames, peak_rss_growth=max(0, peak - before), held_bytes=held)


def measure(method: str, frames: int) -> dict:
    # glibc keeps freed heap blocks in RSS (its mmap threshold grows with use); these
    # settings make it return them, so RSS follows the bytes actually live.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", method, str(frames)],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = [measure(m, t) for t in T_VALUES for m in ("sideways", "bp")]
    mib = lambda b: b / 2**20
    lines = ["| T | Sideways peak RSS growth (MiB) | Sideways rings+buffers (MiB) | BP peak RSS growth (MiB) | BP saved activations (MiB) |",
             "|---|---|---|---|---|"]
    by = {(r["method"], r["frames"]): r for r in rows}
    for t in T_VALUES:
        s, b = by[("sideways", t)], by[("bp", t)]
        lines.append(f"| {t} | {mib(s['peak_rss_growth']):.1f} | {mib(s['held_bytes']):.2f} | "
                     f"{mib(b['peak_rss_growth']):.1f} | {mib(b['held_bytes']):.1f} |")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, label in (("sideways", "Sideways pipeline"), ("bp", "clip BP (nn.Conv3d + autograd)")):
        ax.plot(T_VALUES, [mib(by[(method, t)]["peak_rss_growth"]) for t in T_VALUES], "o-", label=f"{label}: peak RSS growth")
        ax.plot(T_VALUES, [mib(by[(method, t)]["held_bytes"]) for t in T_VALUES], "x--",
                label=f"{label}: {'rings+buffers' if method == 'sideways' else 'saved activations'}")
    ax.set_xlabel("clip length T (frames)")
    ax.set_ylabel("MiB")
    ax.set_title(f"Memory of one training clip, 4-stage C3D-like, B={BATCH}, {HW}x{HW}, CPU")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_vs_T.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
