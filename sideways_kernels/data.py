"""Data for sideways-train: an embedded procedural dataset whose classes are motions
(no download), moving handwritten digits made from the real digits scikit-learn ships (no
download), and a user's own videos in the UCF101/HMDB51 folder layout.

Both yield ``(clip, label)`` with ``clip`` a float tensor ``[C, T, H, W]`` in about [-1, 1].
"""
from __future__ import annotations

import math
import os
import re
import warnings
import zlib
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DataError", "MovingTextures", "MovingDigits", "ShuffledFrames", "VideoFolder", "MOTIONS",
           "UnreadableVideoWarning", "unreadable_summary"]


class DataError(ValueError):
    """A problem with the user's data, reported as one line (no traceback)."""


class UnreadableVideoWarning(UserWarning):
    """Files of a VideoFolder that could not be read and were skipped (one warning per folder
    and split, naming the first few)."""


def unreadable_summary(paths, reasons: Optional[dict] = None, shown: int = 3) -> str:
    """``N unreadable file(s) skipped: a (why), b, c and K more``: one line for any number of files."""
    paths = list(dict.fromkeys(paths))  # a file listed in both splits counts once
    named = []
    for i, path in enumerate(paths[:shown]):
        why = (reasons or {}).get(path)
        named.append(f"{path} ({why})" if why and i == 0 else path)  # the first one's reason: they tend to share it
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return f"skipped {len(paths)} unreadable file(s): {', '.join(named)}{more}"


# The class of a video is its motion: a single frame cannot tell it.
MOTIONS = ("right-slow", "right-fast", "left-slow", "left-fast", "up-slow", "up-fast", "down-slow", "down-fast",
           "rotate-cw", "rotate-ccw")
_DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_SPEED = {"slow": 0.5, "fast": 1.25}  # pixels per original frame
_SPIN = 0.25  # radians per original frame


class MovingTextures(torch.utils.data.Dataset):
    """Procedural videos: a textured disk moving on a noisy textured background, wrapping
    around the edges. Ten classes: four directions at two speeds, and spinning in place
    either way. Generated deterministically from ``seed``; ``frame_stride`` keeps every
    s-th frame, so the video changes s times faster per frame (what Sideways is sensitive to).
    """

    def __init__(self, num_videos: int, clip_len: int = 8, frame_stride: int = 1, size: int = 32, seed: int = 0,
                 channels: int = 3):
        if num_videos < 1 or clip_len < 1 or frame_stride < 1 or size < 8:
            raise DataError(f"embedded data needs num_videos, clip_len, frame_stride >= 1 and size >= 8, got "
                            f"{num_videos}, {clip_len}, {frame_stride}, {size}")
        self.classes = list(MOTIONS)
        g = torch.Generator().manual_seed(seed)
        n, t_full = num_videos, clip_len * frame_stride
        self.labels = torch.randint(0, len(MOTIONS), (n,), generator=g)
        # background: smooth random texture, plus fresh noise every frame
        bg = F.interpolate(torch.rand(n, channels, size // 4, size // 4, generator=g) * 2 - 1, size=(size, size),
                           mode="bilinear", align_corners=False) * 0.3
        texture = torch.sign(torch.rand(n, channels, 5, 5, generator=g) - 0.5)  # saturated colours: the object stands out
        radius = size * (0.18 + 0.06 * torch.rand(n, generator=g))
        start = torch.rand(n, 2, generator=g) * size
        jitter = 0.8 + 0.4 * torch.rand(n, generator=g)
        velocity, spin = torch.zeros(n, 2), torch.zeros(n)
        for i, label in enumerate(self.labels.tolist()):
            name = MOTIONS[label]
            if name.startswith("rotate"):
                spin[i] = _SPIN * jitter[i] * (1 if name.endswith("cw") and not name.endswith("ccw") else -1)
            else:
                direction, speed = name.split("-")
                velocity[i] = torch.tensor(_DIRECTIONS[direction]) * _SPEED[speed] * jitter[i]
        steps = torch.arange(0, t_full, frame_stride, dtype=torch.float32)  # the frames kept
        centre = start[:, None] + velocity[:, None] * steps[None, :, None]  # [n, T, 2]
        angle = spin[:, None] * steps[None]  # [n, T]
        ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                indexing="ij")
        # offset of each pixel from the object centre on the torus, in object radii
        dx = (xs[None, None] - centre[..., 0, None, None] + size / 2) % size - size / 2
        dy = (ys[None, None] - centre[..., 1, None, None] + size / 2) % size - size / 2
        cos, sin = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
        u = (cos * dx + sin * dy) / radius[:, None, None, None]
        v = (-sin * dx + cos * dy) / radius[:, None, None, None]
        grid = torch.stack([u, v], dim=-1).reshape(n, clip_len * size, size, 2)
        obj = F.grid_sample(texture, grid, mode="nearest", padding_mode="border", align_corners=False)
        obj = obj.reshape(n, channels, clip_len, size, size)
        inside = ((u ** 2 + v ** 2) < 1).reshape(n, 1, clip_len, size, size)
        noise = torch.randn(n, channels, clip_len, size, size, generator=g) * 0.1
        video = torch.where(inside, obj, bg[:, :, None]) + noise
        self.videos = video.clamp(-1, 1).to(torch.float16)  # [n, C, T, H, W], ~6 KiB a frame at 32x32

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.videos[i].float(), int(self.labels[i])


# --- moving handwritten digits --------------------------------------------------------------

_DIGIT_SPLIT_SEED = 20260101  # fixed: which digit images are for validation never changes


def _digit_images():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("--dataset digits needs scikit-learn (it ships the 1,797 digits): pip install scikit-learn") \
            from None
    d = load_digits()
    return torch.from_numpy(d.images).float() / 16.0, torch.from_numpy(d.target).long()


DIGIT_SPEED = 1.5  # MovingDigits' pixels per frame (each video: this x 0.6-1.4)


class MovingDigits(torch.utils.data.Dataset):
    """Moving-MNIST-style videos of real handwriting: one of the 1,797 8x8 digits scikit-learn
    ships (``sklearn.datasets.load_digits``), upscaled, bouncing off the edges of a canvas with
    a random velocity, on an optional static clutter of random strokes. The class is the digit:
    appearance is the signal, motion a nuisance. The digit images are split once, by a fixed
    permutation, 80% for training and 20% for validation, so validation digits were never seen
    in training; the videos (which image, start, velocity) follow from ``seed``. Clips are
    ``[3, T, size, size]`` in [0, 1]: ink on a zero background (gray, three channels)."""

    def __init__(self, num_videos: int, split: str = "train", clip_len: int = 8, frame_stride: int = 1,
                 size: int = 32, seed: int = 0, clutter: float = 0.0, speed: float = DIGIT_SPEED):
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        if num_videos < 1 or clip_len < 1 or frame_stride < 1 or size < 12:
            raise DataError(f"digits need num_videos, clip_len, frame_stride >= 1 and size >= 12, got "
                            f"{num_videos}, {clip_len}, {frame_stride}, {size}")
        images, targets = _digit_images()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(_DIGIT_SPLIT_SEED))
        cut = int(0.8 * len(images))
        pool = order[:cut] if split == "train" else order[cut:]
        self.classes = [str(d) for d in range(10)]
        self.pool = pool  # indices into load_digits(): which real digits this split may show
        g = torch.Generator().manual_seed(seed)
        n = num_videos
        which = pool[torch.randint(0, len(pool), (n,), generator=g)]
        self.labels = targets[which]
        digit = max(8, round(size * 0.4))
        glyphs = F.interpolate(images[which][:, None], size=(digit, digit), mode="bilinear", align_corners=False)
        room = size - digit
        start = torch.rand(n, 2, generator=g) * room
        angle = torch.rand(n, generator=g) * 2 * math.pi
        velocity = torch.stack([torch.cos(angle), torch.sin(angle)], 1) * speed * (0.6 + 0.8 * torch.rand(n, 1,
                                                                                                            generator=g))
        steps = torch.arange(0, clip_len * frame_stride, frame_stride, dtype=torch.float32)
        # bouncing: position on a line folded into [0, room] (a triangle wave)
        travel = start[:, None] + velocity[:, None] * steps[None, :, None]  # [n, T, 2]
        folded = torch.remainder(travel, 2 * room)
        pos = torch.where(folded > room, 2 * room - folded, folded).round().long()  # [n, T, 2] (x, y)
        video = torch.zeros(n, clip_len, size, size)
        rows = torch.arange(digit)
        for t in range(clip_len):
            ys = pos[:, t, 1, None] + rows  # [n, digit]
            xs = pos[:, t, 0, None] + rows
            video[torch.arange(n)[:, None, None], t, ys[:, :, None], xs[:, None, :]] = glyphs[:, 0]
        if clutter > 0:  # static strokes: fragments of other digits, faint
            strokes = images[pool[torch.randint(0, len(pool), (n, 3), generator=g)]]
            background = F.interpolate(strokes.reshape(n * 3, 1, 8, 8), size=(size // 2, size // 2), mode="bilinear",
                                       align_corners=False).reshape(n, 3, size // 2, size // 2)
            canvas = torch.zeros(n, size, size)
            for j, (oy, ox) in enumerate([(0, 0), (size // 2, 0), (0, size // 2)]):
                canvas[:, oy:oy + size // 2, ox:ox + size // 2] += background[:, j]
            video = torch.maximum(video, clutter * canvas[:, None])
        self.videos = video.clamp(0, 1).to(torch.float16)[:, None]  # [n, 1, T, H, W]: ink on a zero background

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.videos[i].float().expand(3, -1, -1, -1), int(self.labels[i])


class ShuffledFrames(torch.utils.data.Dataset):
    """The frames of every clip of ``dataset`` in a random order (a control: Sideways pairs
    errors with activations from other frames, so it relies on smooth, correlated frames). The
    order follows from (seed, epoch, index), so a resumed run sees the same clips."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.classes = dataset.classes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        clip, label = self.dataset[i]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
        return clip[:, torch.randperm(clip.shape[1], generator=g)], label


# --- a user's own videos -------------------------------------------------------------------

VIDEO_EXTS = (".avi", ".mp4", ".mkv")
TENSOR_EXTS = (".npy", ".pt")


def _pyav():
    try:
        import av
    except ImportError:
        raise DataError("reading .avi/.mp4/.mkv videos needs PyAV: pip install av") from None
    return av


def _probe(path: str) -> int:
    """Number of frames in a video or tensor file; raises on an unreadable file."""
    if path.endswith(".npy"):
        with open(path, "rb") as f:  # else np.load takes any other bytes for a pickle and says so
            if f.read(6) != b"\x93NUMPY":
                raise ValueError("not a NumPy .npy file (no .npy header)")
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 4:
            raise ValueError(f"expected [T, H, W, C], got shape {arr.shape}")
        return arr.shape[0]
    if path.endswith(".pt"):
        t = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"expected a [T, H, W, C] tensor, got {type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
        return t.shape[0]
    av = _pyav()
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        return sum(1 for _ in container.decode(video=0))


def _read_frames(path: str) -> np.ndarray:
    """All frames as uint8 (or float) [T, H, W, C]."""
    if path.endswith(".npy"):
        return np.load(path)
    if path.endswith(".pt"):
        return torch.load(path, map_location="cpu", weights_only=True).numpy()
    av = _pyav()
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _split_file(root: str, name: str) -> Optional[str]:
    for folder in (root, os.path.join(root, "splits"), os.path.join(root, "ucfTrainTestlist")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


class VideoFolder(torch.utils.data.Dataset):
    """A folder with one sub-folder per class of ``.avi/.mp4/.mkv`` videos (decoded with
    PyAV, in DataLoader workers) or ``.npy/.pt`` tensors ``[T, H, W, C]``. The official
    ``trainlist01.txt``/``testlist01.txt`` are used when present, else a deterministic 80/20
    split by file name. Unreadable files are skipped with one UnreadableVideoWarning naming the
    first few (``skipped`` lists them all, ``skip_reasons`` says why); clips are ``clip_len`` frames ``frame_stride`` apart,
    resized (shorter side) and centre-cropped to ``size``."""

    def __init__(self, root: str, split: str = "train", clip_len: int = 8, frame_stride: int = 1, size: int = 32,
                 seed: int = 0):
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        if not os.path.isdir(root):
            raise DataError(f"data folder {root!r} does not exist or is not a folder")
        self.root, self.clip_len, self.frame_stride, self.size, self.seed = root, clip_len, frame_stride, size, seed
        self.train = split == "train"
        self.epoch = 0
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                              and any(f.lower().endswith(VIDEO_EXTS + TENSOR_EXTS) for f in os.listdir(os.path.join(root, d))))
        if not self.classes:
            raise DataError(f"no videos in {root!r}: expected one sub-folder per class holding "
                            f"{'/'.join(VIDEO_EXTS + TENSOR_EXTS)} files")
        if len(self.classes) < 2:
            raise DataError(f"{root!r} has only one class ({self.classes[0]!r}); a classifier needs at least two")
        files = [(os.path.join(c, f), label) for label, c in enumerate(self.classes)
                 for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(VIDEO_EXTS + TENSOR_EXTS)]
        chosen = self._split(files, split)
        needed = (clip_len - 1) * frame_stride + 1
        self.items, self.skipped, self.skip_reasons = [], [], {}
        for rel, label in chosen:
            path = os.path.join(root, rel)
            try:
                n = _probe(path)
            except DataError:  # a problem of the setup (no PyAV), not of this file
                raise
            except Exception as exc:  # corrupt or unreadable: skip it, name it (once, below)
                self.skipped.append(path)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                first = re.sub(r"^\[Errno -?\d+\] ", "", first)[:100]  # PyAV's FFmpeg code says nothing to a user
                self.skip_reasons[path] = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
                continue
            if n < needed:
                raise DataError(f"video {path} has {n} frames, shorter than one clip ({clip_len} frames "
                                f"{frame_stride} apart need {needed})")
            self.items.append((path, label, n))
        if not self.items:
            raise DataError(f"no readable videos in the {split} split of {root!r} "
                            f"({unreadable_summary(self.skipped, self.skip_reasons)})")
        if self.skipped:
            warnings.warn(f"{root} ({split}): {unreadable_summary(self.skipped, self.skip_reasons)}",
                          UnreadableVideoWarning, stacklevel=2)

    def _split(self, files, split):
        listed = _split_file(self.root, "trainlist01.txt" if split == "train" else "testlist01.txt")
        if listed is not None:
            with open(listed) as f:
                names = {line.split()[0].replace("\\", "/") for line in f if line.strip()}
            return [(rel, label) for rel, label in files if rel.replace(os.sep, "/") in names]
        # deterministic: a file's split depends only on its name
        in_test = lambda rel: zlib.crc32(rel.replace(os.sep, "/").encode()) % 5 == 0
        return [(rel, label) for rel, label in files if in_test(rel) == (split == "test")]

    def set_epoch(self, epoch: int) -> None:
        """Clip start positions depend on (seed, epoch, index): a resumed run sees the same clips."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label, n = self.items[i]
        needed = (self.clip_len - 1) * self.frame_stride + 1
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            start = int(rng.integers(0, n - needed + 1))
        else:
            start = (n - needed) // 2
        frames = _read_frames(path)[start:start + needed:self.frame_stride]
        clip = torch.as_tensor(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float()  # [C, T, H, W]
        if frames.dtype == np.uint8:
            clip = clip / 127.5 - 1
        c, t, h, w = clip.shape
        scale = self.size / min(h, w)
        clip = F.interpolate(clip, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                             mode="bilinear", align_corners=False, antialias=True)
        top, left = (clip.shape[-2] - self.size) // 2, (clip.shape[-1] - self.size) // 2
        return clip[..., top:top + self.size, left:left + self.size].contiguous(), label
