"""The embedded datasets and the evaluation metrics: moving handwritten digits (real digits,
validation digits never seen in training, labels drawn as they say), shuffled frames, and the
calibration figures of evaluate()."""
import functools
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sideways_kernels import data, train
from sideways_kernels.data import (MOTIONS, DataError, MovingDigits, MovingTextures, ShuffledFrames,
                                     UnreadableVideoWarning, VideoFolder)


def test_digits_are_real_handwriting_split_once_and_drawn_as_labelled():
    from sklearn.datasets import load_digits
    images = torch.from_numpy(load_digits().images).float() / 16
    train_set = MovingDigits(40, "train", clip_len=6, size=24, seed=3)
    val_set = MovingDigits(40, "val", clip_len=6, size=24, seed=4)
    assert not set(train_set.pool.tolist()) & set(val_set.pool.tolist())  # validation digits never trained on
    assert len(train_set.pool) + len(val_set.pool) == len(images)
    assert MovingDigits(40, "train", clip_len=6, size=24, seed=99).pool.tolist() == train_set.pool.tolist()
    again = MovingDigits(40, "train", clip_len=6, size=24, seed=3)
    assert torch.equal(again.videos, train_set.videos) and torch.equal(again.labels, train_set.labels)
    clip, label = train_set[5]
    assert clip.shape == (3, 6, 24, 24) and 0 <= clip.min() and clip.max() <= 1 and label == int(train_set.labels[5])
    # every frame shows one of the train pool's images of that label, upscaled, somewhere
    digit = max(8, round(24 * 0.4))
    candidates = F.interpolate(images[train_set.pool][:, None], size=(digit, digit), mode="bilinear",
                               align_corners=False)[:, 0]
    labels = torch.from_numpy(load_digits().target)[train_set.pool]
    frame = clip[0, 2]
    windows = frame.unfold(0, digit, 1).unfold(1, digit, 1).reshape(-1, digit, digit)
    matches = [(windows - c).abs().amax((1, 2)).min() < 2e-3 for c in candidates]  # float16 storage
    assert any(matches) and {int(labels[i]) for i, m in enumerate(matches) if m} == {label}
    # and they move
    assert not torch.equal(clip[0, 0], clip[0, 5])
    # the validation videos show the validation pool's digits (3 clips: one might pick a shared image by chance)
    val_images = F.interpolate(images[val_set.pool][:, None], size=(digit, digit), mode="bilinear",
                               align_corners=False)[:, 0]
    val_labels = torch.from_numpy(load_digits().target)[val_set.pool]
    for i in range(3):
        clip, label = val_set[i]
        windows = clip[0, 2].unfold(0, digit, 1).unfold(1, digit, 1).reshape(-1, digit, digit)
        shown = {int(val_labels[j]) for j, c in enumerate(val_images) if (windows - c).abs().amax((1, 2)).min() < 2e-3}
        assert shown == {label}, (i, shown, label)


def test_clutter_and_bad_arguments():
    plain = MovingDigits(8, "val", size=20, seed=1)
    cluttered = MovingDigits(8, "val", size=20, seed=1, clutter=0.4)
    assert (cluttered.videos.float() >= plain.videos.float()).all() and cluttered.videos.float().sum() > \
        plain.videos.float().sum()
    with pytest.raises(DataError, match="split"):
        MovingDigits(8, "test")
    with pytest.raises(DataError, match="size >= 12"):
        MovingDigits(8, size=10)


def test_clutter_is_made_of_the_splits_own_digits():
    """The static clutter of a validation video shows validation digits only (else training would
    see them as clutter): where the moving digit has passed, a pixel's darkest frame is the
    clutter, and each of its three quadrants is ``clutter`` x one of the split's images, upscaled."""
    from sklearn.datasets import load_digits
    images = torch.from_numpy(load_digits().images).float() / 16
    size, half, brightness = 20, 10, 0.5
    for split in ("train", "val"):
        ds = MovingDigits(6, split, clip_len=8, size=size, seed=2, clutter=brightness)
        strokes = brightness * F.interpolate(images[ds.pool][:, None], size=(half, half), mode="bilinear",
                                             align_corners=False)[:, 0]
        under = ds.videos[:, 0].float().amin(1)  # [videos, H, W]: each pixel's darkest frame
        for v in range(len(ds)):
            for y, x in [(0, 0), (half, 0), (0, half)]:
                quadrant = under[v, y:y + half, x:x + half]
                explained = ((quadrant - strokes).abs() < 2e-3).float().mean((1, 2)).max().item()
                assert explained >= 0.9, (split, v, (y, x), explained)  # measured >= 0.97; another split's: <= 0.5


def test_train_and_validation_videos_differ():
    """build_data: the validation set is not the training set again (both embedded datasets)."""
    for dataset in ("motion", "digits"):
        cfg = vars(train.parse_args(["--dataset", dataset, "--train-videos", "6", "--val-videos", "6", "--size", "16",
                                     "--clip-len", "3"]))
        train_set, val_set = train.build_data(cfg)
        seen = [train_set[i][0] for i in range(len(train_set))]
        assert not any(torch.equal(val_set[i][0], clip) for i in range(len(val_set)) for clip in seen), dataset


def test_digit_speed_reaches_the_videos_and_is_checked(capsys, tmp_path):
    """--digit-speed: 0 keeps every frame of a clip the same, the default moves the digits, a
    faster speed moves them further; a speed outside [0, --size) (32 by default) and the option on the motion
    data are one line each (exit status 2)."""
    def first_video(*extra):
        cfg = vars(train.parse_args(["--dataset", "digits", "--train-videos", "4", "--val-videos", "4", "--size", "16",
                                     "--clip-len", "4", *extra]))
        return train.build_data(cfg)[0][0][0]  # [3, T, H, W]

    def shift(clip):  # mean absolute change from the first frame to the last
        return (clip[:, -1] - clip[:, 0]).abs().mean().item()

    assert shift(first_video("--digit-speed", "0")) == 0
    assert 0 < shift(first_video()) < shift(first_video("--digit-speed", "3"))
    for argv in (["--digit-speed", "-1"], ["--digit-speed", "32"], ["--dataset", "motion", "--digit-speed", "1"],
                 ["--data", str(tmp_path), "--digit-speed", "1"]):
        with pytest.raises(SystemExit) as exit_:
            train.parse_args(argv if "--digit-speed" != argv[0] else ["--dataset", "digits", *argv])
        assert exit_.value.code == 2 and "--digit-speed" in capsys.readouterr().err
    # an older run's config (before the option): the dataset's own speed
    cfg = vars(train.parse_args(["--dataset", "digits", "--train-videos", "4", "--val-videos", "4", "--size", "16",
                                 "--clip-len", "4"]))
    del cfg["digit_speed"]
    assert torch.equal(train.build_data(cfg)[0][0][0], first_video())


def test_a_folder_without_split_lists_is_split_by_name_into_disjoint_parts(tmp_path):
    """No trainlist/testlist: every file is in exactly one split (about a fifth in test), and a
    file's split depends on its name only (adding videos moves none)."""
    root = tmp_path / "tensors"
    add = functools.partial(_blank_video, root)

    def splits():
        return [{os.path.relpath(path, root) for path, _, _ in VideoFolder(str(root), s, clip_len=2).items}
                for s in ("train", "test")]
    for c in ("a", "b"):
        for i in range(20):
            add(c, i)
    train_files, test_files = splits()
    assert not train_files & test_files and len(train_files | test_files) == 40
    assert 4 <= len(test_files) <= 14
    for c in ("a", "b"):
        for i in range(20, 30):
            add(c, i)
    more_train, more_test = splits()
    assert train_files <= more_train and test_files <= more_test and len(more_train | more_test) == 60


def test_shuffled_frames_permute_each_clip_reproducibly():
    base = MovingDigits(6, "train", clip_len=7, size=16, seed=0)
    shuffled = ShuffledFrames(base, seed=5)
    clip, label = shuffled[2]
    original, original_label = base[2]
    assert label == original_label
    assert not torch.equal(clip, original)
    assert sorted(clip[0].flatten(1).sum(1).tolist()) == sorted(original[0].flatten(1).sum(1).tolist())
    assert torch.equal(shuffled[2][0], clip)  # the same clip again within an epoch...
    shuffled.set_epoch(1)
    assert not torch.equal(shuffled[2][0], clip)  # ...another order the next


def _mismatch_after_turning(video, angle: float):
    """How badly the object's colours in each frame of ``video`` [C, T, H, W] are predicted by
    the previous frame's turned by ``angle`` radians (positive: clockwise on screen, y down)
    about the best centre on the object: the fraction of object pixels whose colour differs."""
    _, t, size, _ = video.shape
    colours, obj = video.sign(), video.abs().amax(0) > 0.7  # the object's saturated colours; background <= 0.3
    ys, xs = torch.nonzero(obj[0], as_tuple=True)
    cx, cy = xs.float()[:, None], ys.float()[:, None]  # candidate centres
    cos, sin = math.cos(angle), math.sin(angle)
    errors = 0
    for k in range(t - 1):
        py, px = torch.nonzero(obj[k + 1], as_tuple=True)
        dx, dy = (px - cx + size / 2) % size - size / 2, (py - cy + size / 2) % size - size / 2  # on the torus
        qx, qy = (cx + cos * dx + sin * dy).round().long() % size, (cy - sin * dx + cos * dy).round().long() % size
        errors = errors + (colours[:, k + 1, py, px][:, None] != colours[:, k, qy, qx]).float().mean((0, 2))
    return errors.min().item() / (t - 1)


def test_moving_textures_rotate_cw_turns_clockwise_and_ccw_the_other_way():
    """Measured from the frames: each frame of a rotate-cw video is the previous one turned
    clockwise by about _SPIN (0.2-0.3 rad), of a rotate-ccw one counterclockwise."""
    ds = MovingTextures(30, clip_len=4, size=32, seed=0)
    for name, sign in (("rotate-cw", 1), ("rotate-ccw", -1)):
        videos = (ds.labels == MOTIONS.index(name)).nonzero()[:, 0].tolist()
        assert videos, name
        for i in videos:
            right, wrong = (_mismatch_after_turning(ds[i][0], s * 0.25) for s in (sign, -sign))
            assert right < 0.5 * wrong, (name, i, right, wrong)  # measured: <= 0.12 vs >= 0.28


class _Fixed(nn.Module):
    """Returns given clip logits [B, K] whatever the video (the video carries the row index)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, video):
        return self.logits[video[:, 0, 0, 0, 0].long()]


def test_evaluate_measures_nll_ece_and_confidence_when_wrong():
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.57, 0.43], [0.3, 0.7], [0.55, 0.45]]))
    labels = torch.tensor([0, 1, 1, 0])  # right (0.9), wrong (0.57), right (0.7), right (0.55)
    videos = torch.arange(4.0).view(4, 1, 1, 1, 1)
    loader = [(videos, labels)]
    got = train.evaluate(_Fixed(logits), loader, torch.device("cpu"))
    probs = logits.softmax(1)
    assert got["acc"] == pytest.approx(0.75)
    assert got["nll"] == pytest.approx(-torch.log(probs[torch.arange(4), labels]).mean().item(), rel=1e-6)
    assert got["conf_wrong"] == pytest.approx(0.57, rel=1e-6)
    # 15 equal bins: 0.55 and 0.57 share (8/15, 9/15]; 0.7 is in (10/15, 11/15]; 0.9 in (13/15, 14/15]
    expected_ece = (2 / 4) * abs(0.5 - 0.56) + (1 / 4) * abs(1 - 0.7) + (1 / 4) * abs(1 - 0.9)
    assert got["ece"] == pytest.approx(expected_ece, rel=1e-5)
    assert sum(b[0] for b in got["bins"]) == 4 and len(got["bins"]) == train.CALIBRATION_BINS


@pytest.mark.parametrize("head", ["pooled", "per-frame"])
def test_evaluate_weighs_every_video_alike_and_bins_every_confidence(head):
    """Five videos in batches of 2, 2 and 1, one predicted with a confidence of exactly 1.0: the
    loss is the mean over videos (not over batches), a per-frame network's clip prediction is the
    mean of its frames' logits, and the calibration bins (k/15, (k+1)/15] hold every video."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 1, 0])
    if head == "pooled":
        outputs = torch.randn(5, 3, generator=g)
        outputs[0] = torch.tensor([100.0, -100.0, -100.0])  # softmax: exactly 1.0
        clip, loss = outputs, F.cross_entropy(outputs, labels)
    else:  # [B, K, T, H, W]; frame 3 alone would predict otherwise than the frames' mean
        outputs = torch.randn(5, 3, 4, 2, 2, generator=g)
        outputs[0, :, :3] = torch.tensor([100.0, -100.0, -100.0])[:, None, None, None]
        outputs[:, :, 3] += 30 * torch.tensor([0.0, 0.0, 1.0])[:, None, None]
        frames = outputs.flatten(3).mean(3)
        clip = frames.mean(2)
        loss = F.cross_entropy(frames, labels[:, None].expand(-1, 4))
    batches = [(torch.arange(a, b), labels[a:b]) for a, b in ((0, 2), (2, 4), (4, 5))]
    got = train.evaluate(nn.Identity(), batches, "cpu", forward=lambda index: outputs[index])
    conf, pred = clip.softmax(1).max(1)
    assert conf[0] == 1.0
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert got["nll"] == pytest.approx(F.cross_entropy(clip, labels).item(), rel=1e-6)
    assert got["acc"] == (pred == labels).float().mean().item()
    counts = np.bincount((torch.ceil(conf * 15).long() - 1).clamp(0, 14).numpy(), minlength=15)
    assert [n for n, _, _ in got["bins"]] == counts.tolist()
    ece = sum(abs((pred == labels)[i].float().mean() - conf[i].mean()) * i.sum() / 5
              for i in (torch.ceil(conf * 15).long() - 1 == k for k in range(15)) if i.any())
    assert got["ece"] == pytest.approx(float(ece), rel=1e-6)


def test_digits_run_records_the_new_metrics(tmp_path):
    out = str(tmp_path / "run")
    assert train.main(["--dataset", "digits", "--train-videos", "16", "--val-videos", "8", "--batch-size", "8",
                       "--size", "16", "--width", "4", "--depth", "2", "--stages", "2", "--clip-len", "5",
                       "--epochs", "1", "--dropout", "0.3", "--smoothing", "2", "--shuffle-frames",
                       "--clutter", "0.2", "--out", out]) == 0
    (epoch,) = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["kind"] == "epoch"]
    for key in ("val_nll", "val_ece", "val_conf", "val_conf_wrong", "val_bins", "train_loss_sd"):
        assert key in epoch
    assert math.isfinite(epoch["val_nll"]) and 0 <= epoch["val_ece"] <= 1
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["dataset"] == "digits" and config["smoothing"] == 2 and config["shuffle_frames"]


def test_an_unreadable_tensor_file_is_skipped_with_the_right_reason(tmp_path):
    """A .npy that is no NumPy file is named as such (np.load would call any bytes pickled data
    and point at allow_pickle), and skipped, as is an array that is no [T, H, W, C] video (it
    would fail mid-training); the folder's readable files are used."""

    for c in ("a", "b"):
        for i in range(5):
            _blank_video(tmp_path, c, i)
    (tmp_path / "a" / "broken.npy").write_bytes(b"these bytes are not an array" * 4)
    np.save(tmp_path / "b" / "flat.npy", np.zeros((3, 4, 4), np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folders = [VideoFolder(str(tmp_path), s, clip_len=2) for s in ("train", "test")]
    reasons = {os.path.basename(p): f.skip_reasons[p] for f in folders for p in f.skipped}
    assert sorted(reasons) == ["broken.npy", "flat.npy"]
    assert "not a NumPy .npy file" in reasons["broken.npy"] and "pickle" not in reasons["broken.npy"]
    assert "expected [T, H, W, C], got shape (3, 4, 4)" in reasons["flat.npy"]
    assert any(issubclass(w.category, UnreadableVideoWarning) for w in caught)
    assert sum(len(f.items) for f in folders) == 10


def test_class_labels_follow_the_sorted_folder_names_whatever_order_the_filesystem_lists(tmp_path, monkeypatch):
    """A label is the index of its class folder's name in sorted order — not in the order
    os.listdir happens to give (which differs between filesystems: a model's labels would)."""
    for c in ("run", "jump", "wave"):
        for i in range(4):
            _blank_video(tmp_path, c, i)
    listdir = os.listdir
    monkeypatch.setattr(data.os, "listdir", lambda path: sorted(listdir(path), reverse=True))
    folder = data.VideoFolder(str(tmp_path), "train", clip_len=2)
    assert folder.classes == ["jump", "run", "wave"]
    labels = {os.path.basename(os.path.dirname(path)): label for path, label, _ in folder.items}
    assert labels == {"jump": 0, "run": 1, "wave": 2}


def _blank_video(root, c: str, i: int) -> None:
    """Video ``i`` of class ``c`` under ``root``: a .npy of 3 black 4x4 RGB frames."""
    (root / c).mkdir(parents=True, exist_ok=True)
    np.save(root / c / f"{c}{i}.npy", np.zeros((3, 4, 4, 3), np.float32))


def _frame_indexed_folder(root, frames=20):
    """Two classes of three train and one test .npy video each, frame t of every video filled
    with t (so a clip's values are the frame numbers it was cut from)."""
    video = np.broadcast_to(np.arange(frames, dtype=np.float32)[:, None, None, None], (frames, 8, 8, 3)).copy()
    lists = {"trainlist01.txt": [], "testlist01.txt": []}
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(4):
            np.save(root / c / f"v{i}.npy", video)
            lists["testlist01.txt" if i == 3 else "trainlist01.txt"].append(f"{c}/v{i}.npy")
    for name, files in lists.items():
        (root / name).write_text("\n".join(files) + "\n")
    return str(root)


def _frame_numbers(dataset, i):
    clip = dataset[i][0]  # [C, T, H, W], each frame one value
    numbers = clip.mean((0, 2, 3)).round()
    torch.testing.assert_close(clip, numbers[None, :, None, None].expand_as(clip))
    return [int(t) for t in numbers]


def test_video_folder_train_crops_follow_the_epoch_and_validation_stays_centred(tmp_path):
    """Train clips start where (seed, epoch, index) say: the same within an epoch, elsewhere
    the next epoch, the same again when an epoch is set again (a resume); test clips are
    centred whatever the epoch."""
    root = _frame_indexed_folder(tmp_path)
    train_set, test_set = (VideoFolder(root, s, clip_len=3, size=8, seed=5) for s in ("train", "test"))
    assert len(train_set) == 6 and len(test_set) == 2

    def starts(dataset):
        clips = [_frame_numbers(dataset, i) for i in range(len(dataset))]
        assert all(c == list(range(c[0], c[0] + 3)) for c in clips), clips
        assert [_frame_numbers(dataset, i) for i in range(len(dataset))] == clips  # read again: the same
        return [c[0] for c in clips]
    epoch0 = starts(train_set)
    train_set.set_epoch(1)
    epoch1 = starts(train_set)
    assert epoch0 != epoch1 and all(0 <= s <= 17 for s in epoch0 + epoch1)
    train_set.set_epoch(0)
    assert starts(train_set) == epoch0
    for epoch in (0, 1, 4):
        test_set.set_epoch(epoch)
        assert starts(test_set) == [8, 8]  # (20 - 3) // 2


def test_frame_stride_keeps_every_sth_frame(tmp_path, monkeypatch):
    """clip_len 3 at frame_stride 2 is frames 0, 2, 4 of clip_len 6 at stride 1: the moving
    textures (their per-frame noise, drawn per clip length, zeroed), the moving digits, and a
    video folder's clips (frame start + 2t)."""
    monkeypatch.setattr(torch, "randn", lambda *size, generator=None, **kw: torch.zeros(*size, **kw))
    for make in (lambda **kw: MovingTextures(4, size=16, seed=3, **kw),
                 lambda **kw: MovingDigits(4, "train", size=16, seed=3, **kw)):
        strided, every = make(clip_len=3, frame_stride=2).videos, make(clip_len=6, frame_stride=1).videos
        assert not torch.equal(every[:, :, 0], every[:, :, 2])  # they move
        assert torch.equal(strided, every[:, :, ::2])
    monkeypatch.undo()
    root = _frame_indexed_folder(tmp_path)
    for split, epochs in (("train", (0, 1)), ("test", (0,))):
        folder = VideoFolder(root, split, clip_len=3, frame_stride=2, size=8, seed=5)
        for epoch in epochs:
            folder.set_epoch(epoch)
            for i in range(len(folder)):
                clip = _frame_numbers(folder, i)
                assert clip == [clip[0], clip[0] + 2, clip[0] + 4] and (split == "train" or clip[0] == 7), clip


def test_video_folder_train_starts_reach_the_last_position(tmp_path):
    """A video one frame longer than a clip starts at 0 or 1, both sampled; one exactly a clip
    long always at 0."""
    for frames, expected in ((4, {0, 1}), (3, {0})):
        (tmp_path / str(frames)).mkdir()
        root = _frame_indexed_folder(tmp_path / str(frames), frames=frames)
        folder = VideoFolder(root, "train", clip_len=3, size=8, seed=5)
        starts = set()
        for epoch in range(8):
            folder.set_epoch(epoch)
            starts |= {_frame_numbers(folder, i)[0] for i in range(len(folder))}
        assert starts == expected, (frames, starts)


def _listed_folder(root, video) -> str:
    """Classes a and b holding the .npy ``video`` [T, H, W, C] once each, in both split lists."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        np.save(root / c / "v.npy", video)
    for name in ("trainlist01.txt", "testlist01.txt"):
        (root / name).write_text("a/v.npy\nb/v.npy\n")
    return str(root)


def test_video_folder_maps_uint8_to_minus_one_to_one(tmp_path):
    video = np.zeros((3, 8, 8, 3), np.uint8)
    video[1] = 255
    video[2] = 51  # 51 / 127.5 - 1 = -0.6
    clip, _ = VideoFolder(_listed_folder(tmp_path, video), "test", clip_len=3, size=8)[0]
    assert clip.shape == (3, 3, 8, 8)
    for t, value in enumerate((-1.0, 1.0, -0.6)):
        torch.testing.assert_close(clip[:, t], torch.full((3, 8, 8), value))


def test_video_folder_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    """A 16x32 frame at size 8 is resized to 8x16 (each pixel the mean of 2x2) and its middle
    8 columns kept; a 32x16 one likewise in rows. Frame values are the column (row) index, so
    output pixel k shows 2 (k + 4) + 0.5, not the whole frame squeezed."""
    ramp, kept = np.arange(32, dtype=np.float32), 2 * (torch.arange(8.0) + 4) + 0.5
    wide = np.broadcast_to(ramp[None, None, :, None], (2, 16, 32, 3))
    tall = np.broadcast_to(ramp[None, :, None, None], (2, 32, 16, 3))
    for name, video, expected in (("wide", wide, kept), ("tall", tall, kept.view(8, 1))):
        clip, _ = VideoFolder(_listed_folder(tmp_path / name, video.copy()), "test", clip_len=2, size=8)[0]
        assert clip.shape == (3, 2, 8, 8), name
        torch.testing.assert_close(clip, expected.expand_as(clip), msg=name)


def test_shuffled_frames_pass_the_epoch_on_to_the_clip_starts(tmp_path):
    """ShuffledFrames.set_epoch reaches the wrapped VideoFolder: each epoch's clip holds the
    frames the folder itself cuts that epoch (in another order)."""
    root = _frame_indexed_folder(tmp_path)
    shuffled = ShuffledFrames(VideoFolder(root, "train", clip_len=3, size=8, seed=5), seed=1)
    plain = VideoFolder(root, "train", clip_len=3, size=8, seed=5)
    per_epoch = []
    for epoch in (0, 1, 2):
        shuffled.set_epoch(epoch)
        plain.set_epoch(epoch)
        got = [sorted(_frame_numbers(shuffled, i)) for i in range(len(plain))]
        assert got == [_frame_numbers(plain, i) for i in range(len(plain))], epoch
        per_epoch.append(got)
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]
