"""from_model(..., temporal_padding="causal"): every temporally padded conv and pool streams with
all of its padding on the past side. The oracles of DESIGN.md §2 against an offline causal
reference written here by hand (the same model, each such layer applied to the clip padded on
the past side only), in float64: streaming == the reference, bp == its autograd, Sideways exact
where DESIGN says; the lags; what causal leaves alone and what it refuses."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sideways_kernels import SidewaysPipeline, StreamingError, models
from sideways_kernels.graph import ConvNode
from sideways_kernels.nn import ZEROS
from graphs import DT, FirstTemporalThenLocal, TrunkWithPooledHead, objective, randomize_norms, video_resnet_frames
from nets import rel_error

# the models' own offline forward of a padding='same' conv with an even kernel
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


# --- the offline causal reference ------------------------------------------------------------------

def _past_padded(x, front: int, value=0.0):
    """The clip with ``front`` frames of ``value`` before it (negative: its first ``-front`` frames cut)."""
    return F.pad(x, (0, 0, 0, 0, front, 0), value=value) if front >= 0 else x[:, :, -front:]


def _causal_front(pad_total: int, span: int, stride: int) -> int:
    """All the padding on the past side; strided, what ends each window on the last frame of its
    stride group."""
    return pad_total if stride == 1 else span - stride


class _PastPadded(nn.Module):
    """``layer`` (a Conv3d, MaxPool3d or AvgPool3d) on the clip padded in time on the past side
    as :func:`_causal_front` says, pooled or convolved without temporal padding."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        if isinstance(m, nn.Conv3d):
            t0, t1, h0, h1, w0, w1 = (m._reversed_padding_repeated_twice[i] for i in (4, 5, 2, 3, 0, 1))
            assert (h0, w0) == (h1, w1)
            front = _causal_front(t0 + t1, m.dilation[0] * (m.kernel_size[0] - 1) + 1, m.stride[0])
            return F.conv3d(_past_padded(x, front), m.weight, m.bias, m.stride, (0, h0, w0), m.dilation, m.groups)
        k, s, p = (_triple(v) for v in (m.kernel_size, m.stride, m.padding))
        dilation = _triple(m.dilation)[0] if isinstance(m, nn.MaxPool3d) else 1
        front = _causal_front(2 * p[0], dilation * (k[0] - 1) + 1, s[0])
        if isinstance(m, nn.MaxPool3d):
            return F.max_pool3d(_past_padded(x, front, -math.inf), k, s, (0, *p[1:]), m.dilation, m.ceil_mode)
        if m.count_include_pad:
            return F.avg_pool3d(_past_padded(x, front), k, s, (0, *p[1:]), m.ceil_mode, True)
        # padding not counted (spatial kernel 1 here): the mean of each window's real frames
        assert k[1:] == (1, 1) and s[1:] == (1, 1) and p[1:] == (0, 0)
        xp = _past_padded(x, front, math.nan)
        length = xp.shape[2]
        n = (-(-(length - k[0]) // s[0]) if m.ceil_mode else (length - k[0]) // s[0]) + 1
        if m.ceil_mode and (n - 1) * s[0] >= length:
            n -= 1
        xp = F.pad(xp, (0, 0, 0, 0, 0, (n - 1) * s[0] + k[0] - length), value=math.nan)
        return xp.unfold(2, k[0], s[0]).nanmean(-1)


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def causal_reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (same parameters, in the same order) whose temporally strided convs and
    pools, and those with padding on the future side, read the clip padded on the past side instead."""
    ref = copy.deepcopy(model)

    def swap(module):
        for name, child in module.named_children():
            if isinstance(child, nn.Conv3d) and (child._reversed_padding_repeated_twice[5] > 0 or child.stride[0] > 1) \
                    or isinstance(child, (nn.MaxPool3d, nn.AvgPool3d)) and \
                    (_triple(child.padding)[0] > 0 or _triple(child.stride)[0] > 1):
                setattr(module, name, _PastPadded(child))
            else:
                swap(child)
    swap(ref)
    return ref


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


# --- networks ------------------------------------------------------------------------------------------

class Zoo(TrunkWithPooledHead):
    """Every temporal padding causal mode moves, and two it leaves: a residual around a padded
    3-tap conv, a dilated conv, a padding='same' conv with an even kernel (pads (0, 1)), a strided
    padded conv beside a strided 1x1x1 shortcut, BatchNorm, a padded max-pool, a strided average
    pool in ceil mode not counting its padding, a functional max-pool, a conv without temporal
    padding (left as is), a head pool. Lags: 'same' 18, causal 7 (stride - 1 at the strided conv's
    rate 1 and the strided pool's rate 2, the unpadded conv at rate 4)."""

    def __init__(self, c=3, w=3, classes=5):
        super().__init__()
        self.stem = nn.Conv3d(c, w, 3, padding=1)
        self.t = nn.Conv3d(w, w, (3, 1, 1), padding=(1, 0, 0))
        self.dil = nn.Conv3d(w, w, (3, 1, 1), padding=(2, 0, 0), dilation=(2, 1, 1))
        self.even = nn.Conv3d(w, w, (2, 1, 1), padding="same")
        self.down = nn.Conv3d(w, 2 * w, 3, stride=(2, 1, 1), padding=1)
        self.short = nn.Conv3d(w, 2 * w, 1, stride=(2, 1, 1))
        self.bn = nn.BatchNorm3d(2 * w)
        self.max = nn.MaxPool3d(3, stride=(1, 2, 2), padding=1)
        self.avg = nn.AvgPool3d((3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0), ceil_mode=True,
                                count_include_pad=False)
        self.valid = nn.Conv3d(2 * w, 2 * w, (2, 1, 1))
        self.fc = nn.Linear(2 * w, classes)

    def fmax(self, x):  # a functional pool (the reference's copy overrides it)
        return F.max_pool3d(x, (3, 1, 1), 1, (1, 0, 0))

    def trunk(self, x):
        x = torch.tanh(self.stem(x))
        x = torch.tanh(x + self.t(x))
        x = torch.tanh(self.even(torch.tanh(self.dil(x))))
        x = torch.tanh(self.bn(self.down(x)) + self.short(x))
        return torch.tanh(self.valid(self.fmax(self.avg(self.max(x)))))


def _zoo():
    model = randomize_norms(Zoo().to(DT)).eval()
    ref = causal_reference(model)
    ref.fmax = lambda x: F.max_pool3d(F.pad(x, (0, 0, 0, 0, 2, 0), value=-math.inf), (3, 1, 1), 1, 0)
    return model, ref, lambda m, x: m.frames(x)


def _r2plus1d():
    model = randomize_norms(models.r2plus1d_18(num_classes=4, width=4).to(DT)).eval()
    return model, causal_reference(model), video_resnet_frames


NETS = {"zoo": _zoo, "r2plus1d_18": _r2plus1d}


def _clip(B, T, H, W):
    return torch.randn(B, 3, T, H, W, dtype=DT)


# --- streaming == offline causal reference --------------------------------------------------------

@pytest.mark.parametrize("name,T,n_stages", [("zoo", 9, 1), ("zoo", 12, 3), ("r2plus1d_18", 11, 3)])
def test_causal_stream_is_the_offline_causal_network(name, T, n_stages):
    model, ref, _ = NETS[name]()
    video = _clip(2, T, 8, 7) if name == "zoo" else _clip(2, T, 9, 8)
    with torch.no_grad():
        same = model(video)
        expected = ref(video)
    assert (same - expected).abs().max() > 1e-3  # causal is another function
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = SidewaysPipeline.from_model(model, stages=n_stages, temporal_padding="causal", example=video[:1])
    assert list(model.state_dict()) == list(state) and all(torch.equal(v, state[k]) for k, v in
                                                           model.state_dict().items())  # pretrained weights load
    torch.testing.assert_close(pipe.predict(video), expected, rtol=1e-10, atol=1e-12)
    # the stages called on a clip, one after the other, are the same causal function
    x = video
    with torch.no_grad():
        for stage in pipe.stages:
            x = stage(x)
        torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-12)
        # the model itself is untouched: its own forward is still the 'same' one
        assert torch.equal(model(video), same)


def test_causal_function_is_the_same_one_shifted_by_its_lookahead():
    """A chain, stride 1 throughout: causal output frame t is 'same' output frame t - 5 (the
    lookahead it removes, = the 'same' lag) wherever neither reaches back to the clip's start
    padding. (Around a residual the branches shift by different amounts: no longer a shift.)"""
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv3d(3, 4, 3, padding=1)
            self.b = nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0))
            self.c = nn.Conv3d(4, 4, (3, 1, 1), padding=(2, 0, 0), dilation=(2, 1, 1))
            self.pool = nn.MaxPool3d((3, 1, 1), stride=1, padding=(1, 0, 0))
            self.head = nn.Conv3d(4, 3, 1)

        def forward(self, x):
            x = torch.tanh(self.a(x))
            x = torch.tanh(self.c(torch.tanh(self.b(x))))
            return self.head(F.adaptive_avg_pool3d(self.pool(x), (None, 1, 1)))
    model = Shift().to(DT)
    video = _clip(2, 14, 5, 6)
    with torch.no_grad():
        same = model(video)
    pipe = SidewaysPipeline.from_model(model, temporal_padding="causal", example=video[:1])
    assert pipe.lags == {"same": 5, "causal": 0} and pipe.lag == 0
    causal = pipe.predict(video)
    assert causal.shape == same.shape
    torch.testing.assert_close(causal[:, :, 10:], same[:, :, 5:9], rtol=1e-10, atol=1e-12)
    assert (causal[:, :, :5] - same[:, :, :5]).abs().max() > 1e-3


# --- bp == autograd of the causal clip loss; Sideways ------------------------------------------------

@pytest.mark.parametrize("name,n_stages", [("zoo", 1), ("zoo", 3), ("r2plus1d_18", 2)])
def test_causal_bp_is_autograd_of_the_causal_network(name, n_stages):
    model, ref, frames = NETS[name]()
    video = _clip(2, 12, 8, 7) if name == "zoo" else _clip(2, 9, 9, 8)
    n_out = len(frames(ref, video))
    target = torch.randint(0, 4, (2, n_out))
    ref.zero_grad()
    loss = objective(frames(ref, video), target, per_frame=True)
    loss.backward()
    expected = _grads(ref)
    model.zero_grad()
    pipe = SidewaysPipeline.from_model(model, stages=n_stages, mode="bp", temporal_padding="causal",
                                       example=video[:1])
    result = pipe.backward_clip(video, target)
    assert abs(result.loss.item() - loss.item()) <= 1e-9 * abs(loss.item())
    assert rel_error(_grads(model), expected) <= 1e-9
    # Sideways runs the same forward, and is not BP on this moving video
    model.zero_grad()
    pipe.mode = "sideways"
    torch.testing.assert_close(pipe.backward_clip(video, target).loss, result.loss, rtol=1e-12, atol=0)
    assert rel_error(_grads(model), expected) > 1e-3


def test_causal_single_stage_whose_only_temporal_layer_is_first_is_exact():
    """Oracle 4's case for a causal first conv, a residual of frame-local layers, BatchNorm and a
    pooled head after it: Sideways == autograd of the causal clip loss, on a moving video."""
    model = randomize_norms(FirstTemporalThenLocal(pad_t=1).to(DT)).eval()
    ref = causal_reference(model)
    video, target = _clip(2, 7, 6, 5), torch.randint(0, 5, (2,))
    ref.zero_grad()
    objective(ref.frames(video), target).backward()
    model.zero_grad()
    SidewaysPipeline.from_model(model, temporal_padding="causal").backward_clip(video, target)
    assert rel_error(_grads(model), _grads(ref)) <= 1e-9


# --- lags, what causal leaves alone, refusals ------------------------------------------------------

def test_lags_of_both_settings():
    model = models.r2plus1d_18(num_classes=3, width=2).eval()
    causal = SidewaysPipeline.from_model(model, temporal_padding="causal", example=torch.zeros(1, 3, 4, 16, 16))
    # causal: stride - 1 at each temporally strided conv's input rate (1, 2, 4)
    assert causal.lags == {"same": 54, "causal": 7} and causal.lag == 7
    example = torch.zeros(1, 3, 9, 8, 7)  # several stages: the drain feeds the convs samples after the clip
    zoo = {tp: SidewaysPipeline.from_model(Zoo().eval(), stages=3, temporal_padding=tp, example=example)
           for tp in ("same", "causal")}
    assert zoo["same"].lags == zoo["causal"].lags == {"same": 18, "causal": 7}
    assert (zoo["same"].lag, zoo["causal"].lag) == (18, 7)
    assert (zoo["same"].temporal_padding, zoo["causal"].temporal_padding) == ("same", "causal")
    # no lookahead: a causal conv never pushes end padding, and a clip takes fewer ticks
    for tp, pipe in zoo.items():
        pads = [step.work[0] == ZEROS for plan in pipe._schedule(9, "sideways", True) for sp in plan.stages
                for step in sp.steps if step.fire and isinstance(pipe.graph.nodes[step.node], ConvNode)]
        assert any(pads) == (tp == "same"), tp
    assert zoo["causal"].total_ticks(9, "sideways") < zoo["same"].total_ticks(9, "sideways")
    # the list API streams its stage modules as they are
    chain = SidewaysPipeline(models.stages(models.c3d(widths=(2, 2)), 2))
    assert chain.lags == {"same": chain.lag, "causal": None} and chain.temporal_padding is None


def test_causal_strided_network_reads_every_frame():
    """Each causal window ends on the last frame of its stride group: the output depends on every
    frame of the clip, the last included, and the first sample after three temporal strides on
    more than the first frame (windows ending on the group's first frame read neither: r2plus1d_18
    then never saw the last 7 of 16 frames, and its first top-level sample saw frame 0 alone)."""
    torch.manual_seed(0)  # seeded: at width 4 a ReLU can still silence a frame by chance
    model = randomize_norms(models.r2plus1d_18(num_classes=3, width=4).to(DT)).eval()
    trunk = nn.Sequential(model.stem, model.layer1, model.layer2, model.layer3, model.layer4)
    video = _clip(1, 16, 8, 8).requires_grad_()
    pipe = SidewaysPipeline.from_model(trunk, temporal_padding="causal", example=video.detach())
    top = video
    for stage in pipe.stages:  # the causal function offline (predict's, with autograd)
        top = stage(top)
    assert top.shape[2] == 2 and torch.allclose(top, pipe.predict(video))

    def frames_read(out):
        grad, = torch.autograd.grad(out.sum(), video, retain_graph=True)
        return (grad.abs().flatten(3).sum(3)[0].sum(0) > 0).tolist()
    assert frames_read(top) == [True] * 16
    assert frames_read(top[:, :, :1]) == [True] * 8 + [False] * 8  # causal: nothing after its group
    # whole stride groups only: 8 -> 4 -> 2 -> 1 per 8 frames, a partial last group dropped
    assert [pipe.output_length(T) for T in (7, 8, 15, 16, 17)] == [0, 1, 1, 2, 2]


def test_short_clip_warning_names_the_causal_lag():
    model = Zoo().to(DT).eval()
    video, target = _clip(1, 9, 8, 7), torch.randint(0, 5, (1,))
    with pytest.warns(UserWarning, match=r"lag of 18 frames.*temporal_padding='causal'\) \(lag 7\)"):
        SidewaysPipeline.from_model(model, example=video).backward_clip(video, target)


def test_same_ring_steps_are_the_layers_own():
    """'same' streams exactly as before: the node's ring steps are SidewaysConv3d.ring_step."""
    from sideways_kernels import SidewaysConv3d
    for conv in (SidewaysConv3d(2, 2, 3, padding=1), SidewaysConv3d(2, 2, (2, 1, 1), padding="same"),
                 SidewaysConv3d(2, 2, (3, 1, 1), padding=(2, 0, 0), dilation=(2, 1, 1)),
                 SidewaysConv3d(2, 2, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0)), SidewaysConv3d(2, 2, (2, 1, 1))):
        node = ConvNode("c", [-1], conv)
        for length in (1, 5, 6):
            for m in range(-1, length + 6):
                assert node.step(m, length)[:2] == conv.ring_step(m, length), (conv, m, length)


@pytest.mark.parametrize("layer,words", [
    (nn.Conv3d(3, 3, (2, 3, 3), padding=1), r"module 'layer' \(SidewaysConv3d\): its temporal padding 1\+1 exceeds "
                                            r"the window span - 1 = 1"),
    (nn.MaxPool3d((2, 1, 1), stride=1, padding=(1, 0, 0)), r"module 'layer' \(MaxPool3d\): its temporal padding "
                                                           r"1\+1 exceeds"),
], ids=["conv", "pool"])
def test_causal_form_undefined_is_refused_by_name(layer, words):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)
    example = torch.zeros(1, 3, 4, 5, 5)
    SidewaysPipeline.from_model(Net(), example=example)  # 'same' streams it
    with pytest.raises(StreamingError, match=words):
        SidewaysPipeline.from_model(Net(), temporal_padding="causal", example=example)


def test_bad_temporal_padding_is_one_line():
    with pytest.raises(ValueError, match=r"^temporal_padding must be one of \('same', 'causal'\), got 'future'$"):
        SidewaysPipeline.from_model(Zoo(), temporal_padding="future")
