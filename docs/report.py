"""Runs the experiments behind docs/REPORT.md and draws its figures.

Sideways vs BP on the embedded task with the default configuration, 3 seeds each,
and validation accuracy as --frame-stride grows (1, 2, 4). Each run is a
`sideways-train` subprocess (its peak RSS read with wait4); runs go to runs/report/
(not committed), figures to docs/. Re-running skips finished runs.

    python docs/report.py            # ~25 min on 2 CPU cores
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(os.path.dirname(HERE), "runs", "report")
SEEDS = (0, 1, 2)
STRIDES = (1, 2, 4)
MODES = ("sideways", "bp")


def run(mode: str, seed: int, stride: int) -> dict:
    out = os.path.join(RUNS, f"{mode}-stride{stride}-seed{seed}")
    summary = os.path.join(out, "summary.json")
    if os.path.exists(summary):
        return json.load(open(summary))
    if os.path.exists(out):
        import shutil
        shutil.rmtree(out)
    proc = subprocess.Popen([sys.executable, "-m", "sideways_kernels.train", "--mode", mode, "--seed", str(seed),
                             "--frame-stride", str(stride), "--out", out], stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{out}: exit status {status}")
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = [r for r in records if r["kind"] == "step"]
    result = dict(mode=mode, seed=seed, stride=stride, epochs=epochs, steps=steps,
                  peak_rss_mib=usage.ru_maxrss / 1024,
                  frames_per_s=statistics.median(r["frames_per_s"] for r in steps))
    json.dump(result, open(summary, "w"))
    print(f"{mode} stride {stride} seed {seed}: val acc {epochs[-1]['val_acc']:.3f} "
          f"({result['frames_per_s']:.0f} frames/s, {result['peak_rss_mib']:.0f} MiB)", flush=True)
    return result


def main() -> None:
    results = [run(m, s, k) for k in STRIDES for s in SEEDS for m in MODES]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"sideways": "tab:blue", "bp": "tab:orange"}
    base = [r for r in results if r["stride"] == 1]

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for r in base:
        e = r["epochs"]
        kw = dict(color=colors[r["mode"]], alpha=0.8, label=r["mode"] if r["seed"] == 0 else None)
        axes[0].plot([x["epoch"] for x in e], [x["val_acc"] for x in e], **kw)
        axes[1].plot([x["epoch"] for x in e], [x["train_acc"] - x["val_acc"] for x in e], **kw)
        axes[2].plot([x["step"] for x in r["steps"]], [x["loss"] for x in r["steps"]], lw=0.7, **kw)
    for ax, title in zip(axes, ("validation accuracy", "train - validation accuracy", "training clip loss (per step)")):
        ax.set_title(title)
        ax.set_xlabel("step" if "loss" in title else "epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "sideways_vs_bp.png"), dpi=110)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for mode in MODES:
        accs = [[r["epochs"][-1]["val_acc"] for r in results if r["mode"] == mode and r["stride"] == k] for k in STRIDES]
        ax.errorbar(STRIDES, [statistics.mean(a) for a in accs], yerr=[statistics.pstdev(a) for a in accs],
                    marker="o", capsize=4, color=colors[mode], label=mode)
    ax.set_xlabel("--frame-stride (video change per tick)")
    ax.set_ylabel("final validation accuracy")
    ax.set_xticks(STRIDES)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "accuracy_vs_stride.png"), dpi=110)

    print("\n| mode | frame stride | final val acc (mean ± sd, 3 seeds) | best val acc | final train-val gap | frames/s | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for k in STRIDES:
        for mode in MODES:
            rs = [r for r in results if r["mode"] == mode and r["stride"] == k]
            final = [r["epochs"][-1]["val_acc"] for r in rs]
            best = [max(e["val_acc"] for e in r["epochs"]) for r in rs]
            gap = [r["epochs"][-1]["train_acc"] - r["epochs"][-1]["val_acc"] for r in rs]
            print(f"| {mode} | {k} | {statistics.mean(final):.3f} ± {statistics.pstdev(final):.3f} | "
                  f"{statistics.mean(best):.3f} | {statistics.mean(gap):+.3f} | "
                  f"{statistics.mean(r['frames_per_s'] for r in rs):.0f} | {statistics.mean(r['peak_rss_mib'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
