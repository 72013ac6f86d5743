"""The scheduler against the oracles of DESIGN.md §2 (2-5), plus its error handling."""
import copy
import itertools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sideways_kernels import SidewaysConv3d, SidewaysPipeline, split_sequential
from sideways_kernels.pipeline import frame_logits
from nets import DT, classifier_net, clip_loss, grads, rel_error, stages_of

# (k_t, pad_t, dil_t) per temporal layer: kernels 1-3, padding 0..k-1, dilation.
TEMPORAL = [
    [(1, 0, 1), (3, 1, 1)],
    [(3, 0, 1), (2, 1, 2), (3, 2, 1)],
    [(2, 0, 1), (3, 2, 2)],
    [(3, 1, 1), (3, 1, 1), (3, 1, 1), (2, 1, 1)],
]
BACKENDS = ["cpp", "torch"]


def _video(B=2, C=3, T=9, H=8, W=7):
    return torch.randn(B, C, T, H, W, dtype=DT)


def _drifting(s, B=2, C=3, T=8, H=7, W=6):
    """Frame t = A + s*t*D: the video changes at rate s."""
    A, D = torch.randn(B, C, 1, H, W, dtype=DT), torch.randn(B, C, 1, H, W, dtype=DT)
    return lambda s: A + s * torch.arange(T, dtype=DT).view(1, 1, T, 1, 1) * D


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_stages", [1, 2, 3])
@pytest.mark.parametrize("temporal", TEMPORAL, ids=str)
def test_oracle2_streaming_equals_clip_forward(temporal, n_stages, backend):
    net = classifier_net(temporal)
    video = _video(T=11)
    pipe = SidewaysPipeline(stages_of(net, n_stages), backend=backend)
    with torch.no_grad():
        expected = net(video)
    streamed = list(pipe.stream(video))
    assert len(streamed) == expected.shape[2]
    assert all(frame.shape == expected[:, :, 0].shape for frame in streamed)  # frames in, frames out
    torch.testing.assert_close(torch.stack(streamed, dim=2), expected, rtol=1e-12, atol=1e-12)
    # an iterable of frames whose end is not known in advance gives the same
    frames = (video[:, :, t] for t in range(video.shape[2]))
    torch.testing.assert_close(torch.stack(list(pipe.stream(frames)), dim=2), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer_kwargs", [
    dict(kernel_size=(2, 3, 4), padding="same"),  # uneven 'same' padding in time and space
    dict(kernel_size=(3, 3, 3), padding=(2, 1, 1), dilation=(1, 2, 1), groups=3),
    dict(kernel_size=(1, 3, 3), padding=(0, 1, 2), padding_mode="reflect"),
    dict(kernel_size=(3, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
], ids=str)
def test_oracle2_layer_variants(layer_kwargs):
    net = nn.Sequential(SidewaysConv3d(3, 6, **layer_kwargs), nn.ReLU(), SidewaysConv3d(6, 5, (3, 1, 3), padding=(1, 0, 0))).to(DT)
    video = _video(B=1, T=7, H=9, W=10)
    with torch.no_grad():
        expected = net(video)
    got = torch.stack(list(SidewaysPipeline(split_sequential(net, [2])).stream(video)), dim=2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_stages", [1, 2, 3])
@pytest.mark.parametrize("temporal", TEMPORAL, ids=str)
def test_oracle3_bp_mode_is_autograd_of_the_clip_loss(temporal, n_stages, backend):
    net = classifier_net(temporal)
    video, target = _video(T=10), torch.randint(0, 7, (2,))
    net.zero_grad()
    loss_ref = clip_loss(net, video, target)
    loss_ref.backward()
    expected = grads(net)
    net.zero_grad()
    result = SidewaysPipeline(stages_of(net, n_stages), mode="bp", backend=backend).backward_clip(video, target)
    assert abs(result.loss.item() - loss_ref.item()) <= 1e-9 * abs(loss_ref.item())
    assert rel_error(grads(net), expected) <= 1e-9
    torch.testing.assert_close(result.outputs, net(video).detach(), rtol=1e-12, atol=1e-12)


def test_oracle3_per_frame_targets_and_custom_loss():
    net = classifier_net(TEMPORAL[1])
    video = _video(T=9)
    T_out = net(video).shape[2]
    target = torch.randn(2, T_out, 7, dtype=DT)
    mse = lambda logits, y: F.mse_loss(logits, y)
    net.zero_grad()
    clip_loss(net, video, target, mse, per_frame=True).backward()
    expected = grads(net)
    net.zero_grad()
    SidewaysPipeline(stages_of(net, 2), mse, mode="bp").backward_clip(video, target, per_frame_target=True)
    assert rel_error(grads(net), expected) <= 1e-9
    labels = torch.randint(0, 7, (2, T_out))  # integer [B, T_out]: per frame without being told
    net.zero_grad()
    clip_loss(net, video, labels, per_frame=True).backward()
    expected = grads(net)
    net.zero_grad()
    SidewaysPipeline(stages_of(net, 2), mode="bp").backward_clip(video, labels)
    assert rel_error(grads(net), expected) <= 1e-9


def test_gradients_accumulate_over_clips_like_autograd():
    net = classifier_net(TEMPORAL[0])
    pipe = SidewaysPipeline(stages_of(net, 2), mode="bp")
    v1, v2, y = _video(T=6), _video(T=6), torch.randint(0, 7, (2,))
    net.zero_grad()
    (clip_loss(net, v1, y) + clip_loss(net, v2, y)).backward()
    expected = grads(net)
    net.zero_grad()
    pipe.backward_clip(v1, y)
    pipe.backward_clip(v2, y)
    assert rel_error(grads(net), expected) <= 1e-9


NO_PAD = [[(3, 0, 1), (2, 0, 2)], [(1, 0, 1), (3, 0, 1), (1, 0, 1)], [(2, 0, 1), (2, 0, 1), (3, 0, 1)]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temporal", NO_PAD, ids=str)
def test_oracle4_sideways_is_exact_on_a_static_video(temporal, backend):
    net = classifier_net(temporal)
    static = torch.randn(2, 3, 1, 8, 7, dtype=DT).expand(-1, -1, 9, -1, -1)
    target = torch.randint(0, 7, (2,))
    results = {}
    for mode in ("bp", "sideways"):
        net.zero_grad()
        results[mode] = SidewaysPipeline(stages_of(net, 3), mode=mode, backend=backend).backward_clip(static, target)
        results[mode + "_grads"] = grads(net)
    assert rel_error(results["sideways_grads"], results["bp_grads"]) <= 1e-9
    torch.testing.assert_close(results["sideways"].loss, results["bp"].loss)


def test_clips_of_other_lengths_each_take_their_own_loss_scale():
    """The loss backward's seed, 1/frames, is kept across ticks (``Engine._loss_seed``) — per clip
    length: one Sideways pipeline through static clips of 9, 6 and 9 frames, each clip's gradients
    BP's (oracle 4)."""
    net = classifier_net(NO_PAD[0])
    pipe = SidewaysPipeline(stages_of(net, 2))
    frame, target = torch.randn(2, 3, 1, 8, 7, dtype=DT), torch.randint(0, 7, (2,))
    for T in (9, 6, 9):
        static = frame.expand(-1, -1, T, -1, -1)
        net.zero_grad()
        SidewaysPipeline(stages_of(net, 2), mode="bp").backward_clip(static, target)
        expected = grads(net)
        net.zero_grad()
        pipe.backward_clip(static, target)
        assert rel_error(grads(net), expected) <= 1e-9, T


@pytest.mark.parametrize("first", [(3, 1, 1), (3, 2, 2), (2, 1, 1)], ids=str)
def test_oracle4_single_stage_whose_only_temporal_layer_is_first(first):
    """Exact even on a random (moving) video: the error and the window meet at the same tick."""
    net = classifier_net([first, (1, 0, 1), (1, 0, 1)])
    video, target = _video(T=7), torch.randint(0, 7, (2,))
    net.zero_grad()
    clip_loss(net, video, target).backward()
    expected = grads(net)
    net.zero_grad()
    SidewaysPipeline([net], mode="sideways").backward_clip(video, target)
    assert rel_error(grads(net), expected) <= 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temporal,n_stages", [(NO_PAD[0], 2), (NO_PAD[2], 3),
                                               ([(1, 0, 1), (3, 0, 1), (2, 0, 1), (2, 0, 2)], 4)], ids=str)
def test_oracle5_gap_to_bp_grows_with_the_drift_rate(temporal, n_stages, backend):
    """Frame t = A + s*t*D. Sideways pairs errors with activations 2(L-i) ticks apart, so its
    gradient departs from BP's in proportion to s: zero at s = 0, then growing (close to
    linearly: a smooth activation keeps ReLU's mask flips from making the gap jumpy). This
    fails if Sideways were silently replaced by BP (every gap would be 0)."""
    net = classifier_net(temporal, act=nn.Tanh)
    stages = stages_of(net, n_stages)
    video_at = _drifting(None, T=10)
    target = torch.randint(0, 7, (2,))
    rates = [0.0, 0.01, 0.02, 0.04, 0.08]
    gaps = []
    for s in rates:
        g = {}
        for mode in ("bp", "sideways"):
            net.zero_grad()
            SidewaysPipeline(stages, mode=mode, backend=backend).backward_clip(video_at(s), target)
            g[mode] = torch.cat([x.flatten() for x in grads(net)])
        gaps.append(((g["sideways"] - g["bp"]).norm() / g["bp"].norm()).item())
    assert gaps[0] <= 1e-9, gaps
    assert gaps[1] > 1e-4, gaps
    assert all(b > a for a, b in zip(gaps, gaps[1:])), f"gap not growing with the drift rate: {gaps}"
    assert gaps[-1] >= 4 * gaps[1], f"gap not growing about linearly (8x rate): {gaps}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tick_update_equals_sgd_after_every_frame(backend):
    """One stage whose only temporal layer is first: per-tick updates equal, frame by frame,
    the clip forward with the current weights, the frame's loss, and torch.optim.SGD.step —
    through the compiled fused op and through the torch backend's (the reference)."""
    torch.manual_seed(torch.initial_seed() % 1000)
    net = classifier_net([(3, 1, 1), (1, 0, 1)])
    ref = classifier_net([(3, 1, 1), (1, 0, 1)])
    ref.load_state_dict(net.state_dict())
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    opt = torch.optim.SGD(net.parameters(), **hyper)
    opt_ref = torch.optim.SGD(ref.parameters(), **hyper)
    video, target = _video(T=6), torch.randint(0, 7, (2,))
    T_out = ref(video).shape[2]
    for t in range(T_out):
        opt_ref.zero_grad()
        (F.cross_entropy(ref(video)[:, :, t].flatten(1), target) / T_out).backward()
        opt_ref.step()
    SidewaysPipeline([net], mode="sideways", update="tick", optimizer=opt, backend=backend).backward_clip(video, target)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        assert p.grad is None  # the fused op never materialised the gradient
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], opt_ref.state[q]["momentum_buffer"])


def test_tick_update_multi_stage_trains_and_differs_from_clip_update():
    """Per-tick SGD over 3 stages moves every weight, and not to where one SGD step on the
    clip's Sideways gradient moves it (the steps happen between frames). Tanh: a random ReLU
    net of these widths is dead in a whole layer (no gradient at all) about one time in fifty."""
    net, twin = classifier_net(TEMPORAL[3], act=nn.Tanh), classifier_net(TEMPORAL[3], act=nn.Tanh)
    twin.load_state_dict(net.state_dict())
    before = [p.detach().clone() for p in net.parameters()]
    video, target = _video(T=8), torch.randint(0, 7, (2,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)
    SidewaysPipeline(stages_of(net, 3), update="tick", optimizer=opt).backward_clip(video, target)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.5)
    SidewaysPipeline(stages_of(twin, 3), update="clip").backward_clip(video, target)
    opt_twin.step()
    for a, p, q in zip(before, net.parameters(), twin.parameters()):
        assert not torch.equal(a, p) and not torch.equal(a, q)  # both trained
        assert (p - q).abs().max() > 1e-6 * (q - a).abs().max()  # ... differently


def test_backends_agree_in_sideways_mode():
    net = classifier_net(TEMPORAL[1])
    video, target = _video(T=8), torch.randint(0, 7, (2,))
    out = {}
    for backend in BACKENDS:
        net.zero_grad()
        SidewaysPipeline(stages_of(net, 3), backend=backend).backward_clip(video, target)
        out[backend] = grads(net)
    assert rel_error(out["cpp"], out["torch"]) <= 1e-10


def test_buffers_are_allocated_once_per_input_shape():
    net = classifier_net(TEMPORAL[0])
    pipe = SidewaysPipeline(stages_of(net, 2))
    y = torch.randint(0, 7, (2,))
    pipe.backward_clip(_video(T=6), y)
    buffers = {k: v.data_ptr() for k, v in pipe.engine.buffers.items()}
    rings = [m._ring.data_ptr() for m in net.modules() if isinstance(m, SidewaysConv3d)]
    pipe.backward_clip(_video(T=9), y)
    assert buffers == {k: v.data_ptr() for k, v in pipe.engine.buffers.items()}
    assert rings == [m._ring.data_ptr() for m in net.modules() if isinstance(m, SidewaysConv3d)]


def test_devices_and_layers_outside_a_pipeline():
    """Stages on devices stream the clip forward; after the run the layers are plain convs again:
    the network gives what the same weights give as nn.Conv3d."""
    net = classifier_net(TEMPORAL[0])
    plain = copy.deepcopy(net)
    for name, m in list(plain.named_modules()):
        if isinstance(m, SidewaysConv3d):
            conv = nn.Conv3d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                             m.bias is not None, m.padding_mode, dtype=DT)
            conv.load_state_dict(m.state_dict())
            setattr(plain, name, conv)
    pipe = SidewaysPipeline(stages_of(net, 2), devices=["cpu", "cpu"])
    video = _video(T=5)
    with torch.no_grad():
        expected = plain(video)
        streamed = torch.stack(list(pipe.stream(video)), dim=2)
        torch.testing.assert_close(streamed, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(net(video), expected, rtol=0, atol=0)
    assert all(m._stream is None for m in net.modules() if isinstance(m, SidewaysConv3d))


# --- errors ------------------------------------------------------------------------------

def _pipe(**kw):
    net = classifier_net(NO_PAD[2])
    return net, SidewaysPipeline(stages_of(net, 2), **kw)


def test_clip_shorter_than_the_pipeline_needs():
    net, pipe = _pipe()
    need = pipe.min_clip_length()
    assert need == 5  # kernels 2, 2, 3 without padding shrink the clip by 4
    with pytest.raises(ValueError, match=f"needs at least {need}"):
        pipe.backward_clip(_video(T=need - 1), torch.randint(0, 7, (2,)))
    with pytest.raises(ValueError, match="needs at least"):
        list(pipe.stream(iter([_video(T=1)[:, :, 0]] * 2)))
    pipe.backward_clip(_video(T=need), torch.randint(0, 7, (2,)))


def test_a_clip_no_longer_than_the_lag_is_warned_about_in_sideways_mode():
    """Each padded 3-tap conv delays by one frame: lag 4. Sideways on a clip of <= 4 frames pairs
    errors mostly with end padding (the warning says so); bp mode is exact at any length."""
    net = classifier_net([(3, 1, 1)] * 4)
    pipe = SidewaysPipeline(stages_of(net, 2))
    assert pipe.lag == 4
    with pytest.warns(UserWarning, match="no longer than the pipeline's lag of 4 frames"):
        pipe.backward_clip(_video(T=4), torch.randint(0, 7, (2,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.backward_clip(_video(T=5), torch.randint(0, 7, (2,)))
        pipe.mode = "bp"
        pipe.backward_clip(_video(T=3), torch.randint(0, 7, (2,)))


def test_video_whose_shape_changes_mid_clip():
    net, pipe = _pipe()
    frames = [torch.randn(2, 3, 8, 7, dtype=DT) for _ in range(5)] + [torch.randn(2, 3, 8, 6, dtype=DT)]
    with pytest.raises(ValueError, match="frame 5 .* mid-clip"):
        pipe.backward_clip(frames, torch.randint(0, 7, (2,)))


class _Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def test_stage_returning_the_wrong_rank():
    net = classifier_net(NO_PAD[0])
    pipe = SidewaysPipeline([net[:2], nn.Sequential(*net[2:], _Flatten())])
    with pytest.raises(ValueError, match=r"stage 1 \(Sequential\) returned"):
        pipe.backward_clip(_video(T=6), torch.randint(0, 7, (2,)))


@pytest.mark.parametrize("mode,update", [("sideways", "clip"), ("bp", "clip"), ("sideways", "tick")])
def test_non_finite_loss_leaves_nothing_half_updated(mode, update):
    net = classifier_net(NO_PAD[2])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    pipe = SidewaysPipeline(stages_of(net, 3), mode=mode, update=update, optimizer=opt if update == "tick" else None)
    video, target = _video(T=9), torch.randint(0, 7, (2,))
    pipe.backward_clip(video, target)  # some state to protect: grads or momentum buffers
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    before = [(p.detach().clone(), p.grad.clone()) for p in net.parameters()]
    state_before = {k: v["momentum_buffer"].clone() for k, v in enumerate(opt.state.values())} if update == "tick" else {}
    calls = itertools.count()
    bad_loss = lambda logits, y: F.cross_entropy(logits, y) * (float("nan") if next(calls) == 3 else 1.0)
    pipe.loss_fn = bad_loss
    with pytest.raises(FloatingPointError, match="non-finite loss .* frame 3"):
        pipe.backward_clip(video, target)
    for p, (w, g) in zip(net.parameters(), before):
        assert torch.equal(p, w) and torch.equal(p.grad, g)
    for k, v in enumerate(opt.state.values()):
        if update == "tick":
            assert torch.equal(v["momentum_buffer"], state_before[k])


@pytest.mark.parametrize("mode", ["sideways", "bp"])
def test_non_finite_loss_leaves_batchnorm_buffers_as_they_were(mode):
    """BatchNorm's 'frame' policy updates running_mean, running_var and num_batches_tracked on
    every frame; a clip whose loss is not finite undoes all three."""
    net = nn.Sequential(nn.Conv3d(3, 4, (3, 3, 3), padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                        nn.Conv3d(4, 5, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(5, momentum=None), nn.ReLU(),
                        nn.AdaptiveAvgPool3d((None, 1, 1)), nn.Conv3d(5, 7, 1)).to(DT).train()
    video, target = _video(T=6), torch.randint(0, 7, (2,))
    pipe = SidewaysPipeline.from_model(net, stages=2, mode=mode, batchnorm="frame", example=video[:1])
    pipe.backward_clip(video, target)  # buffers away from their initial values
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm3d)]
    names = ("running_mean", "running_var", "num_batches_tracked")
    snapshot = lambda: {f"{i}.{k}": getattr(m, k).clone() for i, m in enumerate(norms) for k in names}
    before = snapshot()
    calls = itertools.count()
    pipe.loss_fn = lambda logits, y: F.cross_entropy(logits, y) * (float("nan") if next(calls) == 0 else 1.0)
    with pytest.raises(FloatingPointError, match="non-finite loss .* frame 0"):
        pipe.backward_clip(video, target)
    after = snapshot()
    assert [k for k in before if not torch.equal(after[k], before[k])] == []
    # the clip had changed every one of them: a finite clip does (another clip: with momentum None
    # the running statistics are a cumulative average, which the same clip again leaves
    # unchanged up to rounding — and now and then bit for bit)
    pipe.loss_fn = F.cross_entropy
    pipe.backward_clip(_video(T=6), target)
    after = snapshot()
    assert [k for k in before if torch.equal(after[k], before[k])] == []


def test_non_finite_video_and_bad_targets():
    net, pipe = _pipe()
    for bad in ("nan", "inf", "-inf"):  # (NaN reaches the clip's minimum and maximum, +inf only the max)
        video = _video(T=6)
        video[0, 1, 3, 2, 2] = float(bad)
        with pytest.raises(ValueError, match="frame 3 .* NaN or inf"):
            pipe.backward_clip(video, torch.randint(0, 7, (2,)))
    with pytest.raises(ValueError, match="video must be"):
        pipe.backward_clip(torch.randn(3, 6, 8, 7), torch.randint(0, 7, (2,)))
    with pytest.raises(ValueError, match="per-frame target"):
        pipe.backward_clip(_video(T=6), torch.randint(0, 7, (2, 5)), per_frame_target=True)
    seen = []  # an integer [B, 3] target with 2 output frames is the clip's, whole at every frame
    pipe.loss_fn = lambda logits, y: seen.append(y.shape) or F.cross_entropy(logits, y[:, 0])
    pipe.backward_clip(_video(T=6), torch.randint(0, 7, (2, 3)))
    assert seen == [(2, 3)] * 2
    net.zero_grad(set_to_none=True)
    pipe.loss_fn = F.cross_entropy
    with pytest.raises(ValueError, match=r"loss_fn failed on the top stage's output frame \(2, 7\) .* target \(3,\): "
                                         "Expected input batch_size"):  # (what it was given, then its own words)
        pipe.backward_clip(_video(T=6), torch.randint(0, 7, (3,)))
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(TypeError, match="scalar"):
        pipe.loss_fn = lambda logits, y: logits.sum(1)
        pipe.backward_clip(_video(T=6), torch.randint(0, 7, (2,)))


def test_a_video_the_first_conv_cannot_take_is_refused_by_name_before_the_run():
    """A video of another dtype than the first conv's weights (autocast casts float32 and the
    16-bit types where it is on; nothing casts float64), in [B, T, C, H, W] order, or not a video
    at all, is refused in one line naming the video, before anything changed — it had failed deep
    in the first tick's op ("weight must have the activations' dtype"), in a conv's channel check
    or named "frame 0"."""
    net, pipe = _pipe()  # float64
    target = torch.randint(0, 7, (2,))
    with pytest.raises(TypeError, match=r"video is torch.float32 but the first stage's conv weights are torch.float64"):
        pipe.backward_clip(_video(T=6).float(), target)
    with pytest.raises(TypeError, match=r"video must be a tensor \[B, C, T, H, W\] or an iterable .* got str"):
        pipe.predict("clip.mp4")
    with pytest.raises(TypeError, match="frame 0 of the video must be a tensor .* got list"):
        pipe.backward_clip(_video(T=6).tolist(), target)
    with pytest.raises(ValueError, match=r"video must be \[B, C, T, H, W\] with the 3 channels .* \(2, 6, 3, 8, 7\): "
                                         r"one in \[B, T, C, H, W\] order takes .transpose\(1, 2\)"):
        pipe.backward_clip(_video(T=6).transpose(1, 2), target)
    with pytest.raises(ValueError, match="SidewaysConv3d expects 3 input channels .* got 2"):
        pipe.backward_clip(_video(C=2, T=6), target)
    frames = list(_video(T=6).unbind(2))
    frames[5] = frames[5].float()
    with pytest.raises(ValueError, match="frame 5 .* mid-clip"):
        pipe.backward_clip(frames, target)
    assert all(p.grad is None for p in net.parameters())
    net32 = classifier_net(NO_PAD[2], dtype=torch.float32)
    pipe32 = SidewaysPipeline(stages_of(net32, 2))
    with pytest.raises(TypeError, match="video is torch.bfloat16"):
        pipe32.backward_clip(_video(T=6).to(torch.bfloat16), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="video is torch.float64"):
            pipe32.backward_clip(_video(T=6), target)
        pipe32.backward_clip(_video(T=6).float(), target)  # cast as nn.Conv3d's input would be
        pipe32.backward_clip(_video(T=6).to(torch.bfloat16), target)
    assert all(p.grad is not None for p in net32.parameters())


class _LSTMStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 4)

    def forward(self, x):
        return x


@pytest.mark.parametrize("module,words", [
    (nn.BatchNorm3d(3), "BatchNorm3d"),
    (nn.BatchNorm3d(3, track_running_stats=False).eval(), "BatchNorm3d"),  # batch statistics in eval mode too
    (nn.LayerNorm((3, 5, 5)), "LayerNorm"),
    (nn.MaxPool3d((2, 2, 2)), "temporal pooling"),
    (nn.AvgPool3d((1, 2, 2), stride=(2, 1, 1)), "temporal pooling"),
    (nn.AdaptiveAvgPool3d(1), "fixed number of frames"),
    (nn.Conv3d(3, 3, 3), "convert"),
    (nn.GroupNorm(1, 3), "GroupNorm"),
    (nn.InstanceNorm3d(3), "InstanceNorm3d"),
    (_LSTMStage(), "recurrent"),
    (SidewaysConv3d(3, 3, 3, stride=(2, 1, 1)), "temporal stride"),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else v)
def test_modules_that_cannot_stream_are_refused_by_name(module, words):
    with pytest.raises(ValueError, match=words) as info:
        SidewaysPipeline([nn.Sequential(SidewaysConv3d(3, 3, 1), module)])
    assert "stage 0" in str(info.value)


def test_frozen_batchnorm_is_accepted_but_training_batchnorm_is_refused_at_run_time():
    bn = nn.BatchNorm3d(3).eval()
    with torch.no_grad():  # running statistics that are not an identity
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    net = nn.Sequential(SidewaysConv3d(3, 3, (2, 1, 1)), bn)
    pipe = SidewaysPipeline([net])
    video = torch.randn(1, 3, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(list(pipe.stream(video)), dim=2), net(video))
    bn.train()
    with pytest.raises(ValueError, match="BatchNorm3d"):
        list(pipe.stream(torch.randn(1, 3, 4, 5, 5)))


def test_bad_configuration():
    net = classifier_net(NO_PAD[0])
    with pytest.raises(ValueError, match="mode"):
        SidewaysPipeline([net], mode="pipedream")
    with pytest.raises(TypeError, match="SGD"):
        SidewaysPipeline([net], update="tick", optimizer=torch.optim.AdamW(net.parameters()))
    with pytest.raises(ValueError, match="only mode='sideways'"):
        SidewaysPipeline([net], mode="bp", update="tick", optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="one device per stage"):
        SidewaysPipeline([net], devices=["cpu", "cpu"])
    with pytest.raises(TypeError, match="stages"):
        SidewaysPipeline([])
    with pytest.raises(ValueError, match="cuts"):
        split_sequential(net, [0, 3])
    with pytest.raises(ValueError, match="backend"):
        SidewaysPipeline([net], backend="fortran")
    with pytest.raises(ValueError, match="update must be 'clip' or 'tick', got 'step'"):
        SidewaysPipeline([net], update="step")
    with pytest.raises(ValueError, match="maximize=False"):
        SidewaysPipeline([net], update="tick", optimizer=torch.optim.SGD(net.parameters(), lr=0.1, maximize=True))
    with pytest.raises(ValueError, match="appears twice"):
        SidewaysPipeline([net[:2], nn.Sequential(net[0])])


@pytest.mark.parametrize("mode", ["sideways", "bp"])
def test_frozen_weights_or_biases_get_no_gradient_and_the_rest_theirs(mode):
    """Weights frozen (fine-tuning the biases): every bias gets the gradient it gets with the
    weights trained — the whole clip's, through the frozen layers — and no weight a gradient;
    one bias frozen: it alone gets none."""
    def grads_with(frozen):
        torch.manual_seed(0)
        net = classifier_net(NO_PAD[2])
        for name, p in net.named_parameters():
            p.requires_grad_(name not in frozen)
        torch.manual_seed(1)
        SidewaysPipeline(stages_of(net, 3), mode=mode).backward_clip(_video(T=8), torch.randint(0, 7, (2,)))
        return {name: p.grad for name, p in net.named_parameters()}
    full = grads_with(())
    for frozen in ([name for name in full if name.endswith("weight")], ["0.bias"]):
        for name, g in grads_with(frozen).items():
            if name in frozen:
                assert g is None, name
            else:
                torch.testing.assert_close(g, full[name], rtol=1e-12, atol=1e-12, msg=name)


def test_clip_logits_are_the_mean_of_the_frames_logits():
    net, pipe = _pipe()
    video = _video(T=7)
    result = pipe.backward_clip(video, torch.randint(0, 7, (2,)))
    with torch.no_grad():
        torch.testing.assert_close(result.logits, net(video).mean((2, 3, 4)), rtol=1e-12, atol=1e-12)


def test_frame_logits_drop_time_and_a_1x1_extent_only():
    assert frame_logits(torch.zeros(2, 5, 1, 1, 1)).shape == (2, 5)
    assert frame_logits(torch.zeros(2, 5, 1, 3, 1)).shape == (2, 5, 3, 1)  # a map: kept
    assert frame_logits(torch.zeros(2, 5, 1, 1, 3)).shape == (2, 5, 1, 3)
    assert frame_logits(torch.zeros(2, 5)).shape == (2, 5)


def test_stream_is_lazy_and_takes_a_single_frame():
    """A live source: each output comes out as soon as its frame (plus the layers' delay)
    is in, without reading the rest of the stream; a single frame streams too."""
    net = classifier_net([(3, 1, 1), (1, 0, 1)])  # one temporal layer, delay 1 tick
    pipe = SidewaysPipeline(stages_of(net, 2))
    pulled = []

    def camera():
        for t in range(6):
            pulled.append(t)
            yield torch.randn(2, 3, 8, 7, dtype=DT)

    outputs = pipe.stream(camera())
    next(outputs)
    assert len(pulled) == 2 + 1, pulled  # frame 0 needs frame 1 (delay) and a tick per stage boundary
    outputs.close()
    frame = torch.randn(2, 3, 8, 7, dtype=DT)
    (only,) = list(pipe.stream(frame))
    with torch.no_grad():
        torch.testing.assert_close(only, net(frame.unsqueeze(2)).squeeze(2))


@pytest.mark.parametrize("n_stages", [1, 2, 3])
@pytest.mark.parametrize("temporal", TEMPORAL, ids=str)
def test_tick_count_is_known_in_advance(temporal, n_stages):
    """Processes that run a part of the pipeline stop after total_ticks() without seeing the
    top; it must be exactly where the whole pipeline stops by itself."""
    net = classifier_net(temporal)
    pipe = SidewaysPipeline(stages_of(net, n_stages))
    video, target = _video(T=9), torch.randint(0, 7, (2,))
    for mode in ("sideways", "bp"):
        pipe.mode = mode
        pipe.backward_clip(video, target)
        assert pipe.last_ticks == pipe.total_ticks(9, mode), mode
    list(pipe.stream(video))
    assert pipe.last_ticks == pipe.total_ticks(9, "infer")


def test_stage_times_measure_each_stage_and_change_nothing():
    """A stage made 100 ms slower per tick shows it (the slowest, by its 100 ms at least), and the
    measuring clip leaves gradients, weights and optimizer state as they were. (On a loaded machine
    the other stages' few milliseconds can grow many-fold: 20 ms failed there, 50 ms beside two
    training runs on 2 cores, and "4x the others" once at 122 ms against 56.)"""
    import time
    torch.manual_seed(5)
    net = classifier_net([(3, 1, 1), (2, 0, 1), (1, 0, 1)])
    stages = stages_of(net, 3)
    stages[1].register_forward_pre_hook(lambda m, a: time.sleep(0.1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    pipe = SidewaysPipeline(stages, update="tick", optimizer=opt)
    video, target = torch.randn(2, 3, 6, 9, 8, dtype=DT), torch.randint(0, 7, (2,))
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    before = [(p.detach().clone(), p.grad.clone()) for p in net.parameters()]
    times = pipe.stage_times(video, target)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert times[1] >= 0.1 and times[1] > max(times[0], times[2]), times
    for p, (w, g) in zip(net.parameters(), before):
        assert torch.equal(p, w) and torch.equal(p.grad, g)
    assert not opt.state


# --- smoothing: averaged errors and activations in the weight update ---------------------------

@pytest.mark.parametrize("k", [1, 3])
def test_smoothing_pairs_the_mean_of_the_last_k_errors_with_the_mean_of_their_windows(k):
    """One stage, one temporal conv (so each tick's error is exactly that frame's): with
    smoothing=k the weight gradient is the sum over ticks of conv3d_weight(mean of the last k
    windows, mean of the last k errors), fewer at each clip's start — computed here by hand;
    k=1 is Sideways itself (each error with its own window). Two clips: the history is a clip's."""
    torch.manual_seed(torch.initial_seed() % 1000)
    conv = SidewaysConv3d(3, 4, (2, 3, 3), padding=(0, 1, 0), dtype=DT)
    net = nn.Sequential(conv, nn.AdaptiveAvgPool3d((None, 1, 1)))
    target = torch.randint(0, 4, (2,))
    T_out = 6
    expected_w, expected_b = torch.zeros_like(conv.weight), torch.zeros_like(conv.bias)
    videos = [_video(T=7), _video(T=7)]
    for video in videos:
        errors, windows = [], []
        for t in range(T_out):  # frame t's error on the conv's output, and the window it meets
            out = conv(video[:, :, t:t + 2]).detach().requires_grad_()
            (F.cross_entropy(out.mean((3, 4)).flatten(1), target) / T_out).backward()
            errors.append(out.grad)
            windows.append(video[:, :, t:t + 2])
        for t in range(T_out):
            e = sum(errors[max(0, t - k + 1):t + 1]) / len(errors[max(0, t - k + 1):t + 1])
            w = sum(windows[max(0, t - k + 1):t + 1]) / len(windows[max(0, t - k + 1):t + 1])
            expected_w += torch.nn.grad.conv3d_weight(w, conv.weight.shape, e, padding=(0, 1, 0))
            expected_b += e.sum((0, 2, 3, 4))
    net.zero_grad()
    pipe = SidewaysPipeline([net], smoothing=k)
    for video in videos:
        pipe.backward_clip(video, target)
    torch.testing.assert_close(conv.weight.grad, expected_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(conv.bias.grad, expected_b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("update", ["clip", "tick"])
def test_smoothing_one_is_sideways_bit_for_bit_and_bp_ignores_it(update):
    """smoothing=1 (and the default) is Sideways bit for bit, k=3 changes the convs' updates
    only: the errors sent down are unchanged, so a parameter below them (a PReLU before the
    first conv) gets the same gradient bit for bit; bp mode ignores k."""
    results = {}
    for mode, k in (("sideways", None), ("sideways", 1), ("sideways", 3), ("bp", 1), ("bp", 3)):
        if mode == "bp" and update == "tick":
            continue
        torch.manual_seed(7)
        net = nn.Sequential(nn.PReLU(3, init=0.3).to(DT), *classifier_net(TEMPORAL[3]))
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        kwargs = {} if k is None else dict(smoothing=k)
        pipe = SidewaysPipeline(stages_of(net, 3), mode=mode, update=update, optimizer=opt if update == "tick" else None,
                                **kwargs)
        pipe.backward_clip(_video(T=9), torch.randint(0, 7, (2,)))
        results[(mode, k)] = [p.detach().clone() for p in net.parameters()] + grads_or_none(net)
    same = lambda a, b, idx=None: all(torch.equal(x, y) for i, (x, y) in enumerate(zip(results[a], results[b]))
                                      if idx is None or i in idx)
    assert same(("sideways", None), ("sideways", 1))
    assert not same(("sideways", 1), ("sideways", 3))
    if update == "clip":
        n = len(results[("bp", 1)]) // 2
        assert results[("sideways", 1)][n].abs().sum() > 0
        assert same(("sideways", 1), ("sideways", 3), idx={0, n})  # the PReLU: its weight, its gradient
        assert not same(("sideways", 1), ("sideways", 3), idx={n + 1})  # the first conv's weight gradient
        assert same(("bp", 1), ("bp", 3))


def grads_or_none(net):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


def test_smoothing_keeps_oracle_4():
    """On a static video every window and every error in the history are the same: still exact."""
    net = classifier_net(NO_PAD[2])
    static = torch.randn(2, 3, 1, 8, 7, dtype=DT).expand(-1, -1, 10, -1, -1)
    target = torch.randint(0, 7, (2,))
    out = {}
    for mode, k in (("bp", 1), ("sideways", 4)):
        net.zero_grad()
        SidewaysPipeline(stages_of(net, 3), mode=mode, smoothing=k).backward_clip(static, target)
        out[mode] = grads(net)
    assert rel_error(out["sideways"], out["bp"]) <= 1e-9
    with pytest.raises(ValueError, match="smoothing must be an int >= 1"):
        SidewaysPipeline(stages_of(net, 3), smoothing=0)


def test_an_in_place_activation_after_a_streaming_conv_trains_as_an_out_of_place_one():
    """ReLU(inplace=True) right after a SidewaysConv3d modifies the tick's output in place: it must
    be the autograd Function's own output, not a view of it (autograd refuses that)."""
    net = classifier_net([(3, 1, 1), (2, 1, 1)], act=lambda: nn.ReLU(inplace=True))
    ref = classifier_net([(3, 1, 1), (2, 1, 1)])
    ref.load_state_dict(net.state_dict())
    video, target = torch.randn(2, 3, 7, 9, 8, dtype=DT), torch.randint(0, 7, (2,))
    a = SidewaysPipeline(stages_of(net, 2), cuda_graph=False).backward_clip(video, target)
    b = SidewaysPipeline(stages_of(ref, 2), cuda_graph=False).backward_clip(video, target)
    assert torch.equal(a.loss, b.loss)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(net.parameters(), ref.parameters()))


def test_a_clip_on_stage_0_s_device_is_checked_for_nan_in_one_go():
    """The video's finiteness: one reduction over the clip (its minimum and maximum: no temporary
    of the clip's size, test_memory), not an isfinite per frame launched every tick (the NaN's
    frame is still named, test_non_finite_video_and_bad_targets)."""
    net, pipe = _pipe()
    video, target = _video(T=6), torch.randint(0, 7, (2,))
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.isfinite, torch.aminmax) and args[0].dim() == 5:
                seen.append((func.__name__, args[0].shape[2]))
            return func(*args, **(kwargs or {}))

    with Spy():
        pipe.backward_clip(video, target)
    assert seen == [("aminmax", 6)]
