"""Real video networks through SidewaysPipeline.from_model, against the oracles of DESIGN.md
§2 (float64): streaming == the model (predict), bp == autograd of the per-frame objective,
Sideways exact on a static video where no layer pads time and different from bp on a moving
one; refusals that name what they refused. torchvision's own model code and ours."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import torch.nn as nn
import torch.nn.functional as F

from sideways_kernels import SidewaysConv3d, SidewaysPipeline, StreamingError, models, pipeline
from sideways_kernels.cuda_graphs import TickGraphs
from sideways_kernels.trace import trace_model
from graphs import (DT, Branches, FirstTemporalThenLocal, NoPadding, Pools, Residuals, TrunkWithPooledHead, objective,
                    randomize_norms, s3d_frames, video_resnet_frames)
from nets import rel_error
from tv import video_models

TORCHVISION = ["r3d_18", "mc3_18", "r2plus1d_18", "s3d"]


def _torchvision(name: str, classes: int = 5) -> nn.Module:
    """torchvision's model, float64, eval mode with random BatchNorm statistics; S3D's final
    7x7 pool made 1x1 so 32x32 frames fit (its own code otherwise)."""
    model = getattr(video_models(), name)(num_classes=classes).to(DT)
    if name == "s3d":
        model.avgpool = nn.AvgPool3d((2, 1, 1), stride=1)
    return randomize_norms(model).eval()


def _frames_of(name: str):
    return s3d_frames if name == "s3d" else video_resnet_frames


def _grads(model):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _global_rel(a, b) -> float:
    """max |a - b| over all tensors / max |b|: for gradients that are exactly zero in truth
    (a conv bias before a BatchNorm in training mode), where a per-tensor ratio is noise/noise."""
    return max((x - y).abs().max().item() for x, y in zip(a, b)) / max(y.abs().max().item() for y in b)


def _clip(B, T, H, W, C=3):
    return torch.randn(B, C, T, H, W, dtype=DT)


# --- streaming forward: predict == model ---------------------------------------------------------

@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_stream_exactly(name):
    model = _torchvision(name)
    video = _clip(2, 19 if name != "s3d" else 26, 28, 20)  # lengths and sizes that strides do not divide
    with torch.no_grad():
        expected = model(video)
    pipe = SidewaysPipeline.from_model(model, stages=3, example=video[:1])
    assert len(pipe.stages) == 3
    got = pipe.predict(video)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # the head is affine, so the mean of the streamed per-frame logits is the prediction too
    frames = list(pipe.stream(video))
    assert len(frames) == pipe.output_length(video.shape[2]) >= 2
    torch.testing.assert_close(torch.stack(frames).mean(0), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_cls,lengths", [(Branches, [7, 10]), (Residuals, [9, 12, 13]), (Pools, [6, 9, 11]),
                                               (NoPadding, [12, 16])], ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_odd_topologies_stream_exactly(model_cls, lengths, n_stages):
    model = randomize_norms(model_cls().to(DT)).eval()
    for T in lengths:
        video = _clip(2, T, 9, 7)
        pipe = SidewaysPipeline.from_model(model, stages=n_stages, example=video[:1])
        with torch.no_grad():
            expected = model(video)
        torch.testing.assert_close(pipe.predict(video), expected, rtol=1e-10, atol=1e-12)
        # frames one by one from an iterable whose end is not known in advance give the same
        lazy = list(pipe.stream(video[:, :, t] for t in range(T)))
        torch.testing.assert_close(torch.stack(lazy), torch.stack(list(pipe.stream(video))), rtol=0, atol=0)


@pytest.mark.parametrize("model_cls,T", [(Branches, 10), (Residuals, 13), (Pools, 11)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("n_stages", [2, 3])
def test_a_sideways_plan_marks_the_samples_joins_read_and_keeps_each_stage_s_last_arrival(model_cls, T, n_stages):
    """Two facts of every Sideways tick plan its gradients rest on, which a static video (oracle 4)
    cannot show: a join that reads a held sample marks it "fired now" exactly where its producer
    emitted earlier in the same stage's tick (the error then goes to that fresh sample, not to a
    stored copy); and each stage above the first keeps the clip's last real sample from below —
    the one its drain ticks reuse — and no other."""
    model = randomize_norms(model_cls().to(DT)).eval()
    video = _clip(2, T, 9, 7)
    pipe = SidewaysPipeline.from_model(model, stages=n_stages, example=video[:1])
    schedule, nodes = pipe._schedule(T, "sideways", True), pipe.graph.nodes
    kept, flags = {k: [] for k in range(1, n_stages)}, set()
    for plan in schedule:
        for k, sp in enumerate(plan.stages):
            fired = {schedule.inputs[k]} if sp.arrive is not None else set()
            for step in sp.steps:
                for pos, how in enumerate(step.inputs):
                    if how != "new":
                        flags.add(how[2])
                        assert how[2] == (nodes[step.node].inputs[pos] in fired), (plan.tick, k, step)
                if step.fire and step.emit is not None:
                    fired.add(step.node)
            if sp.keep_arrival:
                kept[k].append(sp.arrive)
    assert (True in flags) == (model_cls is not Pools)  # (Pools: no join)
    assert kept == {k: [schedule.length(schedule.inputs[k]) - 1] for k in range(1, n_stages)}


def test_our_models_are_torchvision_key_for_key():
    """Same state dict keys (in order) and shapes, the same initial weights from the same seed
    (a network trained from scratch starts where torchvision's would) and BatchNorm eps and
    momentum; torchvision's weights load strictly and give the same outputs (S3D at 32x32, its
    final pool window scaled as ours does)."""
    tv = video_models()
    norms = lambda net: [(m.eps, m.momentum) for m in net.modules() if isinstance(m, nn.BatchNorm3d)]
    for name in TORCHVISION:
        torch.manual_seed(0)
        theirs = getattr(tv, name)(num_classes=9)
        torch.manual_seed(0)
        ours = getattr(models, name)(num_classes=9, **({"frame_size": 32} if name == "s3d" else {})).eval()
        a, b = theirs.state_dict(), ours.state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a), name
        assert norms(ours) == norms(theirs), name
        theirs = randomize_norms(theirs).eval()
        if name == "s3d":
            theirs.avgpool = nn.AvgPool3d((2, 1, 1), stride=1)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(1, 3, 16, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["r3d_18", "r2plus1d_18"])
def test_our_small_models_stream_exactly(name):
    model = randomize_norms(getattr(models, name)(num_classes=4, width=8).to(DT)).eval()
    video = _clip(3, 11, 20, 24)
    pipe = SidewaysPipeline.from_model(model, stages=4, example=video[:1])
    with torch.no_grad():
        torch.testing.assert_close(pipe.predict(video), model(video), rtol=1e-10, atol=1e-12)


class _PooledAtTheEnd(nn.Module):
    """A frame-local conv, then a temporal pool, then the mean over time as the head."""

    def __init__(self, pool):
        super().__init__()
        self.conv = nn.Conv3d(2, 3, (1, 3, 3))
        self.pool = pool

    def forward(self, x):
        return self.pool(torch.tanh(self.conv(x))).mean((2, 3, 4))


@pytest.mark.parametrize("pool", [
    # ceil mode whose last window would start in the end padding (odd lengths): PyTorch drops it
    nn.MaxPool3d((2, 1, 1), stride=2, padding=(1, 0, 0), ceil_mode=True),
    nn.AvgPool3d((2, 1, 1), stride=2, padding=(1, 0, 0), ceil_mode=True),
    # floor mode whose last window reaches into the end padding: counted in the divisor
    nn.AvgPool3d((3, 1, 1), stride=2, padding=(1, 0, 0)),
    # a one-frame window with temporal stride 2: every other frame dropped, a temporal node
    # (rate 2), not a frame-local op
    nn.MaxPool3d((1, 2, 2), stride=(2, 2, 2)),
    nn.AvgPool3d((1, 2, 2), stride=(2, 2, 2)),
    lambda x: F.max_pool3d(x, (1, 2, 2), stride=(2, 2, 2)),
    lambda x: F.avg_pool3d(x, (1, 2, 2), stride=(2, 2, 2)),
], ids=["max-ceil", "avg-ceil", "avg-end-padding", "max-1-frame-stride-2", "avg-1-frame-stride-2",
        "F.max_pool3d-1-frame-stride-2", "F.avg_pool3d-1-frame-stride-2"])
def test_temporal_pools_end_the_clip_as_pytorch_does(pool):
    """The clip-end and stride rules the other pool tests cannot reach: ceil mode's dropped last
    window, an average over a window that overhangs the end padding, a temporal stride with a
    one-frame window."""
    model = _PooledAtTheEnd(pool).to(DT)
    pipe = SidewaysPipeline.from_model(model, example=_clip(1, 5, 5, 5, C=2))
    for T in (5, 6):
        video = _clip(2, T, 5, 5, C=2)
        with torch.no_grad():
            expected = model(video)
            assert pipe.output_length(T) == pool(model.conv(video)).shape[2]
        torch.testing.assert_close(pipe.predict(video), expected, rtol=1e-10, atol=1e-12)


class _StrideThenPool(nn.Module):
    """A 3-tap temporal conv of stride 2 ('same' padded), then a 2-frame max-pool: the pool runs
    at rate 2, so its own window lag of 1 sample is 2 input frames."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))
        self.pool = nn.MaxPool3d((2, 1, 1))

    def forward(self, x):
        return self.pool(self.conv(x))


def _newest_input(model, T: int) -> list[int]:
    """For each output frame of ``model`` on a T-frame clip, the newest input frame it depends
    on, found offline by perturbing one input frame at a time (both signs, so a max-pool's
    winner changes whichever way the conv's weights point)."""
    video = _clip(1, T, 2, 2, C=2)
    with torch.no_grad():
        base = model(video)
        newest = [-1] * base.shape[2]
        for t in range(T):
            for sign in (1.0, -1.0):
                moved = video.clone()
                moved[:, :, t] += sign * 100.0
                changed = (model(moved) - base).abs().amax((0, 1, 3, 4)) > 0
                for n in torch.nonzero(changed).flatten().tolist():
                    newest[n] = max(newest[n], t)
    return newest


def test_rates_and_lags_count_input_frames_after_a_stride():
    """DESIGN.md §5: (r, λ) -> (r·s, λ + r·(d·(k−1) − p)). conv k3 s2 p1 from (1, 0): (2, 0 + 1·(2 − 1)) =
    (2, 1); max-pool k2 s2 p0 after it: (4, 1 + 2·1) = (4, 3) — the pool's one sample of window lag
    is 2 input frames. Checked against the model: output n (first stride position n·4) depends on
    input frames up to n·4 + 3, found by perturbing input frames."""
    model = _StrideThenPool().to(DT)
    pipe = SidewaysPipeline.from_model(model, example=_clip(1, 8, 2, 2, C=2))
    graph = pipe.graph
    by_name = {node.name: node.index for node in graph.nodes}
    assert (graph.rate[by_name["conv"]], graph.lag[by_name["conv"]]) == (2, 1)
    assert (graph.rate[by_name["pool"]], graph.lag[by_name["pool"]]) == (4, 3)
    # causal: each strided window ends on the last frame of its stride group — the conv's pad (1, 1) -> (1, 0),
    # the pool's (0, 0) kept — so the lag stays 3, and output n still reads up to input n·4 + 3
    causal = SidewaysPipeline.from_model(model, temporal_padding="causal", example=_clip(1, 8, 2, 2, C=2))
    assert pipe.lag == 3 and pipe.lags == causal.lags == {"same": 3, "causal": 3}
    for run in (model, lambda video: causal.stages[0](video)):
        newest = _newest_input(run, 13)
        assert len(newest) == pipe.output_length(13) == causal.output_length(13) == 3
        assert newest == [n * 4 + pipe.lag for n in range(len(newest))]


class _MixThenTemporal(nn.Module):
    """A 1x1x1 conv under a padded 3-tap temporal conv: the error the temporal conv sends down
    is all the lower conv's weight gradient sees."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv3d(2, 3, 1)
        self.temporal = nn.Conv3d(3, 4, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x):
        return self.temporal(torch.tanh(self.mix(x)))


@pytest.mark.parametrize("padding", ["same", "causal"])
def test_sideways_sends_no_error_through_taps_that_read_padding(padding):
    """Oracle 4 at the clip's edges: on a static video Sideways' gradients are BP's exactly, the
    layer under a padded temporal conv included, only if the window's taps that read padding send
    no error down (BP drops their gradient; added onto the frame that arrived now, the lower
    layer's gradient here was off by the padding taps' share)."""
    torch.manual_seed(0)
    model = _MixThenTemporal().to(DT)
    video = torch.randn(2, 2, 1, 1, 1, dtype=DT).expand(-1, -1, 6, -1, -1).contiguous()  # static
    target = torch.randint(0, 4, (2,))
    grads = {}
    for mode in ("bp", "sideways"):
        model.zero_grad()
        pipe = SidewaysPipeline.from_model(model, loss_fn=F.cross_entropy, mode=mode, temporal_padding=padding,
                                           example=video[:1])
        pipe.backward_clip(video, target)
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    assert rel_error(grads["sideways"], grads["bp"]) <= 1e-12


def test_live_taps_are_those_that_read_the_clip():
    from sideways_kernels.nn import live_taps
    assert live_taps(0, 3, 1, 16) == (False, False, True)  # the clip's first window, causal
    assert live_taps(15, 3, 1, 16) is None  # all read frames 13-15
    assert live_taps(16, 3, 1, 16) == (True, True, False)  # 'same': one tap of end padding
    assert live_taps(2, 3, 2, 1) == (False, True, False)  # dilation 2 on a 1-frame clip


class _TimeAxisMoves(nn.Module):
    """The time axis moved by transpose, unsqueeze, indexing, chunk, stack, squeeze and permute,
    sizes read from other axes, and amax over time as the head pool (a max head)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, (2, 3, 3), padding=(1, 1, 1))
        self.fc = nn.Linear(2, 5)

    def trunk(self, x):
        """Per-frame features [B, T, 2, H, W]: time at dim 1."""
        y = torch.tanh(self.conv(x)).transpose(1, 2)  # [B, T, 4, H, W]
        y = y.unsqueeze(1)[:, 0, :, 1:] / y.size(2)  # [B, T, 3, H, W]
        a, b = y.chunk(2, dim=2)  # [B, T, 2, H, W], [B, T, 1, H, W]
        y = torch.stack([a[:, :, :1], b * a[:, :, 1:]], dim=1).squeeze(3)  # [B, 2, T, H, W]
        return y.permute(0, 2, 1, 3, 4) + y.shape[3]

    def forward(self, x):
        return self.fc(self.trunk(x).amax(1).mean((2, 3)))

    def frames(self, x):
        f = self.trunk(x)
        return [self.fc(f[:, t].mean((2, 3))) for t in range(f.shape[1])]


def test_the_time_axis_is_followed_wherever_it_moves():
    """predict == the model, and bp == autograd, when the time axis changes place (a converter
    that lost it would refuse the model or pool the wrong axis)."""
    model = _TimeAxisMoves().to(DT)
    video, target = _clip(2, 5, 4, 4), torch.randint(0, 5, (2,))
    pipe = SidewaysPipeline.from_model(model, mode="bp", example=video[:1])
    with torch.no_grad():
        torch.testing.assert_close(pipe.predict(video), model(video), rtol=1e-10, atol=1e-12)
    model.zero_grad()
    objective(model.frames(video), target).backward()
    expected = _grads(model)
    model.zero_grad()
    pipe.backward_clip(video, target)
    assert rel_error(_grads(model), expected) <= 1e-9


# --- bp mode == autograd of the per-frame objective ----------------------------------------------

@pytest.mark.parametrize("name", TORCHVISION)
def test_bp_mode_is_autograd_on_torchvision_models(name):
    model = _torchvision(name)
    video, target = _clip(2, 17, 28, 24), torch.randint(0, 5, (2,))
    model.zero_grad()
    loss = objective(_frames_of(name)(model, video), target)
    loss.backward()
    expected = _grads(model)
    model.zero_grad()
    pipe = SidewaysPipeline.from_model(model, stages=3, mode="bp", example=video[:1])
    result = pipe.backward_clip(video, target)
    assert abs(result.loss.item() - loss.item()) <= 1e-9 * abs(loss.item())
    assert rel_error(_grads(model), expected) <= 1e-9


@pytest.mark.parametrize("model_cls", [Branches, Residuals, Pools, NoPadding], ids=lambda c: c.__name__)
@pytest.mark.parametrize("n_stages", [1, 3])
def test_bp_mode_is_autograd_on_odd_topologies(model_cls, n_stages):
    model = randomize_norms(model_cls().to(DT)).eval()
    video = _clip(2, 13 if model_cls is not NoPadding else 12, 8, 9)
    frames = model.frames(video)
    target = torch.randint(0, frames[0].shape[1], (2, len(frames)))  # a per-frame target
    model.zero_grad()
    objective(frames, target, per_frame=True).backward()
    expected = _grads(model)
    model.zero_grad()
    pipe = SidewaysPipeline.from_model(model, stages=n_stages, mode="bp", example=video[:1])
    pipe.backward_clip(video, target)
    assert rel_error(_grads(model), expected) <= 1e-9


# --- Sideways -----------------------------------------------------------------------------------

def _sideways_gap(pipe, model, video, target) -> float:
    """The relative gap between the Sideways gradients of a clip and its bp (autograd) ones."""
    g = {}
    for mode in ("bp", "sideways"):
        model.zero_grad()
        pipe.mode = mode
        pipe.backward_clip(video, target)
        g[mode] = _grads(model)
    return rel_error(g["sideways"], g["bp"])


@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
def test_sideways_is_exact_on_a_static_video_without_temporal_padding(n_stages):
    """Oracle 4 with equal-lag branches, a strided residual whose branches emit on different
    ticks (the shortcut's error waits for its next firing), temporal max-pool and a pooled head;
    a moving video must then differ (Sideways is not silently BP)."""
    model = randomize_norms(NoPadding().to(DT)).eval()
    target = torch.randint(0, 7, (2,))
    static = torch.randn(2, 3, 1, 9, 10, dtype=DT).expand(-1, -1, 16, -1, -1)
    moving = _clip(2, 16, 9, 10)
    pipe = SidewaysPipeline.from_model(model, stages=n_stages, example=static[:1])
    gaps = [_sideways_gap(pipe, model, video, target) for video in (static, moving)]
    assert gaps[0] <= 1e-9, gaps
    assert gaps[1] > 1e-3, gaps


class _EvenIntoStridedPool(TrunkWithPooledHead):
    """A strided temporal max-pool that an even clip fills exactly (no partial last window),
    between frame-local layers, and a pooled head; no temporal padding anywhere."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))
        self.pool = nn.MaxPool3d((2, 1, 1), stride=(2, 1, 1))
        self.b = nn.Conv3d(4, 4, 1)
        self.c = nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Linear(4, 5)

    def trunk(self, x):
        x = self.pool(torch.tanh(self.a(x)))
        return torch.tanh(self.c(torch.tanh(self.b(x))))


@pytest.mark.parametrize("n_stages", [2, 3])
def test_a_pool_that_the_clip_fills_exactly_holds_its_last_window_in_the_drain(n_stages):
    """Oracle 4 where a strided temporal pool's last window ends on the clip's last frame: past
    the end it emits that window again (a stage that has produced its last frame holds it), so
    the errors reaching it in the drain still flow; a window past the clip would read no frame."""
    model = _EvenIntoStridedPool().to(DT)
    target = torch.randint(0, 5, (2,))
    static = torch.randn(2, 3, 1, 5, 6, dtype=DT).expand(-1, -1, 8, -1, -1)
    pipe = SidewaysPipeline.from_model(model, stages=n_stages, example=static[:1])
    assert _sideways_gap(pipe, model, static, target) <= 1e-9


class _HeldSkip(TrunkWithPooledHead):
    """A residual around a "same"-padded 3-tap temporal conv, whose skip waits a sample in a delay
    line; with ``identity``, the skip passes an identity 3-tap conv of the same lag instead
    (nothing held: the join's inputs arrive together)."""

    def __init__(self, identity=False):
        super().__init__()
        self.stem = nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))
        self.c = nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0))
        self.d = nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Linear(4, 5)
        self.identity = nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0), bias=False) if identity else None
        if identity:
            with torch.no_grad():
                self.identity.weight.zero_()[:, :, 1, 0, 0] = torch.eye(4)

    def trunk(self, x):
        y = torch.tanh(self.stem(x))
        skip = y if self.identity is None else self.identity(y)
        return torch.tanh(self.d(torch.tanh(self.c(y) + skip)))


@pytest.mark.parametrize("cuts", [[], ["tanh"], ["tanh", "tanh_1"], ["tanh_1"]], ids=str)
def test_a_delay_line_s_sideways_backward_is_an_identity_conv_s(cuts, monkeypatch):
    """DESIGN.md: a delay line's backward is the same delay. A held skip's error goes to its
    producer's fresh sample — or, where the skip is the stage's input, down with the stage's
    error — exactly as through an identity conv of the skip's lag: the same Sideways gradients
    on a moving video, with the stages cut after the same nodes (after the stem's tanh, the skip
    crosses into the join's stage and is held there)."""
    torch.manual_seed(0)
    video, target = _clip(2, 9, 5, 6), torch.randint(0, 5, (2,))
    held, through_conv = _HeldSkip().to(DT), _HeldSkip(identity=True).to(DT)
    through_conv.load_state_dict(held.state_dict(), strict=False)
    grads = []
    for model in (held, through_conv):
        names = [node.name for node in trace_model(model, None, "same")[0].nodes]
        monkeypatch.setattr(pipeline, "balance", lambda costs, points, stages: [names.index(c) for c in cuts])
        pipe = SidewaysPipeline.from_model(model, stages=len(cuts) + 1, example=video[:1])
        model.zero_grad()
        pipe.backward_clip(video, target)
        grads.append([p.grad for name, p in model.named_parameters() if not name.startswith("identity")])
    assert rel_error(grads[0], grads[1]) <= 1e-12


def test_sideways_gap_grows_with_the_drift_rate_on_a_graph():
    """Oracle 5 through a stride, a phase-offset residual and a pool: frame t = A + s·t·D (an
    average pool: a max-pool's argmax flips make the gap jumpy, as ReLU masks do)."""
    model = randomize_norms(NoPadding(pool="avg").to(DT)).eval()
    pipe = SidewaysPipeline.from_model(model, stages=3)
    A, D = torch.randn(2, 3, 1, 9, 10, dtype=DT), torch.randn(2, 3, 1, 9, 10, dtype=DT)
    target = torch.randint(0, 7, (2,))
    gaps = []
    for s in (0.0, 0.01, 0.02, 0.04, 0.08):
        video = A + s * torch.arange(16, dtype=DT).view(1, 1, 16, 1, 1) * D
        g = {}
        for mode in ("bp", "sideways"):
            model.zero_grad()
            pipe.mode = mode
            pipe.backward_clip(video, target)
            g[mode] = torch.cat([x.flatten() for x in _grads(model)])
        gaps.append(((g["sideways"] - g["bp"]).norm() / g["bp"].norm()).item())
    assert gaps[0] <= 1e-9 and gaps[1] > 1e-5, gaps
    assert all(b > a for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] >= 4 * gaps[1], gaps


@pytest.mark.parametrize("name", TORCHVISION)
def test_sideways_runs_on_torchvision_models(name):
    model = _torchvision(name)
    video, target = _clip(2, 16, 24, 24), torch.randint(0, 5, (2,))
    pipe = SidewaysPipeline.from_model(model, stages=3, example=video[:1])
    model.zero_grad()
    result = pipe.backward_clip(video, target)
    sideways = _grads(model)
    assert all(torch.isfinite(g).all() for g in sideways) and any(g.abs().sum() > 0 for g in sideways)
    model.zero_grad()
    pipe.mode = "bp"
    torch.testing.assert_close(pipe.backward_clip(video, target).loss, result.loss, rtol=1e-12, atol=0)  # one forward
    assert rel_error(sideways, _grads(model)) > 1e-3  # a moving video: not BP
    assert pipe.last_ticks == pipe.total_ticks(16, "bp")


def test_single_stage_whose_only_temporal_layer_is_first_is_exact():
    """Oracle 4's other case, now with a residual of frame-local layers, BatchNorm and a pooled
    head after the one temporal conv: exact even on a moving video."""
    model = randomize_norms(FirstTemporalThenLocal(pad_t=2).to(DT)).eval()
    video, target = _clip(2, 7, 6, 5), torch.randint(0, 5, (2,))
    model.zero_grad()
    objective(model.frames(video), target).backward()
    expected = _grads(model)
    model.zero_grad()
    SidewaysPipeline.from_model(model).backward_clip(video, target)
    assert rel_error(_grads(model), expected) <= 1e-9


# --- BatchNorm in training mode -------------------------------------------------------------------

class _FrameBN(nn.Module):
    """The 'frame' policy offline: the BatchNorm applied to each frame on its own."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return torch.cat([self.bn(x[:, :, t:t + 1]) for t in range(x.shape[2])], dim=2)


def _swap_norms(model, wrap):
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm3d):
            setattr(model, name, wrap(child))
        else:
            _swap_norms(child, wrap)


def _odd_norms(model: nn.Module) -> nn.Module:
    """Residuals' two BatchNorms with what no default has: models.s3d's momentum 0.001, a
    cumulative average (momentum None), and eps other than 1e-5."""
    model.bn1.momentum, model.bn1.eps = 0.001, 1e-3
    model.bn2.momentum, model.bn2.eps = None, 1e-2
    return model


@pytest.mark.parametrize("mode", ["bp", "sideways"])
def test_batchnorm_frame_policy(mode):
    """Per-frame batch statistics over (B, H, W): bp is autograd of the model whose BatchNorms
    normalise each frame alone (running buffers updated once per frame, in order, with the
    module's own momentum — also None, a cumulative average — and eps; num_batches_tracked
    counts the frames), and Sideways updates the running buffers exactly as bp does (the drain's
    held samples update nothing)."""
    torch.manual_seed(torch.initial_seed() % 1000)
    model = _odd_norms(randomize_norms(Residuals().to(DT)).train())
    reference = _odd_norms(randomize_norms(Residuals().to(DT)).train())
    reference.load_state_dict(model.state_dict())
    _swap_norms(reference, _FrameBN)
    video, target = _clip(3, 11, 8, 7), torch.randint(0, 6, (3,))
    pipe = SidewaysPipeline.from_model(model, stages=2, mode=mode, batchnorm="frame", example=video[:1])
    for m in model.modules():  # the probe must not have touched the running statistics
        if isinstance(m, nn.BatchNorm3d):
            assert not torch.equal(m.running_var, torch.ones_like(m.running_var))
    buffers = lambda m: {k.replace(".bn.", "."): v.clone() for k, v in m.state_dict().items()
                         if "running" in k or "num_batches" in k}
    buffers_before = buffers(model)
    reference.zero_grad()
    objective(reference.frames(video), target).backward()
    model.zero_grad()
    pipe.backward_clip(video, target)
    expected = buffers(reference)
    assert expected["bn1.num_batches_tracked"] == 11 and expected["bn2.num_batches_tracked"] == 6  # frames seen
    for k, v in buffers(model).items():
        torch.testing.assert_close(v, expected[k], rtol=1e-12, atol=1e-12)
        assert not torch.equal(v, buffers_before[k])
    if mode == "bp":
        assert _global_rel(_grads(model), _grads(reference)) <= 1e-9


class _Writes(TorchDispatchMode):
    """How many ATen ops write into each of ``tensors`` (in place or as ``out``)."""

    def __init__(self, tensors: dict):
        super().__init__()
        self.tensors, self.count = tensors, dict.fromkeys(tensors, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        mutated = [a for a, arg in zip(args, func._schema.arguments) if arg.alias_info is not None
                   and arg.alias_info.is_write]
        mutated += [v for k, v in (kwargs or {}).items() if k == "out"]
        for name, t in self.tensors.items():
            if any(isinstance(a, torch.Tensor) and a.data_ptr() == t.data_ptr() for a in mutated):
                self.count[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["bp", "sideways"])
def test_a_batchnorm_with_a_momentum_is_counted_once_a_run_not_once_a_frame(mode):
    """num_batches_tracked of a BatchNorm with a momentum (it does not steer the update) is
    advanced by the engine when the run ends — one add for the run's frames, not one kernel per
    frame per norm in every tick (~20 launches a tick of a converted r3d_18); with momentum None
    (a cumulative average by the count) the module counts each frame itself, as before. The
    counts themselves: test_batchnorm_frame_policy."""
    model = _odd_norms(randomize_norms(Residuals().to(DT)).train())
    video, target = _clip(3, 11, 8, 7), torch.randint(0, 6, (3,))
    pipe = SidewaysPipeline.from_model(model, stages=2, mode=mode, batchnorm="frame", example=video[:1])
    before = {name: getattr(model, name).num_batches_tracked.item() for name in ("bn1", "bn2")}
    with _Writes({name: getattr(model, name).num_batches_tracked for name in ("bn1", "bn2")}) as writes:
        pipe.backward_clip(video, target)
    assert writes.count == {"bn1": 1, "bn2": 6}  # bn2: momentum None
    assert {name: getattr(model, name).num_batches_tracked.item() - before[name] for name in before} == \
        {"bn1": 11, "bn2": 6}


def test_a_tick_adds_a_stage_s_parameter_gradients_in_one_launch_with_autograd_s_sums(monkeypatch):
    """A stage's Sideways backward hands its parameters' gradients (BatchNorm's, the classifier's;
    not a SidewaysConv3d's, which its ops write) to one foreach add into the gradients so far, not
    one AccumulateGrad add_ each: the same gradients to the bit as autograd accumulating them, in
    the same tensors (an optimizer may hold them), over two clips; a parameter whose accumulation a
    hook watches keeps autograd's own."""
    from sideways_kernels import engine
    model = randomize_norms(Residuals().to(DT)).train()
    twin = Residuals().to(DT).train()
    twin.load_state_dict(model.state_dict())
    video, target = _clip(3, 11, 8, 7), torch.randint(0, 6, (3,))
    seen = []
    model.fc.bias.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    twin_seen = []
    twin.fc.bias.register_post_accumulate_grad_hook(lambda p: twin_seen.append(p.grad.clone()))
    pipe = SidewaysPipeline.from_model(model, stages=2, batchnorm="frame", example=video[:1])
    watched = {name: p for name, p in model.named_parameters() if "bn" in name or name == "fc.weight"}

    class Adds(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.add_, self.foreach, self.into = 0, 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.add_.Tensor and any(args[0] is p.grad for p in watched.values()):
                self.add_ += 1
            if func is torch.ops.aten._foreach_add_.List:
                self.foreach += 1
                self.into += [id(t) for t in args[0]]
            return func(*args, **(kwargs or {}))

    with Adds() as adds:
        pipe.backward_clip(video, target)
    grads = {name: p.grad for name, p in watched.items()}
    pipe.backward_clip(video.flip(2), target)
    assert all(p.grad is grads[name] for name, p in watched.items())  # accumulated in place
    assert adds.add_ == 0 and adds.foreach > 0
    assert set(adds.into) == {id(p.grad) for p in watched.values()}  # (the convs' gradients: their ops')
    monkeypatch.setattr(engine.Engine, "_accumulating_once", lambda self, k: contextlib.nullcontext())
    per_parameter = SidewaysPipeline.from_model(twin, stages=2, batchnorm="frame", example=video[:1])
    per_parameter.backward_clip(video, target)
    per_parameter.backward_clip(video.flip(2), target)
    twins = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, twins[name].grad), name
    assert len(seen) == len(twin_seen) > 2 and all(torch.equal(a, b) for a, b in zip(seen, twin_seen))


def test_every_stage_s_batchnorms_are_counted_and_the_count_survives_a_run_ended_early():
    """The engine counts the norms of every stage it runs (bn2 lives in the second), a run closed
    before its end still adds the frames it ran (a stream the caller stops), and a BatchNorm
    subclass with a forward of its own counts itself."""
    model = randomize_norms(Residuals().to(DT)).train()
    video, target = _clip(3, 11, 8, 7), torch.randint(0, 6, (3,))
    pipe = SidewaysPipeline.from_model(model, stages=2, batchnorm="frame", example=video[:1])
    counts = lambda: [m.num_batches_tracked.item() for m in (model.bn1, model.bn2)]
    start = counts()
    pipe.backward_clip(video, target)
    assert [a - b for a, b in zip(counts(), start)] == [11, 6]
    start, mean = counts(), model.bn1.running_mean.clone()
    stream = pipe.stream(video)
    next(stream)
    stream.close()
    assert not torch.equal(model.bn1.running_mean, mean) and counts()[0] > start[0]

    class OwnForward(nn.BatchNorm3d):
        def forward(self, x):
            assert self.num_batches_tracked is not None
            return super().forward(x)
    model = Residuals().to(DT).train()
    model.bn1 = OwnForward(model.bn1.num_features).to(DT)
    pipe = SidewaysPipeline.from_model(model, stages=2, batchnorm="frame", example=video[:1])
    pipe.backward_clip(video, target)
    assert model.bn1.num_batches_tracked.item() == 11


def test_a_stage_called_as_a_module_counts_its_batchnorms_as_the_model_does():
    """Outside a run (a GraphStage called on a clip in training mode) a BatchNorm counts itself:
    only a run that counts its frames has it skip the count. A forward that fails inside a run
    leaves the counter in place."""
    model = randomize_norms(Residuals().to(DT)).train()
    video = _clip(2, 9, 8, 7)
    pipe = SidewaysPipeline.from_model(model, stages=2, batchnorm="frame", example=video[:1])
    twin = Residuals().to(DT).train()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        composed = video
        for stage in pipe.stages:
            composed = stage(composed)
        twin(video)
    assert model.bn1.num_batches_tracked.item() == twin.bn1.num_batches_tracked.item() == 1
    pipe.backward_clip(video, torch.zeros(2, dtype=torch.long))  # a run counts for the norms, then no longer
    counted = model.bn1.num_batches_tracked.item()
    with torch.no_grad():
        pipe.stages[0](video)
    assert model.bn1.num_batches_tracked.item() == counted + 1
    counter = model.bn1.num_batches_tracked
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # B1 1x1 frames: nothing to normalise
        SidewaysPipeline.from_model(model, stages=2, batchnorm="frame", example=video[:1]).backward_clip(
            _clip(1, 8, 1, 1), torch.zeros(1, dtype=torch.long))
    assert model.bn1.num_batches_tracked is counter


class _RecordPools(TorchDispatchMode):
    """The ATen ops of batch norms and pools, each with its input's number of dims."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if ("pool" in name or "batch_norm" in name) and "backward" not in name:
            self.ops.append((name, args[0].dim()))
        return func(*args, **(kwargs or {}))


def test_batchnorm_runs_on_4d_frames_and_hooks_still_see_the_5d_frame():
    """PyTorch's fast per-channel BatchNorm kernels (CUDA) take 4-D channels-last tensors, not
    5-D: every batch_norm of a streamed frame gets [B, C, H, W] (same numbers: the policies'
    tests above), under every policy — and a hook on the BatchNorm still runs on every frame
    and sees the 5-D frame, as the model calls it."""
    torch.manual_seed(torch.initial_seed() % 1000)
    model = randomize_norms(Residuals().to(DT)).train()
    video, target = _clip(2, 6, 6, 5), torch.randint(0, 6, (2,))
    seen = []
    model.bn1.register_forward_hook(lambda m, i, o: seen.append(i[0].dim()))
    for policy in ("frame", "frozen"):
        pipe = SidewaysPipeline.from_model(model, stages=2, batchnorm=policy, example=video[:1])
        with _RecordPools() as rec:
            pipe.backward_clip(video, target)
        norms = [d for name, d in rec.ops if "batch_norm" in name]
        assert norms and set(norms) == {4}, (policy, rec.ops)
    assert seen and set(seen) == {5}


def test_pools_within_a_frame_run_as_2d_pools_in_graphs_and_chains():
    """A max/avg pool that does not reach across frames streams as the 2-D pool of the 4-D frame
    (PyTorch's NHWC kernels; same numbers: ``Pools`` in the exactness tests), in a converted
    model and in a stage of the list API, the module's hooks seeing the 5-D frame; a pool over
    time stays 3-D."""
    model = _PooledAtTheEnd(nn.Sequential(nn.MaxPool3d((1, 2, 2)), nn.AvgPool3d((1, 3, 3), stride=1, padding=(0, 1, 1)),
                                          nn.MaxPool3d((2, 1, 1), stride=1))).to(DT)
    seen = []
    model.pool[0].register_forward_hook(lambda m, i, o: seen.append(i[0].dim()))
    video, target = _clip(2, 5, 8, 8, C=2), torch.randint(0, 3, (2,))
    with _RecordPools() as rec:
        SidewaysPipeline.from_model(model, stages=2, example=video[:1]).backward_clip(video, target)
    assert set(rec.ops) == {("max_pool2d_with_indices", 4), ("avg_pool2d", 4), ("max_pool3d_with_indices", 5)}, \
        set(rec.ops)
    assert seen and set(seen) == {5}
    chain = [nn.Sequential(SidewaysConv3d(2, 3, 3, padding=1), nn.MaxPool3d((1, 2, 2)), nn.BatchNorm3d(3).eval()),
             nn.Sequential(SidewaysConv3d(3, 2, 1), nn.AvgPool3d((1, 2, 2)))]
    with _RecordPools() as rec:
        list(SidewaysPipeline([s.to(DT) for s in chain]).stream(video))
    assert set(rec.ops) == {("max_pool2d_with_indices", 4), ("avg_pool2d", 4), ("native_batch_norm", 4)}, set(rec.ops)


_FRAME_POOLS = [
    lambda x: F.max_pool3d(x, (1, 2, 2), ceil_mode=True),
    lambda x: F.max_pool3d(x, (1, 3, 3), (1, 2, 1), (0, 1, 1), (1, 2, 1)),
    lambda x: F.max_pool3d(x, (1, 2, 2), stride=(2, 2, 2)),
    lambda x: F.avg_pool3d(x, (1, 2, 2), ceil_mode=True),
    lambda x: F.avg_pool3d(x, (1, 3, 3), 1, (0, 1, 1), count_include_pad=False),
    lambda x: F.avg_pool3d(x, (1, 2, 2), 1, divisor_override=3),
    lambda x: F.avg_pool3d(x, (2, 1, 1), 1),  # reaches across frames: refused on one frame, 2-D or not
    lambda x: F.max_pool3d(x, (1, 2, 2), return_indices=True)[1],
    lambda x: F.batch_norm(x, None, None, training=True),
]


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("i", range(len(_FRAME_POOLS)))
def test_frame_kernels_compute_the_function_they_replace(i, T):
    """Under FrameKernels each pool and batch norm gives what the 5-D call gives (odd sizes, so
    ceil mode changes the shape), on one frame and on several (which it leaves alone), and
    raises where that raises."""
    from sideways_kernels.graph import FrameKernels
    x = torch.randn(2, 3, T, 7, 7, dtype=torch.float64)

    def run():
        try:
            return _FRAME_POOLS[i](x)
        except RuntimeError as e:
            return type(e)
    with FrameKernels():
        got = run()
    expected = run()
    if isinstance(expected, type):
        assert got is expected
    else:
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class _PerFrameNorm(nn.Module):
    """The 'frame' policy written out: each frame normalised by its own (B, H, W) mean and
    biased variance, then scaled and shifted — plain frame-local ops, streamed as such."""

    def __init__(self, bn):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps

    def forward(self, x):
        mean = x.mean((0, 3, 4), keepdim=True)
        var = ((x - mean) ** 2).mean((0, 3, 4), keepdim=True)
        shape = (1, -1, 1, 1, 1)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def test_batchnorm_frame_policy_in_sideways_mode_is_the_per_frame_normalisation():
    """No offline model gives Sideways gradients, but the same network with each BatchNorm
    written out as per-frame normalisation does: the policy must equal it on every sample it
    is run on, the drain's held samples included (where it updates no buffer but still
    normalises, scales and shifts)."""
    torch.manual_seed(torch.initial_seed() % 1000)
    model = _odd_norms(randomize_norms(Residuals().to(DT)).train())
    written_out = _odd_norms(Residuals().to(DT))
    written_out.load_state_dict(model.state_dict())
    _swap_norms(written_out, _PerFrameNorm)
    video, target = _clip(2, 9, 6, 5), torch.randint(0, 6, (2,))
    got = {}
    for net, policy in ((model, "frame"), (written_out, None)):
        net.zero_grad()
        SidewaysPipeline.from_model(net, stages=2, batchnorm=policy, example=video[:1]).backward_clip(video, target)
        got[policy] = {k: p.grad.clone() for k, p in net.named_parameters()}
    assert list(got["frame"]) == list(got[None])
    assert _global_rel(list(got["frame"].values()), list(got[None].values())) <= 1e-9


def test_batchnorm_frozen_policy_in_sideways_mode_is_the_eval_mode_normalisation():
    """The frozen policy is the network with each BatchNorm in eval mode (running statistics),
    streamed as frame-local ops: its Sideways gradients must equal that network's on every sample,
    the drain's held samples included (they too are normalised with the running statistics)."""
    torch.manual_seed(torch.initial_seed() % 1000)
    model = _odd_norms(randomize_norms(Residuals().to(DT)).train())
    evaluated = _odd_norms(Residuals().to(DT)).train()
    evaluated.load_state_dict(model.state_dict())
    for m in evaluated.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.eval()
    video, target = _clip(2, 9, 6, 5), torch.randint(0, 6, (2,))
    got = {}
    for net, policy in ((model, "frozen"), (evaluated, None)):
        net.zero_grad()
        SidewaysPipeline.from_model(net, stages=2, batchnorm=policy, example=video[:1]).backward_clip(video, target)
        got[policy] = {k: p.grad.clone() for k, p in net.named_parameters()}
    assert model.training and model.bn1.training and not evaluated.bn1.training
    assert list(got["frozen"]) == list(got[None])
    assert _global_rel(list(got["frozen"].values()), list(got[None].values())) <= 1e-9


def test_batchnorm_frozen_policy_and_refusal():
    model = _odd_norms(randomize_norms(Residuals().to(DT))).train()
    video, target = _clip(2, 9, 8, 7), torch.randint(0, 6, (2,))
    with pytest.raises(StreamingError, match=r"module 'bn1' \(BatchNorm3d\).*batchnorm='frame'.*'frozen'"):
        SidewaysPipeline.from_model(model, stages=2, example=video[:1])
    # built in eval mode, then switched to training: refused at the next clip, nothing changed
    model.eval()
    pipe = SidewaysPipeline.from_model(model, stages=2, example=video[:1])
    model.train()
    with pytest.raises(StreamingError, match="training mode"):
        pipe.backward_clip(video, target)
    # frozen: running statistics, unchanged, the affine parameters trained: the eval-mode objective
    frozen = SidewaysPipeline.from_model(model, stages=2, mode="bp", batchnorm="frozen", example=video[:1])
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert any("num_batches" in k for k in before)
    model.zero_grad()
    frozen.backward_clip(video, target)
    got = _grads(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model.eval()
    model.zero_grad()
    objective(model.frames(video), target).backward()
    assert rel_error(got, _grads(model)) <= 1e-9


# --- refusals -----------------------------------------------------------------------------------

class _Op(nn.Module):
    def __init__(self, fn, extra=None):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, (3, 3, 3), padding=1)
        self.extra = extra
        self.fn = fn

    def forward(self, x):
        return self.fn(self, self.conv(x))


class _SE(nn.Module):
    """Squeeze-excitation over (T, H, W)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 1)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Conv3d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.sigmoid(self.fc(self.pool(y)))


class _Recurrent(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 1)
        self.layer = layer

    def forward(self, x):
        y = self.conv(x).mean((3, 4)).permute(0, 2, 1)  # [B, T, C]
        out = self.layer(y, y, y) if isinstance(self.layer, nn.MultiheadAttention) else self.layer(y)
        return out[0]


@pytest.mark.parametrize("model,words", [
    (_Op(lambda m, y: y.flip(2)), r"node 'flip' \(method .flip\): flip along the time axis"),
    (_Op(lambda m, y: torch.cumsum(y, dim=2)), r"cumsum.*cannot prove it frame-local"),
    (_Op(lambda m, y: y[:, :, 1:]), r"indexes the time axis"),
    (_Op(lambda m, y: y.reshape(y.shape[0], y.shape[2], -1)), r"reads the number of frames"),
    (_Op(lambda m, y: y.reshape(y.shape[0], -1)), r"reshape of a tensor with a time axis"),
    (_Op(lambda m, y: y.view(2, -1, 4)), r"view of a tensor with a time axis"),
    (_Op(lambda m, y: y.sum(2)), r"sum over the time axis"),
    (_Op(lambda m, y: y * y.size(2)), r"reads the number of frames"),
    (_Op(lambda m, y: m.extra(y), nn.AdaptiveAvgPool3d((2, 1, 1))), r"module 'extra'.*adaptive pooling to 2 frames"),
    (_Op(lambda m, y: m.extra(y), nn.Dropout3d()), r"module 'extra' \(Dropout3d\).*every frame at once"),
    (_Op(lambda m, y: m.extra(y), nn.GroupNorm(2, 4)), r"module 'extra' \(GroupNorm\).*mixes frames"),
    (_Op(lambda m, y: y.flatten(1)), r"flattens the time axis"),
    (_Op(lambda m, y: y.flatten(2)), r"flattens the time axis"),
    (_Op(lambda m, y: y.flip(-3)), r"flip along the time axis"),
    (_Op(lambda m, y: y * y.shape[-3]), r"reads the number of frames"),
    (_Op(lambda m, y: y + y.mean(4)), r"not aligned"),  # [B, C, T, H] broadcast against [B, C, T, H, W]
    (_Op(lambda m, y: m.extra(y.transpose(2, 4)), nn.Linear(4, 3)), r"module 'extra' \(Linear\).*over the time axis"),
    (_Op(lambda m, y: m.extra(y), nn.LayerNorm((4, 5, 5))), r"module 'extra' \(LayerNorm\).*over the time axis"),
    (_Op(lambda m, y: m.extra(y), nn.ConvTranspose3d(4, 4, (1, 3, 3), padding=1)), r"module 'extra'.*no streaming rule"),
    (_SE(), r"node 'mul'.*'pool', which pools over all frames.*squeeze-excitation"),
    (_Recurrent(nn.LSTM(4, 4, batch_first=True)), r"module 'layer' \(LSTM\).*recurrent or attention"),
    (_Recurrent(nn.MultiheadAttention(4, 2, batch_first=True)), r"module 'layer' \(MultiheadAttention\)"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_what_cannot_stream_is_refused_by_name(model, words):
    with pytest.raises(StreamingError, match=words):
        SidewaysPipeline.from_model(model.to(DT), example=_clip(1, 4, 5, 5))


@pytest.mark.parametrize("fn", [
    lambda m, y: y.flatten(0, 1).mean(1),  # the time axis moved by a flatten before it, then pooled
    lambda m, y: y.mean(1).amax(1),  # the time axis moved by a reduction before it
    lambda m, y: (y + 2 * y.relu_()).mean((2, 3, 4)),  # an in-place op read by another node after it
], ids=["flatten-before", "reduce-before", "in-place"])
def test_ops_around_the_time_axis_stream_as_the_model_computes(fn):
    model = _Op(fn).to(DT)
    video = _clip(2, 6, 5, 5)
    pipe = SidewaysPipeline.from_model(model, example=video[:1])
    with torch.no_grad():
        torch.testing.assert_close(pipe.predict(video), model(video), rtol=1e-10, atol=1e-12)


def test_other_refusals():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y
    with pytest.raises(StreamingError, match="one video tensor"):
        SidewaysPipeline.from_model(TwoInputs())

    class Tuple(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(3, 3, 1)

        def forward(self, x):
            return self.conv(x), x
    with pytest.raises(StreamingError, match="one tensor"):
        SidewaysPipeline.from_model(Tuple())

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(3, 3, (3, 1, 1), padding=(1, 0, 0))

        def forward(self, x):
            return self.conv(self.conv(x))
    with pytest.raises(StreamingError, match="called at two places"):
        SidewaysPipeline.from_model(Twice())

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x
    with pytest.raises(StreamingError, match="could not trace Branchy"):
        SidewaysPipeline.from_model(Branchy())
    with pytest.raises(ValueError, match="at most 1 stages"):
        SidewaysPipeline.from_model(nn.Sequential(nn.Conv3d(3, 3, 1)), stages=2)
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        SidewaysPipeline.from_model(Residuals(), batchnorm="per-frame")
    with pytest.raises(ValueError, match="balance_by must be 'flops' or 'time', got 'memory'"):
        SidewaysPipeline.from_model(Residuals(), balance_by="memory")
    statless = nn.Sequential(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4, track_running_stats=False), nn.AdaptiveAvgPool3d(1))
    with pytest.raises(StreamingError, match="no running statistics"):
        SidewaysPipeline.from_model(statless, batchnorm="frozen")
    stages = SidewaysPipeline.from_model(Residuals().to(DT).eval(), stages=2, example=_clip(1, 6, 8, 9)).stages
    with pytest.raises(ValueError, match="one call, in order"):
        SidewaysPipeline(list(stages)[::-1])


def test_clip_lengths_a_join_cannot_take_and_too_short_clips():
    model = randomize_norms(NoPadding().to(DT)).eval()
    pipe = SidewaysPipeline.from_model(model, stages=2)
    with pytest.raises(ValueError, match="does not fit this network.*'add' joins inputs of 5 and 6 frames"):
        pipe.backward_clip(_clip(2, 13, 9, 10), torch.randint(0, 7, (2,)))
    need = pipe.min_clip_length()
    with pytest.raises(ValueError, match=f"needs at least {need}"):
        pipe.predict(_clip(1, need - 2, 9, 10))
    pipe.predict(_clip(1, need, 9, 10))


# --- everything that works on chains works on graphs ----------------------------------------------

def test_parameters_optimizer_and_state_dict_stay_the_models():
    model = randomize_norms(Residuals().to(DT)).eval()
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = SidewaysPipeline.from_model(model, stages=3)
    assert list(model.state_dict()) == keys
    assert {id(p) for p in pipe.parameters()} == {id(p) for p in model.parameters()}
    video = _clip(2, 9, 8, 7)
    with torch.no_grad():
        composed = video
        for stage in pipe.stages:  # a stage called on a clip is its part of the model
            composed = stage(composed)
        torch.testing.assert_close(composed, model(video), rtol=1e-12, atol=1e-12)
    before = [p.detach().clone() for p in model.parameters()]
    pipe.backward_clip(video, torch.randint(0, 6, (2,)))
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_tick_update_on_a_graph_equals_sgd_after_every_frame():
    """One stage whose only temporal layer is first (exact pairing): per-tick SGD through a
    residual, BatchNorm and a pooled head equals, frame by frame, the offline per-frame loss and
    torch.optim.SGD.step (the conv's gradient never materialised)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Conv3d(3, 4, (2, 3, 3), padding=(1, 1, 1))
            self.a = nn.Conv3d(4, 4, 1)
            self.fc = nn.Linear(4, 5)

        def trunk(self, x):
            x = torch.tanh(self.t(x))
            return torch.tanh(self.a(x)) + x

        def forward(self, x):
            return self.fc(self.trunk(x).mean((2, 3, 4)))
    torch.manual_seed(torch.initial_seed() % 1000)
    model, ref = Net().to(DT), Net().to(DT)
    ref.load_state_dict(model.state_dict())
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    opt, opt_ref = torch.optim.SGD(model.parameters(), **hyper), torch.optim.SGD(ref.parameters(), **hyper)
    video, target = _clip(2, 6, 5, 6), torch.randint(0, 5, (2,))
    T_out = ref.trunk(video).shape[2]
    for t in range(T_out):
        opt_ref.zero_grad()
        (F.cross_entropy(ref.fc(ref.trunk(video)[:, :, t].mean((2, 3))), target) / T_out).backward()
        opt_ref.step()
    SidewaysPipeline.from_model(model, update="tick", optimizer=opt).backward_clip(video, target)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert model.t.weight.grad is None


@pytest.mark.parametrize("update", ["clip", "tick"])
def test_graph_ticks_equal_eager_ticks_on_a_multirate_graph(update):
    """CUDA-graph ticks (emulated, as in test_cuda_graphs) through strides, phase-offset joins
    whose errors wait, pools and a head: losses, outputs, gradients and weights bit-equal."""
    results = {}
    for graphs in (False, True):
        torch.manual_seed(3)
        model = randomize_norms(Residuals().to(DT)).eval()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pipe = SidewaysPipeline.from_model(model, stages=3, update=update, optimizer=opt if update == "tick" else None,
                                           cuda_graph=graphs)
        if graphs:
            pipe._graphs = TickGraphs(emulate=True)
        g = torch.Generator().manual_seed(1)
        rows = []
        for _ in range(4):
            video = torch.randn(2, 3, 21, 8, 7, dtype=DT, generator=g)
            target = torch.randint(0, 6, (2,), generator=g)
            r = pipe.backward_clip(video, target)
            rows.append((r.loss, r.outputs, _grads(model), [p.detach().clone() for p in model.parameters()]))
            if update == "clip":
                opt.step()
                opt.zero_grad()
        if graphs:
            assert pipe._graphs.captures >= 2 and pipe._graphs.replays >= pipe._graphs.captures
        results[graphs] = rows
    for (la, oa, ga, wa), (lb, ob, gb, wb) in zip(results[False], results[True]):
        assert torch.equal(la, lb) and torch.equal(oa, ob)
        assert all(torch.equal(x, y) for x, y in zip(ga, gb)) and all(torch.equal(x, y) for x, y in zip(wa, wb))


def test_backends_devices_and_stage_times_on_a_graph():
    model = randomize_norms(Residuals().to(DT)).eval()
    video, target = _clip(2, 11, 8, 7), torch.randint(0, 6, (2,))
    grads = {}
    for backend in ("cpp", "torch"):
        pipe = SidewaysPipeline.from_model(model, stages=2, backend=backend, devices=["cpu", "cpu"])
        model.zero_grad()
        pipe.backward_clip(video, target)
        grads[backend] = _grads(model)
    assert rel_error(grads["cpp"], grads["torch"]) <= 1e-10
    before = _grads(model)
    times = pipe.stage_times(video, target)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert all(torch.equal(a, b) for a, b in zip(before, _grads(model)))


@pytest.mark.parametrize("model_cls", [Residuals, Pools, Branches], ids=lambda c: c.__name__)
def test_tick_count_is_known_in_advance_on_graphs(model_cls):
    model = randomize_norms(model_cls().to(DT)).eval()
    pipe = SidewaysPipeline.from_model(model, stages=3)
    video = _clip(2, 12, 8, 7)
    n_out = pipe.output_length(12)
    target = torch.randint(0, 4, (2,))
    for mode in ("sideways", "bp"):
        pipe.mode = mode
        pipe.backward_clip(video, target)
        assert pipe.last_ticks == pipe.total_ticks(12, mode), mode
    outs = list(pipe.stream(video))
    assert len(outs) == n_out and pipe.last_ticks == pipe.total_ticks(12, "infer")


def test_balanced_cuts_by_flops_and_by_time():
    model = randomize_norms(models.r3d_18(num_classes=4, width=8).to(DT)).eval()
    example = _clip(1, 8, 32, 32)
    by_flops = SidewaysPipeline.from_model(model, stages=4, example=example)
    sizes = [len(s.nodes) for s in by_flops.stages]
    assert len(sizes) == 4 and all(n > 0 for n in sizes) and sum(sizes) == len(by_flops.graph.nodes)
    by_time = SidewaysPipeline.from_model(model, stages=4, example=example, balance_by="time")
    assert len(by_time.stages) == 4
    with pytest.raises(ValueError, match="example must be a clip"):
        SidewaysPipeline.from_model(model, example=torch.randn(3, 4))
