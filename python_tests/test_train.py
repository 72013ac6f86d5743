"""sideways-train end to end: tiny runs per mode, exact resume, Ctrl-C, non-finite loss,
real encoded video folders (PyAV) with a corrupt file, bad data and bad options."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from sideways_kernels import train

TINY = ["--train-videos", "24", "--val-videos", "12", "--batch-size", "8", "--size", "16", "--width", "4",
        "--depth", "2", "--stages", "2", "--clip-len", "5", "--log-every", "1"]


def _run(tmp_path, *extra, name="run"):
    out = str(tmp_path / name)
    code = train.main([*TINY, "--out", out, *extra])
    return code, out


def _records(out, kind="epoch"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.mark.parametrize("extra", [["--mode", "sideways"], ["--mode", "bp"], ["--update", "tick"],
                                   ["--model", "r2plus1d", "--optimizer", "adamw", "--lr", "0.01"]], ids=" ".join)
def test_tiny_run_writes_metrics_checkpoints_and_curves(tmp_path, extra):
    code, out = _run(tmp_path, "--epochs", "2", *extra)
    assert code == 0
    for name in ("metrics.jsonl", "curves.png", "last.pt", "best.pt", "config.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    epochs = _records(out)
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert set(r) >= {"step", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "wall"}
        assert np.isfinite(r["train_loss"]) and 0 <= r["val_acc"] <= 1
    steps = _records(out, "step")
    assert steps and all(r["frames_per_s"] > 0 for r in steps)


def test_checkpoint_loads_into_the_plain_nn_conv3d_network(tmp_path):
    code, out = _run(tmp_path, "--epochs", "1")
    assert code == 0
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    plain = train.build_model(ckpt["config"], len(ckpt["classes"]), conv=nn.Conv3d)
    plain.load_state_dict(ckpt["model"])  # strict: same keys, same shapes
    assert not any(type(m).__name__ == "SidewaysConv3d" for m in plain.modules())
    sideways = train.build_model(ckpt["config"], len(ckpt["classes"]))
    sideways.load_state_dict(ckpt["model"])
    video = torch.randn(2, 3, 5, 16, 16)
    torch.testing.assert_close(plain(video), sideways(video))


def test_resume_continues_exactly(tmp_path):
    """A run cut mid-epoch (--max-steps) and resumed ends where an uncut run ends."""
    code, full = _run(tmp_path, "--epochs", "2", name="full")
    assert code == 0
    code, cut = _run(tmp_path, "--epochs", "2", "--max-steps", "4", name="cut")  # 3 steps an epoch: cut in epoch 2
    assert code == 0 and [r["epoch"] for r in _records(cut)] == [1]
    assert train.main(["--resume", os.path.join(cut, "last.pt")]) == 0
    a, b = _records(full), _records(cut)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("step", "train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert ra[key] == rb[key], (key, ra, rb)
    wa = torch.load(os.path.join(full, "last.pt"), weights_only=False)["model"]
    wb = torch.load(os.path.join(cut, "last.pt"), weights_only=False)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_best_pt_holds_the_epoch_of_the_best_validation_accuracy(tmp_path, monkeypatch):
    """Validation accuracies 0.5, 0.8, 0.6 over three epochs: best.pt is epoch 2's checkpoint,
    with best_val_acc 0.8 in its own state; last.pt is epoch 3's."""
    accuracies = iter([0.5, 0.8, 0.6])
    evaluate = train.evaluate

    def scripted(*args, **kwargs):
        return dict(evaluate(*args, **kwargs), acc=next(accuracies))
    monkeypatch.setattr(train, "evaluate", scripted)
    code, out = _run(tmp_path, "--epochs", "3")
    assert code == 0
    best = train.load_weights(os.path.join(out, "best.pt"), "test")["state"]
    last = train.load_weights(os.path.join(out, "last.pt"), "test")["state"]
    assert (best["epoch"], best["best_val_acc"]) == (2, 0.8)
    assert (last["epoch"], last["best_val_acc"]) == (3, 0.8)
    assert [r["val_acc"] for r in _records(out)] == [0.5, 0.8, 0.6]


class _Recorded(torch.utils.data.Dataset):
    """A dataset that notes each epoch it is told of and each item read."""

    def __init__(self, dataset, reads):
        self.dataset, self.reads, self.classes, self.epoch = dataset, reads, dataset.classes, None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.reads.append((self.epoch, i))
        return self.dataset[i]


def test_each_epoch_is_told_its_number_and_reads_the_videos_in_another_order(tmp_path, monkeypatch):
    reads, build_data = [], train.build_data

    def recorded(cfg):
        train_set, val_set = build_data(cfg)
        return _Recorded(train_set, reads), val_set
    monkeypatch.setattr(train, "build_data", recorded)
    code, _ = _run(tmp_path, "--epochs", "3")
    assert code == 0
    orders = [[i for e, i in reads[1:] if e == epoch] for epoch in range(3)]  # reads[0]: the example clip
    assert [e for e, _ in reads[1:]] == [0] * 24 + [1] * 24 + [2] * 24
    assert all(sorted(order) == list(range(24)) for order in orders)
    assert len({tuple(order) for order in orders}) == 3, orders


def test_epoch_records_weigh_a_partial_last_batch_by_its_videos(tmp_path):
    """20 videos in batches of 8: 8, 8, then 4. The epoch's train loss weighs each step's loss by
    its videos, its spread is the steps' standard deviation, and the cosine schedule spans the
    3 steps of each of the 2 epochs."""
    code, out = _run(tmp_path, "--epochs", "2", "--train-videos", "20")
    assert code == 0
    steps, epochs = _records(out, "step"), _records(out)
    assert [r["step"] for r in steps] == list(range(1, 7))
    for k, r in enumerate(steps, 1):
        assert r["lr"] == pytest.approx(0.05 * 0.5 * (1 + np.cos(np.pi * k / 6)), abs=1e-12), r
    for epoch, record in enumerate(epochs):
        losses = np.array([r["loss"] for r in steps[3 * epoch:3 * epoch + 3]])
        assert record["train_loss"] == pytest.approx((losses * [8, 8, 4]).sum() / 20, rel=1e-12)
        assert record["train_loss_sd"] == pytest.approx(losses.std(), rel=1e-9)
        assert record["train_acc"] == steps[3 * epoch + 2]["train_acc"]


def test_a_run_in_this_process_leaves_the_signal_handlers_as_it_found_them(tmp_path):
    """main() takes SIGINT and SIGTERM for its checkpoint-then-stop while it runs; called from a
    user's own Python it must give them back (else their Ctrl-C is swallowed after it returns)."""
    def mine(signum, frame):
        raise KeyboardInterrupt
    before = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code, _ = _run(tmp_path, "--epochs", "1", "--max-steps", "1")
        assert code == 0
        assert all(signal.getsignal(s) is mine for s in before)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_resume_restores_the_whole_run_state(tmp_path):
    """A run cut in epoch 2 after one validation, resumed for one more step: the new last.pt's
    state is the saved one key for key, moved on by that step (best_val_acc kept, not None,
    so a worse validation later cannot overwrite best.pt), and best.pt is left alone."""
    code, out = _run(tmp_path, "--epochs", "2", "--max-steps", "4")  # 3 steps an epoch
    assert code == 0
    saved = train.load_weights(os.path.join(out, "last.pt"), "test")["state"]
    best = open(os.path.join(out, "best.pt"), "rb").read()
    assert saved["best_val_acc"] is not None and (saved["step"], saved["epoch"], saved["batch"]) == (4, 1, 1)
    assert train.main(["--resume", os.path.join(out, "last.pt"), "--max-steps", "5"]) == 0
    state = train.load_weights(os.path.join(out, "last.pt"), "test")["state"]
    assert set(state) == set(saved)
    step = _records(out, "step")[-1]
    moved = dict(step=5, batch=2, sums=[saved["sums"][0] + 8, None, None, saved["sums"][3] + 1, None, None])
    for key, value in saved.items():
        if key == "sums":
            assert state["sums"][0] == moved["sums"][0] and state["sums"][3] == moved["sums"][3], (saved, state)
            assert state["sums"][5] == pytest.approx(saved["sums"][5] + step["loss"]), (saved, state, step)
        elif key == "wall":
            assert value < state["wall"], (saved, state)
        else:
            assert state[key] == moved.get(key, value), (key, saved, state)
    assert open(os.path.join(out, "best.pt"), "rb").read() == best


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs_keep_float32_masters_and_resume_exactly(tmp_path, amp):
    """--amp: the logged losses are the unscaled ones, the weights and optimizer state stay
    float32, fp16's GradScaler state is checkpointed, and a cut run resumes to the uncut one."""
    code, full = _run(tmp_path, "--epochs", "2", "--amp", amp, name="full")
    assert code == 0
    code, cut = _run(tmp_path, "--epochs", "2", "--max-steps", "4", "--amp", amp, name="cut")
    assert code == 0 and train.main(["--resume", os.path.join(cut, "last.pt")]) == 0
    a, b = _records(full), _records(cut)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert 0 < ra["train_loss"] < 5 and np.isfinite(ra["val_loss"])  # ln(4 classes) = 1.4, not 65536x
        for key in ("step", "train_loss", "train_acc", "val_loss", "val_acc"):
            assert ra[key] == rb[key], (key, ra, rb)
    ckpt = train.load_weights(os.path.join(full, "last.pt"), "test")
    assert ckpt["config"]["amp"] == amp and ("scaler" in ckpt) == (amp == "fp16")
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    assert all(v.dtype == torch.float32 for st in ckpt["optimizer"]["state"].values() for v in st.values()
               if torch.is_tensor(v) and v.is_floating_point())
    wb = train.load_weights(os.path.join(cut, "last.pt"), "test")["model"]
    assert all(torch.equal(ckpt["model"][k], wb[k]) for k in wb)


def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    code, out = _run(tmp_path, "--epochs", "1")
    before = os.path.getmtime(os.path.join(out, "last.pt"))
    code, _ = _run(tmp_path, "--epochs", "1")
    assert code == train.EXIT_DATA
    assert "already holds a run" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(out, "last.pt")) == before


def test_non_finite_loss_stops_naming_the_step(tmp_path, capsys):
    code, out = _run(tmp_path, "--epochs", "2", "--lr", "1e30")
    assert code == train.EXIT_NON_FINITE
    err = capsys.readouterr().err
    assert "stopping at step" in err and "non-finite" in err
    assert "Traceback" not in err


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sideways_kernels.train", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_sigint_saves_a_checkpoint_of_the_step_it_names_and_exits_cleanly(tmp_path):
    """Ctrl-C lands after the first epoch's checkpoint, with step records unlogged (--log-every
    1000): last.pt is written at the interrupted step itself, and that step's record is logged."""
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "sideways_kernels.train", *TINY, "--epochs", "200", "--out", out,
                             "--log-every", "1000"], stderr=subprocess.PIPE, text=True)
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and '"kind": "epoch"' in open(metrics).read()):
        time.sleep(0.2)  # until epoch 1 is done: its last.pt is there
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == train.EXIT_INTERRUPTED, err
    assert "saved" in err and "Traceback" not in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert train.load_weights(os.path.join(out, "last.pt"), "test")["state"]["step"] == step
    assert _records(out, "step")[-1]["step"] == step


# --- the user's own videos ---------------------------------------------------------------

def _write_video(path, frames, size=(20, 24), codec="mpeg4"):
    import av
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        rng = np.random.default_rng(abs(hash(path)) % 2**32)
        for _ in range(frames):
            img = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _folder(tmp_path, classes=("jump", "run", "wave"), per_class=5, frames=9):
    root = tmp_path / "videos"
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            ext, codec = [(".avi", "mpeg4"), (".mp4", "libx264"), (".mkv", "ffv1")][i % 3]
            _write_video(str(root / c / f"v_{c}_g{i:02d}{ext}"), frames, codec=codec)
    return root


VIDEO_ARGS = ["--batch-size", "4", "--size", "16", "--width", "4", "--depth", "2", "--stages", "2", "--clip-len", "4",
              "--frame-stride", "2", "--epochs", "1", "--workers", "2"]


def test_video_folder_with_a_corrupt_file_is_trained_on_and_the_file_named(tmp_path):
    root = _folder(tmp_path)
    bad = root / "run" / "v_run_g99.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    # and the official split files, listing the corrupt one on both sides
    names = [f"{c}/{f}" for c in ("jump", "run", "wave") for f in sorted(os.listdir(root / c))]
    (root / "trainlist01.txt").write_text("\n".join(n for i, n in enumerate(names) if i % 4) + "\nrun/v_run_g99.mp4\n")
    (root / "testlist01.txt").write_text("\n".join(n for i, n in enumerate(names) if i % 4 == 0) + "\nrun/v_run_g99.mp4\n")
    result = _cli("--data", str(root), "--out", str(tmp_path / "out"), *VIDEO_ARGS)
    assert result.returncode == 0, result.stderr
    assert "v_run_g99.mp4" in result.stderr and "skipped 1 unreadable" in result.stderr
    assert _records(str(tmp_path / "out"))[0]["epoch"] == 1


def test_tensor_folder_trains(tmp_path):
    """.npy and .pt tensors whose class is their brightness: the run learns it (the labels reach
    the model as the folders say)."""
    root = tmp_path / "tensors"
    rng = np.random.default_rng(0)
    for label, c in enumerate(("dark", "light")):
        (root / c).mkdir(parents=True)
        for i in range(10):
            arr = (rng.random((7, 18, 20, 3)) * 0.2 + (0.7 if label else -0.9)).astype(np.float32)
            if i % 2:
                np.save(root / c / f"{i}.npy", arr)
            else:
                torch.save(torch.from_numpy(arr), root / c / f"{i}.pt")
    out = str(tmp_path / "out")
    assert train.main(["--data", str(root), "--out", out, *VIDEO_ARGS[:-4], "--epochs", "6", "--lr", "0.1"]) == 0
    epochs = _records(out)
    assert epochs[-1]["val_acc"] == 1.0 and epochs[-1]["train_loss"] < epochs[0]["train_loss"], epochs


def test_video_folder_labels_are_the_folders_in_both_splits(tmp_path):
    """Every video's label is its folder's index in the one class list both splits share, also
    when a split holds no video of some class; a run trains on the train split and validates on
    the test split."""
    from sideways_kernels.data import VideoFolder
    root = tmp_path / "tensors"
    names = ("apple", "banana", "cherry")
    for c in names:
        (root / c).mkdir(parents=True)
        for i in range(4):
            np.save(root / c / f"{c}{i}.npy", np.zeros((5, 8, 8, 3), np.float32))
    # the official split: no apple in the test split
    (root / "trainlist01.txt").write_text("\n".join(f"{c}/{c}{i}.npy" for c in names for i in range(3)))
    (root / "testlist01.txt").write_text("\n".join(f"{c}/{c}3.npy" for c in names[1:]))
    for split in ("train", "test"):
        ds = VideoFolder(str(root), split, clip_len=4)
        assert ds.classes == list(names)
        assert ds.items and all(label == names.index(os.path.basename(os.path.dirname(path)))
                                for path, label, _ in ds.items), (split, ds.items)
        assert {label for _, label, _ in ds.items} == ({0, 1, 2} if split == "train" else {1, 2})
    train_set, val_set = train.build_data(dict(data=str(root), clip_len=4, frame_stride=1, size=8, seed=0))
    assert sorted(os.path.basename(path) for path, _, _ in val_set.items) == ["banana3.npy", "cherry3.npy"]
    assert len(train_set.items) == 9  # --data validates on the test split, trains on the train split


@pytest.mark.parametrize("case", ["missing", "empty", "one class", "too short"])
def test_bad_data_is_a_one_line_error(tmp_path, case):
    root = tmp_path / "data"
    if case == "empty":
        root.mkdir()
    elif case == "one class":
        _folder(tmp_path, classes=("only",), per_class=3)
        root = tmp_path / "videos"
    elif case == "too short":
        root = _folder(tmp_path, per_class=3, frames=3)
    result = _cli("--data", str(root), "--out", str(tmp_path / "out"), *VIDEO_ARGS)
    assert result.returncode == train.EXIT_DATA
    lines = [l for l in result.stderr.splitlines() if l.startswith("sideways-train: error")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    words = {"missing": "does not exist", "empty": "no videos", "one class": "only one class", "too short": "shorter than one clip"}
    assert words[case] in lines[0]


@pytest.mark.parametrize("args,words", [
    (["--mode", "pipedream"], "invalid choice"),
    (["--lr", "-1"], "positive"),
    (["--batch-size", "0"], "positive"),
    (["--update", "tick", "--optimizer", "adamw"], "--update tick needs --optimizer sgd"),
    (["--stages", "9"], "exceeds"),
    (["--resume", "/nonexistent/last.pt"], "no checkpoint"),
    (["--replicas", "2", "--update", "tick"], "--replicas needs --update clip"),
    (["--replicas", "2"], "--replicas 2 needs torchrun"),
    (["--model", "s3d", "--size", "16"], "--model s3d cannot take clips of 8 frames of 16x16"),
    (["--model", "s3d", "--size", "32", "--clip-len", "8"], "cannot take clips of 8 frames of 32x32 (--clip-len, --size)"),
    (["--model", "r3d_18", "--stages", "40"], "at most"),
    (["--model", "c3d", "--pretrained", "x.pth"], "--pretrained needs one of the standard networks"),
    (["--amp", "fp16", "--update", "tick"], "--amp fp16 needs --update clip"),
    (["--amp", "fp8"], "invalid choice"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--lr", "inf"], "expected a positive float, got 'inf'"),
])
def test_bad_options_are_clean_errors(tmp_path, capsys, monkeypatch, args, words):
    """In this process (the command's own entry point is the other tests'): exit status 2 and
    the message on stderr; any other exception would fail the test (a traceback for the user)."""
    from sideways_kernels import backend
    monkeypatch.setattr(backend, "_override", backend._override)  # (a run sets the backend; put back after)
    try:
        code = train.main([*args, "--out", str(tmp_path / "out")])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and words in err, err


def test_help_documents_every_option():
    text = _cli("--help").stdout
    for option in ("--mode", "--model", "--stages", "--epochs", "--max-steps", "--batch-size", "--clip-len",
                   "--frame-stride", "--lr", "--optimizer", "--update", "--seed", "--device", "--backend", "--out",
                   "--resume", "--data", "--workers", "--distributed", "--replicas", "--amp"):
        assert option in text


# --- the standard networks ------------------------------------------------------------------------

STANDARD = ["--train-videos", "8", "--val-videos", "4", "--batch-size", "4", "--size", "16", "--width", "4",
            "--stages", "3", "--clip-len", "13", "--log-every", "1", "--epochs", "1"]


@pytest.mark.parametrize("model", ["r3d_18", "mc3_18", "r2plus1d_18", "s3d"])
def test_standard_networks_train_cut_automatically(tmp_path, model):
    out = str(tmp_path / model)
    # s3d: its trunk has stride 32, and its causal lag is 15 frames (a Sideways clip must be longer)
    size = ["--size", "32", "--clip-len", "16"] if model == "s3d" else []
    assert train.main([*STANDARD, "--model", model, "--out", out, *size]) == 0
    (epoch,) = _records(out)
    assert np.isfinite(epoch["train_loss"])
    ckpt = train.load_weights(os.path.join(out, "last.pt"), "test")  # tensors and plain types only
    net = train.build_model(ckpt["config"], len(ckpt["classes"]))
    net.load_state_dict(ckpt["model"])  # the plain network's keys (torchvision's layout)
    assert not any(type(m).__name__ == "SidewaysConv3d" for m in net.modules())


def test_pretrained_weights_start_the_run_with_a_new_classifier(tmp_path, capsys):
    from sideways_kernels import models
    torch.manual_seed(0)
    source = models.r3d_18(num_classes=400, width=4)  # e.g. Kinetics-400 weights, saved as a state dict
    path = str(tmp_path / "k400.pth")
    torch.save(source.state_dict(), path)
    out = str(tmp_path / "run")
    assert train.main([*STANDARD, "--model", "r3d_18", "--pretrained", path, "--out", out, "--max-steps", "1",
                       "--lr", "1e-9"]) == 0
    assert "new classifier (fc.weight, fc.bias)" in capsys.readouterr().err
    got = train.load_weights(os.path.join(out, "last.pt"), "test")["model"]
    for key, value in source.state_dict().items():
        if "fc." not in key and "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)  # lr 1e-9: barely moved
    assert got["fc.weight"].shape == (10, 32)
    other = str(tmp_path / "other.pth")
    torch.save(models.mc3_18(num_classes=400, width=8).state_dict(), other)
    result = _cli(*STANDARD, "--model", "r3d_18", "--pretrained", other, "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "does not fit this network" in result.stderr and "Traceback" not in result.stderr


def test_pretrained_weights_bring_the_batchnorm_statistics(tmp_path):
    """load_pretrained takes the whole state dict, buffers included: BatchNorm's running
    statistics and num_batches_tracked, not only the parameters; only the classifier is new."""
    from sideways_kernels import models
    torch.manual_seed(0)
    source = models.r3d_18(num_classes=400, width=4)
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    path = str(tmp_path / "k400.pth")
    torch.save(source.state_dict(), path)
    net = models.r3d_18(num_classes=10, width=4)
    fc = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("fc.")}
    train.load_pretrained(net, path)
    got, want = net.state_dict(), source.state_dict()
    assert any("running_mean" in k for k in got) and any("num_batches" in k for k in got)
    for key, value in got.items():
        if key.startswith("fc."):
            assert torch.equal(value, fc[key]), key  # the new classifier, as built
        else:
            assert torch.equal(value, want[key]), key


@pytest.mark.parametrize("case", ["garbage", "truncated", "runs code", "another model", "not a checkpoint"])
def test_resume_of_a_bad_checkpoint_is_one_clear_line(tmp_path, case):
    """Never a traceback, never code run: a pickle that would call os.system is refused before
    anything in it is built (weights_only=True)."""
    code, out = _run(tmp_path, "--epochs", "1")
    assert code == 0
    good = os.path.join(out, "last.pt")
    bad = str(tmp_path / "bad.pt")
    marker = tmp_path / "PWNED"
    if case == "garbage":
        open(bad, "w").write("not a checkpoint at all\n")
    elif case == "truncated":
        open(bad, "wb").write(open(good, "rb").read()[:4000])
    elif case == "runs code":
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))
        ckpt = torch.load(good, weights_only=True)
        ckpt["state"] = Evil()
        torch.save(ckpt, bad)
    elif case == "another model":
        ckpt = torch.load(good, weights_only=True)
        ckpt["config"] = dict(ckpt["config"], width=8)
        torch.save(ckpt, bad)
    else:
        torch.save({"weights": torch.zeros(3)}, bad)
    result = _cli("--resume", bad)
    lines = [l for l in result.stderr.splitlines() if l.startswith("sideways-train: error")]
    assert result.returncode == train.EXIT_DATA and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert bad in lines[0]
    words = {"garbage": "not a PyTorch checkpoint", "truncated": "truncated or corrupt",
             "runs code": "refused.*posix.system.*could run code", "another model": "does not fit",
             "not a checkpoint": "not a sideways-train checkpoint"}[case]
    import re
    assert re.search(words, lines[0]), lines[0]
    assert not marker.exists()


def test_an_interrupted_save_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A save cut short (Ctrl-C, a full disk) leaves the previous checkpoint whole and no
    temporary file behind."""
    code, out = _run(tmp_path, "--epochs", "1")
    path = os.path.join(out, "last.pt")
    before = open(path, "rb").read()
    real_save = torch.save

    def cut_short(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(100)  # half written...
        raise KeyboardInterrupt  # ...then interrupted
    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        train.save_atomic({"model": {}}, path)
    assert open(path, "rb").read() == before
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    monkeypatch.setattr(torch, "save", real_save)
    assert train.main(["--resume", path, "--epochs", "2"]) == 0


class _FastScaler(torch.amp.GradScaler):
    """A GradScaler whose scale moves at every step (growth interval 1, from 2^10), so a run cut
    after 4 steps holds a scale and growth tracker of its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **dict(kwargs, init_scale=2.0 ** 10, growth_interval=1))


def test_fp16_resume_restores_the_grad_scaler_and_the_random_state(tmp_path, monkeypatch):
    """A cut fp16 run with dropout, resumed, is the uncut run bit for bit — losses, weights
    and the GradScaler's state — only if the scaler's state and the random generators (the
    dropout masks) are restored, not just saved."""
    monkeypatch.setattr(torch.amp, "GradScaler", _FastScaler)
    args = ["--epochs", "2", "--amp", "fp16", "--dropout", "0.5"]
    code, full = _run(tmp_path, *args, name="full")
    assert code == 0
    code, cut = _run(tmp_path, *args, "--max-steps", "4", name="cut")
    assert code == 0
    at_cut = train.load_weights(os.path.join(cut, "last.pt"), "test")["scaler"]
    assert at_cut["scale"] != 2.0 ** 10  # the scale moved before the interrupt
    assert train.main(["--resume", os.path.join(cut, "last.pt")]) == 0
    a, b = _records(full), _records(cut)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for key in ("step", "train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert ra[key] == rb[key], (key, ra, rb)
    ca, cb = (train.load_weights(os.path.join(d, "last.pt"), "test") for d in (full, cut))
    assert ca["scaler"] == cb["scaler"]
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
