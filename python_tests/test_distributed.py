"""Depth-parallel across processes on gloo: 2 and 3 ranks spawned by the test give the
single-process pipeline's losses and gradients (float64, rel. error <= 1e-9) in both modes,
and a rank that dies makes the others fail within the timeout, naming it and the tick."""
import multiprocessing
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from nets import DT, classifier_net, rel_error, stages_of

TEMPORAL = [(3, 1, 1), (2, 0, 2), (3, 2, 1), (1, 0, 1)]
HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clip():
    g = torch.Generator().manual_seed(7)
    return torch.randn(3, 3, 8, 9, 8, dtype=DT, generator=g), torch.randint(0, 7, (3,), generator=g)


def _net():
    torch.manual_seed(3)
    return classifier_net(TEMPORAL)


def _r3d():
    """A converted r3d_18 (small width, float64, eval mode with random BatchNorm statistics)."""
    from graphs import randomize_norms
    from sideways_kernels import models
    torch.manual_seed(5)
    return randomize_norms(models.r3d_18(num_classes=7, width=4).to(DT)).eval()


def _leave():
    """All ranks meet before any tears its process group down: gloo aborts a rank ('terminate
    called without an active exception', exit status -6, about 1 run in 25 here) whose peer
    closed the connections while its own threads still used them."""
    dist.barrier()
    dist.destroy_process_group()


def _worker(rank, world, port, mode, placement, out_dir, die_at_tick=None, timeout=60, stall=False, replicas=1,
            nan_at=None, update="clip", model="chain"):
    if isinstance(placement, dict):  # a placement per rank, to test a mismatch
        placement = placement[rank]
    if isinstance(mode, dict):  # likewise a mode
        mode = mode[rank]
    sys.path.insert(0, HERE)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=__import__("datetime").timedelta(seconds=timeout))
        from sideways_kernels.distributed import DistributedSidewaysPipeline
        net = _net() if model == "chain" else _r3d()
        stages = stages_of(net, 4) if model == "chain" else None
        if die_at_tick is not None and rank == world - 1:
            calls = iter(range(10**6))
            fail = (lambda: time.sleep(3600)) if stall else (lambda: os._exit(3))
            stages[-1].register_forward_pre_hook(lambda m, a: fail() if next(calls) == die_at_tick else None)
        video, target = _clip()
        loss_fn = None
        if nan_at is not None:  # the loss of frame nan_at is NaN
            frames = iter(range(10**6))
            loss_fn = lambda y, t: torch.nn.functional.cross_entropy(y, t) * (float("nan") if next(frames) == nan_at
                                                                             else 1.0)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3) if update == "tick" else None
        options = dict(mode=mode, placement=placement, timeout=timeout, replicas=replicas, sample=(video, target),
                       update=update, optimizer=opt)
        if stages is None:  # a whole network, cut by from_model
            pipe = DistributedSidewaysPipeline.from_model(net, stages=4, loss_fn=loss_fn, **options)
        else:
            pipe = DistributedSidewaysPipeline(stages, loss_fn, **options)
        if replicas > 1:  # replica k trains on its share of the batch (of 3: shares of 2 and 1)
            video, target = (torch.tensor_split(x, replicas)[pipe.replica] for x in (video, target))
        try:
            result = pipe.backward_clip(video, target)
        except RuntimeError:
            if die_at_tick is not None:  # a survivor: a second clip must refuse at once, not hang or mix runs
                try:
                    pipe.backward_clip(video, target)
                except RuntimeError as again:
                    open(os.path.join(out_dir, f"{rank}.again"), "w").write(str(again))
            raise
        # update="tick": the weights the per-tick steps left, else the gradients of the clip
        local = {name: (p.detach() if update == "tick" else p.grad).clone() for name, p in net.named_parameters()
                 if any(p is q for s in pipe.local_stages() for q in s.parameters())}
        torch.save(dict(grads=local, loss=result.loss, outputs=result.outputs, placement=pipe.placement,
                        replica=pipe.replica),
                   os.path.join(out_dir, f"{rank}.pt"))
        _leave()
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _spawn(world, mode, placement, out_dir, **options):
    """Runs the ranks (``options``: _worker's); returns them once every rank but a
    deliberately stalled one is done."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    timeout, stall = options.get("timeout", 60), options.get("stall", False)
    procs = [ctx.Process(target=_worker, args=(r, world, port, mode, placement, str(out_dir)), kwargs=options)
             for r in range(world)]
    for p in procs:
        p.start()
    for r, p in enumerate(procs):
        if stall and r == world - 1:
            continue
        p.join(timeout=timeout + 60)
        if p.is_alive():
            for q in procs:
                q.kill()
            pytest.fail(f"rank {r} hung past its timeout")
    if stall:
        procs[-1].kill()
        procs[-1].join()
    return procs


@pytest.mark.parametrize("mode", ["sideways", "bp"])
@pytest.mark.parametrize("world,placement,model", [(2, [2, 2], "chain"), (3, [1, 2, 1], "chain"), (2, [2, 2], "r3d_18")],
                         ids=["2ranks", "3ranks", "r3d_18-2ranks"])
def test_distributed_equals_single_process(tmp_path, world, placement, model, mode):
    """Chains, and a converted r3d_18 (residuals, strides, BatchNorm, a pooled head) cut into
    four stages by from_model."""
    from sideways_kernels import SidewaysPipeline
    video, target = _clip()
    if model == "chain":
        net = _net()
        ref = SidewaysPipeline(stages_of(net, 4), mode=mode).backward_clip(video, target)
    else:
        net = _r3d()
        ref = SidewaysPipeline.from_model(net, stages=4, mode=mode).backward_clip(video, target)
    ref_grads = dict(net.named_parameters())
    procs = _spawn(world, mode, placement, tmp_path, model="chain" if model == "chain" else "r3d")
    errors = [open(tmp_path / f).read() for f in os.listdir(tmp_path) if f.endswith(".err")]
    assert not errors and all(p.exitcode == 0 for p in procs), errors
    seen = set()
    for r in range(world):
        out = torch.load(tmp_path / f"{r}.pt", weights_only=False)
        assert abs(out["loss"].item() - ref.loss.item()) <= 1e-9 * abs(ref.loss.item())
        for name, g in out["grads"].items():
            assert rel_error([g], [ref_grads[name].grad]) <= 1e-9, (r, name)
            seen.add(name)
        if r == world - 1:
            torch.testing.assert_close(out["outputs"], ref.outputs, rtol=1e-12, atol=1e-12)
        else:
            assert out["outputs"] is None
    assert seen == set(ref_grads), "every parameter belongs to exactly one rank"


def test_distributed_per_tick_sgd_equals_single_process(tmp_path):
    """update="tick" across 3 ranks: every rank's weights after the clip are those the
    single-process pipeline's per-tick SGD leaves (float64, rel. error <= 1e-9)."""
    net = _net()
    video, target = _clip()
    from sideways_kernels import SidewaysPipeline
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    SidewaysPipeline(stages_of(net, 4), update="tick", optimizer=opt).backward_clip(video, target)
    expected = dict(net.named_parameters())
    procs = _spawn(3, "sideways", [1, 2, 1], tmp_path, update="tick")
    errors = [open(tmp_path / f).read() for f in os.listdir(tmp_path) if f.endswith(".err")]
    assert not errors and all(p.exitcode == 0 for p in procs), (errors, [p.exitcode for p in procs],
                                                                 sorted(os.listdir(tmp_path)))
    seen = set()
    for r in range(3):
        for name, w in torch.load(tmp_path / f"{r}.pt", weights_only=False)["grads"].items():
            assert rel_error([w], [expected[name].detach()]) <= 1e-9, (r, name)
            seen.add(name)
    assert seen == set(expected)


def test_distributed_replicas_average_to_the_whole_batch(tmp_path):
    """World 6 = 2 replicas x 3 ranks, placed by measured stage times: ranks 0-2 are replica 0 and
    3-5 replica 1, each pipeline's ranks hold its stages in order, the replicas train on shares of
    2 and 1 of a batch of 3, and after the clip every rank holds the single-process gradients and
    loss of the whole batch (float64, rel. error <= 1e-9)."""
    net = _net()
    video, target = _clip()
    from sideways_kernels import SidewaysPipeline
    stages = stages_of(net, 4)
    ref = SidewaysPipeline(stages).backward_clip(video, target)
    ref_grads = dict(net.named_parameters())
    names = {p: name for name, p in net.named_parameters()}
    stage_names = [{names[p] for p in stage.parameters()} for stage in stages]
    procs = _spawn(6, "sideways", "measure", tmp_path, replicas=2)
    errors = [open(tmp_path / f).read() for f in os.listdir(tmp_path) if f.endswith(".err")]
    assert not errors and all(p.exitcode == 0 for p in procs), errors
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(6)]
    placement = results[0]["placement"]
    assert all(r["placement"] == placement for r in results) and len(placement) == 3 and sum(placement) == 4
    assert [out["replica"] for out in results] == [0, 0, 0, 1, 1, 1]
    for r, out in enumerate(results):
        lo = sum(placement[:r % 3])  # position r % 3 runs stages lo .. lo + placement[r % 3]
        assert set(out["grads"]) == set().union(*stage_names[lo:lo + placement[r % 3]]), (r, placement)
        assert abs(out["loss"].item() - ref.loss.item()) <= 1e-9 * abs(ref.loss.item())
        for name, g in out["grads"].items():
            assert rel_error([g], [ref_grads[name].grad]) <= 1e-9, (r, name)
    assert all(results[r]["outputs"] is None for r in (0, 1, 3, 4))
    torch.testing.assert_close(torch.cat([results[2]["outputs"], results[5]["outputs"]]), ref.outputs, rtol=1e-12,
                               atol=1e-12)


def test_distributed_placement_gives_every_rank_a_stage():
    from types import SimpleNamespace
    from sideways_kernels.distributed import DistributedSidewaysPipeline
    pipe = SimpleNamespace(stages=[None] * 4)  # all _placement reads of an explicit placement

    def placement(p, ranks=2):
        return DistributedSidewaysPipeline._placement(pipe, p, ranks, None, None)
    assert placement([1, 3]) == [1, 3] and placement((2, 1, 1), 3) == [2, 1, 1]
    for bad in ([0, 4], [4, 0], [-1, 5], [1.0, 3], [1, 2], [1, 1, 2]):
        with pytest.raises(ValueError, match="at least one stage"):
            placement(bad)


@pytest.mark.parametrize("seed", range(20))
def test_distributed_balanced_placement_minimises_the_slowest_rank(seed):
    """Against every contiguous split: the placement from costs has the least maximal load."""
    import itertools
    from sideways_kernels.distributed import balanced_placement
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (), generator=g))
    world = int(torch.randint(1, n + 1, (), generator=g))
    costs = (torch.rand(n, generator=g) ** 3).tolist()

    def load(split):
        bounds = [0, *itertools.accumulate(split)]
        return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))

    splits = [[b - a for a, b in zip((0, *cuts), (*cuts, n))] for cuts in itertools.combinations(range(1, n), world - 1)]
    got = balanced_placement(n, world, costs)
    assert len(got) == world and sum(got) == n and min(got) >= 1
    assert load(got) == pytest.approx(min(load(s) for s in splits), rel=1e-12)
    assert balanced_placement(n, world) in splits


def test_distributed_balanced_placement_refuses_bad_costs():
    from sideways_kernels.distributed import balanced_placement
    with pytest.raises(ValueError, match="costs must be 3"):
        balanced_placement(3, 2, [1.0, 2.0])
    with pytest.raises(ValueError, match="costs must be"):
        balanced_placement(3, 2, [1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="world size"):
        balanced_placement(2, 3)


@pytest.mark.parametrize("mode", ["sideways", "bp"])
def test_distributed_non_finite_loss_stops_every_rank_at_once(tmp_path, mode):
    """The top rank's NaN loss is every rank's NonFiniteError, right after the clip's ticks —
    not a wait for the timeout on the ranks below."""
    start = time.time()
    procs = _spawn(3, mode, [1, 2, 1], tmp_path, timeout=120, nan_at=2)
    assert time.time() - start < 60
    assert all(p.exitcode != 0 for p in procs)
    for r in range(3):
        message = open(tmp_path / f"{r}.err").read()
        assert "NonFiniteError" in message and "no gradient or weight was changed" in message, message
    assert "frame 2" in open(tmp_path / "2.err").read()


def test_distributed_killed_rank_fails_the_others_within_the_timeout(tmp_path):
    start = time.time()
    procs = _spawn(2, "sideways", [2, 2], tmp_path, die_at_tick=3, timeout=10)
    elapsed = time.time() - start
    assert procs[1].exitcode == 3 and procs[0].exitcode != 0
    message = open(tmp_path / "0.err").read()
    assert "rank 1" in message and "tick" in message, message
    assert elapsed < 10 + 45, f"took {elapsed:.0f} s"
    assert "stopped mid-run" in open(tmp_path / "0.again").read()


def test_distributed_stalled_rank_fails_the_others_within_the_timeout(tmp_path):
    start = time.time()
    procs = _spawn(2, "sideways", [2, 2], tmp_path, die_at_tick=3, timeout=4, stall=True)
    elapsed = time.time() - start
    assert procs[0].exitcode != 0
    message = open(tmp_path / "0.err").read()
    assert "rank 1" in message and "tick" in message, message
    assert elapsed < 4 + 30, f"took {elapsed:.0f} s"


@pytest.mark.parametrize("mode,placement,shown", [("sideways", {0: [2, 2], 1: [1, 3]}, "[1, 3]"),
                                                   ({0: "sideways", 1: "bp"}, [2, 2], "'bp'")],
                         ids=["placement", "mode"])
def test_distributed_ranks_that_built_different_pipelines_are_refused(tmp_path, mode, placement, shown):
    """Each rank names the other and shows what differs (rank 1's own choice, in both messages)."""
    procs = _spawn(2, mode, placement, tmp_path, timeout=20)
    assert all(p.exitcode != 0 for p in procs)
    for r, other in ((0, 1), (1, 0)):
        message = open(tmp_path / f"{r}.err").read()
        assert "built another pipeline" in message and f"rank {other}" in message and shown in message, message


def _train_runs(tmp_path, args: list, ranks: int, *torchrun_args) -> dict:
    """sideways-train in one process and under torchrun: each run's metric lines (without
    the timing fields)."""
    import json
    import subprocess
    runs = {}
    for name, launcher in (("one", [sys.executable, "-m", "sideways_kernels.train"]),
                           ("torchrun", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                                         "--master-port", str(_free_port()), "-m", "sideways_kernels.train",
                                         "--distributed", *torchrun_args])):
        out = tmp_path / name
        proc = subprocess.run(launcher + args + ["--out", str(out)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [{k: v for k, v in json.loads(line).items() if k not in ("wall", "frames_per_s")}
                      for line in open(out / "metrics.jsonl")]
    return runs


def test_distributed_training_under_torchrun_equals_one_process(tmp_path):
    """sideways-train under torchrun (2 ranks, gloo) logs what one process logs, and its
    checkpoint is the single-process file: it loads into one process, which resumes from it."""
    args = ["--train-videos", "24", "--val-videos", "12", "--batch-size", "8", "--size", "16", "--width", "4",
            "--depth", "4", "--stages", "4", "--clip-len", "5", "--epochs", "2", "--log-every", "1"]
    runs = _train_runs(tmp_path, args, 2)
    assert runs["torchrun"] == runs["one"]
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    many = torch.load(tmp_path / "torchrun" / "last.pt", weights_only=False)
    assert one["model"].keys() == many["model"].keys()
    for k in one["model"]:  # torchrun runs 1 thread a rank: oneDNN sums in another order
        torch.testing.assert_close(many["model"][k], one["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert one["optimizer"]["state"].keys() == many["optimizer"]["state"].keys()
    from sideways_kernels import train
    assert train.main(["--resume", str(tmp_path / "torchrun" / "last.pt"), "--epochs", "3"]) == 0


def test_distributed_training_with_replicas_follows_one_process(tmp_path):
    """sideways-train under torchrun with 2 replicas of a 2-rank pipeline: every batch of 5 is
    shared 3 + 2 between the replicas and their gradients weighted by those shares, so the run
    follows the single-process one (up to the float32 rounding of summing two part-batches) and
    writes the same kind of checkpoint."""
    args = ["--train-videos", "15", "--val-videos", "8", "--batch-size", "5", "--size", "16", "--width", "4",
            "--depth", "4", "--stages", "4", "--clip-len", "5", "--epochs", "1", "--log-every", "1"]
    runs = _train_runs(tmp_path, args, 4, "--replicas", "2")
    assert len(runs["torchrun"]) == len(runs["one"]) == 4  # 3 steps (5 + 5 + 5 videos) and the epoch
    for a, b in zip(runs["torchrun"], runs["one"]):
        for key in ("loss", "train_loss", "val_loss", "train_acc", "val_acc"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=False)["model"]
    many = torch.load(tmp_path / "torchrun" / "last.pt", weights_only=False)["model"]
    for k in one:
        torch.testing.assert_close(many[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_distributed_stream_needs_a_known_length():
    """Ranks above 0 read no frames, so an open-ended iterable would never end there: refused;
    a clip or a list of frames streams as the clip forward (one rank here)."""
    import datetime
    from sideways_kernels.distributed import DistributedSidewaysPipeline
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        net = _net()
        pipe = DistributedSidewaysPipeline(stages_of(net, 4))
        video, _ = _clip()
        with pytest.raises(TypeError, match="length known"):
            pipe.stream(video[:, :, t] for t in range(video.shape[2]))
        frames = [video[:, :, t] for t in range(video.shape[2])]
        with torch.no_grad():
            torch.testing.assert_close(torch.stack(list(pipe.stream(frames)), dim=2), net(video))
    finally:
        dist.destroy_process_group()
