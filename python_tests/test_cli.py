"""sideways-train on bad or unusual input: files that are not checkpoints (one line naming the
file, exit status 2, nothing in them run), runs cut short by --max-steps (honest metrics, curves
and last line), unreadable videos (one summary line), the help text (one default per option), and
setup.py's advice when pip's build isolation hides torch."""
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch

from sideways_kernels import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--train-videos", "24", "--val-videos", "12", "--batch-size", "8", "--size", "16", "--width", "4",
        "--depth", "2", "--stages", "2", "--clip-len", "5"]
STANDARD = ["--model", "r3d_18", "--train-videos", "8", "--val-videos", "4", "--batch-size", "4", "--size", "16",
            "--width", "4", "--stages", "3", "--clip-len", "13"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A real checkpoint (and curves.png) of a tiny c3d run cut after one step."""
    out = str(tmp_path_factory.mktemp("good") / "run")
    assert train.main([*TINY, "--epochs", "1", "--max-steps", "1", "--log-every", "1", "--out", out]) == 0
    return out


class _RunsCode:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _checkpoint(good_run):
    return torch.load(os.path.join(good_run, "last.pt"), weights_only=True)


def _resave(good_run, path, change):
    ckpt = _checkpoint(good_run)
    change(ckpt)
    torch.save(ckpt, path)


def _write(case, path, good_run, marker, option):
    """The non-checkpoint ``case`` at ``path``."""
    good = os.path.join(good_run, "last.pt")
    if case == "text":
        open(path, "w").write("not a checkpoint at all\n")
    elif case == "csv":
        open(path, "w").write("step,loss,acc\n1,2.30,0.10\n2,2.25,0.12\n")
    elif case == "json":
        open(path, "w").write(json.dumps({"model": {"conv.weight": [[1.0, 2.0]]}, "step": 3}))
    elif case == "png":
        open(path, "wb").write(open(os.path.join(good_run, "curves.png"), "rb").read())
    elif case == "empty":
        open(path, "wb").close()
    elif case.startswith("random bytes"):
        prefix = {"random bytes": b"", "random bytes after a pickle opcode": b"\x80",
                  "random bytes after a zip's first bytes": b"PK\x03\x04"}[case]
        open(path, "wb").write(prefix + random.Random(case).randbytes(4096))
    elif case == "truncated zip":
        data = open(good, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    elif case == "zip of other files":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "hello")
    elif case == "a list":
        torch.save([torch.zeros(3), 1, "x"], path)
    elif case == "wrong keys":
        torch.save({"weights": torch.zeros(3), "steps": 3}, path)
    elif case == "wrong shapes":
        if option == "--resume":
            def widen(ckpt):
                key = next(iter(ckpt["model"]))
                ckpt["model"][key] = torch.zeros(*ckpt["model"][key].shape[:-1], 7)
            _resave(good_run, path, widen)
        else:
            from sideways_kernels import models
            torch.save(models.r3d_18(num_classes=10, width=8).state_dict(), path)  # --width 4 runs
    elif case == "another network":
        if option == "--resume":
            _resave(good_run, path, lambda c: c["config"].update(depth=3, stages=3))
        else:  # a sideways-train checkpoint of c3d, for r3d_18
            open(path, "wb").write(open(good, "rb").read())
    elif case == "bad option values":
        _resave(good_run, path, lambda c: c["config"].update(model="resnet9000") if option == "--resume" else
                c.update(model={"fc.weight": "not a tensor"}))
    elif case == "bad run position":
        _resave(good_run, path, lambda c: c["state"].update(sums="many") if option == "--resume" else
                c.update(model={7: torch.zeros(2)}))
    elif case == "runs code (torch.save)":
        _resave(good_run, path, lambda c: c.update(state=_RunsCode(marker)))
    elif case == "runs code (a plain pickle)":
        open(path, "wb").write(pickle.dumps({"model": _RunsCode(marker)}))
    elif case == "runs code (protocol 0 text)":
        open(path, "w").write(f"cos\nsystem\n(S'touch {marker}'\ntR.")
    else:
        raise AssertionError(case)


CORPUS = ["text", "csv", "json", "png", "empty", "random bytes", "random bytes after a pickle opcode",
          "random bytes after a zip's first bytes", "truncated zip", "zip of other files", "a list", "wrong keys",
          "wrong shapes", "another network", "bad option values", "bad run position", "runs code (torch.save)",
          "runs code (a plain pickle)", "runs code (protocol 0 text)"]
WORDS = {"text": "is a text file", "csv": "is a text file", "json": "is a text file", "png": "is a PNG image",
         "empty": "is an empty file", "random bytes": "is binary data",
         "random bytes after a pickle opcode": "is not a",
         "random bytes after a zip's first bytes": "truncated or corrupt",
         "zip of other files": "a zip archive without a checkpoint", "truncated zip": "truncated or corrupt",
         "a list": "holds a list", "wrong keys": "not a", "wrong shapes": "does not fit",
         "another network": "does not fit", "bad option values": "", "bad run position": "",
         "runs code (torch.save)": "could run code", "runs code (a plain pickle)": "safe loader refuses",
         "runs code (protocol 0 text)": "could run code"}


@pytest.mark.parametrize("option", ["--resume", "--pretrained"])
@pytest.mark.parametrize("case", CORPUS)
def test_a_file_that_is_not_a_checkpoint_of_this_network_is_one_line(tmp_path, capsys, good_run, case, option):
    """Never a traceback, never code run: one line naming the file, exit status 2."""
    path = str(tmp_path / f"{case.replace(' ', '_')}.pt")
    marker = tmp_path / "CODE_RAN"
    _write(case, path, good_run, marker, option)
    capsys.readouterr()
    # (a resumed run writes where its checkpoint is: --out with --resume is refused)
    args = ["--resume", path] if option == "--resume" else [*STANDARD, "--pretrained", path, "--out",
                                                             str(tmp_path / "out")]
    code = train.main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == train.EXIT_DATA and len(lines) == 1, err
    assert lines[0].startswith(f"sideways-train: error: {option}") and path in lines[0], lines[0]
    assert WORDS[case] in lines[0], lines[0]
    assert not marker.exists(), "the file's code ran"


@pytest.mark.parametrize("option", ["--resume", "--pretrained"])
def test_the_command_line_says_one_line_and_exits_2(tmp_path, option):
    """The same through the real command (a text file used to end in a 26-line traceback)."""
    path = tmp_path / "notes.csv"
    path.write_text("step,loss\n1,2.3\n")
    args = ["--resume", str(path)] if option == "--resume" else ["--model", "r3d_18", "--pretrained", str(path)]
    result = subprocess.run([sys.executable, "-m", "sideways_kernels.train", *args, "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert str(path) in result.stderr and "is a text file" in result.stderr


@pytest.mark.parametrize("case", ["triton without the interpreter", "bogus SIDEWAYS_BACKEND",
                                  "bogus SIDEWAYS_TRITON_COMPILE_THREADS"])
def test_a_backend_that_cannot_run_is_one_line_and_no_run_directory(tmp_path, capsys, monkeypatch, case):
    """Both ended in a ~30-line traceback with exit status 1 (the README walkthrough); a bad
    compile-thread count would have, at a GPU's first autotuned launch."""
    if case.startswith("triton"):
        pytest.importorskip("triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        args, words = ["--backend", "triton"], ("--backend:", "TRITON_INTERPRET=1")
    elif case.endswith("THREADS"):
        pytest.importorskip("triton")
        monkeypatch.setenv("SIDEWAYS_TRITON_COMPILE_THREADS", "two")
        args, words = [], ("SIDEWAYS_TRITON_COMPILE_THREADS", "'two'")
    else:
        monkeypatch.setenv("SIDEWAYS_BACKEND", "cudnn")
        args, words = [], ("SIDEWAYS_BACKEND", "'cudnn'")
    out = tmp_path / "run"
    code = train.main([*TINY, *args, "--max-steps", "1", "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == train.EXIT_DATA and len(lines) == 1, lines
    assert lines[0].startswith("sideways-train: error:") and all(w in lines[0] for w in words), lines[0]
    assert not out.exists()


def test_a_bad_value_on_the_command_line_is_one_line(capsys):
    """argparse printed its usage block (every option, ~20 lines) before the error."""
    with pytest.raises(SystemExit) as stop:
        train.main(["--epochs", "-3"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("sideways-train: error: argument --epochs") and "--help" in lines[0], lines[0]


# --- short runs -----------------------------------------------------------------------------

def _last_line_files(line: str, out: str):
    """The files the run's last line names (after '<out>: ')."""
    listed = line.split(f"{out}: ", 1)[1].split(";")[0]
    return [name.strip() for name in listed.split(",")]


def test_a_run_cut_by_max_steps_is_honest(tmp_path, capsys):
    """--max-steps 2 of a 3-step epoch, --log-every 10: the last step is recorded anyway, the
    last line names only files that exist and reports no validation accuracy (not -1), the
    curves have points; resumed to the epoch's end, the validation and best.pt appear."""
    out = str(tmp_path / "run")
    assert train.main([*TINY, "--epochs", "1", "--max-steps", "2", "--log-every", "10", "--out", out]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [(r["kind"], r["step"]) for r in records] == [("step", 2)] and np.isfinite(records[0]["loss"])
    assert "acc -1" not in last and "no val acc" in last and "best" not in last, last  # (paths may hold "-1")
    named = _last_line_files(last, out)
    assert named == ["metrics.jsonl", "curves.png", "last.pt"], last
    assert all(os.path.getsize(os.path.join(out, name)) > 0 for name in named)
    assert not os.path.exists(os.path.join(out, "best.pt"))
    assert train._plot(out) == [("training clip loss", 1)]

    assert train.main(["--resume", os.path.join(out, "last.pt")]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [(r["kind"], r["step"]) for r in records] == [("step", 2), ("step", 3), ("epoch", 3)]
    assert re.search(r"done \(1 epoch, 3 steps\), best val acc [01]\.\d{3}", last), last
    assert _last_line_files(last, out) == ["metrics.jsonl", "curves.png", "last.pt", "best.pt"], last
    panels = dict(train._plot(out))
    assert panels == {"training clip loss": 2, "accuracy": 1, "validation calibration": 1}


def test_an_old_checkpoint_without_validation_reports_none(tmp_path, capsys, good_run):
    """Checkpoints written before 'no validation yet' was None hold best_val_acc -1: a resumed
    run that validates nothing does not report it."""
    path = str(tmp_path / "old" / "last.pt")
    os.makedirs(os.path.dirname(path))
    _resave(good_run, path, lambda c: c["state"].update(best_val_acc=-1.0))
    assert train.main(["--resume", path, "--max-steps", "1"]) == 0  # already at step 1: nothing to do
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "acc -1" not in last and "no val acc" in last, last


@pytest.mark.parametrize("typed,named", [(["--model", "r3d_18"], "--model r3d_18 (the run has c3d)"),
                                         (["--lr", "0.1"], "--lr 0.1 (the run has 0.05)"),
                                         (["--out", "elsewhere"], "--out elsewhere")])
def test_resume_refuses_a_setting_it_would_not_use(tmp_path, capsys, good_run, typed, named):
    """A setting typed with --resume that the run keeps from its checkpoint was dropped without a
    word (the README walkthrough: --model r3d_18 went on training c3d): one line naming it, exit
    2. The settings a resumed run may change, and the run's own values typed again, go through."""
    run = str(tmp_path / "run")
    shutil.copytree(good_run, run)
    path = os.path.join(run, "last.pt")
    capsys.readouterr()
    code = train.main(["--resume", path, *typed])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == train.EXIT_DATA and len(lines) == 1, lines
    assert named in lines[0] and "may change only --epochs, --max-steps" in lines[0], lines[0]
    assert train.main(["--resume", path, "--max-steps", "1", "--model", "c3d", "--width", "4", "--out", run]) == 0


def test_curves_skip_what_has_no_points(tmp_path):
    out = str(tmp_path)
    open(os.path.join(out, "metrics.jsonl"), "w").close()
    assert train._plot(out) == [] and not os.path.exists(os.path.join(out, "curves.png"))
    epoch = dict(kind="epoch", step=3, epoch=1, train_acc=0.5, val_acc=0.25)  # an older record: no NLL/ECE
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write(json.dumps(epoch) + "\n")
    assert train._plot(out) == [("accuracy", 1)] and os.path.getsize(os.path.join(out, "curves.png")) > 0


# --- unreadable videos ----------------------------------------------------------------------------

def _folder_with_unreadable_videos(tmp_path, bad_per_class=4):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            np.save(root / c / f"{i}.npy", rng.random((6, 8, 8, 3), dtype=np.float32))
        for i in range(bad_per_class):
            (root / c / f"bad{i}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video" * 10)
    return root


def test_unreadable_videos_are_one_warning_naming_a_few(tmp_path):
    pytest.importorskip("av")
    from sideways_kernels.data import UnreadableVideoWarning, VideoFolder
    root = _folder_with_unreadable_videos(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = VideoFolder(str(root), "train", clip_len=4)
    assert len(ds.skipped) >= 4 and len(caught) == 1, [str(w.message) for w in caught]
    assert caught[0].category is UnreadableVideoWarning
    message = str(caught[0].message)
    assert f"skipped {len(ds.skipped)} unreadable file(s)" in message
    assert sum(path in message for path in ds.skipped) == 3 and f"and {len(ds.skipped) - 3} more" in message


def test_the_command_reports_unreadable_videos_in_one_line(tmp_path, capsys):
    pytest.importorskip("av")
    root = _folder_with_unreadable_videos(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train.main(["--data", str(root), "--out", str(tmp_path / "out"), "--size", "8", "--width", "4",
                           "--depth", "2", "--stages", "2", "--clip-len", "4", "--batch-size", "4",
                           "--max-steps", "1"]) == 0
    assert not [w for w in caught if "unreadable" in str(w.message)], [str(w.message) for w in caught]
    lines = [line for line in capsys.readouterr().err.splitlines() if "unreadable" in line]
    assert len(lines) == 1 and re.match(r"sideways-train: skipped 8 unreadable file\(s\): .*bad0\.mp4 \(", lines[0])
    assert "and 5 more" in lines[0] and "[Errno" not in lines[0], lines[0]


def test_a_data_folder_that_cannot_be_read_is_one_line_naming_the_option(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder, words in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "")):
        capsys.readouterr()
        assert train.main(["--data", str(folder), "--out", str(tmp_path / "out")]) == train.EXIT_DATA
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sideways-train: error: --data: ") and words in lines[0], lines
    assert not (tmp_path / "out").exists()


# --- help -------------------------------------------------------------------------------------------

def test_every_option_has_help_and_one_default(monkeypatch):
    """--batch-size, --lr, --weight-decay, --seed had no help; --out and --backend printed their
    default twice ('(default: runs/<mode>-<time>) (default: None)')."""
    monkeypatch.setenv("COLUMNS", "100")
    parser = train._parser()
    text = parser.format_help()
    blocks, current = {}, None
    for line in text.splitlines():
        found = re.match(r"^  (--[\w-]+)", line)
        if found:
            current = found.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    for action in parser._actions:
        if "--help" in action.option_strings:
            continue
        option = action.option_strings[-1]
        assert action.help and len(action.help.strip()) > 5, (option, "no help text")
        assert blocks[option].count("default") == 1, (option, blocks[option])


# --- setup.py without torch ------------------------------------------------------------------

HIDE_TORCH = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
              "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")


@pytest.mark.parametrize("command,advice", [
    (["pip", "wheel", ".", "-w", "dist"], "then pip wheel --no-build-isolation . -w dist"),
    (["pip", "install", "-e", ".[test]"], "then pip install --no-build-isolation -e '.[test]'"),
    (["pip3", "-q", "download", "."], "then pip3 -q download --no-build-isolation ."),
    (["tox"], "then pip install --no-build-isolation . (or pip wheel --no-build-isolation . for a wheel)"),
])
def test_setup_without_torch_names_the_command_the_user_ran(tmp_path, command, advice):
    """Under pip's build isolation setup.py runs in a child of pip: its advice is pip's own
    command with the flag added (both pip commands when the parent is not pip)."""
    front = tmp_path / command[0]
    front.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                     f"sys.exit(subprocess.call([sys.executable, '-c', {HIDE_TORCH!r}], cwd={ROOT!r}))\n")
    front.chmod(0o755)
    result = subprocess.run([str(front), *command[1:]], capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "install torch first" in lines[0] and lines[0].endswith(advice), lines[0]


# --- clip length, lag and temporal padding ------------------------------------------------------------

SMALL = ["--train-videos", "8", "--val-videos", "4", "--batch-size", "4", "--size", "16", "--width", "4",
         "--stages", "3"]
SHORT = {  # a Sideways clip no longer than the 'same' lag, and what the line must say
    "r2plus1d_18": (["--model", "r2plus1d_18", "--clip-len", "16"], ["--clip-len 16", "54-frame lag",
                                                                    "--temporal-padding causal (lag 7)"]),
    "c3d": (["--model", "c3d", "--depth", "2", "--stages", "2", "--clip-len", "2", "--width", "4"],
            ["--clip-len 2", "2-frame lag", "--temporal-padding causal (lag 0)"]),
}


@pytest.mark.parametrize("model", list(SHORT))
def test_a_sideways_clip_no_longer_than_the_lag_is_one_line(tmp_path, capsys, model):
    """r2plus1d_18's 'same' lag is 54 frames: Sideways on 16-frame clips measured chance accuracy.
    Refused in one line naming --clip-len, the lag and the causal option with its lag; no run
    directory is left behind."""
    args, words = SHORT[model]
    out = tmp_path / "out"
    code = train.main([*SMALL, *args, "--temporal-padding", "same", "--max-steps", "1", "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == train.EXIT_DATA and len(lines) == 1, lines
    assert lines[0].startswith("sideways-train: error: --clip-len"), lines[0]
    for word in [*words, "--allow-short-clips", "--mode bp"]:
        assert word in lines[0], (word, lines[0])
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--mode", "bp"], ["--allow-short-clips"], ["--temporal-padding", "causal"]])
def test_a_short_clip_runs_in_bp_mode_with_the_flag_or_causal(tmp_path, capsys, extra):
    """The same clip trains in bp mode (exact, whatever the lag), with --allow-short-clips, or
    with causal padding (lag 0); the startup line says which padding and lag the run streams."""
    args, _ = SHORT["c3d"]
    padding = [] if "--temporal-padding" in extra else ["--temporal-padding", "same"]
    out = str(tmp_path / "run")
    assert train.main([*SMALL, *args, *padding, *extra, "--max-steps", "1", "--out", out]) == 0
    err = capsys.readouterr().err
    expected = "temporal padding causal, lag 0" if "causal" in extra else "temporal padding same, lag 2"
    assert expected in err, err
    assert json.load(open(os.path.join(out, "config.json")))["temporal_padding"] == expected.split()[2].rstrip(",")


@pytest.mark.parametrize("extra", [[], ["--mode", "bp"], ["--temporal-padding", "causal"]])
def test_a_clip_of_one_frame_is_refused(capsys, extra):
    """--clip-len 1 was accepted: refused in every mode, also where the lag would allow it (causal: 0)."""
    with pytest.raises(SystemExit) as stop:
        train.main(["--clip-len", "1", *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith("sideways-train: error: --clip-len 1: a clip needs at least 2 frames"), lines


@pytest.mark.parametrize("model,clip,chosen,expected", [
    ("r2plus1d_18", 16, "auto", "causal"),   # 'same' lag 54
    ("r2plus1d_18", 216, "auto", "same"),    # 4 x 54
    ("mc3_18", 8, "auto", "causal"),         # 'same' lag 5: 8 < 20
    ("mc3_18", 19, "auto", "causal"),
    ("mc3_18", 20, "auto", "same"),
    ("s3d", 16, "auto", "causal"),           # 'same' lag 59, causal 12
    ("c3d", 8, "auto", "same"),              # the chains stream 'same' (the default run)
    ("r2plus1d", 2, "auto", "same"),
    ("mc3_18", 8, "same", "same"),           # an explicit choice is kept
    ("c3d", 8, "causal", "causal"),
])
def test_auto_temporal_padding_is_causal_below_four_times_the_lag(model, clip, chosen, expected):
    args = train.parse_args(["--model", model, "--clip-len", str(clip), "--temporal-padding", chosen,
                             "--width", "4", "--size", "32"])
    cfg = vars(args)
    net = train.build_model(cfg, 10)
    assert train.resolve_temporal_padding(cfg, train.network_lags(net, cfg)) == expected
    assert train.AUTO_CAUSAL_FACTOR == 4 and "4x their 'same' lag" in train._parser().format_help().replace("\n", " ")


def test_validation_measures_the_causal_function_the_run_trained(tmp_path):
    """With causal padding model(video) is still the 'same' function: validation must run the
    pipeline's causal one (the stages offline), or it scores a network nobody trained."""
    out = str(tmp_path / "run")
    assert train.main([*SMALL, "--model", "r2plus1d_18", "--clip-len", "8", "--temporal-padding", "causal",
                       "--epochs", "1", "--out", out]) == 0
    (epoch,) = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["kind"] == "epoch"]
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    cfg = ckpt["config"]
    assert cfg["temporal_padding"] == "causal"
    net = train.build_model(cfg, len(ckpt["classes"]))
    net.load_state_dict(ckpt["model"])
    _, val_set = train.build_data(cfg)
    loader = torch.utils.data.DataLoader(val_set, batch_size=cfg["batch_size"])
    from sideways_kernels import SidewaysPipeline
    pipe = SidewaysPipeline.from_model(net, 3, batchnorm="frame", temporal_padding="causal",
                                       example=val_set[0][0][None])
    causal = train.evaluate(net, loader, "cpu", lambda v: train.offline_forward(pipe.stages, v))
    same = train.evaluate(net, loader, "cpu")
    assert abs(same["loss"] - causal["loss"]) > 1e-4  # the two functions differ on these clips
    assert epoch["val_loss"] == pytest.approx(causal["loss"], rel=1e-5, abs=1e-6)


def test_a_checkpoint_from_before_the_option_resumes_with_same_padding(tmp_path, capsys):
    """A run written before --temporal-padding streamed 'same' (and took any clip): resumed, it
    goes on so, not with what 'auto' would pick now (mc3_18 at 8 frames: causal)."""
    out = str(tmp_path / "run")
    assert train.main([*SMALL, "--model", "mc3_18", "--clip-len", "8", "--temporal-padding", "same", "--epochs", "1",
                       "--max-steps", "1", "--out", out]) == 0
    path = os.path.join(out, "last.pt")
    ckpt = torch.load(path, weights_only=True)
    for key in ("temporal_padding", "allow_short_clips"):
        del ckpt["config"][key]
    torch.save(ckpt, path)
    capsys.readouterr()
    assert train.main(["--resume", path]) == 0
    assert "temporal padding same, lag 5" in capsys.readouterr().err
    assert json.load(open(os.path.join(out, "config.json")))["temporal_padding"] == "same"
