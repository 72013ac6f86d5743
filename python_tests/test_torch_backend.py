"""Oracle 1 for the torch backend (sideways_kernels/torch_backend.py): each op equals
reference.py at every ring slot, on the op tests' geometries (the folded path and the ones that
fall back), in float64 and in bfloat16 against float64, on the CPU and (where there is one) on
a GPU; and the folded path's ATen calls are the few it promises (no window gathered, one
convolution per op), which is its reason to exist."""
import collections
import contextlib
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sideways_kernels import forms, reference as ref, torch_backend as tb
from samples import GEOMETRIES, SGD_CONFIGS, Geometry, geometry_id, make, sgd_id

TOL = {torch.float64: (1e-10, 1e-10), torch.bfloat16: (3e-2, 1e-1)}


def _close(actual, expected, dtype, what):
    actual = actual.cpu()
    rtol, atol = TOL[dtype]
    scale = expected.abs().max().item() + 1
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def _args(g):
    return (*g.conv_args, g.dilation_t, g.groups)


def _double(t):
    """The float64 CPU copy the reference runs on."""
    return None if t is None else t.detach().cpu().double()


def _make(geom, dtype, device, param_dtype=None):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in make(geom, dtype, param_dtype).items()}


def _cases(dtype):
    """(geometry, dtype, slot) for every slot of every geometry: a tap rotated the wrong way
    agrees with the reference at one slot in span."""
    return [pytest.param(g, dtype, s, id=f"{geometry_id(g)}-{str(dtype)[6:]}-slot{s}")
            for g in GEOMETRIES for s in range(g.span)]


CASES = _cases(torch.float64) + _cases(torch.bfloat16)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=["unpadded", "padded"])
def padding(request, monkeypatch):
    """The ring image as it is, or with zero channels appended (as the RGB stem's on CUDA in 16
    bits, forced here on every geometry, and never a multiple of 8 of them: a pad that leaks into
    the result must show)."""
    if request.param == "padded":
        monkeypatch.setattr(tb, "channel_pad", lambda ring: 5)
    return request.param


def _pad_as_on_cuda(monkeypatch):
    """A small ring image padded as on CUDA in 16 bits — here on the CPU and in any dtype."""
    monkeypatch.setattr(tb, "_pad", lambda channels, cuda, dtype: -channels % 8 if channels < 32 else 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geom,dtype,slot", CASES)
def test_ring_conv_forward_matches_reference(geom, dtype, slot, device, padding):
    t = _make(geom, dtype, device, torch.float32 if dtype == torch.bfloat16 else None)
    ring = t["ring"].clone()
    ring[slot] = float("nan")  # the op must overwrite the slot it pushes into
    expected_ring = _double(t["ring"])
    expected = ref.ring_conv_forward(expected_ring, _double(t["frame"]), slot, _double(t["weight"]),
                                     _double(t["bias"]), *_args(geom))
    out = tb.ring_conv_forward(ring, t["frame"], slot, t["weight"], t["bias"], *_args(geom))
    assert out.dtype == dtype and out.shape == expected.shape
    _close(out, expected, dtype, "output")
    _close(ring, expected_ring, dtype, "ring after the write")
    held = tb.ring_conv_forward(ring, None, slot, t["weight"], t["bias"], *_args(geom))  # hold: the ring as it is
    _close(held, expected, dtype, "output of the ring without a push")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geom,dtype,slot", CASES[:len(CASES) // 2:3] + CASES[len(CASES) // 2::3])
def test_window_input_grad_matches_reference(geom, dtype, slot, device):
    t = _make(geom, dtype, device, torch.float32 if dtype == torch.bfloat16 else None)
    size = (geom.height, geom.width)
    expected = ref.window_input_grad(_double(t["grad_out"]), _double(t["weight"]), size, geom.stride, geom.padding,
                                     geom.dilation, geom.groups)
    out = tb.window_input_grad(t["grad_out"], t["weight"], size, geom.stride, geom.padding, geom.dilation,
                               geom.groups)
    assert out.shape == expected.shape and out.dtype == dtype
    _close(out, expected, dtype, "input gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("geom,dtype,slot", CASES)
def test_weight_grad_accumulate_matches_reference(geom, dtype, slot, device, padding):
    t = _make(geom, dtype, device, torch.float32 if dtype == torch.bfloat16 else None)
    grad_w, grad_b = torch.randn_like(t["weight"]), torch.randn_like(t["bias"])  # "+=" onto values, twice
    exp_w, exp_b = _double(grad_w), _double(grad_b)
    for _ in range(2):
        tb.weight_grad_accumulate(grad_w, grad_b, t["grad_out"], t["ring"], slot, *_args(geom))
        ref.weight_grad_accumulate(exp_w, exp_b, _double(t["grad_out"]), _double(t["ring"]), slot, *_args(geom))
    assert grad_w.dtype == t["weight"].dtype and grad_w.stride() == t["weight"].stride()
    _close(grad_w, exp_w, dtype, "grad_weight")
    _close(grad_b, exp_b, dtype, "grad_bias")
    no_bias, exp_no_bias = torch.zeros_like(t["weight"]), torch.zeros_like(exp_w)
    tb.weight_grad_accumulate(no_bias, None, t["grad_out"], t["ring"], slot, *_args(geom))
    ref.weight_grad_accumulate(exp_no_bias, None, _double(t["grad_out"]), _double(t["ring"]), slot, *_args(geom))
    _close(no_bias, exp_no_bias, dtype, "grad_weight without a bias")


@pytest.mark.parametrize("hyper", SGD_CONFIGS, ids=sgd_id)
@pytest.mark.parametrize("geom", [g for g in GEOMETRIES if g.groups == 1 and g.dilation_t == 1]
                         + [GEOMETRIES[2]], ids=geometry_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "channels_last_3d buffer"])
@pytest.mark.parametrize("device", DEVICES)
def test_sgd_tick_update_equals_torch_optim_sgd(geom, hyper, layout, device):
    """Three ticks, each at another slot, of the fused update == torch.optim.SGD.step on the
    reference gradient (float64; a channels-last weight, or momentum buffer, takes the unfused
    step: the fused kernel walks every tensor in memory order)."""
    t = make(geom, torch.float64)
    fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    w = t["weight"].contiguous(memory_format=fmt)
    w_opt = w.detach().clone().requires_grad_()
    b_opt = t["bias"].detach().clone().requires_grad_()
    opt = torch.optim.SGD([w_opt, b_opt], **hyper)
    w, b = w.to(device, copy=True), t["bias"].to(device, copy=True)
    momentum = hyper.get("momentum", 0.0)
    buf_w = torch.full_like(w, float("nan")) if momentum else None  # poison: the first step must overwrite
    if layout == "channels_last_3d buffer" and momentum:
        buf_w = buf_w.contiguous(memory_format=torch.channels_last_3d)
    buf_b = torch.full_like(b, float("nan")) if momentum else None
    full = {**dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False), **hyper}
    for tick in range(3):
        grad_out, ring = torch.randn_like(t["grad_out"]), torch.randn_like(t["ring"])
        slot = tick % geom.span
        gw, gb = torch.zeros_like(w_opt), torch.zeros_like(b_opt)
        ref.weight_grad_accumulate(gw, gb, grad_out, ring, slot, *_args(geom))
        w_opt.grad, b_opt.grad = gw, gb
        opt.step()
        tb.sgd_tick_update(w, buf_w, b, buf_b, grad_out.to(device), ring.to(device), slot, *_args(geom), full["lr"],
                           full["momentum"], full["dampening"], full["weight_decay"], full["nesterov"], tick == 0)
        _close(w, w_opt.detach(), torch.float64, f"weight after tick {tick}")
        _close(b, b_opt.detach(), torch.float64, f"bias after tick {tick}")
        if momentum:
            _close(buf_w, opt.state[w_opt]["momentum_buffer"], torch.float64, f"momentum buffer after tick {tick}")


def test_a_1x1_weight_gradient_with_unequal_strides_reads_the_strided_positions():
    """Height stride 2, width 1 (each axis its own stride in the slice that avoids oneDNN's
    strided 1x1 path on the CPU)."""
    torch.manual_seed(0)
    ring, grad_out = torch.randn(2, 2, 3, 9, 8, dtype=torch.float64), torch.randn(2, 4, 5, 8, dtype=torch.float64)
    got, expected = torch.zeros(4, 3, 2, 1, 1, dtype=torch.float64), torch.zeros(4, 3, 2, 1, 1, dtype=torch.float64)
    tb.weight_grad_accumulate(got, None, grad_out, ring, 1, (2, 1), (0, 0), (1, 1), 1, 1)
    ref.weight_grad_accumulate(expected, None, grad_out, ring, 1, (2, 1), (0, 0), (1, 1), 1, 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_sums_are_taken_before_rounding_to_16_bits():
    """The taps' weights are summed in fp32 and rounded once (three taps of 1.0035 each round to
    1.0 in bf16, their sum 3.0105 to 3.015625), and a bias gradient sums bf16 errors in fp32
    (1025 ones: 1024 in bf16). Each a bf16 rounding the oracle tests' tolerance would hide."""
    w = torch.full((1, 1, 3, 1, 1), 1.0035)
    g = tb.window_input_grad(torch.ones(1, 1, 1, 1, dtype=torch.bfloat16), w, (1, 1), (1, 1), (0, 0), (1, 1), 1)
    assert g.item() == 3.015625
    ring, grad_out = torch.zeros(1, 1, 1, 25, 41, dtype=torch.bfloat16), torch.ones(1, 1, 25, 41, dtype=torch.bfloat16)
    grad_w, grad_b = torch.zeros(1, 1, 1, 1, 1), torch.zeros(1)
    tb.weight_grad_accumulate(grad_w, grad_b, grad_out, ring, 0, (1, 1), (0, 0), (1, 1), 1, 1)
    assert grad_b.item() == 1025


def test_only_a_small_16_bit_ring_image_on_cuda_is_padded():
    """To a multiple of 8 channels, where cuDNN's tensor-core kernels want them: the stems."""
    def ring(span, c, device="cuda", dtype=torch.bfloat16):
        return types.SimpleNamespace(shape=(span, 2, c, 5, 5), is_cuda=device == "cuda", dtype=dtype)
    assert tb.channel_pad(ring(3, 3)) == 7 and tb.channel_pad(ring(1, 3, dtype=torch.float16)) == 5
    assert tb.channel_pad(ring(1, 20)) == 4 and tb.channel_pad(ring(1, 31)) == 1
    assert tb.channel_pad(ring(2, 4)) == 0 and tb.channel_pad(ring(1, 33)) == 0 and tb.channel_pad(ring(3, 45)) == 0
    assert tb.channel_pad(ring(3, 3, device="cpu")) == 0 and tb.channel_pad(ring(3, 3, dtype=torch.float32)) == 0


class _Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


# Ops that launch no kernel: views, aliases, allocation, type arithmetic.
_NO_KERNEL = {"view", "permute", "transpose", "select", "unsqueeze", "squeeze", "expand", "as_strided", "_unsafe_view",
          "slice", "alias", "detach", "t", "unflatten", "_reshape_alias", "reshape", "empty", "empty_like",
          "empty_strided", "new_empty", "new_empty_strided", "promote_types"}


def _moving(calls: _Calls) -> dict:
    return {k: v for k, v in calls.names.items() if k not in _NO_KERNEL}


def test_folded_ops_gather_no_window_and_run_one_convolution():
    """On the layers' ring layout (ops.empty_ring), bf16 activations, fp32 weights: the forward
    is a weight rotation, one convolution and the bias; the input gradient one tap sum, one cast,
    one transposed convolution; the weight gradient one convolution, one rotation back and the
    adds; the SGD tick the same and one fused step. reference.py stacks the window each time."""
    g = Geometry(2, 8, 16, 6, 7, 3, (3, 3), padding=(1, 1), layout="ring")
    t = make(g, torch.bfloat16, torch.float32)
    w, b, gw, gb, buf_w, buf_b = (torch.zeros_like(x) for x in [t["weight"], t["bias"]] * 3)
    counts = {}
    for name, call in [
        ("forward", lambda: tb.ring_conv_forward(t["ring"], t["frame"], 0, t["weight"], t["bias"], *_args(g))),
        ("input_grad", lambda: tb.window_input_grad(t["grad_out"], t["weight"], (6, 7), g.stride, g.padding,
                                                    g.dilation, 1)),
        ("accumulate", lambda: tb.weight_grad_accumulate(gw, gb, t["grad_out"], t["ring"], 0, *_args(g))),
        ("sgd", lambda: tb.sgd_tick_update(w, buf_w, b, buf_b, t["grad_out"], t["ring"], 0, *_args(g), 0.1, 0.9, 0.0,
                                           1e-4, False, False)),
    ]:
        with _Calls() as calls:
            call()
        counts[name] = _moving(calls)
    for name, c in counts.items():
        assert not {"stack", "cat", "clone", "contiguous"} & set(c), (name, c)
    conv = {"convolution", "convolution_backward"}
    assert counts["forward"] == {"copy_": 2, "roll": 1, "convolution": 1, "add_": 1}, counts
    assert counts["input_grad"] == {"sum": 1, "_to_copy": 1, "convolution_backward": 1}, counts
    assert counts["accumulate"] == {"convolution_backward": 1, "roll": 1, "add_": 2, "sum": 1}, counts
    assert sum(v for k, v in counts["sgd"].items() if k in conv) == 1 and counts["sgd"].get("_fused_sgd_") == 1, counts


def test_a_run_that_keeps_its_weights_makes_their_forms_once_and_in_place():
    """forms.held(forms_of(...)): within it the forward is the ring write, one convolution and the
    bias, and the input gradient one transposed convolution (the folded forms and the taps' sum
    made at its start), every slot's output the same bits as without; a weight changed within it
    is read as without; outside it the forms are never read; the next run rewrites them in place
    (a CUDA graph of one run reads them in the next) from the weight as it is then; a dead
    weight's forms go with it."""
    g = Geometry(2, 8, 16, 6, 7, 3, (3, 3), padding=(1, 1), layout="ring")
    t = make(g, torch.bfloat16, torch.float32)
    weight = t["weight"].clone()
    forward = lambda slot, ring=None: tb.ring_conv_forward(t["ring"].clone() if ring is None else ring, t["frame"],
                                                           slot, weight, t["bias"], *_args(g))
    down = lambda w=weight: tb.window_input_grad(t["grad_out"], w, (6, 7), g.stride, g.padding, g.dilation, 1)
    plain = [forward(slot) for slot in range(3)], down()
    run = lambda: forms.held(tb.forms_of(weight, torch.bfloat16, forward=True, input_grad=True))
    held = lambda: [f.tensor for (at, _), f in forms._forms.items() if at == id(weight)]
    with run():
        for slot in range(3):
            ring = t["ring"].clone()
            with _Calls() as calls:
                out = forward(slot, ring)
            assert torch.equal(out, plain[0][slot])
            assert _moving(calls) == {"copy_": 1, "convolution": 1, "add_": 1}, calls.names
        with _Calls() as calls:
            got = down()
        assert torch.equal(got, plain[1])
        assert _moving(calls) == {"convolution_backward": 1}, calls.names
        assert torch.equal(down(weight.narrow(2, 1, 2)), tb.window_input_grad(  # a view (live taps): its own sum
            t["grad_out"], weight.narrow(2, 1, 2).clone(), (6, 7), g.stride, g.padding, g.dilation, 1))
        addresses = [f.data_ptr() for f in held()]
        assert len(addresses) == 4
    ring = t["ring"].clone()
    with _Calls() as calls:  # outside: made at every call again (the weight as it was: its forms still held)
        forward(0, ring)
    assert _moving(calls) == {"copy_": 2, "roll": 1, "convolution": 1, "add_": 1}, calls.names
    with run():
        with torch.no_grad():
            weight.mul_(2)  # changed within the run: read as it is
        assert torch.equal(forward(1), tb.ring_conv_forward(t["ring"].clone(), t["frame"], 1, weight.clone(),
                                                            t["bias"], *_args(g)))
    with run():  # the next run: the forms of the doubled weight, in place
        assert [f.data_ptr() for f in held()] == addresses
        assert torch.equal(forms.get(weight, ("summed", torch.bfloat16)), tb._summed(weight, torch.bfloat16))
        assert all(torch.equal(forms.get(weight, ("folded", s, torch.bfloat16, 0)), tb._fold(weight, s, torch.bfloat16, 0))
                   for s in range(3))
    del weight, held, run, forward, down
    assert all(f.weight() is not None for f in forms._forms.values())  # a dead weight's forms go with it


def test_a_clip_update_run_makes_the_weights_forms_once_and_a_per_tick_update_never(monkeypatch):
    """In a pipeline on the torch backend, a Sideways run that changes no weight (update="clip")
    makes each weight's forms once, at its start, and its gradients are those of a run that makes
    them at every call, to the bit; a run with the per-tick update (weights rewritten within the
    run, inside CUDA graphs where no version moves) never holds them."""
    from nets import classifier_net, stages_of
    from sideways_kernels import SidewaysPipeline, backend
    folds = []
    real_fold = tb._fold
    monkeypatch.setattr(tb, "_fold", lambda *a: folds.append(a[1]) or real_fold(*a))
    video, target = torch.randn(2, 3, 6, 5, 5), torch.randint(0, 7, (2,))

    def clip(update="clip"):
        torch.manual_seed(0)
        net = classifier_net([(3, 1, 1), (3, 1, 1)], channels=(3, 8, 8), dtype=torch.float32)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) if update == "tick" else None
        folds.clear()
        pipe = SidewaysPipeline(stages_of(net, 2), mode="sideways", backend="torch", update=update, optimizer=opt)
        pipe.backward_clip(video, target)
        return [p.grad if update == "clip" else p.detach() for p in net.parameters()], len(folds)
    held, made = clip()
    assert made == 3 + 3 + 1  # two 3-tap layers and the 1-tap head, a form per ring slot: at the start only
    monkeypatch.setattr(backend, "constant_weights", lambda *a: contextlib.nullcontext())
    every_call, made_each = clip()
    assert made_each > made and all(torch.equal(a, b) for a, b in zip(held, every_call))
    monkeypatch.undo()
    monkeypatch.setattr(forms, "held", lambda *a: pytest.fail("a per-tick update run held its weights' forms"))
    clip("tick")
    torch.manual_seed(0)  # nor does BP (it convolves the window with F.conv3d: no op reads a form)
    net = classifier_net([(3, 1, 1), (3, 1, 1)], channels=(3, 8, 8), dtype=torch.float32)
    SidewaysPipeline(stages_of(net, 2), mode="bp", backend="torch").backward_clip(video, target)
    with pytest.raises(pytest.fail.Exception):
        clip("clip")  # (the guard above does fire where a run holds them)


def test_the_bias_gradient_is_summed_in_float32_before_the_step():
    """1025 bf16 ones per channel sum to 1025 in float32 (to 1024 rounded to bf16 first): a plain
    SGD step with lr 1 moves the fp32 bias by exactly that, as autocast's nn.Conv3d moves it."""
    g = Geometry(1, 2, 2, 25, 41, 3, (1, 1), layout="ring")
    t = make(g, torch.bfloat16, torch.float32)
    bias = torch.zeros(2)
    tb.sgd_tick_update(t["weight"].clone(), None, bias, None, torch.ones_like(t["grad_out"]), t["ring"], 0, *_args(g),
                       1.0, 0.0, 0.0, 0.0, False, True)
    assert torch.equal(bias, torch.full((2,), -1025.0))


def test_the_bias_sum_goes_to_triton_only_where_the_dispatch_measured_it_faster(monkeypatch):
    """backend.bias_grad on CUDA errors (stood in for here): Triton's column sum where dispatch.json
    says so for the error's dtype, ATen's sum where it says torch or says nothing, and ATen's
    whenever the torch backend was asked for by name."""
    from sideways_kernels import backend
    summed = []
    fake_triton = types.SimpleNamespace(bias_grad=lambda g: summed.append(g) or g.sum((0, 2, 3), dtype=torch.float32))
    monkeypatch.setattr(backend.importlib, "import_module", lambda name: fake_triton)
    monkeypatch.setattr(backend, "backends", lambda: {"triton": True})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    g = torch.randn(2, 3, 4, 5, dtype=torch.bfloat16)
    for choice, requested, expected in [("triton", None, 1), ("torch", None, 0), (None, None, 0), ("triton", "torch", 0)]:
        measured = {"sm_90": dict(ops={"bias_grad": {"bfloat16": choice}})} if choice else {}
        monkeypatch.setattr(backend, "_table", dict(backend.table(), measured=measured))
        monkeypatch.setattr(backend, "_chosen", {})
        monkeypatch.setattr(backend, "_override", requested)
        summed.clear()
        torch.testing.assert_close(backend.bias_grad(g, torch.float32), g.float().sum((0, 2, 3)))
        assert len(summed) == expected, (choice, requested)
        in_bf16 = backend.bias_grad(g, torch.bfloat16)  # a bf16 bias's gradient: in its dtype, either way
        assert in_bf16.dtype == torch.bfloat16 and torch.equal(in_bf16, g.float().sum((0, 2, 3)).to(torch.bfloat16))


def test_held_forms_are_the_derived_ones_for_16_bit_masters_and_padded_stems(monkeypatch):
    """The forms a run holds equal what the ops derive, to the bit: for a bf16 master weight (its
    taps' sum accumulated in fp32 all the same) and for a small stem image padded with zero
    channels (as on CUDA in 16 bits: here the pad forced), where the held forward derives nothing."""
    _pad_as_on_cuda(monkeypatch)
    g = Geometry(2, 3, 8, 6, 7, 3, (3, 3), padding=(1, 1), layout="ring")
    t = make(g, torch.bfloat16, torch.bfloat16)
    weight = t["weight"]
    made = []
    real = tb._fold
    monkeypatch.setattr(tb, "_fold", lambda *a: made.append(a[1:]) or real(*a))
    plain = tb.ring_conv_forward(t["ring"].clone(), t["frame"], 1, weight, t["bias"], *_args(g))
    with forms.held(tb.forms_of(weight, torch.bfloat16, forward=True, input_grad=True)):
        made.clear()
        assert torch.equal(tb.ring_conv_forward(t["ring"].clone(), t["frame"], 1, weight, t["bias"], *_args(g)), plain)
        assert made == []  # the padded fold was held (pad 7: 9 channels -> 16)
        assert torch.equal(forms.get(weight, ("summed", torch.bfloat16)), tb._summed(weight, torch.bfloat16))
        assert torch.equal(forms.get(weight, ("summed", torch.bfloat16)),
                           weight.sum(2, dtype=torch.float32).to(torch.bfloat16))


def test_a_ring_made_with_the_image_pad_is_read_as_the_padded_image_in_place(monkeypatch):
    """Where this backend pads the stem's ring image (on CUDA in 16 bits; forced here), a ring made
    with those zero channels (``ops.empty_ring(image_pad=...)``, as a layer makes its ring for this
    backend: ``ring_image_pad``) is read as that image where it lies: the forward and the weight
    gradient each launch two kernels fewer (no zeroed image, no copy into it), with the results of
    the copied image to the bit. A ring of that layout whose pad nobody vouches for (a view of a
    tensor holding NaN there) is copied as any other: its NaN never reaches a result."""
    from sideways_kernels import ops
    _pad_as_on_cuda(monkeypatch)
    g = Geometry(2, 3, 8, 6, 7, 3, (3, 3), padding=(1, 1), layout="ring")
    t = make(g, torch.bfloat16, torch.float32)
    pad = tb.ring_image_pad(g.span, t["frame"])
    assert pad == 7  # 3 channels x 3 slots -> 16
    padded = ops.empty_ring(g.span, 2, 3, 6, 7, dtype=torch.bfloat16, image_pad=pad).copy_(t["ring"])
    memory = torch.full((2, 6, 7, 16), float("nan"), dtype=torch.bfloat16)
    unvouched = memory[..., :9].unflatten(-1, (3, 3)).permute(3, 0, 4, 1, 2).copy_(t["ring"])
    assert unvouched.stride() == padded.stride()
    assert ops.zero_image_pad(padded) == pad and ops.zero_image_pad(unvouched) == 0 and \
        ops.zero_image_pad(t["ring"]) == 0 and ops.zero_image_pad(padded[:]) == 0  # (a view vouches for nothing)
    image = tb._ring_image(padded, pad)
    assert image.data_ptr() == padded.data_ptr() and image.shape == (2, 16, 6, 7) and not image[:, 9:].any()
    got = {}
    for name, ring in (("padded", padded), ("unvouched", unvouched)):
        grad = torch.zeros_like(t["weight"])
        with _Calls() as forward:
            out = tb.ring_conv_forward(ring, t["frame"], 1, t["weight"], t["bias"], *_args(g))
        with _Calls() as update:
            tb.weight_grad_accumulate(grad, None, t["grad_out"], ring, 1, *_args(g))
        got[name] = out, grad, _moving(forward), _moving(update)
    assert torch.equal(got["padded"][0], got["unvouched"][0]) and torch.equal(got["padded"][1], got["unvouched"][1])
    assert not got["padded"][0].isnan().any() and not got["padded"][1].isnan().any()
    for calls in (2, 3):
        fewer = collections.Counter(got["unvouched"][calls])
        fewer.subtract(got["padded"][calls])
        assert +fewer == {"new_zeros": 1, "copy_": 1}, (got["unvouched"][calls], got["padded"][calls])
    d = _double
    expected = ref.ring_conv_forward(d(t["ring"]), d(t["frame"]), 1, d(t["weight"]), d(t["bias"]), *_args(g))
    _close(got["padded"][0], expected, torch.bfloat16, "forward")
    # rings whose pad is not this image's are copied: one in 16-byte rows (its slots' spare channels
    # between), one with fewer zero channels than the image needs
    for other in (ops.empty_ring(g.span, 2, 3, 6, 7, dtype=torch.bfloat16, aligned=True, image_pad=pad),
                  ops.empty_ring(g.span, 2, 3, 6, 7, dtype=torch.bfloat16, image_pad=3)):
        assert ops.zero_image_pad(other) == (pad if other.stride(0) == 8 else 3)
        other.copy_(t["ring"])
        _close(tb.ring_conv_forward(other, t["frame"], 1, t["weight"], t["bias"], *_args(g)), expected, torch.bfloat16,
               "forward of another ring")


def test_a_layer_makes_its_ring_with_the_pad_its_backend_reads(monkeypatch):
    """A pipeline on this backend, its stem's image padded (forced, as on CUDA in 16 bits): the
    stem's ring carries the zero channels (3 x 3 -> 16) and is read in place, the other layers'
    rings none; loss and gradients those of the same run with every padded image copied, to the
    bit. ``auto`` pads where its choice for the ring's ops includes this backend, never on the CPU;
    the other backends never."""
    from sideways_kernels import SidewaysPipeline, backend, ops
    from nets import classifier_net, grads, stages_of
    _pad_as_on_cuda(monkeypatch)
    video, target = torch.randn(2, 3, 5, 6, 7), torch.tensor([1, 4])
    results, pads = [], []
    for vouched in (True, False):
        torch.manual_seed(0)
        net = classifier_net([(3, 1, 1), (2, 0, 1)], channels=(3, 8, 8), dtype=torch.float32)
        with monkeypatch.context() as m:
            if not vouched:
                m.setattr(ops, "zero_image_pad", lambda ring: 0)
            out = SidewaysPipeline(stages_of(net, 2), backend="torch").backward_clip(video, target)
        pads.append([ops.zero_image_pad(layer._ring) for layer in net if hasattr(layer, "_ring")])
        results.append((out.loss, grads(net)))
    assert pads[0] == [7, 0, 0]  # the stem: 9 channels + 7; the second conv 16 and the head 8 of their own
    assert results[0][0] == results[1][0] and all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    # a layer's ring is made again when its backend's pad changes (kept when it does not)
    torch.manual_seed(0)
    net = classifier_net([(3, 1, 1), (2, 0, 1)], channels=(3, 8, 8), dtype=torch.float32)
    stem_pad = []
    for forced in (False, True, True, False):
        with monkeypatch.context() as m:
            if not forced:
                m.setattr(tb, "_pad", lambda channels, cuda, dtype: 0)
            SidewaysPipeline(stages_of(net, 2), backend="torch").backward_clip(video, target)
        stem_pad.append((ops.zero_image_pad(net[0]._ring), net[0]._ring.stride(4)))
    assert stem_pad == [(0, 9), (7, 16), (7, 16), (0, 9)]
    frame = types.SimpleNamespace(shape=(2, 3, 6, 7), is_cuda=True, dtype=torch.bfloat16)
    forward_only = lambda op: {"torch"} if op == "ring_conv_forward" else {"triton"}
    for chosen, pad in ((lambda op: {"torch"}, 7), (lambda op: {"triton"}, 0), (forward_only, 7)):
        monkeypatch.setattr(backend, "_choices", lambda op, t, channels, geometry=None, chosen=chosen: chosen(op))
        assert backend.kernels("auto").ring_image_pad(3, frame) == pad
    assert backend.kernels("auto").ring_image_pad(3, types.SimpleNamespace(**{**vars(frame), "is_cuda": False})) == 0
    assert backend.kernels("triton").ring_image_pad(3, frame) == backend.kernels("cpp").ring_image_pad(3, frame) == 0
    assert backend.kernels("torch").ring_image_pad(3, frame) == 7
