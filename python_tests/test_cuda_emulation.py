"""The CUDA kernels' own source (csrc/cuda/kernels.cu), compiled for the host with csrc/cuda/emulation/cuda_emulation.h
(blocks in turn, each block's threads as host threads meeting at __syncthreads), checked
against reference.py on tiny odd shapes. This verifies the kernels' indexing, tiling,
barriers and epilogues without a GPU; their speed is measured only on a GPU. The fp16/bf16
kernels' tensor-core GEMMs (wmma m16n16k16) run here through the header's emulation of
the wmma calls (each lane holds the whole fragment), which checks the tiling, fragment
placement and layouts; the cp.async pipeline's copies land at once here, so the stage
bookkeeping is checked (every stage read was written, zero-filled where it must be) but not
its timing; the tensor cores' own arithmetic and the copies' asynchrony are checked only on
a GPU (test_gpu.py)."""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from sideways_kernels import reference as ref
from sideways_kernels.ops import empty_ring
from samples import Geometry, geometry_id

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = os.path.join(ROOT, "csrc", "cuda")
CXX = os.environ.get("CXX", "g++")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if shutil.which(CXX) is None:
        pytest.skip(f"no host C++ compiler ({CXX}) to build the emulated kernels")
    lib = str(tmp_path_factory.mktemp("emulation") / "libsideways_emulated.so")
    cmd = [CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-DSIDEWAYS_EMULATE", f"-I{CUDA}", "-x", "c++",
           os.path.join(CUDA, "kernels.cu"), "-x", "none", os.path.join(CUDA, "emulation", "emulated_ops.cpp"),
           "-shared", "-fPIC", "-pthread", "-o", lib]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    so = ctypes.CDLL(lib)
    so.sideways_emulated_async_copies.restype = ctypes.c_int64
    return so


DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GEOMS = [
    Geometry(2, 5, 7, 6, 5, 2, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    Geometry(1, 6, 9, 7, 6, 3, (3, 3), padding=(1, 1), dilation_t=2, groups=3),
    Geometry(3, 3, 131, 5, 4, 1, (1, 3), padding=(0, 1)),  # C_out > one 128-wide tile
    Geometry(2, 4, 3, 9, 8, 3, (3, 3), stride=(2, 2), padding=(1, 1)),  # K = B*H_out*W_out spans steps
    # Channel counts the 16-byte copies take (8 per group): the vectorised loads, zero-filled
    # in the padding, with strides, groups, tails and several K steps.
    Geometry(2, 16, 16, 7, 6, 2, (3, 3), stride=(2, 1), padding=(1, 1), groups=2),
    Geometry(3, 8, 24, 9, 7, 3, (3, 3), padding=(1, 1), dilation=(2, 1)),
]
VECTORISED = GEOMS[4:]


def _dims(g, slot):
    return (ctypes.c_int64 * 20)(g.span, g.batch, g.channels, g.height, g.width, g.out_channels, g.k_t, *g.k_hw,
                                 *g.out_hw(), *g.stride, *g.padding, *g.dilation, g.dilation_t, g.groups, slot)


def _strides(ring, out_shaped):
    return (ctypes.c_int64 * 9)(*ring.stride(), *out_shaped.stride())


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _ok(err):
    assert err == 0, f"emulated launch failed with cudaError {err}"


def _call(so, g, mode, grad_out, ring, slot, grad_weight=None, weight=None, buf=None, hyper=(0, 0, 0, 0),
          nesterov=False, first_step=False, split_k=0):
    """The weight update with split_k forced (0: planned for the emulated H100); returns the factor taken."""
    taken = ctypes.c_int64(0)
    err = so.sideways_emulated_weight_update(_dims(g, slot), _strides(ring, grad_out), mode, _ptr(grad_weight),
                                             _ptr(weight), _ptr(buf), (ctypes.c_double * 4)(*hyper), int(nesterov),
                                             int(first_step), DTYPE_CODE[grad_out.dtype], _ptr(grad_out), _ptr(ring),
                                             ctypes.c_int64(split_k), ctypes.byref(taken))
    assert err != -1, "a split-K launch left a tile counter non-zero"
    _ok(err)
    return taken.value


def _inputs(g, dtype):
    """A ring in the layout the layers allocate (ops.empty_ring: strided, not contiguous) and
    a channels-last error, as the pipeline hands them over."""
    ring = empty_ring(g.span, g.batch, g.channels, g.height, g.width, dtype=dtype)
    ring.copy_(torch.randn(ring.shape))
    grad_out = torch.randn(g.batch, g.out_channels, *g.out_hw()).to(dtype).contiguous(memory_format=torch.channels_last)
    return ring, grad_out, int(torch.randint(g.span, ()).item())


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1e-3, atol=1e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("g", GEOMS, ids=geometry_id)
def test_emulated_weight_grad_accumulate_matches_reference(emulated, g, dtype):
    """fp32 accumulation of fp32/fp16/bf16 frame pairs into an fp32 gradient buffer."""
    ring, grad_out, slot = _inputs(g, dtype)
    shape = (g.out_channels, g.channels // g.groups, g.k_t, *g.k_hw)
    grad_w = torch.randn(shape)  # accumulate onto values, not zeros
    expected = grad_w.double()
    _call(emulated, g, 0, grad_out, ring, slot, grad_weight=grad_w)
    ref.weight_grad_accumulate(expected, None, grad_out.double(), ring.double(), slot, list(g.stride),
                               list(g.padding), list(g.dilation), g.dilation_t, g.groups)
    _assert_sums_close(grad_w, expected, dtype)


def _assert_sums_close(actual, expected, dtype):
    """fp32 sums of hundreds of products: their rounding scales with the sums' size."""
    scale = expected.abs().max().item() + 1
    torch.testing.assert_close(actual.double(), expected, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("g", [Geometry(3, 5, 6, 8, 9, 2, (3, 3), padding=(1, 1)), GEOMS[5]], ids=geometry_id)
def test_emulated_split_k_sums_the_splits_once_and_resets_its_counters(emulated, g, dtype):
    """Split-K 1, 2 and 3 (each split >= one K step), twice in a row on the same buffers: the
    last split of each tile applies the sum of every split's partial exactly once (partials
    start as NaN, so one read before it is written shows), the tile counters end at zero, and
    the result is the reference's. A split factor is never larger than the K steps."""
    shape = (g.out_channels, g.channels // g.groups, g.k_t, *g.k_hw)
    for split_k in (1, 2, 3):
        grad_w = torch.randn(shape)
        expected = grad_w.double()
        for _ in range(2):
            ring, grad_out, slot = _inputs(g, dtype)
            assert _call(emulated, g, 0, grad_out, ring, slot, grad_weight=grad_w, split_k=split_k) == split_k
            ref.weight_grad_accumulate(expected, None, grad_out.double(), ring.double(), slot, list(g.stride),
                                       list(g.padding), list(g.dilation), g.dilation_t, g.groups)
        _assert_sums_close(grad_w, expected, dtype)
    ring, grad_out, slot = _inputs(g, dtype)
    steps = -(-g.batch * g.out_hw()[0] * g.out_hw()[1] // (16 if dtype == torch.float32 else 32))
    assert _call(emulated, g, 0, grad_out, ring, slot, grad_weight=torch.zeros(shape), split_k=1000) == steps


def test_emulated_split_k_plan_fills_the_sms_with_steps_to_spare(emulated):
    """The planned factor for one output tile (fp32: 16-deep K steps): at most two waves over
    the emulated H100's 132 SMs (264 blocks), at least four K steps per split, and no split
    without a step: 32 steps -> 8 splits; 1280 steps -> 264 -> 5 steps each -> 256 splits."""
    for width, splits in ((16, 8), (640, 256)):
        g = Geometry(4, 8, 8, 8, width, 1, (1, 1))  # K = 4*8*width
        ring, grad_out, slot = _inputs(g, torch.float32)
        grad_w = torch.zeros(8, 8, 1, 1, 1)
        assert _call(emulated, g, 0, grad_out, ring, slot, grad_weight=grad_w) == splits
        expected = torch.zeros(8, 8, 1, 1, 1, dtype=torch.float64)
        ref.weight_grad_accumulate(expected, None, grad_out.double(), ring.double(), slot, [1, 1], [0, 0], [1, 1], 1, 1)
        _assert_sums_close(grad_w, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_loads_are_16_byte_copies_exactly_where_layouts_allow(emulated, dtype):
    """An operand arrives as asynchronous 16-byte copies when its contiguous run is a multiple
    of the vector (4 fp32, 8 bf16): channels per group for the ring and the error, a whole row
    for the GEMM-layout weights. 8 channels per group: every op copies. 5 and 7 channels: the
    weight update does not; the forward only through its weight, when C/groups * taps
    (5 * 2 * 3 * 2 = 60) is a multiple of the vector (fp32, not bf16)."""
    vector = 16 // torch.empty((), dtype=dtype).element_size()

    def copies(g):
        ring, grad_out, slot = _inputs(g, dtype)
        weight = torch.randn(g.out_channels, g.channels // g.groups, g.k_t, *g.k_hw)
        counts = []
        emulated.sideways_emulated_async_copies()
        _call(emulated, g, 0, grad_out, ring, slot, grad_weight=torch.zeros(weight.shape))
        counts.append(emulated.sideways_emulated_async_copies())
        out = _poisoned((g.batch, g.out_channels, *g.out_hw()), dtype)
        _ok(emulated.sideways_emulated_ring_conv_forward(_dims(g, slot), _strides(ring, out), DTYPE_CODE[dtype],
                                                         _ptr(ring), _ptr(_gemm_weight(weight, dtype)), None,
                                                         _ptr(out)))
        counts.append(emulated.sideways_emulated_async_copies())
        grad_in = _poisoned((g.batch, g.channels, g.height, g.width), dtype)
        _ok(emulated.sideways_emulated_window_input_grad(
            _dims(g, slot), _strides(ring, grad_out), DTYPE_CODE[dtype], _ptr(grad_out),
            _ptr(_gemm_summed_weight(weight, dtype, g.groups)), _ptr(grad_in), (ctypes.c_int64 * 4)(*grad_in.stride())))
        counts.append(emulated.sideways_emulated_async_copies())
        return counts

    update, forward, input_grad = copies(GEOMS[4])
    assert update > 0 and forward > 0 and input_grad > 0
    update, forward, _ = copies(GEOMS[0])
    assert update == 0 and (forward > 0) == (60 % vector == 0)


@pytest.mark.parametrize("hyper,nesterov", [((0.1, 0.0, 0.0, 0.0), False), ((0.05, 0.9, 0.1, 1e-2), False),
                                            ((0.02, 0.8, 0.0, 5e-3), True)], ids=["plain", "momentum", "nesterov"])
@pytest.mark.parametrize("g", GEOMS[:2], ids=geometry_id)
def test_emulated_sgd_epilogue_matches_torch_optim_sgd(emulated, g, hyper, nesterov):
    """Two ticks of the fused SGD epilogue == torch.optim.SGD.step on the reference gradient."""
    shape = (g.out_channels, g.channels // g.groups, g.k_t, *g.k_hw)
    w = torch.randn(shape)
    w_opt = w.clone().requires_grad_()
    lr, momentum, dampening, wd = hyper
    opt = torch.optim.SGD([w_opt], lr=lr, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov)
    buf = torch.full(shape, float("nan")) if momentum else None  # poison: the first step must overwrite it
    for tick in range(2):
        ring, grad_out, slot = _inputs(g, torch.float32)
        grad = torch.zeros(shape)
        ref.weight_grad_accumulate(grad, None, grad_out, ring, slot, list(g.stride), list(g.padding),
                                   list(g.dilation), g.dilation_t, g.groups)
        w_opt.grad = grad
        opt.step()
        _call(emulated, g, 1, grad_out, ring, slot, weight=w, buf=buf, hyper=hyper, nesterov=nesterov,
              first_step=tick == 0)
        torch.testing.assert_close(w, w_opt.detach(), rtol=1e-5, atol=1e-5)
        if momentum:
            torch.testing.assert_close(buf, opt.state[w_opt]["momentum_buffer"], rtol=1e-5, atol=1e-5)


def _gemm_weight(weight, dtype):
    """The forward's weight as kernels.h asks for it (the binding makes it likewise): in the
    activations' dtype, [C_out, k_t, k_h, k_w, C/groups] contiguous."""
    return weight.to(dtype).permute(0, 2, 3, 4, 1).contiguous()


def _gemm_summed_weight(weight, dtype, groups):
    """The input gradient's summed weight as kernels.h asks for it: summed over k_t in fp32, in
    the activations' dtype, [groups, C/groups, k_h, k_w, C_out/groups] contiguous."""
    summed = weight.sum(2)
    return summed.view(groups, -1, *summed.shape[1:]).permute(0, 2, 3, 4, 1).to(dtype).contiguous()


def _poisoned(shape, dtype):
    """Channels-last output, NaN-filled: every element must be written."""
    return torch.full(shape, float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("g", GEOMS, ids=geometry_id)
def test_emulated_ring_conv_forward_matches_reference(emulated, g, dtype):
    ring, _, slot = _inputs(g, dtype)
    weight = torch.randn(g.out_channels, g.channels // g.groups, g.k_t, *g.k_hw) / 3
    bias = torch.randn(g.out_channels)
    out = _poisoned((g.batch, g.out_channels, *g.out_hw()), dtype)
    w = _gemm_weight(weight, dtype)
    _ok(emulated.sideways_emulated_ring_conv_forward(_dims(g, slot), _strides(ring, out), DTYPE_CODE[dtype],
                                                     _ptr(ring), _ptr(w), _ptr(bias), _ptr(out)))
    expected = ref.ring_conv_forward(ring.double(), None, slot, weight.double(), bias.double(), list(g.stride),
                                     list(g.padding), list(g.dilation), g.dilation_t, g.groups)
    scale = expected.abs().max().item() + 1
    torch.testing.assert_close(out.double(), expected, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("g", GEOMS, ids=geometry_id)
def test_emulated_window_input_grad_matches_reference(emulated, g, dtype):
    ring, grad_out, slot = _inputs(g, dtype)
    weight = torch.randn(g.out_channels, g.channels // g.groups, g.k_t, *g.k_hw) / 3
    summed = _gemm_summed_weight(weight, dtype, g.groups)
    grad_in = _poisoned((g.batch, g.channels, g.height, g.width), dtype)
    in_strides = (ctypes.c_int64 * 4)(*grad_in.stride())
    _ok(emulated.sideways_emulated_window_input_grad(_dims(g, slot), _strides(ring, grad_out), DTYPE_CODE[dtype],
                                                     _ptr(grad_out), _ptr(summed), _ptr(grad_in), in_strides))
    expected = ref.window_input_grad(grad_out.double(), weight.double(), [g.height, g.width], list(g.stride),
                                     list(g.padding), list(g.dilation), g.groups)
    scale = expected.abs().max().item() + 1
    torch.testing.assert_close(grad_in.double(), expected, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10 * scale)


def test_emulated_launch_beyond_the_device_grid_is_refused_before_it_runs(emulated):
    """65536 groups: more blocks on grid z than the device allows (its limits are read from it,
    here the emulation's H100 figures): cudaErrorInvalidConfiguration, and nothing written."""
    g = Geometry(1, 65536, 65536, 1, 1, 1, (1, 1), groups=65536)
    ring, grad_out, slot = _inputs(g, torch.float32)
    grad_w = torch.randn(g.out_channels, 1, 1, 1, 1)
    before = grad_w.clone()
    err = emulated.sideways_emulated_weight_update(_dims(g, slot), _strides(ring, grad_out), 0, _ptr(grad_w), None,
                                                   None, (ctypes.c_double * 4)(0, 0, 0, 0), 0, 0, 0, _ptr(grad_out),
                                                   _ptr(ring))
    assert err == 9 and torch.equal(grad_w, before)
