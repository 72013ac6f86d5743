"""SidewaysConv3d as a layer: clip mode is nn.Conv3d (oracle 1), from_conv3d/convert keep
weights and state dicts, and the streaming autograd function's gradients."""

import pytest
import torch
import torch.nn as nn

from sideways_kernels import SidewaysConv3d, convert
from sideways_kernels.nn import StreamClock, _Stream
from sideways_kernels import backend

DT = torch.float64

CTOR_ARGS = [
    dict(in_channels=3, out_channels=5, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 1)),
    dict(in_channels=6, out_channels=9, kernel_size=(3, 3, 3), padding="same", dilation=(2, 1, 2), groups=3),
    dict(in_channels=3, out_channels=2, kernel_size=(2, 2, 4), padding="same", bias=False),
    dict(in_channels=5, out_channels=5, kernel_size=(1, 3, 3), padding="valid", groups=5),
    dict(in_channels=3, out_channels=4, kernel_size=(3, 3, 3), stride=2, padding=2, dilation=2),
    dict(in_channels=2, out_channels=3, kernel_size=(3, 3, 3), padding=(1, 1, 1), padding_mode="reflect"),
    dict(in_channels=2, out_channels=3, kernel_size=(2, 3, 3), padding=(1, 2, 1), padding_mode="circular"),
    dict(in_channels=2, out_channels=3, kernel_size=(1, 3, 3), padding=(0, 1, 1), padding_mode="replicate"),
]


def _ids(kw):
    return "-".join(f"{k}{v}" for k, v in kw.items() if k not in ("in_channels", "out_channels"))


@pytest.mark.parametrize("kwargs", CTOR_ARGS, ids=_ids)
def test_clip_mode_is_nn_conv3d(kwargs):
    """Oracle 1 for the layer: outputs and gradients equal nn.Conv3d's, float64."""
    ref = nn.Conv3d(**kwargs, dtype=DT)
    layer = SidewaysConv3d.from_conv3d(ref, copy=True)
    assert isinstance(layer, nn.Conv3d) and layer.weight is not ref.weight
    x = torch.randn(2, kwargs["in_channels"], 7, 9, 8, dtype=DT, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), ref(x2)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", CTOR_ARGS, ids=_ids)
def test_same_constructor_and_state_dict_as_nn_conv3d(kwargs):
    torch.manual_seed(1)
    ref = nn.Conv3d(**kwargs)
    torch.manual_seed(1)
    layer = SidewaysConv3d(**kwargs)
    assert list(layer.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v, rtol=0, atol=0)
    layer.load_state_dict(ref.state_dict())  # and the other way round
    ref.load_state_dict(layer.state_dict())
    assert repr(layer).replace("SidewaysConv3d", "Conv3d") == repr(ref)


def test_from_conv3d_shares_or_copies_and_keeps_dtype_frozen_weights_and_mode():
    conv = nn.Conv3d(3, 4, (3, 1, 1), dtype=torch.float64)
    shared = SidewaysConv3d.from_conv3d(conv)
    assert shared.weight is conv.weight and shared.bias is conv.bias and shared.weight.dtype == torch.float64
    copied = SidewaysConv3d.from_conv3d(conv, copy=True)
    assert copied.weight is not conv.weight and torch.equal(copied.weight, conv.weight)
    assert copied.weight.device == conv.weight.device
    conv.weight.requires_grad_(False)
    conv.eval()
    for layer in (SidewaysConv3d.from_conv3d(conv), SidewaysConv3d.from_conv3d(conv, copy=True)):
        assert not layer.weight.requires_grad and layer.bias.requires_grad and not layer.training  # as it found them
    with pytest.raises(TypeError, match="nn.Conv3d"):
        SidewaysConv3d.from_conv3d(nn.Conv2d(3, 4, 3))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.inner = nn.Sequential(nn.ReLU(), nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1)))
        self.skip = nn.Conv2d(3, 3, 1)  # not a Conv3d: untouched

    def forward(self, x):
        return self.inner(self.conv(x))


def test_convert_swaps_every_conv3d_in_place():
    model = _Block().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 5, 6, 7, dtype=DT)
    y_before = model(x)
    weight = model.conv.weight
    assert convert(model) is model
    assert type(model.conv) is SidewaysConv3d and type(model.inner[1]) is SidewaysConv3d
    assert type(model.skip) is nn.Conv2d
    assert model.conv.weight is weight  # optimizers holding it keep working
    assert list(model.state_dict()) == list(before)
    torch.testing.assert_close(model(x), y_before, rtol=0, atol=0)


def test_convert_filter_fn_and_bare_conv():
    model = _Block()
    convert(model, filter_fn=lambda m, name: name.startswith("inner"))
    assert type(model.conv) is nn.Conv3d and type(model.inner[1]) is SidewaysConv3d
    assert isinstance(convert(nn.Conv3d(2, 2, 1)), SidewaysConv3d)


@pytest.mark.parametrize("k_t,dil_t", [(1, 1), (2, 1), (3, 2)])
def test_streaming_function_gradcheck_on_a_static_window(k_t, dil_t):
    """The Sideways input gradient is the window-summed Jacobian: the exact derivative of the
    output when every frame in the window is the same input (gradcheck, float64). The weight
    gradient (accumulated in place by the op, not returned through autograd) equals the
    exact conv3d weight gradient of the window."""
    layer = SidewaysConv3d(3, 4, (k_t, 3, 2), padding=(0, 1, 0), dilation=(dil_t, 1, 1), dtype=DT)

    def stream_static(x):
        layer._stream = _Stream("sideways", backend.kernels("cpp"), clock=StreamClock())
        try:
            for t in range(layer.span):  # the ring ends up holding x in every slot
                layer._stream.clock.frame, layer._stream.clock.length = t, float("inf")
                out = layer(x)
            return out
        finally:
            layer._stream = None

    x = torch.randn(2, 3, 1, 5, 4, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(stream_static, (x,), eps=1e-6, atol=1e-8)

    layer.zero_grad(set_to_none=True)
    g = torch.randn(2, 4, 1, 5, 3, dtype=DT)
    stream_static(x.detach().requires_grad_()).backward(g)
    window = x.detach().expand(-1, -1, layer.span, -1, -1)
    w_ref = torch.nn.grad.conv3d_weight(window, layer.weight.shape, g, 1, (0, 1, 0), (dil_t, 1, 1))
    torch.testing.assert_close(layer.weight.grad, w_ref)
    torch.testing.assert_close(layer.bias.grad, g.sum((0, 2, 3, 4)))


@pytest.mark.parametrize("kwargs,why", [
    (dict(kernel_size=(3, 1, 1), stride=(2, 1, 1)), "temporal stride"),
    (dict(kernel_size=(2, 1, 1), padding=(2, 0, 0)), "start temporal padding"),
    (dict(kernel_size=(3, 3, 3), padding=1, padding_mode="reflect"), "padding_mode"),
    (dict(kernel_size=(2, 3, 3), padding="same", padding_mode="reflect"), "padding_mode"),  # time: (0, 1)
])
def test_streaming_problem_names_the_rule(kwargs, why):
    assert why in SidewaysConv3d(2, 2, **kwargs).streaming_problem()
    assert SidewaysConv3d(2, 2, 3, padding=(2, 1, 1)).streaming_problem() is None
