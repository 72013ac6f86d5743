"""Runs every experiment behind docs/REPORT.md, draws its figures and writes it.

    python docs/report.py            # every run from scratch: see the time REPORT.md states; finished runs are reused
    python docs/report.py --render   # no run: REPORT.md and its figures again from the runs there are

Each run is one ``sideways-train`` subprocess with one thread, as many at a time as there are
cores; its directory (metrics.jsonl, curves.png, checkpoints, train.log, summary.json) stays under
runs/report/. A run is reused when its summary.json names the same command line and the same library
sources (`code_version`), else run again — into a new directory that replaces the old one only
when it has finished, so an interrupted generation loses no run. ``--render`` runs nothing: it
writes the page from the runs as they are, whatever code made them, and says which code that was
(for a change to this script or the template; a change to the library needs the runs again).
Three seeds per configuration; tables give mean ± sd over the seeds, and every comparison in
the text is computed here, with "within seed noise" meaning the difference of the means is less
than twice its standard error (sqrt(sd_a²/n + sd_b²/n)).

Experiments:
- digits (overfitting regime): moving real handwritten digits, 192 training videos (validation
  digits never seen in training), mc3_18 at width 16 with per-frame BatchNorm and 'same' temporal
  padding, 30 epochs — BP, BP + dropout 0.5, BP + weight decay 5e-3, Sideways, Sideways with
  smoothing 3;
- shuffled frames: the same with every clip's frames in random order — BP, Sideways, Sideways
  with smoothing 3;
- motion (the embedded procedural data, the default run): C3D-like chain, BP and Sideways at
  frame strides 1, 2, 4;
- converted standard networks on both datasets: r2plus1d_18 on 16-frame clips with 'same'
  temporal padding (lag 54: the clip is shorter than the lag) and causal (lag 7), mc3_18 causal on
  16 frames (lag 0: no temporal stride) and with 'same' padding on clips of 4x its lag — BP and
  Sideways each; causal r2plus1d_18 on digits again with 3x the epochs; and a gradient probe
  (`alignment`, no training: seconds) — the cosine between Sideways' and BP's weight gradient per
  stage at the weights BP trained, on digits moving at several speeds and on motion.

The discussion (the last section) is docs/report_discussion.md, a template: every number in it
is a {placeholder} filled from the runs below (a decimal typed into the template is refused), and
every verdict word that depends on a number ("within seed noise", "better", ...) is one too.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import functools
import glob
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNS = os.path.join(ROOT, "runs", "report")
SEEDS = (0, 1, 2)
CHANCE = 0.1  # both datasets have 10 classes

DIGITS = ["--dataset", "digits", "--model", "mc3_18", "--width", "16", "--stages", "3", "--train-videos", "192",
          "--val-videos", "320", "--epochs", "30", "--log-every", "2", "--temporal-padding", "same"]

# the converted standard networks (section 6)
STD_WIDTH, STD_SIZE, STD_EPOCHS, STD_VIDEOS = 8, 32, 10, 640
STD = ["--width", str(STD_WIDTH), "--size", str(STD_SIZE), "--stages", "4", "--train-videos", str(STD_VIDEOS),
       "--val-videos", "320", "--epochs", str(STD_EPOCHS), "--log-every", "5"]
STD_DATASETS = ("motion", "digits")
SHORT_CLIP = 16  # the clip length a user would pick
# (datasets, network, temporal padding, clip; None: LONG_FACTOR x the 'same' lag). r2plus1d_18 'same' on
# 16 frames (clip < lag: Sideways at chance before causal padding) only on motion: its 70-odd ticks a clip
# make it the costliest run here
STD_SETTINGS = [(("motion",), "r2plus1d_18", "same", SHORT_CLIP), (STD_DATASETS, "r2plus1d_18", "causal", SHORT_CLIP),
                (STD_DATASETS, "mc3_18", "causal", SHORT_CLIP), (STD_DATASETS, "mc3_18", "same", None)]
LONG_FACTOR = 4
# (dataset, network, temporal padding, clip, epochs): a setting of section 6 trained longer, to tell a
# slower start from a worse end
STD_LONGER = [("digits", "r2plus1d_18", "causal", SHORT_CLIP, 3 * STD_EPOCHS)]
# the gradient-alignment probe of section 6: which network and setting, how many training clips
ALIGN_MODEL, ALIGN_PADDING, ALIGN_BATCHES = "r2plus1d_18", "causal", 4
ALIGN_DIGIT_SPEEDS = (0.0, 0.5)  # still and slow, beside the dataset's own (MovingDigits' default)
# (dataset, network, temporal padding, clip, digits' px/frame): the digits setting of section 6 with the
# probe's slower digits, to tell whether Sideways' gap there follows the digits' speed (a layer pairs
# activations and errors of frames apart)
STD_SLOWER = [("digits", "r2plus1d_18", "causal", SHORT_CLIP, speed) for speed in ALIGN_DIGIT_SPEEDS]
FIT_LEVEL = 0.99


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    label: str
    args: tuple


@functools.lru_cache(maxsize=None)
def network_facts(model: str) -> dict:
    """What the text says about a standard network, computed from it: the lags of its pipeline
    under both temporal paddings, its convs with a temporal kernel, and how many of those stride."""
    sys.path.insert(0, ROOT)
    import torch.nn as nn
    from sideways_kernels import models, train
    net = models.GRAPHS[model](10, width=STD_WIDTH)
    temporal = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.kernel_size[0] > 1]
    lags = train.network_lags(net, dict(model=model, batchnorm="frame"))
    return dict(lag_same=lags["same"], lag_causal=lags["causal"], temporal_convs=len(temporal),
                kernels=sorted({m.kernel_size[0] for m in temporal}),
                strided=sum(m.stride[0] > 1 for m in temporal))


def alignment(dataset: str, speed=None, seed: int = 0) -> list[float]:
    """How far Sideways' weight gradient is from BP's, stage by stage: the cosine between the two
    (every parameter of the stage, one vector), each the clip gradient ``backward_clip`` leaves,
    at the same weights (those BP trained in section 6's run of ``ALIGN_MODEL`` on ``dataset``,
    seed ``seed``) on the same training clips; mean over ``ALIGN_BATCHES`` batches of 16.
    ``speed``: the digits' pixels per frame (None: the dataset's own)."""
    sys.path.insert(0, ROOT)
    import torch
    import torch.nn.functional as F
    from sideways_kernels import SidewaysPipeline, data, train
    trained = run_dir(BY_NAME[std_name(dataset, ALIGN_MODEL, ALIGN_PADDING, SHORT_CLIP, "bp")], seed)
    checkpoint = torch.load(os.path.join(trained, "last.pt"), map_location="cpu", weights_only=False)
    cfg = checkpoint["config"]
    net = train.build_model(cfg, len(checkpoint["classes"]))
    net.load_state_dict(checkpoint["model"])
    common = dict(clip_len=cfg["clip_len"], size=cfg["size"], seed=cfg["seed"] * 2 + 1000)  # its training videos
    n = 16 * ALIGN_BATCHES
    if dataset == "digits":
        videos = data.MovingDigits(n, "train", **common, **({} if speed is None else dict(speed=speed)))
    else:
        videos = data.MovingTextures(n, **common)
    batches = list(torch.utils.data.DataLoader(videos, batch_size=16))
    pipes = {mode: SidewaysPipeline.from_model(net, cfg["stages"], F.cross_entropy, mode, batchnorm=cfg["batchnorm"],
                                               temporal_padding=cfg["temporal_padding"], example=batches[0][0][:1])
             for mode in ("bp", "sideways")}
    cosines = [[] for _ in range(cfg["stages"])]
    for video, label in batches:
        grads = {}
        for mode, pipe in pipes.items():
            net.zero_grad(set_to_none=True)
            pipe.backward_clip(video, label)
            grads[mode] = [torch.cat([p.grad.flatten().double() for p in stage.parameters() if p.grad is not None])
                           for stage in pipe.stages]
        for k, (a, b) in enumerate(zip(grads["bp"], grads["sideways"])):
            cosines[k].append(float(a @ b / (a.norm() * b.norm())))
    return [statistics.mean(c) for c in cosines]


def _own_speed() -> float:
    """MovingDigits' own px/frame (``--digit-speed``'s default)."""
    sys.path.insert(0, ROOT)
    from sideways_kernels import data
    return data.DIGIT_SPEED


def alignments() -> dict:
    """The probe's rows: digits at ``ALIGN_DIGIT_SPEEDS`` (still, then slow) and at their own
    speed, and motion; ``by``: the same cosines by role, for the discussion."""
    own = _own_speed()
    still, slow = (alignment("digits", s) for s in ALIGN_DIGIT_SPEEDS)
    by = dict(still=still, slow=slow, own=alignment("digits"), motion=alignment("motion"))
    rows = {f"digits, {ALIGN_DIGIT_SPEEDS[0]:g} px/frame": still, f"digits, {ALIGN_DIGIT_SPEEDS[1]:g} px/frame": slow,
            f"digits, {own:g} px/frame (the dataset's)": by["own"], "motion (the dataset's)": by["motion"]}
    return dict(rows=rows, by=by, own_speed=own)


def std_clip(model: str, padding: str, clip) -> int:
    return clip if clip is not None else LONG_FACTOR * network_facts(model)["lag_same"]


def std_settings(dataset: str) -> list:
    return [(model, padding, clip) for datasets, model, padding, clip in STD_SETTINGS if dataset in datasets]


def std_name(dataset: str, model: str, padding: str, clip: int, mode: str, epochs: int = STD_EPOCHS,
             speed=None) -> str:
    return (f"std-{dataset}-{model}-{padding}{clip}-" + (f"e{epochs}-" if epochs != STD_EPOCHS else "")
            + (f"speed{speed:g}-" if speed is not None else "") + mode)


def std_config(dataset: str, model: str, padding: str, clip: int, mode: str, epochs: int = STD_EPOCHS,
               speed=None) -> Config:
    """One run of section 6: STD's command (for ``epochs``, and the digits at ``speed`` px/frame
    where given) on this setting; Sideways on a clip no longer than the 'same' lag gets
    ``--allow-short-clips``."""
    args = list(STD)
    args[args.index("--epochs") + 1] = str(epochs)
    allow = ["--allow-short-clips"] if mode == "sideways" and padding == "same" and \
        clip <= network_facts(model)["lag_same"] else []
    slower = ["--digit-speed", f"{speed:g}"] if speed is not None else []
    return Config(std_name(dataset, model, padding, clip, mode, epochs, speed), "BP" if mode == "bp" else "Sideways",
                  tuple(args + ["--dataset", dataset, "--model", model, "--clip-len", str(clip),
                                "--temporal-padding", padding, "--mode", mode, *allow, *slower]))


def _std_configs() -> list:
    settings = [(dataset, model, padding, std_clip(model, padding, clip), STD_EPOCHS, None)
                for dataset in STD_DATASETS for model, padding, clip in std_settings(dataset)]
    settings += [(*setting, None) for setting in STD_LONGER]
    settings += [(*setting[:4], STD_EPOCHS, setting[4]) for setting in STD_SLOWER]
    return [std_config(*setting[:4], mode, *setting[4:]) for setting in settings for mode in ("bp", "sideways")]


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
    *_std_configs(),
]
BY_NAME = {c.name: c for c in CONFIGS}


def _cost(config: Config) -> float:
    """A rough relative cost (longest first keeps both cores busy to the end)."""
    a = list(config.args)
    clip = int(a[a.index("--clip-len") + 1]) if "--clip-len" in a else 8
    model = a[a.index("--model") + 1] if "--model" in a else "c3d"
    lag = network_facts(model)["lag_same"] if model in ("r2plus1d_18", "mc3_18") and "same" in a else 0
    epochs = int(a[a.index("--epochs") + 1]) if "--epochs" in a else 20
    videos = int(a[a.index("--train-videos") + 1]) if "--train-videos" in a else 640
    return epochs * videos * (clip + lag) * (3 if model == "mc3_18" else 1)


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """A hash of the library's sources (Python and C++): a run is reused only by the code that
    made it, so a fix to training cannot be reported with runs of the code before it."""
    h = hashlib.sha256()
    for pattern in ("sideways_kernels/**/*.py", "csrc/**/*.*"):
        for path in sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True)):
            h.update(os.path.relpath(path, ROOT).encode())
            h.update(open(path, "rb").read())
    return h.hexdigest()[:16]


def run_dir(config: Config, seed: int) -> str:
    return os.path.join(RUNS, f"{config.name}-seed{seed}")


def run(config: Config, seed: int) -> dict:
    out = run_dir(config, seed)
    summary = os.path.join(out, "summary.json")
    command = [*config.args, "--seed", str(seed)]
    if os.path.exists(summary):
        result = json.load(open(summary))
        if result.get("args") == command and result.get("code") == code_version():
            result["reused"] = True
            return result
    code = code_version()  # of the code that runs now
    fresh = out + ".new"  # replaces ``out`` once finished: an interrupted run leaves the last one as it was
    if os.path.exists(fresh):
        shutil.rmtree(fresh)
    os.makedirs(fresh)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = time.time()
    with open(os.path.join(fresh, "train.log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sideways_kernels.train", *command, "--out", fresh],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{fresh}: exit status {status} (see {os.path.join(fresh, 'train.log')})")
    records = [json.loads(line) for line in open(os.path.join(fresh, "metrics.jsonl"))]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = [r for r in records if r["kind"] == "step"]
    result = dict(config=config.name, seed=seed, args=command, code=code, epochs=epochs, steps=steps,
                  peak_rss_mib=usage.ru_maxrss / 1024, wall_s=time.time() - started,
                  cpu_s=usage.ru_utime + usage.ru_stime,
                  frames_per_s=statistics.median(r["frames_per_s"] for r in steps))
    json.dump(result, open(os.path.join(fresh, "summary.json"), "w"))
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(fresh, out)
    print(f"{config.name} seed {seed}: val acc {epochs[-1]['val_acc']:.3f} ({result['wall_s']:.0f}s)", flush=True)
    result["reused"] = False
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


def noise_word(results, a, b, metric) -> str:
    return "within seed noise" if compare(results, a, b, metric)[2] else "outside seed noise"


def said(results, a: str, b: str, metric: str) -> str:
    d, se, noise = compare(results, a, b, metric)
    return f"{d:+.3f} (± {se:.3f}, {noise_word(results, a, b, metric)})"


def pooled_bins(results, name) -> list:
    """The reliability diagram of ``name``'s last epoch, the seeds pooled: (count, accuracy,
    confidence) per bin, count-weighted."""
    bins = [r["epochs"][-1]["val_bins"] for r in results[name]]
    pooled = []
    for b in zip(*bins):
        n = sum(x[0] for x in b)
        pooled.append((n, sum(x[0] * x[1] for x in b) / n if n else float("nan"),
                       sum(x[0] * x[2] for x in b) / n if n else float("nan")))
    return pooled


def below_diagonal(results, name) -> tuple[int, int]:
    """(occupied bins whose accuracy is below their confidence, occupied bins)."""
    occupied = [p for p in pooled_bins(results, name) if p[0]]
    return sum(p[1] < p[2] for p in occupied), len(occupied)


def mean_curve(results, name, key) -> list:
    return [statistics.mean(v) for v in zip(*[[e[key] for e in r["epochs"]] for r in results[name]])]


def first_epoch_at(results, name, key, level) -> str:
    curve = mean_curve(results, name, key)
    return next((str(i + 1) for i, v in enumerate(curve) if v >= level), "never")


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
    fig.suptitle(f"Moving digits, 192 training videos (mean ± sd over {len(SEEDS)} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "digits_curves.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(colors), figsize=(3.2 * len(colors), 3.4), sharey=True)
    for ax, name in zip(axes, colors):
        pooled = pooled_bins(results, name)
        width = 1 / len(pooled)
        centres = [(i + 0.5) * width for i in range(len(pooled))]
        ax.bar(centres, [p[1] if p[0] else 0 for p in pooled], width=width * 0.9, color="tab:blue", alpha=0.7,
               label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        ax.plot([p[2] for p in pooled if p[0]], [p[1] for p in pooled if p[0]], "o", color="tab:red", ms=3,
                label="(confidence, accuracy)")
        m, _ = stats(results, name, "val ECE")
        below, occupied = below_diagonal(results, name)
        ax.set_title(f"{BY_NAME[name].label}\nECE {m:.3f}; {below}/{occupied} bins below", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Reliability of the validation predictions after 30 epochs (15 bins, {len(SEEDS)} seeds pooled)",
                 fontsize=10)
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

    fig, axes = plt.subplots(1, len(STD_DATASETS), figsize=(6.5 * len(STD_DATASETS), 3.8), sharey=True)
    for ax, dataset in zip(axes, STD_DATASETS):
        labels = []
        for i, (model, padding, clip) in enumerate(std_settings(dataset)):
            clip = std_clip(model, padding, clip)
            labels.append(f"{model}\n{padding}, {clip} frames")
            for j, (mode, color) in enumerate((("bp", "tab:orange"), ("sideways", "tab:blue"))):
                m, s = stats(results, std_name(dataset, model, padding, clip, mode), "final val acc")
                ax.bar(i + (j - 0.5) * 0.35, m, 0.35, yerr=s, capsize=3, color=color, alpha=0.85,
                       label=("BP" if mode == "bp" else "Sideways") if i == 0 else None)
        ax.axhline(CHANCE, color="k", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(f"--dataset {dataset}")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("final validation accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Converted standard networks (width {STD_WIDTH}), mean ± sd over {len(SEEDS)} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "standard_networks.png"), dpi=110)
    plt.close(fig)


# --- the page ------------------------------------------------------------------------------------

def table(results, names, metrics, label=lambda n: BY_NAME[n].label) -> list[str]:
    lines = ["| | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name in names:
        lines.append(f"| {label(name)} | " + " | ".join(cell(results, name, m) for m in metrics) + " |")
    return lines


DIGITS_RUNS = ["digits-bp", "digits-bp-dropout", "digits-bp-wd", "digits-sideways", "digits-sideways-smooth"]


def std_section(R, probe: dict) -> list[str]:
    lines = [
        "## 6. Converted standard networks at a clip length a user would pick",
        "",
        f"`models.r2plus1d_18` and `models.mc3_18` (torchvision's layouts) at width {STD_WIDTH}, per-frame "
        f"BatchNorm, cut into 4 stages by `SidewaysPipeline.from_model`, {STD_SIZE}×{STD_SIZE} frames, "
        f"{STD_VIDEOS} training and 320 validation videos, {STD_EPOCHS} epochs of batch 16 "
        f"({STD_EPOCHS * math.ceil(STD_VIDEOS / 16)} steps), SGD (momentum 0.9, lr 0.05, cosine), weight decay 1e-4, on "
        "both datasets (digits: one moving digit per video, class = the digit; motion: class = the "
        "motion). Validation scores the function each run trained: with causal padding, the pipeline's stages "
        "run offline on the clip (`model(video)` is the 'same' function). Command per run: `sideways-train "
        + " ".join(STD) + " --dataset D --model M --clip-len T --temporal-padding same|causal --mode bp|sideways "
        "[--allow-short-clips] --seed S` (`--allow-short-clips`: Sideways on a clip no longer than the lag, which "
        "`sideways-train` refuses without it).",
        "",
        "| network | convs with a temporal kernel (k_t) | of them temporally strided | lag, 'same' | lag, causal |",
        "|---|---|---|---|---|",
    ]
    for model in ("r2plus1d_18", "mc3_18"):
        f = network_facts(model)
        lines.append(f"| {model} | {f['temporal_convs']} ({', '.join(map(str, f['kernels']))}) | {f['strided']} | "
                     f"{f['lag_same']} | {f['lag_causal']} |")
    lines += ["", "The lags are `SidewaysPipeline.lags` (input frames a frame's output is late: each 'same'-padded "
              "temporal conv at rate r adds r·p).", ""]
    for dataset in STD_DATASETS:
        lines += [f"**--dataset {dataset}**", "",
                  "| network | temporal padding | clip | clip / lag | mode | final val acc | best val acc | train acc |"
                  " val ECE |", "|---|---|---|---|---|---|---|---|---|"]
        for model, padding, clip in std_settings(dataset):
            clip = std_clip(model, padding, clip)
            lag = network_facts(model)["lag_same" if padding == "same" else "lag_causal"]
            ratio = f"{clip / lag:.1f}" if lag else "∞ (lag 0)"
            for mode in ("bp", "sideways"):
                n = std_name(dataset, model, padding, clip, mode)
                lines.append(f"| {model} | {padding} | {clip} | {ratio} | {BY_NAME[n].label} | "
                             + " | ".join(cell(R, n, m) for m in ("final val acc", "best val acc", "train acc",
                                                                    "val ECE")) + " |")
        lines.append("")
        bullets = []
        for model, padding, clip in std_settings(dataset):
            clip = std_clip(model, padding, clip)
            sw, bp = (std_name(dataset, model, padding, clip, m) for m in ("sideways", "bp"))
            bullets.append(f"{model}, {padding}, {clip} frames: final {said(R, sw, bp, 'final val acc')}, best "
                           f"{said(R, sw, bp, 'best val acc')}")
        lines += ["- Sideways − BP, validation accuracy (final with final, best with best): " + "; ".join(bullets)
                  + ".", ""]
    lines += ["![final validation accuracy, standard networks](standard_networks.png)", ""]
    for dataset, model, padding, clip, epochs in STD_LONGER:
        lines += [f"**Trained {epochs // STD_EPOCHS}× longer** (--dataset {dataset}, {model}, {padding}, {clip} frames, "
                  f"`--epochs {epochs}`, the rest as above)", "",
                  "| mode | final val acc | best val acc | train acc | val ECE |", "|---|---|---|---|---|"]
        sw, bp = (std_name(dataset, model, padding, clip, m, epochs) for m in ("sideways", "bp"))
        for n in (bp, sw):
            lines.append(f"| {BY_NAME[n].label} | " + " | ".join(
                cell(R, n, m) for m in ("final val acc", "best val acc", "train acc", "val ECE")) + " |")
        lines += ["", f"- Sideways − BP: final validation accuracy {said(R, sw, bp, 'final val acc')}, training "
                  f"accuracy {said(R, sw, bp, 'train acc')}.", ""]
    lines += [f"**Slower digits** (--dataset digits, {STD_SLOWER[0][1]}, {STD_SLOWER[0][2]}, {STD_SLOWER[0][3]} "
              f"frames, `--epochs {STD_EPOCHS}`, the digits moving at `--digit-speed` px/frame instead of the "
              f"dataset's {_own_speed():g}; the rest as above)", "",
              "| px/frame | mode | final val acc | best val acc | train acc | val ECE |", "|---|---|---|---|---|---|"]
    differences = []
    for dataset, model, padding, clip, speed in STD_SLOWER:
        sw, bp = (std_name(dataset, model, padding, clip, mode, speed=speed) for mode in ("sideways", "bp"))
        for n in (bp, sw):
            lines.append(f"| {speed:g} | {BY_NAME[n].label} | " + " | ".join(
                cell(R, n, m) for m in ("final val acc", "best val acc", "train acc", "val ECE")) + " |")
        differences.append(f"at {speed:g} px/frame final validation accuracy {said(R, sw, bp, 'final val acc')}, "
                           f"training accuracy {said(R, sw, bp, 'train acc')}")
    lines += ["", "- Sideways − BP: " + "; ".join(differences) + ".", ""]
    stages = len(next(iter(probe["rows"].values())))
    lines += [f"**Where Sideways' gradient points.** The cosine between Sideways' and BP's clip weight gradient "
              f"of each stage (all its parameters as one vector), at the weights BP trained ({ALIGN_MODEL}, "
              f"{ALIGN_PADDING}, {SHORT_CLIP} frames, seed 0's last checkpoint above), on {ALIGN_BATCHES} batches of "
              "16 of that run's training videos (`alignment()` in docs/report.py); 1 would be BP's direction, 0 "
              "orthogonal to it. The digits rows are the same videos with the digits moving at other speeds "
              "(`MovingDigits(speed=...)`).", "",
              "| videos | " + " | ".join(f"stage {k + 1}" for k in range(stages)) + " |",
              "|---|" + "---|" * stages]
    for row, cosines in probe["rows"].items():
        lines.append(f"| {row} | " + " | ".join(f"{c:.2f}" for c in cosines) + " |")
    lines.append("")
    return lines


def page(results: dict, timing: dict, probe: dict) -> str:
    import torch
    R = results
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
        f"Generated by `{timing['command']}` on {datetime.date.today()} ({os.cpu_count()}-core CPU shared with "
        f"other work, torch {torch.__version__}, each run one `sideways-train` process with one thread, "
        f"{os.cpu_count()} at a time; runs under `runs/report/`). {timing['line']} {len(SEEDS)} seeds per "
        "configuration; mean ± sd over seeds. \"Within seed noise\": the difference of two means is less than "
        "twice its standard error — with three seeds, a rough guide, not a test. BP and Sideways run through the "
        "very same pipeline (`mode=\"bp\"` or `\"sideways\"`), so the only difference is the Sideways pairing of "
        "each error with a later frame's activation.",
        "",
        "## 1. Does Sideways generalise better? (the paper's claim)",
        "",
        "An overfitting regime on real data: `sideways-train --dataset digits` makes Moving-MNIST-style videos "
        "from the 1,797 real 8×8 handwritten digits scikit-learn ships (one digit, upscaled, bouncing with a "
        "random velocity on a 32×32 canvas; class = the digit, so appearance is the signal and motion a "
        "nuisance; 8-frame clips). The digit images are split 80/20 once, so validation digits were never seen "
        "in training. 192 training videos, 320 validation videos, `mc3_18` at width 16 (its torchvision layout: "
        "residual blocks, BatchNorm per frame; 'same' temporal padding, lag "
        f"{network_facts('mc3_18')['lag_same']}) in 3 stages, SGD (momentum 0.9, lr 0.05, cosine), weight decay "
        "1e-4, 30 epochs, batch 16. Command per run: `sideways-train " + " ".join(DIGITS) + " --mode bp|sideways "
        "[--dropout 0.5 | --weight-decay 5e-3 | --smoothing 3] --seed S`.",
        "",
        *table(R, DIGITS_RUNS, main),
        "",
        "![train and validation accuracy, validation NLL](digits_curves.png)",
        "",
        f"- **{claim}.** Sideways − BP, final validation accuracy: "
        f"{said(R, 'digits-sideways', 'digits-bp', 'final val acc')}; train − validation gap: Sideways "
        f"{gap_s:.3f} vs BP {gap_b:.3f} ({said(R, 'digits-sideways', 'digits-bp', 'train − val gap')}); "
        f"training accuracy {said(R, 'digits-sideways', 'digits-bp', 'train acc')}.",
        f"- First epoch whose mean training accuracy reaches {FIT_LEVEL}: " + ", ".join(
            f"{BY_NAME[n].label} {first_epoch_at(R, n, 'train_acc', FIT_LEVEL)}" for n in DIGITS_RUNS) + ". Mean "
        "validation accuracy gained over the last 5 epochs: " + ", ".join(
            f"{BY_NAME[n].label} {mean_curve(R, n, 'val_acc')[-1] - mean_curve(R, n, 'val_acc')[-6]:+.3f}"
            for n in DIGITS_RUNS) + ".",
        "",
        "## 2. Calibration: is Sideways over-confident when wrong?",
        "",
        *table(R, DIGITS_RUNS, calib),
        "",
        "![reliability diagrams](digits_reliability.png)",
        "",
        f"- Sideways − BP: validation NLL {said(R, 'digits-sideways', 'digits-bp', 'val NLL')}, expected "
        f"calibration error {said(R, 'digits-sideways', 'digits-bp', 'val ECE')}, mean confidence on wrong "
        f"predictions {said(R, 'digits-sideways', 'digits-bp', 'confidence when wrong')}.",
        f"- The spread of the per-step training loss (sd over an epoch's steps, last epoch): Sideways − BP "
        f"{said(R, 'digits-sideways', 'digits-bp', 'step-loss sd')}.",
        "- Reliability bins (15, seeds pooled) whose accuracy lies below their confidence (over-confident), of the "
        "occupied ones: " + ", ".join(f"{BY_NAME[n].label} {'/'.join(map(str, below_diagonal(R, n)))}"
                                       for n in DIGITS_RUNS) + ".",
        "",
        "## 3. Against regularised BP",
        "",
        f"- BP + dropout − Sideways, final validation accuracy: "
        f"{said(R, 'digits-bp-dropout', 'digits-sideways', 'final val acc')}; BP + weight decay − Sideways: "
        f"{said(R, 'digits-bp-wd', 'digits-sideways', 'final val acc')}. The better regulariser here is "
        f"{BY_NAME[best_reg].label.replace('BP + ', '')} ({said(R, best_reg, 'digits-bp', 'final val acc')} over "
        "plain BP); dropout − plain BP: "
        f"{said(R, 'digits-bp-dropout', 'digits-bp', 'final val acc')}.",
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
        f"- Shuffling costs BP {shuffle_drop['bp']:+.3f}, Sideways {shuffle_drop['sideways']:+.3f} and Sideways "
        f"with smoothing 3 {shuffle_drop['sideways-smooth']:+.3f} of final validation accuracy (ordered − "
        f"shuffled); Sideways − BP on shuffled frames: {said(R, 'shuffled-sideways', 'shuffled-bp', 'final val acc')}.",
        f"- Smoothing 3 − plain Sideways, final validation accuracy: ordered "
        f"{said(R, 'digits-sideways-smooth', 'digits-sideways', 'final val acc')}, shuffled "
        f"{said(R, 'shuffled-sideways-smooth', 'shuffled-sideways', 'final val acc')}.",
        "",
        "## 5. The embedded motion task",
        "",
        "The default `sideways-train` run (C3D-like chain of widths 16/32/64 in 3 stages, 'same' temporal padding, "
        "lag 3; 640 training and 320 validation procedural videos whose class is their motion, 8-frame clips of "
        "32×32, 20 epochs), at frame strides 1, 2 and 4 (every s-th frame kept: the video changes s times faster "
        "per tick).",
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
        *std_section(R, probe),
    ]
    return "\n".join(lines)


# --- the discussion: a template whose every number comes from the runs ----------------------------

def discussion_numbers(R: dict, probe: dict) -> dict:
    """Every value docs/report_discussion.md quotes, by name (numbers formatted, verdicts in words)."""
    v = {}
    f3 = lambda x: f"{x:.3f}"
    m = lambda n, metric="final val acc": stats(R, n, metric)[0]
    sd = lambda n, metric="final val acc": stats(R, n, metric)[1]
    diff = lambda a, b, metric="final val acc": f"{compare(R, a, b, metric)[0]:+.3f}"
    noise = lambda a, b, metric="final val acc": noise_word(R, a, b, metric)
    v["seeds"] = str(len(SEEDS))
    v["fit_level"] = str(FIT_LEVEL)
    v["wd_label"], v["dropout_label"] = BY_NAME["digits-bp-wd"].label, BY_NAME["digits-bp-dropout"].label
    # 1. generalisation
    d, _, within = compare(R, "digits-sideways", "digits-bp", "final val acc")
    v["gen_verdict"] = ("validates no better and no worse than BP within seed noise" if within else
                        "validates better than BP" if d > 0 else "validates worse than BP")
    v["gen_reproduced"] = "is reproduced" if d > 0 and not within else "is not reproduced"
    for key, n in (("sw", "digits-sideways"), ("bp", "digits-bp"), ("wd", "digits-bp-wd"),
                   ("dropout", "digits-bp-dropout"), ("smooth", "digits-sideways-smooth")):
        v[f"{key}_final"], v[f"{key}_final_sd"] = f3(m(n)), f3(sd(n))
        v[f"{key}_train"] = f3(m(n, "train acc"))
        v[f"{key}_gap"] = f3(m(n, "train − val gap"))
        v[f"{key}_ece"], v[f"{key}_nll"] = f3(m(n, "val ECE")), f3(m(n, "val NLL"))
        v[f"{key}_conf_wrong"] = f3(m(n, "confidence when wrong"))
        v[f"{key}_loss_sd"] = f3(m(n, "step-loss sd"))
        v[f"{key}_fit_epoch"] = first_epoch_at(R, n, "train_acc", FIT_LEVEL)
        below, occupied = below_diagonal(R, n)
        v[f"{key}_below"], v[f"{key}_occupied"] = str(below), str(occupied)
    v["gen_diff"], v["gen_noise"] = diff("digits-sideways", "digits-bp"), noise("digits-sideways", "digits-bp")
    v["gap_noise"] = noise("digits-sideways", "digits-bp", "train − val gap")
    v["gap_word"] = "smaller" if m("digits-sideways", "train − val gap") < m("digits-bp", "train − val gap") else "no smaller"
    fitted = v["sw_fit_epoch"] != "never" and v["bp_fit_epoch"] != "never"
    v["fit_sentence"] = ("the comparison at the last epoch is made after both have fitted the training set, in the "
                         "overfitting regime the claim is about" if fitted else
                         "not both fit the training set, so this is not yet the overfitting regime the claim is about")
    v["spread_word"] = "larger" if sd("digits-sideways") > sd("digits-bp") else "smaller"
    # 2. calibration
    for metric, key in (("confidence when wrong", "conf"), ("val NLL", "nll"), ("val ECE", "ece"),
                        ("step-loss sd", "loss_sd")):
        d, _, within = compare(R, "digits-sideways", "digits-bp", metric)
        v[f"cal_{key}_diff"], v[f"cal_{key}_noise"] = f"{d:+.3f}", noise("digits-sideways", "digits-bp", metric)
        v[f"cal_{key}_word"] = ("less" if d < 0 else "more") if key == "loss_sd" else ("lower" if d < 0 else "higher")
    all_below = all(below_diagonal(R, n)[0] == below_diagonal(R, n)[1] for n in DIGITS_RUNS)
    v["below_all"] = ("every occupied bin of every configuration lies below the diagonal" if all_below else
                      "so not every bar lies below the diagonal")
    v["overconfident_word"] = ("less" if m("digits-sideways", "confidence when wrong") <
                               m("digits-bp", "confidence when wrong") else "more")
    # 3. regularised BP
    best = max(DIGITS_RUNS, key=lambda n: m(n))
    v["best_config"], v["best_final"], v["best_final_sd"] = BY_NAME[best].label, f3(m(best)), f3(sd(best))
    v["wd_minus_sw"], v["wd_minus_sw_noise"] = diff("digits-bp-wd", "digits-sideways"), noise("digits-bp-wd", "digits-sideways")
    v["wd_minus_bp"], v["wd_minus_bp_noise"] = diff("digits-bp-wd", "digits-bp"), noise("digits-bp-wd", "digits-bp")
    v["dropout_minus_bp"], v["dropout_minus_bp_noise"] = (diff("digits-bp-dropout", "digits-bp"),
                                                          noise("digits-bp-dropout", "digits-bp"))
    sw_vs_reg = [compare(R, "digits-sideways", n, "final val acc") for n in ("digits-bp-wd", "digits-bp-dropout")]
    v["reg_verdict"] = ("Sideways does not come out ahead of either" if all(d <= 0 or w for d, _, w in sw_vs_reg)
                        else "Sideways comes out ahead of at least one")
    # 4. shuffled frames and smoothing
    for key in ("bp", "sideways", "sideways-smooth"):
        v[f"shuffle_cost_{key.replace('-', '_')}"] = f3(m(f"digits-{key}") - m(f"shuffled-{key}"))
        v[f"shuffled_{key.replace('-', '_')}_train"] = f3(m(f"shuffled-{key}", "train acc"))
        v[f"shuffled_{key.replace('-', '_')}_ece"] = f3(m(f"shuffled-{key}", "val ECE"))
    v["shuffled_sw_minus_bp"] = diff("shuffled-sideways", "shuffled-bp")
    v["shuffled_sw_minus_bp_noise"] = noise("shuffled-sideways", "shuffled-bp")
    v["shuffle_hurts_word"] = ("not hurt more than BP" if compare(R, "shuffled-sideways", "shuffled-bp",
                                                                  "final val acc")[2] or
                               m("shuffled-sideways") >= m("shuffled-bp") else "hurt more than BP")
    v["smooth_ordered"], v["smooth_ordered_noise"] = (diff("digits-sideways-smooth", "digits-sideways"),
                                                      noise("digits-sideways-smooth", "digits-sideways"))
    v["smooth_shuffled"], v["smooth_shuffled_noise"] = (diff("shuffled-sideways-smooth", "shuffled-sideways"),
                                                        noise("shuffled-sideways-smooth", "shuffled-sideways"))
    ece = {n: m(n, "val ECE") for n in CONFIGS_DIGITS_ALL}
    lowest = min(ece, key=ece.get)
    v["lowest_ece_config"] = BY_NAME[lowest].label + (", shuffled" if lowest.startswith("shuffled") else ", ordered")
    v["lowest_ece"] = f3(ece[lowest])
    # 5. motion
    words = []
    for k in (1, 2, 4):
        a, b = f"motion-sideways-stride{k}", f"motion-bp-stride{k}"
        v[f"motion_sw{k}"], v[f"motion_bp{k}"] = f3(m(a)), f3(m(b))
        v[f"motion_diff{k}"], v[f"motion_noise{k}"] = diff(a, b), noise(a, b)
        words.append(compare(R, a, b, "final val acc")[2])
    v["motion_verdict"] = ("every difference within seed noise" if all(words) else
                           "not every difference within seed noise")
    v["motion_sw1_sd"] = f3(sd("motion-sideways-stride1"))
    # 6. the standard networks
    for model in ("r2plus1d_18", "mc3_18"):
        f = network_facts(model)
        key = SHORT_NAMES[model]
        v[f"{key}_lag_same"], v[f"{key}_lag_causal"] = str(f["lag_same"]), str(f["lag_causal"])
        v[f"{key}_temporal_convs"], v[f"{key}_strided"] = str(f["temporal_convs"]), str(f["strided"])
    v["long_clip"], v["short_clip"], v["long_factor"] = (str(std_clip("mc3_18", "same", None)), str(SHORT_CLIP),
                                                         str(LONG_FACTOR))
    v["chance"] = f"{CHANCE:.1f}"
    goal = []
    for dataset in STD_DATASETS:
        for model, padding, clip in std_settings(dataset):
            clip = std_clip(model, padding, clip)
            sw, bp = (std_name(dataset, model, padding, clip, mode) for mode in ("sideways", "bp"))
            key = f"{dataset}_{SHORT_NAMES[model]}_{padding}"
            v[f"{key}_sw"], v[f"{key}_sw_sd"] = f3(m(sw)), f3(sd(sw))
            v[f"{key}_bp"], v[f"{key}_bp_sd"] = f3(m(bp)), f3(sd(bp))
            v[f"{key}_sw_best"], v[f"{key}_bp_best"] = f3(m(sw, "best val acc")), f3(m(bp, "best val acc"))
            v[f"{key}_sw_train"], v[f"{key}_bp_train"] = f3(m(sw, "train acc")), f3(m(bp, "train acc"))
            v[f"{key}_diff"], v[f"{key}_noise"] = diff(sw, bp), noise(sw, bp)
            v[f"{key}_best_diff"], v[f"{key}_best_noise"] = diff(sw, bp, "best val acc"), noise(sw, bp, "best val acc")
            v[f"{key}_bp_learns"] = learns_word(R, bp)
            v[f"{key}_sw_learns"] = learns_word(R, sw)
            if padding == "causal" and clip == SHORT_CLIP:
                goal.append((dataset, model, compare(R, sw, bp, "final val acc")[2], learns(R, bp)))
    met = [f"{model} on {dataset}" for dataset, model, within, bp_learns in goal if within and bp_learns]
    missed = [f"{model} on {dataset}" + ("" if within else " (Sideways outside seed noise of BP)") +
              ("" if bp_learns else " (BP itself not above chance by twice its sd)")
              for dataset, model, within, bp_learns in goal if not (within and bp_learns)]
    v["goal_verdict"] = ((f"met for {', '.join(met)}" if met else "met for none of them")
                         + (f"; not met for {', '.join(missed)}" if missed else ""))
    # 6. trained longer, and the gradient probe
    (dataset, model, padding, clip, epochs), = STD_LONGER
    sw, bp = (std_name(dataset, model, padding, clip, mode, epochs) for mode in ("sideways", "bp"))
    v["long_epochs"], v["std_epochs"] = str(epochs), str(STD_EPOCHS)
    v["long_sw"], v["long_sw_sd"], v["long_bp"], v["long_bp_sd"] = f3(m(sw)), f3(sd(sw)), f3(m(bp)), f3(sd(bp))
    v["long_sw_train"], v["long_bp_train"] = f3(m(sw, "train acc")), f3(m(bp, "train acc"))
    v["long_diff"], v["long_noise"] = diff(sw, bp), noise(sw, bp)
    v["long_train_diff"], v["long_train_noise"] = diff(sw, bp, "train acc"), noise(sw, bp, "train acc")
    v["long_sw_seeds"] = "/".join(f"{final(r, 'val_acc'):.3f}" for r in R[sw])
    train_d, _, train_within = compare(R, sw, bp, "train acc")
    v["long_pace_word"] = ("more slowly than BP" if train_d < 0 and not train_within else
                           "as fast as BP, within seed noise")
    # 6. slower digits: the gaps at each speed, the dataset's own last
    gaps = []
    for i, (dataset, model, padding, clip, speed) in enumerate(STD_SLOWER):
        sw, bp = (std_name(dataset, model, padding, clip, mode, speed=speed) for mode in ("sideways", "bp"))
        v[f"slow{i}_speed"] = f"{speed:g}"
        v[f"slow{i}_sw"], v[f"slow{i}_sw_sd"], v[f"slow{i}_bp"], v[f"slow{i}_bp_sd"] = f3(m(sw)), f3(sd(sw)), \
            f3(m(bp)), f3(sd(bp))
        v[f"slow{i}_sw_train"], v[f"slow{i}_bp_train"] = f3(m(sw, "train acc")), f3(m(bp, "train acc"))
        v[f"slow{i}_diff"], v[f"slow{i}_noise"] = diff(sw, bp), noise(sw, bp)
        v[f"slow{i}_train_diff"], v[f"slow{i}_train_noise"] = diff(sw, bp, "train acc"), noise(sw, bp, "train acc")
        gaps.append(m(sw, "train acc") - m(bp, "train acc"))
    own_sw, own_bp = (std_name("digits", STD_SLOWER[0][1], STD_SLOWER[0][2], STD_SLOWER[0][3], mode)
                      for mode in ("sideways", "bp"))
    gaps.append(m(own_sw, "train acc") - m(own_bp, "train acc"))
    v["slow_own_train_diff"], v["slow_own_train_noise"] = diff(own_sw, own_bp, "train acc"), \
        noise(own_sw, own_bp, "train acc")
    v["slow_gap_word"] = ("widens as the digits move faster" if all(a > b for a, b in zip(gaps, gaps[1:])) else
                          "does not steadily widen as the digits move faster")
    by = probe["by"]
    lower = len(by["own"]) - 1  # every stage but the last
    v["align_lower"] = str(lower)
    for key, cosines in by.items():
        v[f"align_{key}_low"], v[f"align_{key}_high"] = f"{min(cosines[:lower]):.2f}", f"{max(cosines[:lower]):.2f}"
    means = [statistics.mean(by[k][:lower]) for k in ("still", "slow", "own")]
    v["align_speed_word"] = ("lower the faster the digits move" if means[0] > means[1] > means[2] else
                             "not steadily lower the faster the digits move")
    v["align_max_lower"] = f"{max(max(by['own'][:lower]), max(by['motion'][:lower])):.2f}"
    v["half_speed"], v["own_speed"] = f"{ALIGN_DIGIT_SPEEDS[1]:g}", f"{probe['own_speed']:g}"
    motion_sw = std_name("motion", ALIGN_MODEL, ALIGN_PADDING, SHORT_CLIP, "sideways")
    motion_bp = std_name("motion", ALIGN_MODEL, ALIGN_PADDING, SHORT_CLIP, "bp")
    v["align_motion_verdict"] = ("where Sideways validates within seed noise of BP" if
                                 compare(R, motion_sw, motion_bp, "final val acc")[2] else
                                 "where Sideways too is outside seed noise of BP")
    return v


def learns(R, name) -> bool:
    """Above chance by more than twice the seeds' sd (final validation accuracy)."""
    mean, sd = stats(R, name, "final val acc")
    return mean - CHANCE > 2 * sd


def learns_word(R, name) -> str:
    return "above chance" if learns(R, name) else "not clearly above chance"


CONFIGS_DIGITS_ALL = [*DIGITS_RUNS, "shuffled-bp", "shuffled-sideways", "shuffled-sideways-smooth"]
SHORT_NAMES = {"r2plus1d_18": "r2p1d18", "mc3_18": "mc3"}  # in placeholder names
PLACEHOLDER = re.compile(r"\{([a-z0-9_]+)\}")


def discussion(R: dict, probe: dict) -> str:
    """docs/report_discussion.md with every {placeholder} filled. A decimal typed into the
    template (a number nobody computed) or an unknown placeholder is an error."""
    path = os.path.join(HERE, "report_discussion.md")
    template = open(path).read()
    typed = re.findall(r"(?<![\w{])\d+\.\d+", PLACEHOLDER.sub("", template))
    if typed:
        raise SystemExit(f"{path}: numbers typed by hand ({', '.join(typed[:5])}): quote them as {{placeholders}} "
                         "computed in discussion_numbers()")
    values = discussion_numbers(R, probe)
    unknown = sorted(set(PLACEHOLDER.findall(template)) - set(values))
    if unknown:
        raise SystemExit(f"{path}: unknown placeholders {unknown}")
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def readme_check(R: dict) -> None:
    """The README's quick-start figure is the default run's (Sideways, motion, stride 1): say
    when it no longer is."""
    text = open(os.path.join(ROOT, "README.md")).read()
    found = re.search(r"reaches (\d\.\d+) ± (\d\.\d+) validation accuracy over (\d+) seeds", text)
    mean, sd = stats(R, "motion-sideways-stride1", "final val acc")
    now = f"{mean:.2f} ± {sd:.2f}"
    if not found or f"{found.group(1)} ± {found.group(2)}" != now or int(found.group(3)) != len(SEEDS):
        print(f"README.md: the quick start should say 'reaches {now} validation accuracy over {len(SEEDS)} seeds' "
              f"(it says {found.group(0) if found else 'nothing of the kind'!r})", file=sys.stderr)


def rendered(job) -> dict:
    """A run as it is (``--render``), whatever code made it; a missing one is an error."""
    config, seed = job
    summary = os.path.join(run_dir(config, seed), "summary.json")
    if not os.path.exists(summary):
        raise SystemExit(f"docs/report.py --render: no finished run at {os.path.dirname(summary)}; "
                         "python docs/report.py makes it")
    return dict(json.load(open(summary)), reused=True)


def main(argv=None) -> None:
    import argparse
    p = argparse.ArgumentParser(prog="docs/report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--render", action="store_true", help="run nothing: the page from the runs there are")
    p.add_argument("--only", default=None, metavar="TEXT",
                   help="run (or reuse) only the configurations whose name contains TEXT; the page shows the "
                        "others' runs as they are, whatever code made them (as --render)")
    args = p.parse_args(argv)
    render = args.render or args.only is not None
    os.makedirs(RUNS, exist_ok=True)
    started = time.time()
    jobs = sorted(((c, s) for c in CONFIGS for s in SEEDS), key=lambda job: -_cost(job[0]))
    to_run = [job for job in jobs if args.only is not None and args.only in job[0].name] if render else jobs
    if args.only is not None and not to_run:
        p.error(f"--only {args.only!r}: no configuration's name contains it")
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        ran = dict(zip(map(id, to_run), pool.map(lambda job: run(*job), to_run)))
    done = [ran[id(job)] if id(job) in ran else rendered(job) for job in jobs]
    results = {c.name: sorted((r for r in done if r["config"] == c.name), key=lambda r: r["seed"]) for c in CONFIGS}
    executed = [r for r in done if not r["reused"]]
    load = os.getloadavg()[2]
    cpu_min = sum(r.get("cpu_s", 0.0) for r in done) / 60
    codes = collections.Counter(r.get("code") for r in done)
    made_by = ", ".join(f"{n} by `{c}`" for c, n in codes.most_common())
    line = ((f"This page was rendered from the {len(done)} runs there were ("
             + (f"`--only {args.only}`: {len(executed)} of them run now, {len(to_run) - len(executed)} reused, the "
                f"rest as they were" if args.only is not None else "`--render`: none run")
             + f"); library code (`code_version`) of the runs: {made_by}; of the library now: `{code_version()}`"
             if render else
             f"This generation ran {len(executed)} of the {len(done)} runs in {(time.time() - started) / 60:.0f} min "
             f"wall (load average over the last 15 min at its end: {load:.1f} on {os.cpu_count()} cores)"
             + (f", reusing {len(done) - len(executed)}" if len(done) > len(executed) else ""))
            + (f"; the runs took {cpu_min:.0f} CPU-minutes in all, i.e. about {cpu_min / (os.cpu_count() or 2):.0f} min "
               f"on {os.cpu_count()} idle cores" if all("cpu_s" in r for r in done) else "") + ".")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figures(results, plt)
    probe = alignments()
    command = "python docs/report.py" + (f" --only {args.only}" if args.only is not None else
                                         " --render" if render else "")
    text = page(results, dict(line=line, command=command), probe) + "\n" + discussion(results, probe)
    with open(os.path.join(HERE, "REPORT.md"), "w") as f:
        f.write(text)
    readme_check(results)
    print(f"wrote {os.path.join(HERE, 'REPORT.md')}")


if __name__ == "__main__":
    main()
