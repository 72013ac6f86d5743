"""Every code block of README.md, checked, so an example cannot break unnoticed:

- every ```python block runs as written, except for the few sizes in SMALLER (the README's
  would take minutes on a CPU), and what its comments promise is checked (CLAIMS);
- every line of a ```bash block is a command this file knows how to check: `make` targets exist,
  `sideways-train` / `python -m sideways_kernels.train` / `torchrun ... -m sideways_kernels.train`
  command lines parse with the command's own parser, files and extras it names exist;
- the unlabelled layout block names paths that exist;
- inline `make ...` and `sideways-train ...` spans in the prose are checked the same way.

A block of another language, a command line no rule here knows, a SMALLER or CLAIMS entry whose
README text is gone: each fails, naming the README line, until this file is updated with it.
"""
import os
import re
import shlex
import tomllib

import pytest
import torch

from sideways_kernels import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# (README text, what the test runs instead, why). Each README text must still be in a ```python
# block: the test fails when one is not, so this table cannot drift from the README.
SMALLER = [
    ("torch.randn(2, 3, 16, 112, 112)", "torch.randn(2, 3, 16, 32, 32)",
     "112x112 frames through r2plus1d_18 take minutes on a CPU; 32x32 keeps 2x2 at its last BatchNorm"),
    ("r2plus1d_18(num_classes=10)", "r2plus1d_18(num_classes=10, width=4)",
     "torchvision's width (64: 31M parameters) is the same code at ~250x the FLOPs"),
    ('temporal_padding="causal")', 'temporal_padding="causal", example=torch.randn(1, 3, 16, 32, 32))',
     "the cost probe's default clip is 112x112 frames"),
]


def _blocks():
    """[(language, first line of the code (1-based), code, section heading)] of README.md."""
    blocks, heading, fence = [], "", None
    with open(README) as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        if fence is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            found = re.match(r"^```\s*([\w+-]*)\s*$", line)
            if found:
                fence = (found.group(1), number + 1, [], heading)
        elif line.startswith("```"):
            blocks.append((fence[0], fence[1], "\n".join(fence[2]), fence[3]))
            fence = None
        else:
            fence[2].append(line)
    assert fence is None, f"README.md:{fence[1] - 1}: a ``` block is never closed"
    return blocks


BLOCKS = _blocks()
PYTHON = [b for b in BLOCKS if b[0] == "python"]


def _id(block):
    return f"README.md:{block[1]} ({block[3]})"


def test_every_block_is_of_a_kind_this_file_checks():
    unknown = [_id(b) + f" ```{b[0]}" for b in BLOCKS if b[0] not in ("python", "bash", "")]
    assert not unknown, f"no check for these README blocks; add one to python_tests/test_readme.py: {unknown}"
    assert PYTHON and any(b[0] == "bash" for b in BLOCKS)


def test_every_substitution_still_matches_the_readme():
    """A SMALLER entry whose README text changed would silently run the README's sizes (or
    nothing): the table must be updated with the README."""
    code = "\n".join(b[2] for b in PYTHON)
    stale = [old for old, _, _ in SMALLER if old not in code]
    assert not stale, f"README.md's python blocks no longer contain {stale}: update SMALLER in {__file__}"
    stale = [key for key in CLAIMS if not any(key in b[2] for b in PYTHON)]
    assert not stale, f"README.md's python blocks no longer contain {stale}: update CLAIMS in {__file__}"


def _smaller(code: str) -> str:
    for old, new, _ in SMALLER:
        code = code.replace(old, new)
    return code


def _chain_claims(ns):
    """The comments of the list-API example: result's fields and their shapes, a frame a tick."""
    result, video = ns["result"], ns["video"]
    assert torch.isfinite(result.loss)
    assert result.outputs.shape == (8, 10, 16, 1, 1) and result.logits.shape == (8, 10)
    assert ns["logits"].shape == (8, 10, 1, 1)  # the last streamed frame
    assert sum(1 for _ in ns["pipe"].stream(video)) == video.shape[2]


def _from_model_claims(ns):
    """The comments of the from_model example: result.logits [B, 10], a causal pipeline with lag
    0 where 'same' has 54, and predict == model(video) with the default 'same' padding (the
    causal pipeline predicts its stages' offline function). (The block's zero_grad leaves no
    .grad to look at.)"""
    assert ns["result"].logits.shape == (2, 10)
    assert ns["pipe"].lags == {"same": 54, "causal": 7} and ns["pipe"].lag == 7
    from sideways_kernels import SidewaysPipeline
    with torch.no_grad():
        torch.testing.assert_close(ns["logits"], train.offline_forward(ns["pipe"].stages, ns["video"]),
                                   rtol=1e-4, atol=1e-4)
        same = SidewaysPipeline.from_model(ns["model"], stages=4, batchnorm="frame", example=ns["video"][:1])
        torch.testing.assert_close(same.predict(ns["video"]), ns["model"](ns["video"]), rtol=1e-4, atol=1e-4)


# a text that identifies a python block -> what its comments promise, checked after it ran
CLAIMS = {
    "split_sequential(net, [3, 6])": _chain_claims,
    "SidewaysPipeline.from_model(model, stages=4": _from_model_claims,
}


@pytest.mark.parametrize("block", PYTHON, ids=_id)
def test_python_block_runs(block):
    _, first, code, _ = block
    namespace = {"__name__": "__readme__"}
    # blank lines first, so a traceback names the README's own line numbers
    exec(compile("\n" * (first - 1) + _smaller(code), README, "exec"), namespace)
    for key, check in CLAIMS.items():
        if key in code:
            check(namespace)


# --- command lines ----------------------------------------------------------------------------

def _make_targets():
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read()
    return {t for line in re.findall(r"^([A-Za-z0-9_.%/$() -]+?)\s*::?(?!=)", text, re.M) for t in line.split()}


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _parses(argv, where):
    """``argv`` (of sideways-train) parses; ``...`` at its end stands for more options."""
    if argv and argv[-1] == "...":
        argv = argv[:-1]
    assert "..." not in argv, f"{where}: '...' only at the end of a command line"
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True  # `--device cuda` lines are for GPU machines
    try:
        train.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: sideways-train {shlex.join(argv)} does not parse (exit {exc.code}; "
                             "the error is printed above)") from None
    finally:
        torch.cuda.is_available = real


def _check_make(words, where):
    targets = _make_targets()
    for word in words:
        if "=" in word:  # a variable: TRAIN_ARGS="..." passes options to sideways-train
            name, value = word.split("=", 1)
            with open(os.path.join(ROOT, "Makefile")) as f:
                assert f"$({name})" in f.read(), f"{where}: the Makefile reads no variable {name}"
            if name == "TRAIN_ARGS":
                _parses(shlex.split(value), where)
            continue
        assert word in targets, f"{where}: `make {word}`: the Makefile has no target {word!r}"


def _check_command(words, where):
    """One command (no &&) of a bash block, or an inline code span."""
    head = words[0]
    if head == "make":
        _check_make(words[1:], where)
    elif head == "sideways-train":
        assert "sideways-train" in _pyproject()["project"]["scripts"], f"{where}: no sideways-train script"
        _parses(words[1:], where)
    elif head in ("python", "python3", ".venv/bin/python", "torchrun"):
        if "-m" in words:
            module = words[words.index("-m") + 1]
            rest = words[words.index("-m") + 2:]
            if module == "sideways_kernels.train":
                _parses(rest, where)
            elif module == "venv":
                assert len(rest) == 1, where
            elif module == "pytest":
                assert all(os.path.exists(os.path.join(ROOT, p)) for p in rest if not p.startswith("-")), where
            else:
                raise AssertionError(f"{where}: no check for `python -m {module}`; add one to {__file__}")
        else:
            assert head != "torchrun", f"{where}: torchrun without -m"
            script = words[1]
            assert os.path.isfile(os.path.join(ROOT, script)), f"{where}: {script} does not exist"
    elif head == "pip" and words[1] == "install":
        pins = [w for w in words[2:] if w.startswith("torch==")]
        for pin in pins:
            with open(os.path.join(ROOT, "Makefile")) as f:
                assert f"TORCH_PIN ?= {pin}" in f.read(), f"{where}: {pin} is not the Makefile's TORCH_PIN"
        extras = [w for w in words[2:] if w.startswith(".[") or w.startswith("'.[")]
        defined = set(_pyproject()["project"]["optional-dependencies"])
        for spec in extras:
            for extra in spec.strip("'").strip(".[]").split(","):
                assert extra in defined, f"{where}: pyproject.toml has no extra {extra!r}"
        if not pins and not extras:  # plain packages: those the Makefile's install installs so
            with open(os.path.join(ROOT, "Makefile")) as f:
                makefile = [line.split() for line in f if "pip install" in line]
            wanted = [w for w in words[2:] if not w.startswith("-")]
            assert wanted and any(set(wanted) <= set(line) for line in makefile), \
                f"{where}: pip install {' '.join(wanted)} is no install of the Makefile's"
    elif head == "." and words[1].endswith("/bin/activate") and len(words) == 2:
        pass  # sourcing the venv made on the same line
    else:
        raise AssertionError(f"{where}: no check for `{shlex.join(words)}`; add one to {__file__}")


BASH = [b for b in BLOCKS if b[0] == "bash"]


@pytest.mark.parametrize("block", BASH, ids=_id)
def test_bash_block_command_lines_are_real(block):
    _, first, code, _ = block
    logical, start = "", first
    for number, line in enumerate(code.splitlines(), first):
        if not logical:
            start = number
        logical += line
        if line.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        words = shlex.split(logical, comments=True)
        logical = ""
        if not words:
            continue
        command = []
        for word in words + ["&&"]:
            if word in ("&&", ";", "||"):
                if command:
                    _check_command(command, f"README.md:{start}")
                command = []
            else:
                command.append(word)


def test_inline_command_spans_are_real():
    """`make ...` and `sideways-train ...` in the prose, and `python -m sideways_kernels.train`."""
    with open(README) as f:
        text = f.read()
    spans = 0
    for found in re.finditer(r"`((?:make|sideways-train|python -m sideways_kernels\.train)(?: [^`]*)?)`", text):
        where = f"README.md:{text.count(chr(10), 0, found.start()) + 1}"
        _check_command(shlex.split(found.group(1)), where)
        spans += 1
    assert spans >= 5


def test_layout_block_names_paths_that_exist():
    layouts = [b for b in BLOCKS if b[0] == ""]
    assert layouts
    for _, first, code, _ in layouts:
        for number, line in enumerate(code.splitlines(), first):
            if not line.strip() or line[0].isspace():
                continue  # a continuation of the line above
            path = line.split()[0]
            assert os.path.exists(os.path.join(ROOT, path)), f"README.md:{number}: {path} does not exist"


def test_readme_names_the_cxx_standard_setup_builds_with():
    with open(README) as f:
        said = re.findall(r"C\+\+(\d\d) compiler", f.read())
    with open(os.path.join(ROOT, "setup.py")) as f:
        built = re.search(r'cxx = \[[^\]]*"-std=c\+\+(\d\d)"', f.read())
    assert said and built, "the README's compiler requirement or setup.py's -std flag moved: update this test"
    assert set(said) == {built.group(1)}, f"README.md says C++{said}, setup.py builds C++{built.group(1)}"
