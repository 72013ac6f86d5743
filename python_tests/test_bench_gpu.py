"""bench/bench_gpu.py's end-to-end measurement runs where a GPU run will run it, on the CPU at
small sizes: a GPU session's minutes should not go to finding a broken benchmark."""
import pytest

from scripts import load

bench_gpu = load("bench/bench_gpu.py")


@pytest.mark.parametrize("network,impl,padding", [("c3d", "clip_bp", "same"), ("c3d", "sideways", "same"),
                                                  ("r3d_18", "clip_bp", "same"), ("r3d_18", "sideways", "causal"),
                                                  ("chain", "sideways", "same")])
def test_end_to_end_measures_every_kind_of_case_on_the_cpu(network, impl, padding):
    # 8 frames: causal r3d_18's three temporal strides each keep whole stride groups (8 -> 4 -> 2 -> 1)
    row = bench_gpu.end_to_end(network, impl, 8, backend="torch" if impl == "sideways" else None,
                               temporal_padding=padding, batch=2, size=32, width=4, device="cpu", rounds=1)
    assert row["frames_per_s"] > 0 and row["T"] == 8 and row["network"] == network
    if impl == "sideways":
        assert row["ticks"] >= 8 and row["graphs"] is False  # no graphs on the CPU
        assert row["temporal_padding"] == (padding if network == "r3d_18" else None)
        # rings and buffers; the torch backend's bf16 forms of the weights a clip keeps (3-tap: a folded one per ring
        # slot and the taps' sum, 3 1/3 copies of 2 bytes a weight: 1.67x the fp32 weights; 1-tap: 2 copies, 1x)
        assert row["held_mib"] > 0 and row["params_mib"] < row["derived_mib"] < 1.67 * row["params_mib"]
    params = row["params_mib"]
    assert params > 0 and row["grads_mib"] == pytest.approx(params)  # one clip's fp32 gradients, once
    assert row["video_mib"] == pytest.approx(2 * 3 * 8 * 32 * 32 * 4 / 2 ** 20)


def test_the_gpu_run_s_end_to_end_matrix_names_each_case_once():
    ids = [bench_gpu._e2e_id(c) for c in bench_gpu.E2E]
    assert len(ids) == len(set(ids))
    assert {c[0] for c in bench_gpu.E2E} == {"c3d", "r3d_18", "chain"} and {c[5] for c in bench_gpu.E2E} == {16, 48, 256}


def test_profile_clip_runs_and_measures_the_union_of_kernel_intervals(capsys):
    """bench/profile_clip.py, which only a GPU run uses, on the CPU at a small size (no kernels
    are traced there: the run must not break on the way), and its GPU-busy arithmetic."""
    profile_clip = load("bench/profile_clip.py")
    assert profile_clip.busy_us([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4.0  # overlaps counted once
    profile_clip.main(["--network", "r3d_18", "--padding", "causal", "--frames", "8", "--eager", "--backend", "torch",
                       "--device", "cpu", "--batch", "2", "--size", "32", "--width", "4", "--top", "3"])
    out = capsys.readouterr().out
    assert "r3d_18 sideways T8 (causal), backend torch, eager" in out and "aten op" in out


@pytest.mark.parametrize("op", ["forward", "input_grad", "weight_accumulate", "weight_sgd"])
@pytest.mark.parametrize("shape", bench_gpu.OTHER_SHAPES, ids=bench_gpu.OTHER_IDS)
def test_the_other_layers_op_cases_compute_what_reference_py_does_on_the_cpu(shape, op):
    """bench_gpu's op cases of the strided, unaligned and non-3x3x3 layers (``OTHER_SHAPES``), at
    B1 and 16x16 frames: cuDNN's calls in both layouts (their stride and padding) and the torch
    backend's op against reference.py in float64, as the GPU run first checks each."""
    small = (*shape[:2], 1, 16, *shape[4:])
    layer = bench_gpu._Layer(*small, device="cpu")
    assert layer.grad_out.shape[-1] == 16 // shape[7]
    for impl in ("cudnn_ncdhw", "cudnn_cl", "torch"):
        _, result = bench_gpu._implementation(op, impl, layer)
        assert bench_gpu._checked(op, impl, small, layer, result()) < 2e-2


def test_the_gpu_tests_run_in_several_processes_and_one_log_sums_them_up(tmp_path, monkeypatch):
    """bench/parallel_tests.py (run_gpu.sh's test phase): every selected test runs once, in one of
    the processes; the log's last line sums their outcomes; a failure fails the whole; at the
    deadline the processes are interrupted and what ran is still reported."""
    parallel = load("bench/parallel_tests.py")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test_some.py").write_text(
        "import os, time, pytest\n"
        "@pytest.mark.parametrize('i', range(5))\n"
        "def test_case(i):\n"
        "    open(f'ran{i}-{os.getpid()}', 'w').close()\n"
        "    assert i != 3\n"
        "def test_skipped():\n"
        "    pytest.skip('no GPU')\n"
        "def test_slow():\n"
        "    time.sleep(0 if os.environ.get('FAST') else 600)\n")
    monkeypatch.setenv("FAST", "1")
    log = tmp_path / "all.log"
    assert parallel.main(["--jobs", "3", "--log", str(log), "--", "test_some.py", "-k", "case or skipped"]) == 1
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("1 failed, 4 passed, 1 skipped of 6 in 3 processes")
    ran = sorted(p.name.split("-") for p in tmp_path.glob("ran*"))
    assert [r[0] for r in ran] == [f"ran{i}" for i in range(5)]  # each once
    assert len({r[1] for r in ran}) == 3  # in three processes
    assert parallel.main(["--jobs", "2", "--log", str(log), "--", "test_some.py", "-k", "not case"]) == 0
    assert log.read_text().strip().splitlines()[-1].startswith("1 passed, 1 skipped of 2 in 2 processes")
    monkeypatch.delenv("FAST")
    # one process: the test before the slow one is reported (pytest's own summary, on SIGINT); the limit
    # leaves a loaded machine time to start pytest and run the first
    assert parallel.main(["--jobs", "1", "--limit", "20", "--log", str(log), "--", "test_some.py", "-k",
                          "slow or case and 0"]) == 124
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("1 passed of 2 in 1 process in") and last.endswith("(stopped at the deadline)")
    assert parallel.main(["--log", str(log), "--", "test_some.py", "-k", "nothing"]) == 5
    with pytest.raises(SystemExit):
        parallel.main(["--jobs", "0", "--log", str(log), "--", "test_some.py"])
