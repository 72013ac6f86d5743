"""Which backend runs the ops: the default per device and what is built, the per-op, per-dtype
dispatch on CUDA from dispatch.json, and the overrides."""
import json
import types

import pytest
import torch

from sideways_kernels import backend

def _recording(monkeypatch, cuda: bool = True, triton: bool = True) -> tuple:
    """The CUDA kernels and Triton built as asked, on an sm_90 GPU, every backend's ops (cuda,
    triton, torch) replaced by recorders: (the calls as (op, backend), the backends whose ops were
    made)."""
    monkeypatch.setattr(backend, "backends", lambda: dict(torch=True, cpp=True, cuda=cuda, triton=triton))
    calls, made = [], []
    fake = {name: types.SimpleNamespace(**{op: (lambda *a, _n=name, _op=op, **k: calls.append((_op, _n)))
                                           for op in backend.OPS}) for name in ("cuda", "triton", "torch")}
    monkeypatch.setattr(backend, "kernels", lambda name, _real=backend.kernels: made.append(name) or fake[name]
                        if name in fake else _real(name))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return calls, made


BUILT = [(True, True), (True, False), (False, True), (False, False)]  # (CUDA kernels, Triton)


@pytest.mark.parametrize("built", BUILT, ids=str)
def test_the_default_on_cuda_is_the_dispatch_whatever_is_built(monkeypatch, built):
    """On a CUDA device the default is ``auto`` whichever kernels are built (with Triton alone it
    had been Triton for every op, with the CUDA kernels alone the CUDA kernels — also where cuDNN
    measured faster); on the CPU the fastest built."""
    cuda, triton = built
    monkeypatch.setattr(backend, "backends", lambda: dict(torch=True, cpp=True, cuda=cuda, triton=triton))
    monkeypatch.delenv("SIDEWAYS_BACKEND", raising=False)
    assert backend.resolve(torch.device("cuda", 0)) == "auto"
    assert backend.resolve(torch.device("cpu")) == "cpp"
    monkeypatch.setenv("SIDEWAYS_BACKEND", "torch")
    assert backend.resolve(torch.device("cuda", 0)) == "torch"


@pytest.mark.parametrize("built", BUILT, ids=str)
def test_a_choice_whose_backend_is_not_built_runs_on_its_stand_in(monkeypatch, built):
    """``auto`` sends a call whose chosen backend is not built here to its stand-in: the CUDA
    kernels' to Triton, else cuDNN (the torch backend); Triton's to cuDNN — and needs no Triton
    to be made."""
    cuda, triton = built
    calls, made = _recording(monkeypatch, cuda, triton)
    assert backend.built_for("cuda") == ("cuda" if cuda else "triton" if triton else "torch")
    assert backend.built_for("triton") == ("triton" if triton else "torch")
    assert backend.built_for("torch") == "torch"
    monkeypatch.setattr(backend, "_table", dict(
        unmeasured=dict(float32="cuda", bfloat16="torch"),
        measured={"sm_90": dict(device="H100", date="2026-01-01", ops={"window_input_grad": {"bfloat16": "triton"}},
                                shapes={"window_input_grad": {"bfloat16": [dict(channels=[4, 8], positions=64,
                                                                                backend="cuda")]}})}))
    monkeypatch.setattr(backend, "_chosen", {})
    auto = backend.kernels("auto")
    assert ("triton" in made) == triton  # (its grouped launches, where it is built)
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    auto.window_input_grad(bf16, None)
    auto.ring_conv_forward(fp32, None, 0)
    auto.ring_conv_forward(bf16, None, 0)
    assert calls == [("window_input_grad", backend.built_for("triton")),
                     ("ring_conv_forward", backend.built_for("cuda")), ("ring_conv_forward", "torch")]
    # every backend a layer's calls may take (the weights' forms a run makes), stand-ins included: its
    # measured rows' where it has some (at any frame size, each takes the nearest), else the op's
    assert backend._choices("window_input_grad", bf16, (4, 8)) == {backend.built_for("cuda")}
    assert backend._choices("window_input_grad", bf16, (4, 16)) == {backend.built_for("triton")}


def test_the_shipped_dispatch_table_names_a_backend_for_every_case():
    with open(backend.TABLE_PATH) as f:
        table = json.load(f)
    dtypes = {"float32", "float16", "bfloat16", "float64"}
    assert set(table["unmeasured"]) == dtypes and set(table["unmeasured"].values()) <= {"cuda", "triton", "torch"}
    # our kernels are in the default path only where a measured row says they win: until an
    # architecture is measured, cuDNN for 16-bit (every GPU run measured it ahead of our general
    # kernels, which are what an unmeasured architecture without TMA runs)
    assert table["unmeasured"]["float16"] == table["unmeasured"]["bfloat16"] == "torch"
    for arch, entry in table["measured"].items():
        assert arch.startswith("sm_") and entry["device"] and entry["date"]
        for op, by_dtype in entry["ops"].items():
            assert op in backend.OPS and set(by_dtype) <= dtypes
            assert set(by_dtype.values()) <= {"cuda", "triton", "torch"}
        for op, by_dtype in entry.get("shapes", {}).items():  # per layer shape (gpu_report.dispatch)
            assert op in backend.OPS and set(by_dtype) <= dtypes
            for shapes in by_dtype.values():
                assert all(len(s["channels"]) == 2 and s["positions"] > 0
                           and s["backend"] in {"cuda", "triton", "torch"} for s in shapes)


def test_choose_takes_the_measured_entry_of_the_architecture_else_the_default():
    table = dict(unmeasured=dict(float32="cuda", float16="triton", bfloat16="triton", float64="cuda"),
                 measured={"sm_90": dict(device="H100", date="2026-01-01",
                                         ops={"weight_grad_accumulate": {"bfloat16": "cuda"}})})
    assert backend.choose("weight_grad_accumulate", torch.bfloat16, "sm_90", table) == "cuda"
    assert backend.choose("weight_grad_accumulate", torch.float16, "sm_90", table) == "cuda"  # bf16's measurement
    table["measured"]["sm_90"]["ops"]["weight_grad_accumulate"]["float16"] = "torch"
    assert backend.choose("weight_grad_accumulate", torch.float16, "sm_90", table) == "torch"  # its own
    assert backend.choose("weight_grad_accumulate", torch.bfloat16, "sm_90", table) == "cuda"
    table["measured"]["sm_90"]["ops"]["weight_grad_accumulate"]["bfloat16"] = "torch"
    assert backend.choose("weight_grad_accumulate", torch.float32, "sm_90", table) == "cuda"  # not bf16's: fp32's
    table["measured"]["sm_90"]["shapes"] = {"ring_conv_forward": {"bfloat16": [
        dict(channels=[16, 32], positions=64, backend="torch")]}}  # per shape too: fp16 takes bf16's
    assert backend.choose("ring_conv_forward", torch.float16, "sm_90", table, layer=(16, 32, 64)) == "torch"
    assert backend.choose("ring_conv_forward", torch.bfloat16, "sm_90", table) == "triton"
    assert backend.choose("weight_grad_accumulate", torch.bfloat16, "sm_80", table) == "triton"
    assert backend.choose("weight_grad_accumulate", torch.float32, "sm_90", table) == "cuda"
    assert backend.choose("ring_conv_forward", torch.int32, "sm_90", table) == "cuda"  # named nowhere


def test_auto_routes_each_call_by_the_activations_dtype(monkeypatch):
    calls, _ = _recording(monkeypatch)
    monkeypatch.setattr(backend, "_table", dict(
        unmeasured=dict(float32="cuda", float16="triton", bfloat16="triton", float64="cuda"),
        measured={"sm_90": dict(device="H100", date="2026-01-01", ops={"window_input_grad": {"bfloat16": "cuda"}})}))
    monkeypatch.setattr(backend, "_chosen", {})
    auto = types.SimpleNamespace(**{op: backend._dispatched(op) for op in backend.OPS})
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    auto.ring_conv_forward(bf16, None, 0)
    auto.ring_conv_forward(fp32, None, 0)
    auto.window_input_grad(bf16, None)
    auto.weight_grad_accumulate(None, None, bf16)
    auto.sgd_tick_update(None, None, None, None, fp32)
    auto.weight_grad_accumulate(None, None, grad_out=bf16)  # the activations by name
    assert calls == [("ring_conv_forward", "triton"), ("ring_conv_forward", "cuda"), ("window_input_grad", "cuda"),
                     ("weight_grad_accumulate", "triton"), ("sgd_tick_update", "cuda"),
                     ("weight_grad_accumulate", "triton")]
    # a tick holds for grouping exactly the weight updates the dispatch sends to Triton
    groups = backend.kernels("auto").groups
    assert groups("weight_grad_accumulate", (None, None, bf16)) and groups("sgd_tick_update", (None,) * 4 + (bf16,))
    assert not groups("sgd_tick_update", (None,) * 4 + (fp32,))


def test_auto_routes_a_call_by_its_layer_where_the_dispatch_measured_it(monkeypatch):
    """Where the architecture's ``shapes`` name a layer — its (C_in, C_out), spatial kernel,
    stride and groups — a call goes to the backend measured fastest at the nearest frame size
    (B·H·W); the op's overall choice elsewhere; a tick holds for grouping the weight updates of
    the layers so sent to Triton."""
    calls, _ = _recording(monkeypatch)
    at = lambda c_in, c_out, positions, name, **geometry: dict(channels=[c_in, c_out], positions=positions,
                                                               backend=name, **geometry)
    shapes = {"ring_conv_forward": {"bfloat16": [at(16, 32, 8 * 56 * 56, "torch"), at(16, 32, 8 * 7 * 7, "cuda"),
                                                 at(16, 32, 8 * 56 * 56, "triton", kernel=[1, 5, 5], stride=[2, 2])]},
              "window_input_grad": {"bfloat16": [at(16, 32, 8 * 56 * 56, "torch")]},
              "weight_grad_accumulate": {"bfloat16": [at(16, 32, 8 * 56 * 56, "triton"), at(16, 64, 64, "torch")]}}
    monkeypatch.setattr(backend, "_table", dict(
        unmeasured=dict(bfloat16="triton"),
        measured={"sm_80": dict(device="A100", date="2026-01-01", shapes=shapes,
                                ops={op: {"bfloat16": "cuda"} for op in backend.OPS})}))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(backend, "_chosen", {})
    auto = backend.kernels("auto")
    meta = lambda *shape: torch.empty(shape, dtype=torch.bfloat16, device="meta")
    ring = lambda c, h: meta(3, 8, c, h, h)
    weight = lambda c_in, c_out, kernel=(3, 3, 3): meta(c_out, c_in, *kernel)
    one = [1, 1]
    forward = lambda c_in, c_out, h, stride=one, groups=1, kernel=(3, 3, 3): auto.ring_conv_forward(
        ring(c_in, h), None, 0, weight(c_in // groups, c_out, kernel), None, stride, one, one, 1, groups)
    forward(16, 32, 56)
    forward(16, 32, 8)  # nearest: 7x7
    forward(16, 64, 56)  # channels not measured
    forward(16, 32, 56, stride=[2, 2])  # strided: not as measured
    forward(16, 32, 56, groups=2)  # grouped: not as measured
    forward(16, 32, 56, stride=[2, 2], kernel=(1, 5, 5))  # the strided 1x5x5 layer measured
    forward(16, 32, 56, kernel=(1, 5, 5))  # its stride-1 twin: not measured
    auto.ring_conv_forward(ring(16, 56), None, 0, weight(16, 32), None, one)  # no groups: no layer, the op's choice
    auto.window_input_grad(meta(8, 32, 56, 56), weight(16, 32), [56, 56], one, one, one, 1)
    accumulate = lambda c_in, c_out, h: (weight(c_in, c_out), None, meta(8, c_out, h, h), ring(c_in, h), 0, one,
                                         one, one, 1, 1)
    auto.weight_grad_accumulate(*accumulate(16, 32, 56))
    assert calls == [("ring_conv_forward", "torch"), ("ring_conv_forward", "cuda"), ("ring_conv_forward", "cuda"),
                     ("ring_conv_forward", "cuda"), ("ring_conv_forward", "cuda"), ("ring_conv_forward", "triton"),
                     ("ring_conv_forward", "cuda"), ("ring_conv_forward", "cuda"), ("window_input_grad", "torch"),
                     ("weight_grad_accumulate", "triton")]
    assert auto.groups("weight_grad_accumulate", accumulate(16, 32, 56))
    assert not auto.groups("weight_grad_accumulate", accumulate(16, 64, 56))


def _gpu_report():
    from scripts import load
    return load("bench/gpu_report.py")


def test_a_gpu_run_s_rows_become_tables_and_a_dispatch_table_the_backend_reads(tmp_path):
    """bench/gpu_report.py on the rows a (cut short) GPU run leaves: the faster kernel per op by
    geometric mean over the shapes both ran, ratios against the faster cuDNN layout."""
    report = _gpu_report()
    rows = [dict(kind="ceiling", tflops=800.0)]
    times = {("weight_sgd", "cuda"): [2.0, 4.0], ("weight_sgd", "triton"): [1.0, 5.0],  # geomean 2.83 vs 2.24
             ("weight_sgd", "torch"): [1.5, 1.5],  # the torch backend's (cuDNN) beats both
             ("forward", "cuda"): [1.0, 1.0], ("forward", "triton"): [3.0, 3.0]}
    graph = {("forward", "cuda"): 0.9, ("forward", "triton"): 0.5}  # a call's GPU time alone: triton's is less
    for (op, impl), ms in times.items():
        for shape, t in zip(([64, 128, 8, 56], [128, 256, 16, 28]), ms):
            rows.append(dict(kind="op", op=op, shape=shape, impl=impl, median_s=t / 1e3, tflops=100.0 / t,
                             graph_s=graph[op, impl] / 1e3 if (op, impl) in graph else None))
    rows += [dict(kind="op", op="forward", shape=[64, 128, 8, 56], impl=i, median_s=t / 1e3, tflops=1.0,
                  graph_s=t / 2e3) for i, t in (("cudnn_ncdhw", 2.0), ("cudnn_cl", 1.5))]
    rows.append(dict(kind="op", op="input_grad", shape=[64, 128, 8, 56], impl="cuda", median_s=1e-3, tflops=1.0))
    rows += [dict(kind="op", op="bias_grad", shape=[64, 128, 8, 56], impl=i, median_s=t / 1e3, tflops=None,
                  gb_per_s=g, graph_s=t / 4e3) for i, t, g in (("torch", 0.04, 320.0), ("triton", 0.01, 1280.0))]
    # a tick's weight updates, grouped: they decide the weight ops where torch and (grouped) triton both ran —
    # accumulating, triton's 0.4 ms beats torch's 0.5 (eager: triton's capture failed, so no graph times
    # compared); the SGD tick without a grouped row leaves the SGD op to its op rows (torch)
    layers = [[3, 64, 8, 112], [64, 128, 8, 56]]
    tick = lambda op, impl, t, g: dict(kind="tick_updates", op=op, impl=impl, layers=layers, median_s=t / 1e3,
                                       graph_s=g and g / 1e3, graph_error=None if g else "capture failed")
    rows += [tick("weight_accumulate", "torch", 0.5, 0.2), tick("weight_accumulate", "triton", 0.4, None),
             tick("weight_accumulate", "triton-per-layer", 0.9, 0.3),
             tick("weight_sgd", "torch", 0.5, 0.2), tick("weight_sgd", "triton-per-layer", 0.1, 0.05)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"kind": "op", "op": "forw')  # cut mid-line
    loaded = report.load(str(path))
    assert len(loaded) == len(rows)
    text = "\n".join(report.tables(loaded, "H100"))
    assert "| forward | 64→128, B8, 56 | cuda | 1.000 | 100.0 | 12% | 1.50× | 0.900 | 0.83× |" in text
    assert "| weight_sgd | 64→128, B8, 56 | torch | 1.500 |" in text
    assert "| bias_grad | 64→128, B8, 56 | triton | 0.010 | 1280 GB/s | – | 4.00× | 0.003 | 4.00× |  |" in text
    assert "| weight_accumulate | triton-per-layer | 0.900 | 0.300 | 0.67× |" in text
    assert "| weight_accumulate | triton | 0.400 | – | capture failed |" in text
    table = report.dispatch(loaded, "H100", "sm_90", backend.table())
    ops = table["measured"]["sm_90"]["ops"]  # forward by GPU time (graph), the weight update by the eager call's
    earlier = backend.table()["measured"]["sm_90"]["ops"]  # the ops this run did not measure keep their entry
    assert ops == {**earlier, "sgd_tick_update": {"bfloat16": "torch"}, "ring_conv_forward": {"bfloat16": "triton"},
                   "bias_grad": {"bfloat16": "triton"}, "weight_grad_accumulate": {"bfloat16": "triton"}}
    assert table["measured"]["sm_90"]["from_earlier_runs"] == sorted(
        set(earlier) - {"sgd_tick_update", "ring_conv_forward", "bias_grad", "weight_grad_accumulate"})
    assert backend.choose("bias_grad", torch.bfloat16, "sm_90", table) == "triton"
    assert backend.choose("bias_grad", torch.bfloat16, "sm_80", table) == "torch"  # a helper unmeasured: ATen's
    assert backend.choose("sgd_tick_update", torch.bfloat16, "sm_90", table) == "torch"
    assert backend.choose("weight_grad_accumulate", torch.bfloat16, "sm_90", table) == "triton"
    assert backend.choose("ring_conv_forward", torch.bfloat16, "sm_90", table) == "triton"
    assert backend.choose("window_input_grad", torch.bfloat16, "sm_90", table) == \
        backend.choose("window_input_grad", torch.bfloat16, "sm_90")  # not measured here: as before
    assert table["unmeasured"] == backend.table()["unmeasured"]
    # per shape: the forward's fastest at each (the geomean's triton at both here); the weight ops the
    # tick decided have none (the grouped launch covers every layer); the SGD tick's per shape (triton's
    # 1.0 ms beats torch's 1.5 at the first, which the geomean gives to torch)
    shapes = table["measured"]["sm_90"]["shapes"]
    assert shapes["ring_conv_forward"]["bfloat16"] == [
        dict(channels=[64, 128], positions=8 * 56 * 56, backend="triton"),
        dict(channels=[128, 256], positions=16 * 28 * 28, backend="triton")]
    assert "weight_grad_accumulate" not in shapes
    assert [s["backend"] for s in shapes["sgd_tick_update"]["bfloat16"]] == ["triton", "torch"]
    # a shape where another backend wins takes it there, the op's choice elsewhere
    rows.append(dict(kind="op", op="forward", shape=[256, 256, 8, 14], impl="cuda", median_s=1e-4, graph_s=1e-4))
    rows.append(dict(kind="op", op="forward", shape=[256, 256, 8, 14], impl="triton", median_s=1e-3, graph_s=1e-3))
    table = report.dispatch(rows, "H100", "sm_90", backend.table())
    assert backend.choose("ring_conv_forward", torch.bfloat16, "sm_90", table, layer=(256, 256, 8 * 16 * 16)) == "cuda"
    assert backend.choose("ring_conv_forward", torch.bfloat16, "sm_90", table, layer=(64, 128, 8 * 7 * 7)) == "triton"
    assert backend.choose("ring_conv_forward", torch.bfloat16, "sm_90", table, layer=(32, 32, 100)) == \
        table["measured"]["sm_90"]["ops"]["ring_conv_forward"]["bfloat16"]


def test_a_gpu_run_s_rows_of_strided_and_unaligned_layers_decide_those_layers_alone(monkeypatch):
    """bench_gpu's ``OTHER_SHAPES`` rows ([C_in, C_out, B, H, kt, kh, kw, stride]): a dispatch row per
    layer naming its kernel and stride, which such a layer's calls take (Triton's general kernels
    where they won: the rule against unmeasured ones does not apply to a layer measured itself);
    the op's choice still from the 3x3x3 stride-1 shapes (the box kernels on sm_90); a tick's
    grouped weight updates decide the layers they group, not those."""
    report = _gpu_report()
    plain, strided, stem = [64, 128, 8, 56], [64, 128, 8, 56, 3, 3, 3, 2], [3, 45, 8, 112, 1, 7, 7, 2]
    times = {("input_grad", "triton"): (1.0, 5.0, 1.0), ("input_grad", "torch"): (2.0, 0.5, 3.0),
             ("weight_accumulate", "triton"): (1.0, 5.0, 1.0), ("weight_accumulate", "torch"): (2.0, 0.5, 3.0)}
    rows = [dict(kind="op", op=op, shape=shape, impl=impl, median_s=t / 1e3, graph_s=t / 1e3, tflops=1.0)
            for (op, impl), ts in times.items() for shape, t in zip((plain, strided, stem), ts)]
    rows += [dict(kind="tick_updates", op="weight_accumulate", impl=impl, layers=[plain], median_s=t, graph_s=t)
             for impl, t in (("torch", 2e-3), ("triton", 1e-3))]
    text = "\n".join(report.tables(rows, "H100"))
    assert "| input_grad | 64→128, B8, 56, k3x3x3 s2 | torch | 0.500 |" in text
    assert "| input_grad | 3→45, B8, 112, k1x7x7 s2 | triton | 1.000 |" in text
    table = report.dispatch(rows, "H100", "sm_90", backend.table())
    entry = table["measured"]["sm_90"]
    # the op: triton, from the plain shape alone (with the others' times, torch's geometric mean is less)
    assert entry["ops"]["window_input_grad"] == entry["ops"]["weight_grad_accumulate"] == {"bfloat16": "triton"}
    assert entry["shapes"]["window_input_grad"]["bfloat16"] == [
        dict(channels=[3, 45], positions=8 * 112 * 112, kernel=[1, 7, 7], stride=[2, 2], backend="triton"),
        dict(channels=[64, 128], positions=8 * 56 * 56, backend="triton"),
        dict(channels=[64, 128], positions=8 * 56 * 56, kernel=[3, 3, 3], stride=[2, 2], backend="torch")]
    assert [(s["channels"], s["backend"]) for s in entry["shapes"]["weight_grad_accumulate"]["bfloat16"]] == [
        ([3, 45], "triton"), ([64, 128], "torch")]  # the tick decided the plain layer
    # a later run of one other layer alone: the ops' choices and the other rows stay the earlier run's
    later = [dict(kind="op", op="input_grad", shape=strided, impl=impl, median_s=t, graph_s=t, tflops=1.0)
             for impl, t in (("triton", 1e-3), ("torch", 2e-3))]
    again = report.dispatch(later, "H100", "sm_90", table)["measured"]["sm_90"]
    assert again["ops"] == entry["ops"] and again["from_earlier_runs"] == sorted(entry["ops"])
    assert [(s["channels"], s.get("stride"), s["backend"]) for s in again["shapes"]["window_input_grad"]["bfloat16"]] \
        == [([3, 45], [2, 2], "triton"), ([64, 128], None, "triton"), ([64, 128], [2, 2], "triton")]
    assert again["shapes"]["weight_grad_accumulate"] == entry["shapes"]["weight_grad_accumulate"]
    # and one that decides an op anew drops the earlier 3x3x3 stride-1 rows measured beside its choice
    anew = [dict(kind="op", op="input_grad", shape=[128, 128, 8, 28], impl=impl, median_s=t, graph_s=t, tflops=1.0)
            for impl, t in (("triton", 2e-3), ("torch", 1e-3))]
    again = report.dispatch(anew, "H100", "sm_90", table)["measured"]["sm_90"]
    assert again["ops"]["window_input_grad"] == {"bfloat16": "torch"}
    assert [(s["channels"], s.get("stride")) for s in again["shapes"]["window_input_grad"]["bfloat16"]] == [
        ([3, 45], [2, 2]), ([64, 128], [2, 2]), ([128, 128], None)]
    monkeypatch.setattr(backend, "_table", table)
    monkeypatch.setattr(backend, "backends", lambda: dict(torch=True, cpp=True, cuda=True, triton=True))
    bf16, Layer = torch.empty(0, dtype=torch.bfloat16), backend.Layer
    choice = lambda op, layer, channels: backend.measured_choice(op, bf16, "sm_90", layer,
                                                                 (layer.stride, layer.groups, channels))
    assert choice("window_input_grad", Layer(64, 128, 8 * 56 * 56, (3, 3), (2, 2)), (64, 128)) == "torch"
    assert choice("window_input_grad", Layer(3, 45, 8 * 112 * 112, (7, 7), (2, 2)), (3, 45)) == "triton"
    assert choice("window_input_grad", Layer(128, 256, 8 * 28 * 28, (3, 3), (2, 2)), (128, 256)) == "torch"
    assert choice("window_input_grad", Layer(128, 256, 8 * 28 * 28), (128, 256)) == "triton"  # the op's, on the box
    assert choice("weight_grad_accumulate", Layer(3, 45, 8 * 112 * 112, (7, 7), (2, 2)), (45,)) == "triton"
    assert choice("weight_grad_accumulate", Layer(64, 128, 8 * 56 * 56), (128,)) == "triton"  # the tick's


def test_the_stage_epilogue_entry_is_decided_by_end_to_end_rows():
    """dispatch.json's ``stage_epilogue``: Triton where the default with it ran faster end to end than
    the default beside it (the geometric mean over the networks both ran), else ATen's per stage;
    unmeasured, ATen's (a helper's choice until a GPU run has measured it)."""
    report = _gpu_report()
    e2e = lambda net, name, fps: dict(kind="end_to_end", network=net, impl="sideways", backend=name, T=48,
                                      frames_per_s=fps)
    rows = [e2e("chain", "default", 100.0), e2e("chain", "default-epilogues", 150.0), e2e("c3d", "default", 100.0),
            e2e("c3d", "default-epilogues", 90.0), e2e("r3d_18", "default-epilogues", 10.0)]  # (no pair: not counted)
    assert report.stage_epilogue(rows) == "triton"  # sqrt(1.5 * 0.9) = 1.16
    table = report.dispatch(rows, "H100", "sm_90", backend.table())
    assert backend.choose("stage_epilogue", torch.bfloat16, "sm_90", table) == "triton"
    rows[1]["frames_per_s"] = 100.0
    assert report.stage_epilogue(rows) == "torch"
    assert report.stage_epilogue(rows[:1]) is None
    assert backend.choose("stage_epilogue", torch.bfloat16, "sm_90") == "torch"


def test_the_dispatch_compares_graph_times_only_where_every_backend_has_them():
    """Op rows: a backend whose capture failed has no GPU time, so the op is decided on the eager
    calls of all (never a None in the mean). Tick rows: graph times where both have them; one side
    alone (a grouped row missing) decides nothing — the op rows do."""
    report = _gpu_report()
    op = lambda name, impl, median, graph: dict(kind="op", op=name, shape=[64, 64, 8, 56], impl=impl,
                                                median_s=median / 1e3, graph_s=graph and graph / 1e3,
                                                graph_error=None if graph else "capture failed")
    tick = lambda name, impl, median, graph: dict(kind="tick_updates", op=name, impl=impl, layers=[[64, 64, 8, 56]],
                                                  median_s=median / 1e3, graph_s=graph / 1e3)
    rows = [op("forward", "cuda", 1.0, 0.9), op("forward", "triton", 2.0, None),
            op("weight_accumulate", "torch", 1.0, 1.0), op("weight_accumulate", "triton", 2.0, 2.0),
            tick("weight_accumulate", "torch", 0.3, 0.2), tick("weight_accumulate", "triton", 0.2, 0.3),
            op("weight_sgd", "cuda", 1.0, 1.0), op("weight_sgd", "torch", 2.0, 2.0),
            tick("weight_sgd", "torch", 0.1, 0.1), tick("weight_sgd", "triton-per-layer", 0.05, 0.05)]
    ops = report.dispatch(rows, "H100", "sm_90", backend.table())["measured"]["sm_90"]["ops"]
    assert ops["ring_conv_forward"] == {"bfloat16": "cuda"}  # on the eager calls: 1.0 against 2.0
    assert ops["weight_grad_accumulate"] == {"bfloat16": "torch"}  # the tick's graph times: 0.2 against 0.3
    assert ops["sgd_tick_update"] == {"bfloat16": "cuda"}  # no grouped row: the op rows decide


def test_end_to_end_rows_are_compared_with_clip_bp_at_the_same_network_and_length():
    report = _gpu_report()
    e2e = lambda **kw: dict(kind="end_to_end", batch=8, size=112, **kw)
    rows = [e2e(network="c3d", impl="clip_bp", T=16, frames_per_s=1000.0, peak_mib=800.0),
            e2e(network="c3d", impl="clip_bp", T=48, frames_per_s=2000.0, peak_mib=2400.0),
            e2e(network="c3d", impl="sideways", T=48, backend="default", graphs=True, frames_per_s=500.0,
                peak_mib=300.0, ticks=58, replays=58),
            e2e(network="r3d_18", impl="sideways", T=16, backend="torch", graphs=False, temporal_padding="causal",
                frames_per_s=40.0, peak_mib=100.0, ticks=20, replays=None)]  # its clip BP row never ran
    text = "\n".join(report.tables(rows, "H100"))
    assert "| c3d | 48 | Sideways (chain) | default | yes | 500 | 0.25× | 300 | 0.12× | 58 | 58 |" in text
    assert "| c3d | 16 | clip BP |  |  | 1000 |  | 800 |  |  |  |" in text
    assert "| r3d_18 | 16 | Sideways (causal) | torch | no | 40 |  | 100 |  | 20 |  |" in text
    assert "where the memory goes" not in text  # rows from before bench_gpu._memory_parts
    rows[2].update(after_clip_mib=120.0, params_mib=40.0, grads_mib=40.0, video_mib=20.0, held_mib=15.0,
                   graph_held_mib=42.0, derived_mib=0.0, graphs_captured=26)
    text = "\n".join(report.tables(rows, "H100"))
    assert "| c3d | 48 | Sideways | default | yes | 300 | 120 | 40 | 40 | 20 | 15 | 42 | 0 | 26 | 180 |" in text


@pytest.mark.parametrize("how", ["env", "set_backend", "argument"])
def test_auto_names_the_default_wherever_a_backend_is_named(monkeypatch, how):
    """SIDEWAYS_BACKEND=auto (as the README lists it), set_backend("auto") and backend="auto" all
    mean the default: per-op dispatch on a CUDA device, the fastest built
    elsewhere."""
    monkeypatch.setattr(backend, "backends", lambda: dict(torch=True, cpp=True, cuda=True, triton=True))
    monkeypatch.delenv("SIDEWAYS_BACKEND", raising=False)
    name = None
    if how == "env":
        monkeypatch.setenv("SIDEWAYS_BACKEND", "auto")
    elif how == "set_backend":
        backend.set_backend("auto")
    else:
        name = "auto"
    try:
        assert backend.resolve(torch.device("cuda", 0), name) == "auto"
        assert backend.resolve(torch.device("cpu"), name) == "cpp"
    finally:
        backend.set_backend(None)
    with pytest.raises(ValueError, match="SIDEWAYS_BACKEND must be one of"):
        monkeypatch.setenv("SIDEWAYS_BACKEND", "bogus")
        backend.requested()


def test_weight_updates_hold_what_the_backend_groups_and_keep_each_weight_s_order():
    """backend.WeightUpdates: a call the backend would not group runs at once; the others wait
    for run(), which hands them to ``group`` and runs what it returns, in order; a weight met a
    second time first runs what is held (its earlier update must land first)."""
    log = []
    w1, w2, other = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    ops = types.SimpleNamespace(
        groups=lambda op, args: args[0] is not other,
        group=lambda calls: log.append(("group", [a[0] for _, a in calls])) or calls[1:],  # leaves all but the first
        weight_grad_accumulate=lambda *args: log.append(("alone", args[0])),
        sgd_tick_update=lambda *args: log.append(("alone", args[0])))
    updates = backend.WeightUpdates(ops)
    updates.add("weight_grad_accumulate", (w1, 1))
    updates.add("sgd_tick_update", (other, 2))
    assert log == [("alone", other)]
    updates.add("weight_grad_accumulate", (w2, 3))
    updates.add("weight_grad_accumulate", (w1, 4))  # w1 again: the held ones run first
    assert log[1:] == [("group", [w1, w2]), ("alone", w2)]
    updates.run()
    assert log[3:] == [("group", [w1])]
    updates.run()  # nothing held: nothing runs
    assert len(log) == 4


def test_a_triton_choice_measured_on_its_box_kernels_leaves_what_they_cannot_take_to_cudnn(monkeypatch):
    """On a GPU with TMA the runs time Triton's box kernels (every measured layer shape takes
    them): a call Triton would run on its general kernels — strided, grouped, channels not in
    16-byte rows — goes to cuDNN, there being no measurement of those; on a GPU without TMA a
    measured Triton choice was of the general kernels and stands. A run's weight forms follow."""
    from sideways_kernels import SidewaysConv3d, forms
    calls, _ = _recording(monkeypatch)
    triton_ops = {op: {"bfloat16": "triton"} for op in backend.OPS}
    monkeypatch.setattr(backend, "_table", dict(unmeasured=dict(bfloat16="torch"), measured={
        arch: dict(device="GPU", date="2026-01-01", ops=triton_ops) for arch in ("sm_90", "sm_80")}))
    meta = lambda *shape: torch.empty(shape, dtype=torch.bfloat16, device="meta")
    one, two = [1, 1], [2, 2]

    def routes(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(backend, "_chosen", {})
        calls.clear()
        auto = types.SimpleNamespace(**{op: backend._dispatched(op) for op in backend.OPS})
        grad_in = lambda c_in, c_out, stride, groups: auto.window_input_grad(
            meta(2, c_out, 4, 4), meta(c_out, c_in // groups, 3, 3, 3), [8, 8], stride, one, one, groups)
        grad_in(64, 64, one, 1)
        grad_in(64, 64, two, 1)
        grad_in(64, 64, one, 2)
        grad_in(45, 64, one, 1)  # R(2+1)D's 45 channels: not whole 16-byte rows
        ring = meta(3, 2, 64, 8, 8)
        auto.ring_conv_forward(ring, None, 0, meta(64, 64, 3, 3, 3), None, two, one, one, 1, 1)
        auto.sgd_tick_update(meta(64, 64, 3, 3, 3), None, None, None, meta(2, 64, 8, 8), ring, 0, one, one, one, 1,
                             2, 0.1, 0.0, 0.0, 0.0, False, False)
        auto.weight_grad_accumulate(meta(64, 64, 3, 3, 3), None, meta(2, 64, 8, 8), ring, 0, one, one, one, 1, 1)
        auto.weight_grad_accumulate(meta(64, 32, 3, 3, 3), None, meta(2, 64, 8, 8), ring, 0, one, one, one, 1, 2)
        auto.weight_grad_accumulate(meta(64, 64, 3, 3, 3), None, meta(2, 64, 4, 4), ring, 0, two, one, one, 1, 1)
        auto.ring_conv_forward(ring, None, 0, meta(64, 32, 3, 3, 3), None, one, one, one, 1, 2)
        auto.ring_conv_forward(ring, None, 0, meta(64, 64, 3, 3, 3), None, one, one, one, 1, 1)
        auto.sgd_tick_update(meta(64, 64, 3, 3, 3), None, None, None, meta(2, 64, 4, 4), ring, 0, two, one, one, 1,
                             1, 0.1, 0.0, 0.0, 0.0, False, False)
        auto.sgd_tick_update(meta(64, 32, 3, 3, 3), None, None, None, meta(2, 64, 8, 8), ring, 0, one, one, one, 1,
                             2, 0.1, 0.0, 0.0, 0.0, False, False)
        # 45 output channels (the forward's and weight update's checked channels), 64 input ones
        auto.ring_conv_forward(ring, None, 0, meta(45, 64, 3, 3, 3), None, one, one, one, 1, 1)
        auto.weight_grad_accumulate(meta(45, 64, 3, 3, 3), None, meta(2, 45, 8, 8), ring, 0, one, one, one, 1, 1)
        return [name for _, name in calls]

    assert routes((9, 0)) == ["triton", "torch", "torch", "torch", "torch", "torch", "triton", "torch", "torch",
                              "torch", "triton", "torch", "torch", "torch", "torch"]
    assert routes((8, 0)) == ["triton"] * 15  # measured there on the general kernels
    # only a Triton choice is the box kernels': another measured choice stands for any call; a row of the
    # layer itself timed the kernels it takes (a strided layer's: Triton's general ones) and stands too,
    # a row of another layer (here: stride 1, one group) does not apply
    row = lambda name, **geometry: dict(channels=[64, 64], positions=128, backend=name, **geometry)
    monkeypatch.setattr(backend, "_table", dict(unmeasured=dict(bfloat16="torch"), measured={
        "sm_90": dict(device="GPU", date="2026-01-01", ops={"window_input_grad": {"bfloat16": "cuda"}},
                      shapes={"window_input_grad": {"bfloat16": [
                          row("triton"), row("triton", stride=[2, 2], kernel=[3, 3, 3]),
                          row("cuda", stride=[2, 2], kernel=[1, 1, 1])]}})}))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(backend, "_chosen", {})
    calls.clear()
    grad_in = lambda stride, groups=1, kernel=(3, 3, 3): backend._dispatched("window_input_grad")(
        meta(2, 64, 4, 4), meta(64, 64 // groups, *kernel), [8, 8], stride, one, one, groups)
    grad_in(two, kernel=(1, 5, 5))
    grad_in(one, groups=2)
    grad_in(two)
    grad_in(two, kernel=(2, 3, 3))  # at a clip's edge: the live taps of the same layer
    grad_in(one)
    assert calls == [("window_input_grad", "cuda"), ("window_input_grad", "cuda"), ("window_input_grad", "triton"),
                     ("window_input_grad", "triton"), ("window_input_grad", "triton")]
    # a measured row's backend not built: its stand-in, on the kernels measured (the CUDA kernels' Triton,
    # for a strided call its general kernels, unmeasured: cuDNN)
    monkeypatch.setattr(backend, "backends", lambda: dict(torch=True, cpp=True, cuda=False, triton=True))
    monkeypatch.setattr(backend, "_chosen", {})
    calls.clear()
    grad_in(two, kernel=(1, 1, 1))
    assert calls == [("window_input_grad", "torch")]
    # every backend a layer's calls may take: its own rows' (a strided layer's measured Triton stands)
    Layer = backend.Layer
    assert backend._choices("window_input_grad", meta(1), Layer(64, 64, None, (5, 5), (2, 2)),
                            ((2, 2), 1, (64, 64))) == {"torch"}  # the op's cuda, not built: Triton's general: cuDNN
    assert backend._choices("window_input_grad", meta(1), Layer(64, 64, None, (3, 3), (2, 2)),
                            ((2, 2), 1, (64, 64))) == {"triton"}
    # a run's forms: a strided layer's input gradient reads the torch backend's (its folded taps' sum)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(backend, "_chosen", {})
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(backend, "_table", dict(unmeasured=dict(bfloat16="torch"), measured={
        "sm_90": dict(device="GPU", date="2026-01-01", ops=triton_ops)}))
    strided = SidewaysConv3d(4, 8, (3, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
    plain = SidewaysConv3d(8, 8, (3, 3, 3), padding=(0, 1, 1))
    stem = SidewaysConv3d(3, 16, (3, 3, 3), padding=(0, 1, 1))  # its input gradient's 3 channels: no 16-byte row
    with backend.constant_weights("auto", [strided, plain, stem], torch.bfloat16):
        kinds = lambda layer: {str(k[0]) for (at, k) in forms._forms if at == id(layer.weight)}
        assert kinds(strided) == {"folded", "summed"} and kinds(plain) == {"triton"}
        assert kinds(stem) == {"triton", "summed"}  # Triton's forward, the torch backend's input gradient


def test_a_run_holds_the_forms_its_layers_backends_read(monkeypatch):
    """backend.constant_weights: the torch backend's folded forms and taps' sum only for a layer
    that folds (one group, no temporal dilation), Triton's for any layer on Triton, nothing for
    the compiled backends; under ``auto`` each op where the dispatch sends activations of the
    run's dtype (the probe in that dtype)."""
    from sideways_kernels import SidewaysConv3d, forms
    plain = SidewaysConv3d(4, 8, (3, 3, 3), padding=(0, 1, 1))
    grouped = SidewaysConv3d(4, 8, (3, 3, 3), padding=(0, 1, 1), groups=2)
    dilated = SidewaysConv3d(4, 8, (3, 3, 3), padding=(0, 1, 1), dilation=(2, 1, 1))
    keys = lambda layer: sorted(str(k[0]) for (at, k) in forms._forms if at == id(layer.weight))
    with backend.constant_weights("torch", [plain, grouped, dilated], torch.bfloat16):
        assert keys(plain) == ["folded"] * 3 + ["summed"] and keys(grouped) == keys(dilated) == []
    with backend.constant_weights("cpp", [plain], torch.float32):
        assert not forms.get(plain.weight, ("summed", torch.float32))
    probes = []
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(backend, "_arch", lambda device: "sm_90")
    monkeypatch.setattr(backend, "_chosen", {})
    sm_90 = dict(device="H100", date="2026-01-01", ops={"ring_conv_forward": {"bfloat16": "torch"},
                                                        "window_input_grad": {"bfloat16": "triton"}})
    monkeypatch.setattr(backend, "_table", dict(unmeasured=dict(bfloat16="cuda"), measured={"sm_90": sm_90}))
    choice = backend._choice
    monkeypatch.setattr(backend, "_choice", lambda op, t, layer=None, geometry=None: probes.append(t.dtype)
                        or choice(op, t, layer, geometry))
    fresh = SidewaysConv3d(16, 8, (3, 3, 3), padding=(0, 1, 1))  # (whole 16-byte rows: Triton's box kernels)
    triton_forms = lambda: sorted((k[2], k[3]) for (at, k) in forms._forms
                                  if at == id(fresh.weight) and k[0] == "triton")
    with backend.constant_weights("auto", [fresh], torch.bfloat16):
        assert set(probes) == {torch.bfloat16}
        assert sorted(map(str, {k[0] for (at, k) in forms._forms if at == id(fresh.weight)})) == ["folded", "triton"]
        assert forms.get(fresh.weight, ("summed", torch.bfloat16)) is None  # the input gradient is Triton's
        assert triton_forms() == [(True, False), (True, True)]  # Triton's input-gradient forms, not its forward's
    # the dispatch measured the layer's channels at two frame sizes, the forward fastest on each backend
    # at one (the frame's size is not known when the run starts): the forms of both are made
    sm_90["shapes"] = {"ring_conv_forward": {"bfloat16": [dict(channels=[16, 8], positions=64, backend="triton"),
                                                          dict(channels=[16, 8], positions=4096, backend="torch"),
                                                          dict(channels=[8, 8], positions=64, backend="cuda")]}}
    backend._chosen.clear()
    with backend.constant_weights("auto", [fresh], torch.bfloat16):
        assert any(k[0] == "folded" for (at, k) in forms._forms if at == id(fresh.weight))
        assert triton_forms() == [(False, False), (True, False), (True, True)]
