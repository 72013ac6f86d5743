"""sideways-train: train a video classifier with Sideways (or exact backprop through the
same pipeline) on the embedded procedural data or on a folder of your own videos.

    sideways-train                          # embedded data, Sideways, a few minutes on 2 cores
    sideways-train --mode bp --seed 1 --out runs/bp1
    sideways-train --data ~/UCF101 --clip-len 16 --size 112 --device cuda --workers 8
    sideways-train --resume runs/bp1/last.pt     # continue exactly where it stopped
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import time
import warnings
import zipfile
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import models
from ._loader import backends
from .backend import NAMES as BACKENDS, resolve as resolve_backend, set_backend
from .data import (DIGIT_SPEED, DataError, MovingDigits, MovingTextures, ShuffledFrames, UnreadableVideoWarning,
                   VideoFolder, unreadable_summary)
from .pipeline import NonFiniteError, SidewaysPipeline

__all__ = ["main", "parse_args"]

EXIT_INTERRUPTED = 130
EXIT_NON_FINITE = 3
EXIT_DATA = 2
TEMPORAL_PADDING_CHOICES = ("auto", "same", "causal")
AUTO_CAUSAL_FACTOR = 4  # --temporal-padding auto: causal when --clip-len < this x the 'same' lag (standard networks)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, once: ``(default: X)`` is added unless the
    help already says it in words (where the default is None: what happens without it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return text + " (default: off)"
        return super()._get_help_string(action)


class _ConfigError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """error(): usage and exit status 2 for a command line, or _ConfigError for a checkpoint's
    config (``raise_errors``), checked with the same rules."""
    raise_errors = False

    def error(self, message):
        if self.raise_errors:
            raise _ConfigError(message)
        # one line, not argparse's usage block of every option
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> _Parser:
    p = _Parser(prog="sideways-train", description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    pos = lambda kind: (lambda s: _positive(s, kind))
    g = p.add_argument_group("training")
    g.add_argument("--mode", choices=["sideways", "bp"], default="sideways",
                   help="Sideways approximation, or exact backprop through the same pipeline")
    g.add_argument("--epochs", type=pos(int), default=20, help="the learning-rate schedule spans these")
    g.add_argument("--max-steps", type=pos(int), default=None,
                   help="stop after this many steps in all (the schedule still spans --epochs; resume to go on) "
                        "(default: no limit, all of --epochs)")
    g.add_argument("--batch-size", type=pos(int), default=16, help="videos per step")
    g.add_argument("--lr", type=pos(float), default=0.05,
                   help="peak learning rate (a cosine schedule over --epochs takes it to 0)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="SGD (momentum 0.9) or AdamW")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="the optimizer's weight decay (L2 for SGD, "
                                                                    "decoupled for AdamW)")
    g.add_argument("--update", choices=["clip", "tick"], default="clip",
                   help="apply the optimizer once per clip, or every tick (SGD only, fused into the weight update)")
    g.add_argument("--dropout", type=float, default=0.0,
                   help="dropout before the classifier (c3d, r2plus1d, the standard networks)")
    g.add_argument("--smoothing", type=pos(int), default=1,
                   help="Sideways weight updates pair the mean of the last k errors with the mean of the last k "
                        "activation windows (1: plain Sideways)")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, the embedded data and the clip order")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=list(models.MODELS), default="c3d",
                   help="c3d, r2plus1d: small chains cut at their blocks; r3d_18, mc3_18, r2plus1d_18, s3d: the "
                        "standard networks (torchvision's layouts), cut automatically by SidewaysPipeline.from_model")
    m.add_argument("--width", type=pos(int), default=16,
                   help="channels of the first block (doubling per block); the standard networks are torchvision's "
                        "at --width 64")
    m.add_argument("--depth", type=pos(int), default=3, help="number of blocks (c3d, r2plus1d)")
    m.add_argument("--temporal-kernel", type=pos(int), default=3, help="frames each temporal conv spans (c3d, r2plus1d)")
    m.add_argument("--stages", type=pos(int), default=3,
                   help="pipeline stages the network is cut into (c3d, r2plus1d: <= --depth)")
    m.add_argument("--temporal-padding", choices=list(TEMPORAL_PADDING_CHOICES), default="auto",
                   help="how temporally padded convs and pools stream (SidewaysPipeline.from_model's "
                        "temporal_padding): 'same' computes the network as written, each padded layer waiting for "
                        "its future frames (the lag adds up: r2plus1d_18 and r3d_18 54 frames, mc3_18 5, s3d 59, the "
                        "chains --depth); 'causal' puts all the padding on the past side (lag 7 for r2plus1d_18 and "
                        "r3d_18: stride - 1 at each temporal stride; mc3_18 0, s3d 15), the "
                        "function shifted in time, the weights the same; 'auto' picks causal for r3d_18, mc3_18, "
                        f"r2plus1d_18 and s3d when --clip-len is below {AUTO_CAUSAL_FACTOR}x their 'same' lag "
                        "(Sideways learns little on clips not several times the lag) and same otherwise, and always "
                        "same for c3d and r2plus1d; the same choice in --mode bp and sideways. c3d and r2plus1d "
                        "with causal are cut by from_model")
    m.add_argument("--batchnorm", choices=["frame", "frozen"], default="frame",
                   help="BatchNorm while training (standard networks): per-frame batch statistics, or the running "
                        "statistics frozen")
    m.add_argument("--pretrained", default=None,
                   help="a state dict of the standard network (e.g. Kinetics-400 weights saved from torchvision, "
                        "--width 64) to start from; a new classifier when the class count differs (default: "
                        "random initial weights)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=["motion", "digits"], default="motion",
                   help="embedded data: procedural textures whose class is their motion, or moving handwritten digits "
                        "(real 8x8 digits from scikit-learn) whose class is the digit")
    d.add_argument("--data", default=None, help="a folder of videos (UCF101 layout) or of .npy/.pt tensors "
                                                "(instead of --dataset; default: the embedded --dataset)")
    d.add_argument("--clutter", type=float, default=0.0, help="digits: brightness of static stroke clutter (0-1)")
    d.add_argument("--digit-speed", type=float, default=DIGIT_SPEED,
                   help="digits: how far a digit moves per frame, in pixels (each video's speed is this x 0.6-1.4; 0: "
                        "still)")
    d.add_argument("--shuffle-frames", action="store_true",
                   help="every clip's frames in random order (a control: destroys temporal smoothness)")
    d.add_argument("--clip-len", type=pos(int), default=8,
                   help="frames per clip (at least 2; in --mode sideways longer than the network's lag, see "
                        "--temporal-padding and --allow-short-clips)")
    d.add_argument("--allow-short-clips", action="store_true",
                   help="--mode sideways: train on clips no longer than the network's lag anyway (refused "
                        "otherwise: most errors would meet activations of the clip's end padding, and such runs "
                        "measured chance accuracy, docs/REPORT.md)")
    d.add_argument("--frame-stride", type=pos(int), default=1, help="keep every s-th frame (faster change per tick)")
    d.add_argument("--size", type=pos(int), default=32, help="frames are resized and cropped to size x size")
    d.add_argument("--train-videos", type=pos(int), default=640, help="embedded data: training videos")
    d.add_argument("--val-videos", type=pos(int), default=320, help="embedded data: validation videos")
    d.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    r = p.add_argument_group("run")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the network trains")
    r.add_argument("--distributed", action="store_true",
                   help="depth-parallel across the processes of torchrun (--nproc-per-node N): each rank runs "
                        "a group of the stages (also on when torchrun's WORLD_SIZE > 1)")
    r.add_argument("--replicas", type=pos(int), default=1,
                   help="under torchrun: data-parallel copies of the pipeline (the ranks are replicas x stage "
                        "groups); each trains on its share of every batch, gradients averaged once per clip")
    r.add_argument("--backend", choices=BACKENDS, default=None,
                   help="op backend (default: SIDEWAYS_BACKEND if set, else auto: on CUDA each op where measured "
                        "fastest, on the CPU the fastest built)")
    r.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                   help="mixed precision: torch.autocast in that dtype (activations, rings and errors 16-bit; weights, "
                        "gradients and optimizer state float32); fp16 scales the loss with a GradScaler")
    r.add_argument("--out", default=None, help="run directory (default: runs/<mode>-<time>)")
    r.add_argument("--resume", default=None, help="a checkpoint (last.pt) to continue from; its run directory is "
                                                  "reused (default: a new run)")
    r.add_argument("--log-every", type=pos(int), default=10,
                   help="steps between metric lines (the last step of a run is always recorded)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    # which options were typed (a resumed run keeps its config except for these)
    typed = sys.argv[1:] if argv is None else list(argv)
    actions = p._option_string_actions
    args.given = {actions[a.split("=")[0]].dest for a in typed if a.split("=")[0] in actions}
    _check_options(p, args)
    return args


def _check_options(p: _Parser, args: argparse.Namespace) -> None:
    """The rules between options (p.error for the first broken one)."""
    if args.update == "tick" and args.optimizer != "sgd":
        p.error("--update tick needs --optimizer sgd (the fused per-tick update is SGD)")
    if args.replicas > 1 and args.update == "tick":
        p.error("--replicas needs --update clip (replicas average their gradients once per clip)")
    if args.update == "tick" and args.mode != "sideways":
        p.error("--update tick needs --mode sideways")
    if args.amp == "fp16" and args.update == "tick":
        p.error("--amp fp16 needs --update clip (its GradScaler unscales a clip's gradients before the step; the "
                "per-tick update has no such step): use --amp bf16")
    if args.amp == "fp16" and (args.distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        p.error("--amp fp16 runs in one process (each rank's loss scale would drift apart): use --amp bf16")
    if args.model in models.CHAINS and args.stages > args.depth:
        p.error(f"--stages {args.stages} exceeds the network's {args.depth} blocks (--depth; the head joins the last)")
    if args.pretrained is not None and args.model in models.CHAINS:
        p.error(f"--pretrained needs one of the standard networks ({', '.join(models.GRAPHS)}), not --model {args.model}")
    if args.clip_len < 2:
        p.error(f"--clip-len {args.clip_len}: a clip needs at least 2 frames (with one, a temporal conv's other "
                "taps see only padding, and nothing of time is learnt)")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0 <= args.clutter <= 1:
        p.error(f"--clutter must be in [0, 1], got {args.clutter}")
    if not 0 <= args.digit_speed < args.size:
        p.error(f"--digit-speed must be in [0, --size), got {args.digit_speed}")
    if args.digit_speed != DIGIT_SPEED and (args.dataset != "digits" or args.data is not None):
        p.error("--digit-speed applies to --dataset digits only")  # (a checkpoint's config holds the default)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")


def _positive(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
    if not value > 0 or (kind is float and not math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
    return value


# --- pieces ---------------------------------------------------------------------------

def build_model(cfg: dict, num_classes: int, conv=None) -> nn.Module:
    """The network of a run's config (``conv=nn.Conv3d`` gives a chain's plain-PyTorch twin; the
    standard networks are built with nn.Conv3d and converted by from_model)."""
    name = cfg["model"]
    dropout = cfg.get("dropout", 0.0)
    if name in models.GRAPHS:
        if name == "s3d":
            return models.s3d(num_classes, width_mult=cfg["width"] / 64, frame_size=cfg["size"], dropout=dropout)
        return models.GRAPHS[name](num_classes, width=cfg["width"], dropout=dropout)
    widths = [cfg["width"] * 2 ** i for i in range(cfg["depth"])]
    kwargs = dict(widths=widths, temporal_kernel=cfg["temporal_kernel"], dropout=dropout)
    if conv is not None:
        kwargs["conv"] = conv
    return models.CHAINS[name](num_classes, **kwargs)


def load_weights(path: str, what: str):
    """A checkpoint or state dict from a user, read as tensors and plain types only
    (``weights_only=True``: a pickle that would build other objects, or run code, is refused).
    Every failure is a DataError naming the file."""
    if not os.path.isfile(path):
        raise DataError(f"{what}: no file at {path!r}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever a foreign file makes the unpickler raise (KeyError, IndexError, ...)
        found = re.search(r"GLOBAL (\S+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        if found:  # a pickle that builds something other than tensors and plain types
            raise DataError(f"{what}: refused {path!r}: it would build {found.group(1)}, which is not a tensor or a "
                            "plain type, and loading it could run code; only files of tensors, numbers, strings, "
                            "lists and dicts load") from None
        kind = _file_kind(path)
        if kind is not None:
            raise DataError(f"{what}: {path!r} is not a PyTorch checkpoint (not a file torch.save wrote): it is "
                            f"{kind}") from None
        refused = re.search(r"WeightsUnpickler error:\s*(Unsupported operand \d+)", str(exc))
        if refused:  # e.g. pickle protocol 4's FRAME: another program's pickle, or a damaged file
            raise DataError(f"{what}: {path!r} is not a PyTorch checkpoint: a pickle the safe loader refuses "
                            f"({refused.group(1)}; torch.save writes none such), so nothing in it was built") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        detail = f"{type(exc).__name__}: {first.split('. ')[0][:120]}" if first else type(exc).__name__
        with open(path, "rb") as f:
            zip_like = f.read(2) == b"PK"
        if zip_like and not zipfile.is_zipfile(path):
            detail = "a zip archive, as torch.save writes, that does not open: cut short or damaged"
        raise DataError(f"{what}: {path!r} is not a readable checkpoint: truncated or corrupt ({detail})") from None


def _file_kind(path: str) -> Optional[str]:
    """What a file that torch.load could not read is, when it is plainly not a checkpoint
    (None: it starts as torch.save's files do, a zip or a pickle, so it is damaged)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if not head:
        return "an empty file"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None  # a zip cut short or damaged: perhaps a checkpoint
        if not any(n.endswith("data.pkl") for n in names):
            return "a zip archive without a checkpoint in it"
        return None
    if head[:1] == b"\x80":  # a binary pickle (torch.save's legacy format)
        return None
    for magic, kind in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"%PDF", "a PDF document"),
                        (b"\x1f\x8b", "gzip data"), (b"\x93NUMPY", "a NumPy array (.npy)")):
        if head.startswith(magic):
            return kind
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            return "binary data"
    return "a text file"


def read_state_dict(path: str) -> dict:
    """The state dict in a file for --pretrained: a plain state dict, or a sideways-train
    checkpoint's model part. Anything else is a DataError naming the file."""
    state = load_weights(path, "--pretrained")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a sideways-train checkpoint
        state = state["model"]
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DataError(f"--pretrained: {path!r} is not a state dict (a dict of names to tensors): it holds "
                        f"{_describe(state)}")
    return state


def _describe(obj) -> str:
    if isinstance(obj, dict):
        if not obj:
            return "an empty dict"
        key = next((k for k in obj if not isinstance(k, str)), None)
        if key is not None:
            return f"a dict with a key that is not a name: {str(key)[:40]!r} of type {type(key).__name__}"
        odd = next(((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        if odd is not None:
            return f"a dict whose entry {odd[0][:40]!r} is not a tensor but of type {type(odd[1]).__name__}"
        return f"a dict of {len(obj)} tensors"
    return f"a {type(obj).__name__}"


def _misfit(own: dict, state: dict) -> str:
    """What keeps ``state`` from loading into a network whose state dict is ``own`` ('' if nothing)."""
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if not (missing or unexpected or wrong):
        return ""
    return (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped entries, e.g. "
            f"{(missing + unexpected + wrong)[:3]}")


def load_pretrained(net: nn.Module, path: str, state: Optional[dict] = None) -> None:
    """Start from a state dict of the same network (``state``, else read from ``path``); a
    classifier of another class count is left as built (new)."""
    state = dict(read_state_dict(path) if state is None else state)
    own = net.state_dict()
    fresh = [k for k in own if k in state and state[k].shape != own[k].shape and
             k.split(".")[0] in ("fc", "classifier")]
    for k in fresh:
        del state[k]
    misfit = _misfit({k: v for k, v in own.items() if k not in fresh}, state)
    if misfit:
        raise DataError(f"--pretrained: {path!r} does not fit this network (--model/--width): {misfit}")
    net.load_state_dict(state, strict=False)
    if fresh:
        print(f"sideways-train: --pretrained: new classifier ({', '.join(fresh)}) for this class count",
              file=sys.stderr)


def build_data(cfg: dict):
    common = dict(clip_len=cfg["clip_len"], frame_stride=cfg["frame_stride"], size=cfg["size"])
    if cfg["data"] is not None:
        try:
            sets = (VideoFolder(cfg["data"], "train", seed=cfg["seed"], **common),
                    VideoFolder(cfg["data"], "test", seed=cfg["seed"], **common))
        except DataError as exc:  # the folder's problem, said as the option's
            raise DataError(f"--data: {exc}") from None
    elif cfg.get("dataset", "motion") == "digits":
        # a run made before --digit-speed existed had the default
        common.update(clutter=cfg["clutter"], speed=cfg.get("digit_speed", DIGIT_SPEED))
        sets = (MovingDigits(cfg["train_videos"], "train", seed=cfg["seed"] * 2 + 1000, **common),
                MovingDigits(cfg["val_videos"], "val", seed=cfg["seed"] * 2 + 1001, **common))
    else:
        sets = (MovingTextures(cfg["train_videos"], seed=cfg["seed"] * 2 + 1000, **common),
                MovingTextures(cfg["val_videos"], seed=cfg["seed"] * 2 + 1001, **common))
    if cfg.get("shuffle_frames"):
        sets = tuple(ShuffledFrames(d, seed=cfg["seed"] * 2 + k) for k, d in enumerate(sets))
    return sets


def build_optimizer(cfg: dict, params):
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"])
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def rng_state() -> dict:
    """The random generators' states as tensors and plain types (a checkpoint loads with
    weights_only=True)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return dict(torch=torch.get_rng_state(), numpy=[kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss,
                                                    cached], python=random.getstate())


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))


def save_atomic(obj, path: str) -> None:
    """Write to a temporary file, flush it to disk and rename: a crash or an interrupt never
    leaves a half-written checkpoint, and the previous one stays until the new one is whole."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


CALIBRATION_BINS = 15


@torch.no_grad()
def evaluate(net: nn.Module, loader, device, forward=None) -> dict:
    """The clip forward (which the streamed pipeline equals, oracle 2) over ``loader`` (``forward``:
    what computes it, default ``net``; with causal temporal padding, :func:`offline_forward`):
    ``loss`` (a per-frame network: its frames' losses averaged; a pooled head: the clip's),
    ``acc``, and the calibration of the clip prediction (the mean of the frame logits, or the
    pooled head's): ``nll``, ``ece`` (expected calibration error over 15 equal-width confidence
    bins), ``conf``, ``conf_wrong`` (mean confidence on wrong predictions; None if none) and the
    reliability diagram ``bins`` ([count, accuracy, confidence] per bin)."""
    was_training = net.training
    net.eval()
    total_loss, count = 0.0, 0
    clip_logits, labels = [], []
    for video, label in loader:
        video, label = video.to(device), label.to(device)
        out = (forward or net)(video)
        if out.dim() == 2:  # a pooled head: [B, K]
            logits = out
            total_loss += F.cross_entropy(out, label).item() * len(label)
        else:
            frames = out.flatten(3).mean(3)  # [B, K, T]
            total_loss += F.cross_entropy(frames, label[:, None].expand(-1, frames.shape[2]),
                                          reduction="mean").item() * len(label)
            logits = frames.mean(2)
        clip_logits.append(logits.float().cpu())
        labels.append(label.cpu())
        count += len(label)
    net.train(was_training)
    logits, labels = torch.cat(clip_logits), torch.cat(labels)
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    right = pred == labels
    bins, ece = [], 0.0
    edges = torch.linspace(0, 1, CALIBRATION_BINS + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        n = int(inside.sum())
        acc_b = right[inside].float().mean().item() if n else 0.0
        conf_b = conf[inside].mean().item() if n else 0.0
        bins.append([n, acc_b, conf_b])
        ece += n / len(labels) * abs(acc_b - conf_b)
    return dict(loss=total_loss / count, acc=right.float().mean().item(),
                nll=F.cross_entropy(logits, labels).item(), ece=ece, conf=conf.mean().item(),
                conf_wrong=conf[~right].mean().item() if (~right).any() else None, bins=bins)


def offline_forward(stages, video: torch.Tensor) -> torch.Tensor:
    """A from_model pipeline's stages run one after the other on a whole clip: the function the
    pipeline streams (with ``temporal_padding="causal"`` the causal one, which ``model(video)``
    is not)."""
    x = video
    for stage in stages:
        x = stage(x)
    return x


def network_lags(net: nn.Module, cfg: dict) -> dict:
    """``{"same": lag, "causal": lag or None}`` of the network, in input frames (traced as
    from_model traces it; the chains' list API streams 'same', their causal form is from_model's)."""
    from .trace import trace_model
    graph, _ = trace_model(net, cfg.get("batchnorm") if cfg["model"] in models.GRAPHS else None, "same")
    return graph.lags()


def resolve_temporal_padding(cfg: dict, lags: dict) -> str:
    """--temporal-padding as the run streams it: 'auto' is causal for a standard network whose
    'same' lag is more than a quarter of the clip (clip_len < AUTO_CAUSAL_FACTOR x lag) and
    that has a causal form, else same; the chains stay 'same'. It depends on the network and
    the clip length only, so --mode bp and sideways train the same function."""
    chosen = cfg.get("temporal_padding", "same")
    if chosen != "auto":
        return chosen
    if cfg["model"] in models.GRAPHS and lags.get("causal") is not None and \
            cfg["clip_len"] < AUTO_CAUSAL_FACTOR * lags["same"]:
        return "causal"
    return "same"


def short_clip_problem(cfg: dict, lag: int, lags: dict) -> Optional[str]:
    """The one-line refusal of a Sideways run whose clips are no longer than the pipeline's lag
    (None when it may run: a longer clip, --mode bp, or --allow-short-clips)."""
    if cfg["mode"] != "sideways" or cfg["clip_len"] > lag or cfg.get("allow_short_clips"):
        return None
    padding = cfg.get("temporal_padding", "same")
    causal = lags.get("causal")
    if padding == "same" and causal is not None and causal < lag:
        ways = f"use --temporal-padding causal (lag {causal}), a --clip-len several times {lag}"
    else:
        ways = f"use a --clip-len several times {lag}"
    return (f"--clip-len {cfg['clip_len']} is no longer than the {lag}-frame lag of --model {cfg['model']} with "
            f"--temporal-padding {padding}: Sideways would pair most errors with activations of the clip's end "
            f"padding and learn little; {ways}, or --mode bp, or pass --allow-short-clips to train anyway")


def _padding_note(cfg: dict, chosen: str, lag: int, lags: dict) -> str:
    """The startup line's account of the temporal padding and the lag it gives."""
    padding = cfg["temporal_padding"]
    note = f"temporal padding {padding}, lag {lag}"
    if padding == "causal":
        note += f" ('same': {lags['same']})"
    if chosen == "auto":
        why = (f"--clip-len {cfg['clip_len']} < {AUTO_CAUSAL_FACTOR}x the 'same' lag" if padding == "causal" else
               "the chains stream 'same'" if cfg["model"] in models.CHAINS else
               f"--clip-len {cfg['clip_len']} >= {AUTO_CAUSAL_FACTOR}x the lag" if lags.get("causal") is not None
               else "no causal form")
        note += f", by --temporal-padding auto: {why}"
    return note


class _Precision:
    """--amp: the autocast every forward runs under and, for fp16, the GradScaler. The pipeline
    back-propagates inside backward_clip, so the loss function itself carries the scale."""

    def __init__(self, amp: str, device: torch.device):
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        self.scale = None  # this step's loss scale, a tensor (no host sync)
        if self.scaler is not None:  # a step skipped for overflow is the scaler's normal working
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")

    def autocast(self):
        return torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None)

    def loss_fn(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, target)
        return loss if self.scale is None else loss * self.scale

    def begin_step(self) -> None:
        if self.scaler is not None:
            self.scale = self.scaler.scale(torch.ones((), device=self.device))

    def unscaled(self, loss: torch.Tensor) -> float:
        return loss.item() if self.scale is None else (loss / self.scale).item()

    def step(self, optimizer) -> None:
        """The clip's optimizer step; fp16 skips it where a gradient overflowed (and lowers the scale)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and exits after the current step."""

    def __init__(self):
        self.signal: Optional[int] = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nsideways-train: {signal.Signals(signum).name} received; saving a checkpoint after this step",
              file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


class _Cluster:
    """The processes of a run: one, or torchrun's ranks each running a stage group. Rank 0
    writes the files; every decision that changes what happens next is taken together."""

    def __init__(self, distributed: bool, device: str, replicas: int = 1):
        import torch.distributed as dist
        self.dist = dist
        self.replicas = replicas
        self.distributed = distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not self.distributed:
            if replicas > 1:
                raise DataError(f"--replicas {replicas} needs torchrun (torchrun --nproc-per-node N -m "
                                "sideways_kernels.train --distributed --replicas R ...); to go on in one process "
                                "(e.g. resuming such a run), pass --replicas 1")
            self.rank, self.world, self.device = 0, 1, torch.device(device)
            return
        if "RANK" not in os.environ:
            raise DataError("--distributed needs torchrun (torchrun --nproc-per-node N -m sideways_kernels.train ...)")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}") if device == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL's point-to-point calls need it set
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world % replicas:
            raise DataError(f"--replicas {replicas} does not divide the {self.world} ranks")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def pipeline(self, net: nn.Module, cfg: dict, optimizer, example: torch.Tensor, loss_fn=F.cross_entropy):
        """The chains cut at their blocks; the standard networks by from_model."""
        kind = SidewaysPipeline
        kwargs = dict(update=cfg["update"], optimizer=optimizer, smoothing=cfg.get("smoothing", 1))
        if self.distributed:
            from .distributed import DistributedSidewaysPipeline
            kind = DistributedSidewaysPipeline
            kwargs.update(device=self.device, replicas=self.replicas)
        padding = cfg.get("temporal_padding", "same")
        if cfg["model"] in models.CHAINS and padding == "same":
            return kind(models.stages(net, cfg["stages"]), loss_fn, cfg["mode"], **kwargs)
        was_training = net.training
        try:  # the network itself must take the clips
            with torch.no_grad():
                net.eval()(example)
        except RuntimeError as exc:
            raise DataError(f"--model {cfg['model']} cannot take clips of {cfg['clip_len']} frames of "
                            f"{cfg['size']}x{cfg['size']} (--clip-len, --size): {str(exc).splitlines()[0][:160]}") \
                from None
        finally:
            net.train(was_training)
        try:
            return kind.from_model(net, cfg["stages"], loss_fn, cfg["mode"], batchnorm=cfg["batchnorm"],
                                   temporal_padding=padding, example=example, **kwargs)
        except ValueError as exc:  # too many stages, a clip its strides cannot take, ...
            raise DataError(f"--model {cfg['model']}: {exc}") from None

    def share(self, pipe, batch: torch.Tensor) -> torch.Tensor:
        """This replica's share of a batch (all of it without replicas)."""
        if self.replicas == 1:
            return batch
        if len(batch) < self.replicas:
            raise DataError(f"a batch of {len(batch)} cannot be shared by --replicas {self.replicas}")
        return torch.tensor_split(batch, self.replicas)[pipe.replica]

    def any(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)])
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def total(self, value: float) -> float:
        """The sum over the ranks of a number only the top ranks have (they hold the outputs;
        the others give 0), for every rank."""
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        self.dist.all_reduce(t)
        return t.item()

    def sync(self, net: nn.Module, pipe, optimizer) -> dict:
        """Every rank gets the whole model (each trained only its own stages' parameters); returns
        the optimizer state of all ranks merged, as one process would have it."""
        if not self.distributed:
            return optimizer.state_dict()
        mine = {id(t) for stage in pipe.local_stages() for t in itertools.chain(stage.parameters(), stage.buffers())}
        local = {k: v.detach().cpu() for k, v in net.state_dict(keep_vars=True).items() if id(v) in mine}
        everyone = [None] * self.world
        self.dist.all_gather_object(everyone, (local, optimizer.state_dict()))
        merged = {k: v for part, _ in everyone for k, v in part.items()}
        net.load_state_dict({**net.state_dict(), **{k: v.to(self.device) for k, v in merged.items()}})
        state = everyone[0][1]
        state["state"] = {k: v for _, opt in everyone for k, v in opt["state"].items()}
        return state

    def close(self, finished: bool = False) -> None:
        """Tear the process group down; after a finished run the ranks meet first (gloo aborts
        a rank whose peer closed the connections while its own threads still used them)."""
        if self.distributed and self.dist.is_initialized():
            if finished:
                self.dist.barrier()
            self.dist.destroy_process_group()


# --- the run ----------------------------------------------------------------------------

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "state", "rng", "config", "classes")


def _check_checkpoint(ckpt, path: str) -> None:
    """A DataError naming ``path`` unless ``ckpt`` has the parts and types of a sideways-train
    checkpoint (whether they fit the network is found when they are loaded)."""
    def refuse(why: str):
        raise DataError(f"--resume: {path!r} is not a sideways-train checkpoint ({why})")

    if not isinstance(ckpt, dict):
        refuse(f"it holds a {type(ckpt).__name__}, not a dict")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        refuse(f"it lacks {missing}")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    state = ckpt["state"]
    checks = [
        ("model", isinstance(ckpt["model"], dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                          for k, v in ckpt["model"].items()), "a dict of tensors"),
        ("optimizer", isinstance(ckpt["optimizer"], dict) and isinstance(ckpt["optimizer"].get("state"), dict)
         and isinstance(ckpt["optimizer"].get("param_groups"), list), "an optimizer's state dict"),
        ("scheduler", isinstance(ckpt["scheduler"], dict), "a scheduler's state dict"),
        ("state", isinstance(state, dict) and all(count(state.get(k)) for k in ("step", "epoch", "batch"))
         and isinstance(state.get("sums"), list) and 4 <= len(state["sums"]) <= 6 and all(map(number, state["sums"]))
         and (state.get("best_val_acc") is None or number(state.get("best_val_acc"))) and number(state.get("wall")),
         "the run's position (step, epoch, batch, sums, best_val_acc, wall)"),
        ("rng", isinstance(ckpt["rng"], dict) and isinstance(ckpt["rng"].get("torch"), torch.Tensor)
         and isinstance(ckpt["rng"].get("numpy"), (list, tuple)) and len(ckpt["rng"]["numpy"]) == 5
         and isinstance(ckpt["rng"].get("python"), (list, tuple)), "the random generators' states"),
        ("config", isinstance(ckpt["config"], dict) and all(isinstance(k, str) for k in ckpt["config"])
         and "model" in ckpt["config"] and "mode" in ckpt["config"], "the run's options"),
        ("classes", isinstance(ckpt["classes"], list) and len(ckpt["classes"]) >= 2
         and all(isinstance(c, str) for c in ckpt["classes"]), "a list of class names"),
    ]
    for key, ok, expected in checks:
        if not ok:
            refuse(f"its {key!r} entry is not {expected}")


def _check_config(cfg: dict, path: str) -> None:
    """The options a checkpoint names, checked by the command line's own rules (choices, types,
    ranges, the rules between options): a DataError naming ``path`` for the first broken one."""
    p = _parser()
    p.raise_errors = True
    argv, dests = [], []
    for action in p._actions:
        if not action.option_strings or action.dest not in cfg or action.dest in ("help", "resume", "out"):
            continue
        value = cfg[action.dest]
        dests.append(action.dest)
        if isinstance(action, argparse._StoreTrueAction):
            if value is True:
                argv.append(action.option_strings[-1])
            elif value is not False:
                argv.append(f"{action.option_strings[-1]}={value}")  # refused: the flag takes no value
        elif value is not None:
            argv.append(f"{action.option_strings[-1]}={value}")
    try:
        parsed = p.parse_args(argv)
        for dest in dests:
            got = getattr(parsed, dest)
            if got != cfg[dest] or type(got) is not type(cfg[dest]) and not (
                    isinstance(got, float) and isinstance(cfg[dest], int) and not isinstance(cfg[dest], bool)):
                raise _ConfigError(f"its {dest!r} is {cfg[dest]!r}, which --{dest.replace('_', '-')} does not take")
        _check_options(p, parsed)
    except _ConfigError as exc:
        raise DataError(f"--resume: {path!r} names options this run cannot take: {exc}") from None


# what a resumed run may change; it keeps every other setting of its checkpoint
RESUME_MAY_CHANGE = ("epochs", "max_steps", "device", "backend", "workers", "log_every", "replicas")


def _refuse_changes(args: argparse.Namespace, cfg: dict, out: str) -> None:
    """A setting typed with --resume that differs from the checkpoint's is refused, naming it:
    the run goes on as it was made (dropping it silently would train something else than asked)."""
    flag = lambda key: "--" + key.replace("_", "-")
    changed = [f"{flag(k)} {getattr(args, k)} (the run has {cfg.get(k)})" for k in sorted(args.given)
               if k not in (*RESUME_MAY_CHANGE, "resume", "out") and getattr(args, k) != cfg.get(k)]
    if "out" in args.given and os.path.abspath(args.out) != out:
        changed.append(f"--out {args.out} (the run's directory is {out})")
    if changed:
        raise DataError(f"--resume continues the run as it was made, but {'; '.join(changed)}; a resumed run may "
                        f"change only {', '.join(flag(k) for k in RESUME_MAY_CHANGE)} (start a new run for the rest)")


def run(args: argparse.Namespace) -> int:
    resume = pretrained = None
    if args.resume:
        if not os.path.isfile(args.resume):
            raise DataError(f"--resume: no checkpoint at {args.resume!r}")
        resume = load_weights(args.resume, "--resume")
        _check_checkpoint(resume, args.resume)
        best = resume["state"].get("best_val_acc")
        if best is not None and best < 0:  # written before "no validation yet" was None
            resume["state"]["best_val_acc"] = None
        cfg = {action.dest: action.default for action in _parser()._actions
               if action.dest not in ("help", "resume", "out")}  # a checkpoint older than some options
        cfg.update(resume["config"])
        if "temporal_padding" not in resume["config"]:  # written before the option: it streamed 'same' and
            cfg.update(temporal_padding="same", allow_short_clips=True)  # took any clip length; it goes on so
        cfg["max_steps"] = None  # a cut run goes on to the end unless cut again
        cfg["pretrained"] = None  # the checkpoint's weights are where the run goes on from
        for key in RESUME_MAY_CHANGE:
            if key in args.given:
                cfg[key] = getattr(args, key)
        _check_config(cfg, args.resume)
        out = os.path.dirname(os.path.abspath(args.resume))
        _refuse_changes(args, cfg, out)  # after the checkpoint's own checks: a foreign file is said first
    else:
        cfg = {k: v for k, v in vars(args).items() if k not in ("resume", "out", "given")}
        out = args.out or os.path.join("runs", f"{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
        if os.path.exists(os.path.join(out, "last.pt")):
            raise DataError(f"{out!r} already holds a run; continue it with --resume {os.path.join(out, 'last.pt')} "
                            "or choose another --out")
        if cfg["pretrained"]:  # read (and refused) before anything is built or written
            pretrained = read_state_dict(cfg["pretrained"])
    cluster = _Cluster(args.distributed, cfg["device"], cfg["replicas"])
    code = None
    try:
        code = _train(args, cfg, out, resume, cluster, pretrained)
        return code
    finally:
        cluster.close(finished=code == 0)


def _train(args, cfg: dict, out: str, resume, cluster: _Cluster, pretrained: Optional[dict] = None) -> int:
    set_backend(cfg["backend"])
    device = cluster.device
    try:  # a backend that cannot run here (or a bogus SIDEWAYS_BACKEND) is one line, before anything is built
        resolve_backend(device)
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"{'--backend' if cfg['backend'] else 'SIDEWAYS_BACKEND'}: {exc}") from None
    if "SIDEWAYS_TRITON_COMPILE_THREADS" in os.environ and backends()["triton"]:  # read at a GPU's first autotuning
        try:
            importlib.import_module("sideways_kernels.triton")._compile_threads()
        except ValueError as exc:
            raise DataError(str(exc)) from None
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])

    with warnings.catch_warnings():  # said once below, for both splits
        warnings.simplefilter("ignore", UnreadableVideoWarning)
        train_set, val_set = build_data(cfg)
    folders = [getattr(ds, "dataset", ds) for ds in (train_set, val_set)]  # ShuffledFrames wraps one
    skipped = [path for ds in folders for path in getattr(ds, "skipped", [])]
    if skipped and cluster.main:
        reasons = {k: v for ds in folders for k, v in getattr(ds, "skip_reasons", {}).items()}
        print(f"sideways-train: {unreadable_summary(skipped, reasons)}", file=sys.stderr)
    classes = len(train_set.classes)
    net = build_model(cfg, classes)
    if cfg.get("pretrained"):
        load_pretrained(net, cfg["pretrained"], pretrained)
    net = net.to(device)
    optimizer = build_optimizer(cfg, net.parameters())
    steps_per_epoch = math.ceil(len(train_set) / cfg["batch_size"])
    total_steps = cfg["epochs"] * steps_per_epoch  # not --max-steps: a cut run is a prefix of the full one
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps))))
    example = train_set[0][0].unsqueeze(0).to(device)
    precision = _Precision(cfg["amp"], device)
    lags = network_lags(net, cfg)
    chosen = cfg["temporal_padding"]
    cfg["temporal_padding"] = resolve_temporal_padding(cfg, lags)  # what the run streams (a checkpoint keeps it)
    pipe = cluster.pipeline(net, cfg, optimizer if cfg["update"] == "tick" else None, example, precision.loss_fn)
    if pipe.min_clip_length() > cfg["clip_len"]:
        raise DataError(f"--clip-len {cfg['clip_len']} is too short for --model {cfg['model']}: its temporal layers "
                        f"need at least {pipe.min_clip_length()} frames")
    short = short_clip_problem(cfg, pipe.lag, lags)
    if short:
        raise DataError(short)
    # the clip forward that validation runs: the network's own function, or the causal one the pipeline streams
    forward = net if pipe.temporal_padding != "causal" else (lambda video: offline_forward(pipe.stages, video))
    # batch: batches of `epoch` done; sums: (videos, correct, loss*videos, steps, loss², loss) of those,
    # for the epoch record
    # best_val_acc: None until a validation has run
    state = dict(step=0, epoch=0, batch=0, sums=[0, 0, 0.0, 0, 0.0, 0.0], best_val_acc=None, wall=0.0)
    if resume is not None:
        misfit = _misfit(net.state_dict(), resume["model"])
        if misfit:
            options = " ".join(f"--{k.replace('_', '-')} {cfg[k]}" for k in ("model", "width", "depth") if k in cfg)
            raise DataError(f"--resume: {args.resume!r} does not fit the network its options build ({options}): "
                            f"{misfit}")
        try:
            net.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            state.update(resume["state"])
            set_rng_state(resume["rng"])
            if precision.scaler is not None and "scaler" in resume:
                precision.scaler.load_state_dict(resume["scaler"])
        except Exception as exc:  # noqa: BLE001 - a foreign checkpoint can fail anywhere in these loads
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"--resume: {args.resume!r} does not fit the network and options it names "
                            f"({type(exc).__name__}: {first[:200]})") from None
    if cluster.main:
        os.makedirs(out, exist_ok=True)  # only now: a run refused above leaves no directory behind
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)

    def checkpoint(name: str, optimizer_state: Optional[dict] = None) -> str:
        """The same file from one process or many (every rank takes part; rank 0 writes).
        ``optimizer_state``: from a cluster.sync() just made, else one is made here."""
        path = os.path.join(out, name)
        if optimizer_state is None:
            optimizer_state = cluster.sync(net, pipe, optimizer)
        if cluster.main:
            extra = dict(scaler=precision.scaler.state_dict()) if precision.scaler is not None else {}
            save_atomic(dict(model=net.state_dict(), optimizer=optimizer_state, scheduler=scheduler.state_dict(),
                             state=dict(state), rng=rng_state(), config=cfg, classes=train_set.classes, **extra), path)
        return path

    loader_kw = dict(batch_size=cfg["batch_size"], num_workers=cfg["workers"], drop_last=False,
                     persistent_workers=False, pin_memory=device.type == "cuda")
    val_loader = torch.utils.data.DataLoader(val_set, shuffle=False, **loader_kw)
    metrics = open(os.path.join(out, "metrics.jsonl"), "a") if cluster.main else open(os.devnull, "w")
    interactive = sys.stderr.isatty() and cluster.main
    say = (lambda *a, **k: print(*a, **k)) if cluster.main else (lambda *a, **k: None)
    started = time.time() - state["wall"]
    ranks = f", {cluster.world} ranks" if cluster.distributed else ""
    ranks += f" ({cluster.replicas} replicas)" if cluster.replicas > 1 else ""
    say(f"sideways-train: {cfg['mode']} {cfg['model']} ({sum(p.numel() for p in net.parameters())} parameters, "
        f"{cfg['stages']} stages{ranks}, {_padding_note(cfg, chosen, pipe.lag, lags)}) on {len(train_set)} train / {len(val_set)} val videos, {classes} classes -> {out}",
        file=sys.stderr)
    unlogged = None  # the last step's record while --log-every has not written it: written where the run stops

    def log_unlogged():
        nonlocal unlogged
        if unlogged is not None:
            _log(metrics, **unlogged)
            unlogged = None

    try:
        with _Stop() as stop:
            while state["epoch"] < cfg["epochs"] and (cfg["max_steps"] is None or state["step"] < cfg["max_steps"]):
                epoch = state["epoch"]
                if hasattr(train_set, "set_epoch"):
                    train_set.set_epoch(epoch)
                order = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)  # same order after a resume
                loader = torch.utils.data.DataLoader(train_set, shuffle=True, generator=order, **loader_kw)
                bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg['epochs']}", interactive)
                for batch_index, (video, label) in enumerate(loader):
                    if batch_index < state["batch"]:  # resumed mid-epoch: these were done
                        bar.update(1)
                        continue
                    tick = time.time()
                    video, label = video.to(device, non_blocking=True), label.to(device, non_blocking=True)
                    precision.begin_step()
                    try:
                        with precision.autocast():
                            result = pipe.backward_clip(cluster.share(pipe, video), cluster.share(pipe, label))
                    except RuntimeError as exc:  # under torchrun: another rank stopped (it said why)
                        if not cluster.distributed:
                            raise
                        print(f"sideways-train: rank {cluster.rank} stopping at step {state['step'] + 1}: {exc}",
                              file=sys.stderr)
                        return EXIT_NON_FINITE
                    except NonFiniteError as exc:
                        log_unlogged()
                        last = os.path.join(out, "last.pt")
                        kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written yet"
                        print(f"sideways-train: stopping at step {state['step'] + 1} (epoch {epoch + 1}): {exc}; {kept}",
                              file=sys.stderr)
                        return EXIT_NON_FINITE
                    if cfg["update"] == "clip":
                        precision.step(optimizer)
                        optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    state["step"] += 1
                    state["batch"] = batch_index + 1
                    elapsed = time.time() - tick
                    hits = 0 if result.logits is None else \
                        (result.logits.argmax(1) == cluster.share(pipe, label)).sum().item()
                    hits = int(cluster.total(hits))
                    sums = state["sums"]
                    sums.extend([0, 0.0, 0.0][len(sums) - 3:])  # a checkpoint from before the spread was kept
                    step_loss = precision.unscaled(result.loss)
                    sums[0], sums[1], sums[2] = sums[0] + len(label), sums[1] + hits, sums[2] + step_loss * len(label)
                    sums[3], sums[4], sums[5] = sums[3] + 1, sums[4] + step_loss ** 2, sums[5] + step_loss
                    fps = video.shape[0] * video.shape[2] / elapsed
                    bar.update(1, loss=step_loss, acc=sums[1] / sums[0], fps=fps)
                    unlogged = dict(kind="step", step=state["step"], epoch=epoch + 1, loss=step_loss,
                                    train_acc=sums[1] / sums[0], frames_per_s=fps, lr=scheduler.get_last_lr()[0],
                                    wall=time.time() - started)
                    if state["step"] % cfg["log_every"] == 0:
                        log_unlogged()
                    state["wall"] = time.time() - started
                    if cluster.any(stop.signal is not None):
                        log_unlogged()
                        path = checkpoint("last.pt")
                        say(f"sideways-train: interrupted at step {state['step']}; saved {path}. "
                            f"Resume with --resume {path}", file=sys.stderr)
                        return EXIT_INTERRUPTED
                    if cfg["max_steps"] is not None and state["step"] >= cfg["max_steps"]:
                        break
                bar.close()
                if state["batch"] < steps_per_epoch:  # --max-steps cut the epoch: keep its place
                    log_unlogged()
                    checkpoint("last.pt")
                    break
                if epoch + 1 == cfg["epochs"] or (cfg["max_steps"] is not None and state["step"] >= cfg["max_steps"]):
                    log_unlogged()  # the run's last step, before its last epoch record
                seen, correct, loss_sum, n_steps, loss_sq, loss_plain = (list(state["sums"]) + [0, 0.0, 0.0])[:6]
                state.update(epoch=epoch + 1, batch=0, sums=[0, 0, 0.0, 0, 0.0, 0.0])
                optimizer_state = cluster.sync(net, pipe, optimizer)  # every rank evaluates the whole model
                with precision.autocast():
                    val = evaluate(net, val_loader, device, forward)
                val_loss, val_acc = val["loss"], val["acc"]
                mean_step = loss_plain / max(n_steps, 1)
                record = dict(kind="epoch", step=state["step"], epoch=epoch + 1, train_loss=loss_sum / seen,
                              train_acc=correct / seen, train_loss_sd=math.sqrt(max(loss_sq / max(n_steps, 1)
                                                                                    - mean_step ** 2, 0.0)),
                              val_loss=val_loss, val_acc=val_acc, val_nll=val["nll"], val_ece=val["ece"],
                              val_conf=val["conf"], val_conf_wrong=val["conf_wrong"], val_bins=val["bins"],
                              lr=scheduler.get_last_lr()[0], wall=time.time() - started)
                _log(metrics, **record)
                say(f"epoch {epoch + 1}: train loss {record['train_loss']:.3f} acc {record['train_acc']:.3f} | "
                      f"val loss {val_loss:.3f} acc {val_acc:.3f} | {record['wall']:.0f}s", file=sys.stderr)
                if state["best_val_acc"] is None or val_acc > state["best_val_acc"]:
                    state["best_val_acc"] = val_acc
                    checkpoint("best.pt", optimizer_state)
                checkpoint("last.pt", optimizer_state)
    finally:
        metrics.close()
    if not cluster.main:
        return 0
    _plot(out)
    print(f"sideways-train: {_summary(cfg, state, out, steps_per_epoch)}", file=sys.stderr)
    return 0


def _summary(cfg: dict, state: dict, out: str, steps_per_epoch: int) -> str:
    """The run's last line: how far it went, the best validation accuracy if a validation ran,
    and the files that exist."""
    if state["epoch"] >= cfg["epochs"]:
        head = f"done ({cfg['epochs']} epoch{'s' * (cfg['epochs'] != 1)}, {state['step']} steps)"
    else:
        where = (f"step {state['batch']} of {steps_per_epoch} in epoch {state['epoch'] + 1} of {cfg['epochs']}"
                 if state["batch"] else f"after epoch {state['epoch']} of {cfg['epochs']}")
        head = f"stopped at --max-steps {cfg['max_steps']} ({where})"
    best = state["best_val_acc"]
    if best is not None:
        head += f", best val acc {best:.3f}"
    else:
        head += ", before the first validation (at each epoch's end): no val acc yet"
    files = [name for name in ("metrics.jsonl", "curves.png", "last.pt", "best.pt")
             if os.path.isfile(os.path.join(out, name)) and os.path.getsize(os.path.join(out, name)) > 0]
    tail = f"; resume with --resume {os.path.join(out, 'last.pt')}" if state["epoch"] < cfg["epochs"] else ""
    return f"{head}; {out}: {', '.join(files) or 'no files'}{tail}"


def _log(stream, **record) -> None:
    stream.write(json.dumps(record) + "\n")
    stream.flush()


class _Quiet:
    def update(self, n=1, **postfix):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, interactive: bool):
    """A tqdm bar on a terminal, nothing otherwise."""
    if not interactive:
        return _Quiet()
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    class _Bar:
        def update(self, n=1, **postfix):
            if postfix:
                bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)
            bar.update(n)

        def close(self):
            bar.close()

    return _Bar()


def _plot(out: str) -> list:
    """curves.png: training loss per logged step; train/val accuracy, validation NLL and
    calibration error per epoch. Only panels with points are drawn, and no file when none has
    any. Returns the panels drawn as (y label, number of points)."""
    path = os.path.join(out, "metrics.jsonl")
    records = [json.loads(line) for line in open(path) if line.strip()] if os.path.isfile(path) else []
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    ep = [r["epoch"] for r in epochs]
    calibration = [(r["epoch"], r.get("val_nll"), r.get("val_ece")) for r in epochs
                   if r.get("val_nll") is not None and r.get("val_ece") is not None]
    panels = []  # (y label, x label, [(x, y, style, label)])
    if steps:
        marker = "." if len(steps) < 50 else None  # a single point must show
        panels.append(("training clip loss", "step",
                       [([r["step"] for r in steps], [r["loss"] for r in steps], dict(lw=1, marker=marker), None)]))
    if epochs:
        panels.append(("accuracy", "epoch", [(ep, [r["train_acc"] for r in epochs], dict(marker="o"), "train"),
                                             (ep, [r["val_acc"] for r in epochs], dict(marker="o"), "validation")]))
    if calibration:
        x = [c[0] for c in calibration]
        panels.append(("validation calibration", "epoch",
                       [(x, [c[1] for c in calibration], dict(marker="o"), "validation NLL"),
                        (x, [c[2] for c in calibration], dict(marker="s"), "validation ECE (15 bins)")]))
    if not panels:
        return []
    try:
        import matplotlib
    except ImportError:
        print("sideways-train: matplotlib is not installed, so no curves.png (pip install matplotlib)", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 3.6), squeeze=False)
    drawn = []
    for ax, (ylabel, xlabel, lines) in zip(axes[0], panels):
        for x, y, style, label in lines:
            ax.plot(x, y, label=label, **style)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if any(label for *_, label in lines):
            ax.legend()
        ax.grid(alpha=0.3)
        drawn.append((ylabel, min(len(x) for x, *_ in lines)))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    plt.close(fig)
    return drawn


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except DataError as exc:
        print(f"sideways-train: error: {exc}", file=sys.stderr)
        return EXIT_DATA


if __name__ == "__main__":
    sys.exit(main())
