"""The embedded datasets and the evaluation metrics: moving handwritten digits (real digits,
validation digits never seen in training, labels drawn as they say), shuffled frames, and the
calibration figures of evaluate()."""
import functools
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sideways_kernels import train
from sideways_kernels.data import MovingDigits, ShuffledFrames


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
    from sideways_kernels.data import DataError
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
    from sideways_kernels.data import VideoFolder
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


def test_digits_run_records_the_new_metrics(tmp_path):
    out = str(tmp_path / "run")
    assert train.main(["--dataset", "digits", "--train-videos", "16", "--val-videos", "8", "--batch-size", "8",
                       "--size", "16", "--width", "4", "--depth", "2", "--stages", "2", "--clip-len", "5",
                       "--epochs", "1", "--dropout", "0.3", "--smoothing", "2", "--shuffle-frames",
                       "--clutter", "0.2", "--out", out]) == 0
    import json
    import os
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
    import warnings

    import numpy as np
    from sideways_kernels.data import UnreadableVideoWarning, VideoFolder
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
    from sideways_kernels import data
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
    import numpy as np
    (root / c).mkdir(parents=True, exist_ok=True)
    np.save(root / c / f"{c}{i}.npy", np.zeros((3, 4, 4, 3), np.float32))


def _frame_indexed_folder(root, frames=20):
    """Two classes of three train and one test .npy video each, frame t of every video filled
    with t (so a clip's values are the frame numbers it was cut from)."""
    import numpy as np
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
    from sideways_kernels.data import VideoFolder
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
    from sideways_kernels.data import MovingTextures, VideoFolder
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
