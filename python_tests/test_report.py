"""docs/report.py's runs: an interrupted or failed run loses nothing already made, and --render
writes the page from the runs there are (or names the one that is missing)."""
import json

import pytest

from scripts import load

report = load("docs/report.py")

TINY = ("--mode", "bp", "--width", "4", "--depth", "1", "--stages", "1", "--size", "12", "--train-videos", "4",
        "--val-videos", "2", "--batch-size", "2", "--epochs", "1", "--clip-len", "4")


def test_a_run_that_fails_leaves_the_last_finished_one_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RUNS", str(tmp_path))
    config = report.Config("tiny", "BP", TINY)
    first = report.run(config, 0)
    assert not first["reused"] and first["epochs"] and first["code"] == report.code_version()
    out = tmp_path / "tiny-seed0"
    assert json.loads((out / "summary.json").read_text())["epochs"] == first["epochs"]
    assert report.run(config, 0)["reused"]  # same command, same code: nothing runs
    monkeypatch.setattr(report, "code_version", lambda: "another")  # the library changed: it runs again ...
    broken = report.Config("tiny", "BP", TINY + ("--clip-len", "0"))  # ... and fails
    with pytest.raises(RuntimeError, match="exit status"):
        report.run(broken, 0)
    assert json.loads((out / "summary.json").read_text())["epochs"] == first["epochs"]
    assert (out / "last.pt").exists()


def test_render_names_a_missing_run(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RUNS", str(tmp_path))
    with pytest.raises(SystemExit, match="no finished run at"):
        report.main(["--render"])


def test_only_runs_the_configurations_it_names_and_renders_the_rest(tmp_path, monkeypatch):
    """--only TEXT: the runs of the configurations whose name contains TEXT (run or reused), every
    other one as it is on disk, and the page says so; a TEXT no configuration has is one line."""
    monkeypatch.setattr(report, "RUNS", str(tmp_path))
    ran, shown = [], {}
    fake = lambda config, seed, reused: dict(config=config.name, seed=seed, reused=reused, code="c")
    monkeypatch.setattr(report, "run", lambda config, seed: ran.append((config.name, seed)) or fake(config, seed, False))
    monkeypatch.setattr(report, "rendered", lambda job: fake(*job, True))
    for name in ("figures", "readme_check"):
        monkeypatch.setattr(report, name, lambda *a: None)
    monkeypatch.setattr(report, "alignments", lambda: {})
    monkeypatch.setattr(report, "page", lambda results, timing, probe: shown.update(timing) or "")
    monkeypatch.setattr(report, "discussion", lambda results, probe: "")
    monkeypatch.setattr(report, "HERE", str(tmp_path))
    report.main(["--only", "speed0.5"])
    named = {c.name for c in report.CONFIGS if "speed0.5" in c.name}
    assert named and sorted(ran) == sorted((n, s) for n in named for s in report.SEEDS)
    assert f"{len(ran)} of them run now, 0 reused, the rest as they were" in shown["line"]
    assert shown["command"] == "python docs/report.py --only speed0.5"
    with pytest.raises(SystemExit):
        report.main(["--only", "no such configuration"])
