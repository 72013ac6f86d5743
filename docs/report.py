"""Runs every experiment behind docs/REPORT.md, draws its figures and writes it.

    python docs/report.py            # about 1.5 h on 2 CPU cores; finished runs are kept and reused

Each run is one ``sideways-train`` subprocess with one thread, as many at a time as there are
cores; its directory (metrics.jsonl, curves.png, checkpoints, summary.json) stays under
runs/report/. Three seeds per configuration; tables give mean ± sd over the seeds, and every
comparison in the text is computed here, with "within seed noise" meaning the difference of
the means is less than twice its standard error (sqrt(sd_a²/n + sd_b²/n)).

Experiments:
- digits (overfitting regime): moving real handwritten digits, 192 training videos (validation
  digits never seen in training), mc3_18 at width 16 with per-frame BatchNorm, 30 epochs — BP,
  BP + dropout 0.5, BP + weight decay 5e-3, Sideways, Sideways with smoothing 3;
- shuffled frames: the same with every clip's frames in random order — BP, Sideways, Sideways
  with smoothing 3;
- motion (the embedded procedural data, the default run): C3D-like chain, BP and Sideways at
  frame strides 1, 2, 4;
- motion with a converted standard network: r2plus1d_18 at width 8, 4 stages cut by from_model.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNS = os.path.join(ROOT, "runs", "report")
SEEDS = (0, 1, 2)

DIGITS = ["--dataset", "digits", "--model", "mc3_18", "--width", "16", "--stages", "3", "--train-videos", "192",
          "--val-videos", "320", "--epochs", "30", "--log-every", "2"]
R2 = ["--model", "r2plus1d_18", "--width", "8", "--stages", "4", "--epochs", "20"]


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    label: str
    args: tuple


CONFIGS = [
    Config("digits-bp", "BP", tuple(DIGITS + ["--mode", "bp"])),
    Config("digits-bp-dropout", "BP + dropout 0.5", tuple(DIGITS + ["--mode", "bp", "--dropout", "0.5"])),
    Config("digits-bp-wd", "BP + weight decay 5e-3", tuple(DIGITS + ["--mode", "bp", "--weight-decay", "5e-3"])),
    Config("digits-sideways", "Sideways", tuple(DIGITS + ["--mode", "sideways"])),
    Config("digits-sideways-smooth", "Sideways, smoothing 3", tuple(DIGITS + ["--mode", "sideways", "--smoothing", "3"])),
    Config("shuffled-bp", "BP", tuple(DIGITS + ["--mode", "bp", "--shuffle-frames"])),
    Config("shuffled-sideways", "Sideways", tuple(DIGITS + ["--mode", "sideways", "--shuffle-frames"])),
    Config("shuffled-sideways-smooth", "Sideways, smoothing 3",
           tuple(DIGITS + ["--mode", "sideways", "--smoothing", "3", "--shuffle-frames"])),
    *[Config(f"motion-{mode}-stride{k}", mode, ("--mode", mode, "--frame-stride", str(k)))
      for k in (1, 2, 4) for mode in ("sideways", "bp")],
    Config("r2plus1d-bp", "BP", tuple(R2 + ["--mode", "bp"])),
    Config("r2plus1d-sideways", "Sideways", tuple(R2 + ["--mode", "sideways"])),
]
BY_NAME = {c.name: c for c in CONFIGS}


def run(config: Config, seed: int) -> dict:
    out = os.path.join(RUNS, f"{config.name}-seed{seed}")
    summary = os.path.join(out, "summary.json")
    if os.path.exists(summary):
        return json.load(open(summary))
    if os.path.exists(out):
        import shutil
        shutil.rmtree(out)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "sideways_kernels.train", *config.args, "--seed", str(seed),
                             "--out", out], stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{out}: exit status {status}")
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = [r for r in records if r["kind"] == "step"]
    result = dict(config=config.name, seed=seed, epochs=epochs, steps=steps, peak_rss_mib=usage.ru_maxrss / 1024,
                  frames_per_s=statistics.median(r["frames_per_s"] for r in steps))
    json.dump(result, open(summary, "w"))
    print(f"{config.name} seed {seed}: val acc {epochs[-1]['val_acc']:.3f}", flush=True)
    return result


# --- numbers -------------------------------------------------------------------------------------

def final(r: dict, key: str):
    return r["epochs"][-1][key]


METRICS = {
    "final val acc": lambda r: final(r, "val_acc"),
    "best val acc": lambda r: max(e["val_acc"] for e in r["epochs"]),
    "train acc": lambda r: final(r, "train_acc"),
    "train − val gap": lambda r: final(r, "train_acc") - final(r, "val_acc"),
    "val NLL": lambda r: final(r, "val_nll"),
    "val ECE": lambda r: final(r, "val_ece"),
    "confidence when wrong": lambda r: final(r, "val_conf_wrong") if final(r, "val_conf_wrong") is not None
    else float("nan"),
    "step-loss sd": lambda r: final(r, "train_loss_sd"),
}


def stats(results: dict, name: str, metric: str) -> tuple[float, float]:
    values = [METRICS[metric](r) for r in results[name]]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(results, name, metric) -> str:
    m, s = stats(results, name, metric)
    return f"{m:.3f} ± {s:.3f}"


def compare(results, a: str, b: str, metric: str) -> tuple[float, float, bool]:
    """(mean a − mean b, its standard error, whether it is within seed noise)."""
    ma, sa = stats(results, a, metric)
    mb, sb = stats(results, b, metric)
    n = len(SEEDS)
    se = math.sqrt(sa ** 2 / n + sb ** 2 / n)
    return ma - mb, se, abs(ma - mb) < 2 * se


def said(results, a: str, b: str, metric: str) -> str:
    d, se, noise = compare(results, a, b, metric)
    where = "within seed noise" if noise else "outside seed noise"
    return f"{d:+.3f} (± {se:.3f}, {where})"


# --- figures -------------------------------------------------------------------------------------

def figures(results: dict, plt) -> None:
    colors = {"digits-bp": "tab:orange", "digits-bp-dropout": "tab:red", "digits-bp-wd": "tab:brown",
              "digits-sideways": "tab:blue", "digits-sideways-smooth": "tab:cyan"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, color in colors.items():
        runs = results[name]
        epochs = [e["epoch"] for e in runs[0]["epochs"]]
        for ax, key in zip(axes, ("train_acc", "val_acc", "val_nll")):
            series = [[e[key] for e in r["epochs"]] for r in runs]
            mean = [statistics.mean(v) for v in zip(*series)]
            sd = [statistics.stdev(v) for v in zip(*series)]
            ax.plot(epochs, mean, color=color, label=BY_NAME[name].label)
            ax.fill_between(epochs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=color,
                            alpha=0.15)
    for ax, title in zip(axes, ("training accuracy", "validation accuracy", "validation NLL")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("Moving digits, 192 training videos (mean ± sd over 3 seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "digits_curves.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(colors), figsize=(3.2 * len(colors), 3.4), sharey=True)
    for ax, name in zip(axes, colors):
        bins = [r["epochs"][-1]["val_bins"] for r in results[name]]
        pooled = []
        for b in zip(*bins):  # a bin's count-weighted accuracy and confidence over the seeds
            n = sum(x[0] for x in b)
            pooled.append((n, sum(x[0] * x[1] for x in b) / n if n else float("nan"),
                           sum(x[0] * x[2] for x in b) / n if n else float("nan")))
        width = 1 / len(pooled)
        centres = [(i + 0.5) * width for i in range(len(pooled))]
        ax.bar(centres, [p[1] if p[0] else 0 for p in pooled], width=width * 0.9, color="tab:blue", alpha=0.7,
               label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        ax.plot([p[2] for p in pooled if p[0]], [p[1] for p in pooled if p[0]], "o", color="tab:red", ms=3,
                label="(confidence, accuracy)")
        m, _ = stats(results, name, "val ECE")
        ax.set_title(f"{BY_NAME[name].label}\nECE {m:.3f}", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Reliability of the validation predictions after 30 epochs (15 bins, 3 seeds pooled)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "digits_reliability.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    pairs = [("BP", "digits-bp", "shuffled-bp"), ("Sideways", "digits-sideways", "shuffled-sideways"),
             ("Sideways, smoothing 3", "digits-sideways-smooth", "shuffled-sideways-smooth")]
    for i, (label, ordered, shuffled) in enumerate(pairs):
        for j, (name, hatch) in enumerate(((ordered, ""), (shuffled, "//"))):
            m, s = stats(results, name, "final val acc")
            ax.bar(i + (j - 0.5) * 0.35, m, 0.35, yerr=s, capsize=3, hatch=hatch,
                   color=["tab:orange", "tab:blue", "tab:cyan"][i], alpha=0.8,
                   label=("ordered frames" if j == 0 else "shuffled frames") if i == 0 else None)
    ax.set_xticks(range(len(pairs)))
    ax.set_xticklabels([p[0] for p in pairs])
    ax.set_ylabel("final validation accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "digits_shuffled.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for mode, color in (("sideways", "tab:blue"), ("bp", "tab:orange")):
        for r in results[f"motion-{mode}-stride1"]:
            e = r["epochs"]
            kw = dict(color=color, alpha=0.8, label=mode if r["seed"] == 0 else None)
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
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    strides = (1, 2, 4)
    for mode, color in (("sideways", "tab:blue"), ("bp", "tab:orange")):
        accs = [stats(results, f"motion-{mode}-stride{k}", "final val acc") for k in strides]
        ax.errorbar(strides, [a[0] for a in accs], yerr=[a[1] for a in accs], marker="o", capsize=4, color=color,
                    label=mode)
    ax.set_xlabel("--frame-stride (video change per tick)")
    ax.set_ylabel("final validation accuracy")
    ax.set_xticks(strides)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "accuracy_vs_stride.png"), dpi=110)
    plt.close(fig)


# --- the page ------------------------------------------------------------------------------------

def table(results, names, metrics, label=lambda n: BY_NAME[n].label) -> list[str]:
    lines = ["| | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name in names:
        lines.append(f"| {label(name)} | " + " | ".join(cell(results, name, m) for m in metrics) + " |")
    return lines


def page(results: dict) -> str:
    import torch
    R = results
    digits = ["digits-bp", "digits-bp-dropout", "digits-bp-wd", "digits-sideways", "digits-sideways-smooth"]
    main = ["final val acc", "best val acc", "train acc", "train − val gap"]
    calib = ["val NLL", "val ECE", "confidence when wrong", "step-loss sd"]
    gap_s, gap_b = stats(R, "digits-sideways", "train − val gap")[0], stats(R, "digits-bp", "train − val gap")[0]
    val_cmp = compare(R, "digits-sideways", "digits-bp", "final val acc")
    claim = ("Sideways validates better than BP" if val_cmp[0] > 0 and not val_cmp[2] else
             "Sideways validates worse than BP" if val_cmp[0] < 0 and not val_cmp[2] else
             "Sideways and BP validate alike (the difference is within seed noise)")
    best_reg = max(("digits-bp-dropout", "digits-bp-wd"), key=lambda n: stats(R, n, "final val acc")[0])
    shuffle_drop = {n: stats(R, f"digits-{n}", "final val acc")[0] - stats(R, f"shuffled-{n}", "final val acc")[0]
                    for n in ("bp", "sideways", "sideways-smooth")}
    lines = [
        "# Sideways vs backprop: generalisation, calibration, and what it needs from the video",
        "",
        f"Generated by `python docs/report.py` on {__import__('datetime').date.today()} (2-core CPU, "
        f"torch {torch.__version__}, each run one `sideways-train` process with one thread; runs under "
        "`runs/report/`). Three seeds per configuration; mean ± sd over seeds. \"Within seed noise\": the "
        "difference of two means is less than twice its standard error — with three seeds, a rough guide, not a "
        "test. BP and Sideways run through the very same pipeline (`mode=\"bp\"` or `\"sideways\"`), so the only "
        "difference is the Sideways pairing of each error with a later frame's activation.",
        "",
        "## 1. Does Sideways generalise better? (the paper's claim)",
        "",
        "An overfitting regime on real data: `sideways-train --dataset digits` makes Moving-MNIST-style videos "
        "from the 1,797 real 8×8 handwritten digits scikit-learn ships (one digit, upscaled, bouncing with a "
        "random velocity on a 32×32 canvas; class = the digit, so appearance is the signal and motion a "
        "nuisance; 8-frame clips). The digit images are split 80/20 once, so validation digits were never seen "
        "in training. 192 training videos, 320 validation videos, `mc3_18` at width 16 (its torchvision layout: "
        "residual blocks, BatchNorm per frame) in 3 stages, SGD (momentum 0.9, lr 0.05, cosine), weight decay "
        "1e-4, 30 epochs, batch 16. Command per run: `sideways-train " + " ".join(DIGITS) + " --mode bp|sideways "
        "[--dropout 0.5 | --weight-decay 5e-3 | --smoothing 3] --seed S`.",
        "",
        *table(R, digits, main),
        "",
        "![train and validation accuracy, validation NLL](digits_curves.png)",
        "",
        f"- **{claim}.** Sideways − BP, final validation accuracy: "
        f"{said(R, 'digits-sideways', 'digits-bp', 'final val acc')}; train − validation gap: Sideways "
        f"{gap_s:.3f} vs BP {gap_b:.3f} ({said(R, 'digits-sideways', 'digits-bp', 'train − val gap')}); "
        f"training accuracy {said(R, 'digits-sideways', 'digits-bp', 'train acc')}.",
        "",
        "## 2. Calibration: is Sideways over-confident when wrong?",
        "",
        *table(R, digits, calib),
        "",
        "![reliability diagrams](digits_reliability.png)",
        "",
        f"- Sideways − BP: validation NLL {said(R, 'digits-sideways', 'digits-bp', 'val NLL')}, expected "
        f"calibration error {said(R, 'digits-sideways', 'digits-bp', 'val ECE')}, mean confidence on wrong "
        f"predictions {said(R, 'digits-sideways', 'digits-bp', 'confidence when wrong')}.",
        f"- The spread of the per-step training loss (sd over an epoch's steps, last epoch): Sideways − BP "
        f"{said(R, 'digits-sideways', 'digits-bp', 'step-loss sd')}.",
        "",
        "## 3. Against regularised BP",
        "",
        f"- BP + dropout − Sideways, final validation accuracy: "
        f"{said(R, 'digits-bp-dropout', 'digits-sideways', 'final val acc')}; BP + weight decay − Sideways: "
        f"{said(R, 'digits-bp-wd', 'digits-sideways', 'final val acc')}. The better regulariser here is "
        f"{BY_NAME[best_reg].label.replace('BP + ', '')} ({said(R, best_reg, 'digits-bp', 'final val acc')} over "
        "plain BP).",
        "",
        "## 4. What Sideways needs from the video: shuffled frames, and smoothing",
        "",
        "The same runs with `--shuffle-frames` (each clip's frames in a random order: the class, a digit's "
        "appearance, is still in every frame, but consecutive frames no longer resemble each other), and "
        "Sideways with `--smoothing 3` (`SidewaysPipeline(smoothing=3)`: each weight update pairs the mean of the "
        "last 3 errors with the mean of the last 3 input windows, the write-up's averaging idea).",
        "",
        *table(R, ["digits-bp", "digits-sideways", "digits-sideways-smooth"], ["final val acc", "train acc", "val ECE"],
               label=lambda n: BY_NAME[n].label + ", ordered"),
        *table(R, ["shuffled-bp", "shuffled-sideways", "shuffled-sideways-smooth"],
               ["final val acc", "train acc", "val ECE"], label=lambda n: BY_NAME[n].label + ", shuffled")[2:],
        "",
        "![ordered vs shuffled frames](digits_shuffled.png)",
        "",
        f"- Shuffling costs BP {shuffle_drop['bp']:+.3f} and Sideways {shuffle_drop['sideways']:+.3f} of final "
        f"validation accuracy (ordered − shuffled); Sideways − BP on shuffled frames: "
        f"{said(R, 'shuffled-sideways', 'shuffled-bp', 'final val acc')}.",
        f"- Smoothing 3 − plain Sideways, final validation accuracy: ordered "
        f"{said(R, 'digits-sideways-smooth', 'digits-sideways', 'final val acc')}, shuffled "
        f"{said(R, 'shuffled-sideways-smooth', 'shuffled-sideways', 'final val acc')}.",
        "",
        "## 5. The embedded motion task",
        "",
        "The default `sideways-train` run (C3D-like chain of widths 16/32/64 in 3 stages, 640 training and 320 "
        "validation procedural videos whose class is their motion, 8-frame clips of 32×32, 20 epochs), at frame "
        "strides 1, 2 and 4 (every s-th frame kept: the video changes s times faster per tick).",
        "",
        "| mode | frame stride | final val acc | best val acc | train − val gap | val ECE | frames/s (1 thread, shared machine) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in (1, 2, 4):
        for mode in ("sideways", "bp"):
            n = f"motion-{mode}-stride{k}"
            fps = statistics.mean(r["frames_per_s"] for r in R[n])
            lines.append(f"| {mode} | {k} | {cell(R, n, 'final val acc')} | {cell(R, n, 'best val acc')} | "
                         f"{cell(R, n, 'train − val gap')} | {cell(R, n, 'val ECE')} | {fps:.0f} |")
    lines += [
        "",
        "![validation accuracy, train-validation gap and loss, stride 1](sideways_vs_bp.png)",
        "",
        "![final validation accuracy vs frame stride](accuracy_vs_stride.png)",
        "",
        "- Sideways − BP, final validation accuracy: " + "; ".join(
            f"stride {k} {said(R, f'motion-sideways-stride{k}', f'motion-bp-stride{k}', 'final val acc')}"
            for k in (1, 2, 4)) + ".",
        "",
        "A converted standard network on the same task: `models.r2plus1d_18` at width 8 (residual blocks, "
        "temporal strides, per-frame BatchNorm, a pooled head), cut into 4 stages by "
        "`SidewaysPipeline.from_model` (`sideways-train " + " ".join(R2) + " --mode bp|sideways`).",
        "",
        *table(R, ["r2plus1d-bp", "r2plus1d-sideways"], main + ["val ECE"]),
        "",
        f"- Sideways − BP with r2plus1d_18, final validation accuracy: "
        f"{said(R, 'r2plus1d-sideways', 'r2plus1d-bp', 'final val acc')}. Its temporal lag is 54 frames, so with "
        "8-frame clips its slower layers see the clip's end padding for most ticks and every error is paired "
        "with the state the clip left behind.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    os.makedirs(RUNS, exist_ok=True)
    jobs = [(c, s) for c in CONFIGS for s in SEEDS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        done = list(pool.map(lambda job: run(*job), jobs))
    results = {c.name: [r for r in done if r["config"] == c.name] for c in CONFIGS}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figures(results, plt)
    text = page(results)
    discussion = os.path.join(HERE, "report_discussion.md")  # the reading of the numbers, by a person
    if os.path.exists(discussion):
        text += "\n" + open(discussion).read()
    with open(os.path.join(HERE, "REPORT.md"), "w") as f:
        f.write(text)
    print(f"wrote {os.path.join(HERE, 'REPORT.md')}")


if __name__ == "__main__":
    main()
