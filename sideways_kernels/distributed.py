"""Depth-parallel across processes: every rank of a ``torch.distributed`` group runs a
contiguous group of the pipeline's stages. Per tick a rank receives the activation from the
rank below and the error from the rank above (both sent the tick before), runs its stages with
the single-process engine's code, and sends its top activation up and its bottom error down
(``batch_isend_irecv``). ``mode="bp"`` is exact across ranks too: the graph is kept on every
rank and the clip loss's gradient is passed down rank by rank at the end.

Launch one process per rank (``torchrun --nproc-per-node N script.py``), gloo on CPU, NCCL
on GPUs; every rank builds the same network and calls ``backward_clip`` with the same clip
(rank 0 reads its frames, the top rank the target). A rank that dies or stalls makes the
others fail within ``timeout`` seconds with an error naming that rank and the tick.
"""
from __future__ import annotations

import datetime
import itertools
import math
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from .pipeline import NonFiniteError, SidewaysPipeline

__all__ = ["DistributedSidewaysPipeline", "balanced_placement"]

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_HEADER = 11  # present, frame, offset, dtype, ndim, 6 sizes
_HEADER_BYTES = 8 * _HEADER  # a multiple of every dtype's size, so the payload after it is aligned
_WHAT = {"act": "activation from below", "err": "error from above", "up": "activation for the rank above",
         "down": "error for the rank below"}


def balanced_placement(n_stages: int, world_size: int, costs: Optional[Sequence[float]] = None) -> list[int]:
    """Stages per rank, contiguous: as even in count as it allows, or, given each stage's
    cost (e.g. :meth:`SidewaysPipeline.stage_times`), the split whose most loaded rank
    carries the least (the tick time is the slowest rank's)."""
    if not 1 <= world_size <= n_stages:
        raise ValueError(f"need 1 <= world size ({world_size}) <= number of stages ({n_stages})")
    if costs is None:
        base, extra = divmod(n_stages, world_size)
        return [base + (r < extra) for r in range(world_size)]
    costs = [float(c) for c in costs]
    if len(costs) != n_stages or not all(math.isfinite(c) and c >= 0 for c in costs):
        raise ValueError(f"costs must be {n_stages} finite non-negative numbers, got {costs}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[r][n]: (the least max load, stages on the last rank) placing the first n stages on r ranks
    best = [[(math.inf, 0)] * (n_stages + 1) for _ in range(world_size + 1)]
    best[0][0] = (0.0, 0)
    for r in range(1, world_size + 1):
        for n in range(r, n_stages - (world_size - r) + 1):
            best[r][n] = min((max(best[r - 1][m][0], prefix[n] - prefix[m]), n - m) for m in range(r - 1, n))
    placement, n = [], n_stages
    for r in range(world_size, 0, -1):
        placement.append(best[r][n][1])
        n -= placement[-1]
    return placement[::-1]


class _Boundary:
    """This rank's two streams of messages with its neighbours: activations up (tag 0) and
    errors down (tag 1), one message per stream per tick, the message of tick τ read at τ+1.

    Overlap: a rank sends its top activation as soon as that stage's forward is done (its
    transfer overlaps the stage's backward) and its bottom error as soon as it exists; it
    waits for the activation from below only when its bottom stage starts and for the error
    from above only when its top stage's backward starts (the forward of tick τ+1 overlaps
    the error's transfer), and posts the receive of tick τ+1's message as soon as tick τ's
    arrived. So the link's latency is hidden whenever it is below about half a tick.

    Messages: a stream's first message with a tensor is a header announcing its shape (the
    tensor follows as a second message); after that, for the rest of the run, every message
    is one buffer, header and payload together, sent from and received into double buffers
    (the payload is garbage when the header says nothing was sent). Both sides know which case
    they are in from the messages they have already exchanged. Sends are waited a tick late.
    """

    def __init__(self, rank: int, below: Optional[int], above: Optional[int], device, group, timeout: float):
        self.rank, self.below, self.above, self.device, self.group = rank, below, above, device, group
        self.timeout = datetime.timedelta(seconds=timeout)
        self.peer = {"up": above, "down": below, "act": below, "err": above}
        self.tag = {"up": 0, "act": 0, "down": 1, "err": 1}
        self.received: list = []  # bp mode: activations from below, as graph leaves
        self.sent: list = []  # bp mode: activations sent up, still in the graph
        self._in_run = False  # between start() and finish(): true after a run that stopped mid-clip
        self._begin_run()

    def _begin_run(self) -> None:
        self.shape = dict.fromkeys(self.peer)  # per stream: its tensors' shape and dtype, once known
        self.dtype = dict.fromkeys(self.peer)
        self._inbox: dict = {}  # incoming stream -> (tick of the awaited message, works, buffer)
        self._buffers: dict = {}  # (stream, parity) -> message buffer
        self._sends: dict = {}  # tick -> [(works, ops)]: sends in flight, their tensors kept alive
        self._taken: dict = {}  # incoming stream -> (tick, what receive() returned then)
        self._sent_now: set = set()

    # --- plumbing --------------------------------------------------------------------------

    def _failed(self, what: str, tick: int, why) -> RuntimeError:
        peers = " or ".join(str(p) for p in (self.below, self.above) if p is not None)
        return RuntimeError(f"rank {self.rank}: {what} at tick {tick} failed — rank {peers} died or stalled ({why})")

    def _post(self, ops, tick, what: str) -> list:
        """batch_isend_irecv, whose sends already fail when a peer has gone."""
        try:
            return dist.batch_isend_irecv(ops)
        except RuntimeError as exc:
            raise self._failed(what, tick, exc) from None

    def _wait(self, works, tick, what: str) -> None:
        for work in works:
            try:
                ok = work.wait(self.timeout)
            except RuntimeError as exc:
                raise self._failed(what, tick, exc) from None
            if ok is False:
                raise self._failed(what, tick, f"timed out after {self.timeout.total_seconds():.0f} s")

    def _op(self, op, key: str, tensor: torch.Tensor):
        return dist.P2POp(op, tensor, self.peer[key], self.group, tag=self.tag[key])

    def _buffer(self, key: str, parity: int) -> torch.Tensor:
        """The double buffer of an established stream: header bytes, then the payload."""
        size = _HEADER_BYTES + math.prod(self.shape[key]) * self.dtype[key].itemsize
        buf = self._buffers.get((key, parity))
        if buf is None or buf.numel() != size:
            buf = self._buffers[(key, parity)] = torch.empty(size, dtype=torch.uint8, device=self.device)
        return buf

    def _payload(self, buf: torch.Tensor, key: str) -> torch.Tensor:
        return buf[_HEADER_BYTES:].view(self.dtype[key]).view(self.shape[key])

    # --- the engine's calls ----------------------------------------------------------------

    def start(self) -> None:
        """A new run (shapes may have changed): post the receives of tick 0's messages."""
        if self._in_run:  # its receives are still posted: they would take the new run's messages
            raise RuntimeError(f"rank {self.rank}: the last clip stopped mid-run (an error here or on another rank) "
                               "with messages still in flight, so the ranks are out of step; start the job again")
        self._in_run = True
        self._begin_run()
        for key in ("act", "err"):
            if self.peer[key] is not None:
                self._post_receive(key, 0)

    def _post_receive(self, key: str, tick: int) -> None:
        if self.shape[key] is not None:
            buf = self._buffer(key, tick % 2)
        else:  # not established: a header
            buf = torch.empty(_HEADER_BYTES, dtype=torch.uint8, device=self.device)
        works = self._post([self._op(dist.irecv, key, buf)], tick, f"receiving the {_WHAT[key]}")
        self._inbox[key] = (tick, works, buf)

    def receive(self, key: str, tick: int, mode: str, post_next: bool = True):
        """What the neighbour sent on ``key`` ("act" from below: (tensor, frame, offset); "err"
        from above: a tensor) at tick ``tick - 1``, or None; waits for it only now, then posts
        the receive of this tick's message. The same answer again if asked twice in a tick."""
        if self.peer[key] is None:
            return None
        taken_tick, value = self._taken.get(key, (None, None))
        if taken_tick == tick:
            return value
        msg_tick, works, buf = self._inbox[key]
        if msg_tick == tick:  # tick 0: nothing was sent before
            return None
        what = f"receiving the {_WHAT[key]}"
        self._wait(works, tick, what)
        header = buf[:_HEADER_BYTES].view(torch.int64).tolist()
        value = None
        if header[0]:
            if self.shape[key] is None:  # the stream's first tensor: its shape is in the header
                self.shape[key], self.dtype[key] = tuple(header[5:5 + header[4]]), _DTYPES[header[3]]
                tensor = torch.empty(self.shape[key], dtype=self.dtype[key], device=self.device)
                self._wait(self._post([self._op(dist.irecv, key, tensor)], tick, what), tick, what)
            else:
                tensor = self._payload(buf, key)
            if key == "err":
                value = tensor
            else:
                if mode == "bp":  # a graph leaf of its own, kept for the backward at the end
                    tensor = tensor.clone().requires_grad_()
                    self.received.append(tensor)
                value = (tensor, header[1], header[2])
        self._taken[key] = (tick, value)
        if post_next:
            self._post_receive(key, tick)
        return value

    def send(self, key: str, tick: int, tensor: Optional[torch.Tensor], frame: int = -1, offset: int = 0,
             mode: str = "sideways") -> None:
        """Send ``tensor`` (or that there is none) on ``key`` ("up" or "down") for tick ``tick``."""
        if self.peer[key] is None:
            return
        self._sent_now.add(key)
        what = f"sending the {_WHAT[key]}"
        if tensor is not None:
            if mode == "bp" and key == "up":
                self.sent.append(tensor)
            tensor = tensor.detach()
            if tensor.dtype not in _DTYPES or tensor.dim() > 6:
                raise TypeError(f"rank {self.rank}: can only send {_DTYPES} tensors of at most 6 dims between "
                                f"ranks, got {tensor.dtype} {tuple(tensor.shape)}")
        fields = [1, frame, offset, _DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape] if tensor is not None \
            else []
        header = torch.tensor(fields + [0] * (_HEADER - len(fields)), dtype=torch.int64)
        if self.shape[key] is not None:
            if tensor is not None and (tuple(tensor.shape) != self.shape[key] or tensor.dtype != self.dtype[key]):
                raise ValueError(f"rank {self.rank}: the {_WHAT[key]} of tick {tick} is {tuple(tensor.shape)} "
                                 f"{tensor.dtype}, but this run's earlier ones were {self.shape[key]} "
                                 f"{self.dtype[key]}: a stage's output shape cannot change mid-clip")
            buf = self._buffer(key, tick % 2)
            buf[:_HEADER_BYTES].view(torch.int64).copy_(header)
            if tensor is not None:
                self._payload(buf, key).copy_(tensor)
            ops = [self._op(dist.isend, key, buf)]
        else:
            ops = [self._op(dist.isend, key, header.view(torch.uint8).to(self.device))]
            if tensor is not None:  # announced: from now on header and tensor travel together
                self.shape[key], self.dtype[key] = tuple(tensor.shape), tensor.dtype
                ops.append(self._op(dist.isend, key, tensor.contiguous()))
        self._sends.setdefault(tick, []).append((self._post(ops, tick, what), ops))

    def end_tick(self, tick: int, mode: str) -> None:
        """Every stream carries one message a tick: send "nothing" where this tick sent none,
        take the messages of the last tick that no stage asked for, and wait for the sends
        of the last tick (their buffers are written again next tick)."""
        for key in ("up", "down"):
            if key not in self._sent_now:
                self.send(key, tick, None, mode=mode)
        self._sent_now.clear()
        for key in ("act", "err"):
            self.receive(key, tick, mode)
        for works, _ in self._sends.pop(tick - 1, []):
            self._wait(works, tick, "sending the last tick's messages")

    def finish(self, tick: int, mode: str) -> None:
        """After the run's last tick: take its messages (nobody will use them) and wait for
        every send, so the next run starts with nothing in flight."""
        for key in ("act", "err"):
            self.receive(key, tick + 1, mode, post_next=False)
        for works, _ in self._sends.pop(tick, []):
            self._wait(works, tick, "sending the last tick's messages")
        self._inbox.clear()
        self._taken.clear()
        self._in_run = False

    def backward_bp(self, top_loss: Optional[torch.Tensor]) -> None:
        """bp mode after the ticks: the top rank back-propagates the clip loss, then each rank
        passes the gradients of the activations it received down to the rank that sent them."""
        if self.above is not None:
            grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in self.sent]
            if grads:
                ops = [dist.P2POp(dist.irecv, g, self.above, self.group, tag=2) for g in grads]
                self._wait(self._post(ops, -1, "receiving bp gradients"), -1, "receiving bp gradients")
                torch.autograd.backward(self.sent, grads)
        elif top_loss is not None:
            top_loss.backward()
        if self.below is not None and self.received:
            grads = [(t.grad if t.grad is not None else torch.zeros_like(t)).contiguous() for t in self.received]
            ops = [dist.P2POp(dist.isend, g, self.below, self.group, tag=2) for g in grads]
            self._wait(self._post(ops, -1, "sending bp gradients"), -1, "sending bp gradients")
        self.sent.clear()
        self.received.clear()


class DistributedSidewaysPipeline(SidewaysPipeline):
    """A :class:`~sideways_kernels.SidewaysPipeline` of which this process runs the stages that
    ``placement`` gives its rank. Its local stages are moved to ``device``.

    Args:
        placement: stages per rank of one pipeline, contiguous, bottom rank first; default
            :func:`balanced_placement` by count; ``"measure"``: balanced by the stages' measured
            time per tick (rank 0 runs one ``sample=(video, target)`` clip through all stages
            on its device, with :meth:`~SidewaysPipeline.stage_times`, and tells the others).
        replicas: data-parallel copies of the whole pipeline: the world is ``replicas`` pipelines
            of ``world / replicas`` ranks (ranks ``[k·G, (k+1)·G)`` are replica k). Each replica
            trains on its own share of the batch; after every clip the gradients of each stage are
            averaged over the replicas, weighted by their shares' batch sizes (one all-reduce per
            rank), which makes them the gradients of the whole batch's loss (and the loss its
            loss) for a loss that is a mean over the batch. Needs ``update="clip"``.
        timeout: seconds a rank waits for a neighbour before failing with an error that names
            the rank and the tick.

    ``backward_clip`` leaves the local stages' gradients in ``.grad`` and returns the clip
    loss (averaged over replicas) on every rank and the per-frame outputs on each replica's top
    rank (None elsewhere).
    """

    def __init__(self, stages: Sequence[torch.nn.Module], loss_fn=None, mode: str = "sideways", *,
                 placement: Union[None, str, Sequence[int]] = None, replicas: int = 1, sample=None, group=None,
                 device=None, timeout: float = 60.0, **kwargs):
        if not dist.is_initialized():
            raise RuntimeError("DistributedSidewaysPipeline needs torch.distributed initialised "
                               "(torchrun, then dist.init_process_group)")
        if kwargs.get("devices") is not None:
            raise ValueError("use device= (this rank's device); devices= is for one process")
        super().__init__(stages, loss_fn, mode, **kwargs)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if not isinstance(replicas, int) or replicas < 1 or world % replicas:
            raise ValueError(f"replicas must be a positive divisor of the world size {world}, got {replicas}")
        if replicas > 1 and self.update != "clip":
            raise ValueError("replicas average their gradients once per clip, so they need update='clip' "
                             "(per-tick updates would let the replicas' weights drift apart)")
        ranks = world // replicas  # in one pipeline
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL's batch_isend_irecv hangs without it
        self.rank, self.world_size, self.group = rank, world, group
        self.replicas = replicas
        # Compared before anything else collective, so that ranks asked for different things
        # are told so instead of waiting in different collectives.
        self._check_same_pipeline(placement if placement is None or isinstance(placement, str) else list(placement),
                                  mode)
        placement = self.placement = self._placement(placement, ranks, sample, group)
        replica, position = divmod(rank, ranks)
        lo = sum(placement[:position])
        self.engine.lo, self.engine.hi = lo, lo + placement[position]
        self.devices = [self.device] * len(self.stages)  # only the local ones ever run
        for stage in self.local_stages():
            stage.to(self.device)
        peer = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
        self.replica = replica
        # One group per pipeline position, over the replicas (every rank creates every group).
        self._replica_group = None
        for pos in range(ranks if replicas > 1 else 0):
            g = dist.new_group([peer(pos + k * ranks) for k in range(replicas)])
            if pos == position:
                self._replica_group = g
        self.engine.boundary = _Boundary(rank, peer(rank - 1) if position > 0 else None,
                                   peer(rank + 1) if position < ranks - 1 else None, self.device, group, timeout)

    def _placement(self, placement, ranks: int, sample, group) -> list[int]:
        n = len(self.stages)
        if placement == "measure":
            if sample is None:
                raise ValueError("placement='measure' needs sample=(video, target): a clip to time the stages on")
            costs = [None]
            if dist.get_rank(group) == 0:
                costs[0] = self._measure(sample)
            dist.broadcast_object_list(costs, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                       group=group)
            return balanced_placement(n, ranks, costs[0])
        if placement is None:
            return balanced_placement(n, ranks)
        placement = list(placement)
        if len(placement) != ranks or any(not isinstance(k, int) or k < 1 for k in placement) or sum(placement) != n:
            raise ValueError(f"placement must give each of the {ranks} ranks of a pipeline at least one stage and "
                             f"{n} in all, got {placement}")
        return placement

    def _measure(self, sample) -> list[float]:
        """Every stage's time per tick, all of them on this rank's device for one clip, then
        each put back where it was."""
        homes = [next(itertools.chain(s.parameters(), s.buffers()), torch.empty(0)).device for s in self.stages]
        video, target = sample
        try:
            probe = SidewaysPipeline(list(self.stages), self.loss_fn, self.mode, devices=[self.device] * len(homes))
            return probe.stage_times(video, target)
        finally:
            for stage, home in zip(self.stages, homes):
                stage.to(home)

    def _check_same_pipeline(self, placement, mode: str) -> None:
        """Every rank must have built the same stages, placement, replicas and mode: compared once
        here (a collective), so a mismatch is an error naming the rank instead of a wrong tick."""
        mine = (placement, mode, self.replicas,
                [[tuple(p.shape) for p in stage.parameters()] for stage in self.stages])
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        for r, theirs in enumerate(everyone):
            if theirs != mine:
                raise ValueError(f"rank {r} built another pipeline than rank {self.rank} (placement, mode, replicas "
                                 f"or stage parameter shapes differ): {theirs[:3]} vs {mine[:3]}")

    def stream(self, frames):
        """As :meth:`SidewaysPipeline.stream`, for a clip or a sequence of frames: the ranks
        above 0 read no frames, so the clip's length must be known to every rank in advance."""
        if not isinstance(frames, torch.Tensor) and not hasattr(frames, "__len__"):
            raise TypeError("a distributed stream needs a clip [B, C, T, H, W] or a sequence of frames "
                            "(its length known to every rank), not an open-ended iterable")
        if not isinstance(frames, torch.Tensor):
            frames = torch.stack([f if f.dim() == 4 else f.squeeze(2) for f in frames], dim=2)
        return super().stream(frames)

    def local_stages(self) -> list:
        """The stages this rank runs."""
        return list(self.stages[self.engine.lo:self.engine.hi])

    def _backward_bp(self, losses: list) -> None:
        self.engine.boundary.backward_bp(torch.stack(losses).sum() if losses else None)

    def backward_clip(self, video, target, **kwargs):
        if not isinstance(video, torch.Tensor):
            video = list(video)
        first = video if isinstance(video, torch.Tensor) else (video[0] if video else None)
        self._share = float(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() >= 1 else 0.0
        return super().backward_clip(video, target, **kwargs)

    def _check_losses(self, losses: list) -> None:
        """Only each replica's top rank has losses; every rank learns whether one was not finite,
        so all of them raise (and put their state back) together instead of waiting for a peer."""
        bad = bool(losses) and not torch.isfinite(torch.stack([l.detach() for l in losses])).all()
        flag = torch.tensor([float(bad)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if bad:
            super()._check_losses(losses)
        if flag.item():
            raise NonFiniteError("a non-finite loss on another rank; no gradient or weight was changed")

    def _clip_loss(self, losses: list) -> torch.Tensor:
        """Only each replica's top rank has losses: their mean over the replicas, weighted by
        the replicas' batch sizes, for every rank."""
        share = self._share if losses else 0.0
        loss = torch.stack([l.detach() for l in losses]).sum().double() if losses else torch.zeros((),
                                                                                              dtype=torch.float64)
        share_t = torch.tensor(share, dtype=torch.float64, device=self.device)
        both = torch.stack([loss.to(self.device) * share_t, share_t])
        dist.all_reduce(both, group=self.group)
        return both[0] / both[1] if both[1] > 0 else both[0]

    def _reduce_gradients(self, params: list) -> None:
        """Replicas: every local gradient averaged over them, weighted by their batch sizes, in
        one all-reduce (the shares ride along in its last element)."""
        if self._replica_group is None:
            return
        grads = [p.grad for p in params if p.grad is not None]
        dtype = grads[0].dtype if grads else torch.float32
        flat = torch.cat([g.reshape(-1).to(dtype) for g in grads] +
                         [torch.full((1,), self._share, dtype=dtype, device=self.device)])
        flat[:-1] *= self._share
        dist.all_reduce(flat, group=self._replica_group)
        flat[:-1] /= flat[-1]
        for g, part in zip(grads, flat[:-1].split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
