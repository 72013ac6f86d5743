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
import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .pipeline import SidewaysPipeline

__all__ = ["DistributedSidewaysPipeline", "balanced_placement"]

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_HEADER = 11  # present, frame, offset, dtype, ndim, 6 sizes
_HEADER_BYTES = 8 * _HEADER  # a multiple of every dtype's size, so the payload after it is aligned
_WHAT = {"act": "activation from below", "err": "error from above", "up": "activation for the rank above",
         "down": "error for the rank below"}


def balanced_placement(n_stages: int, world_size: int) -> list[int]:
    """Stages per rank, contiguous and as even as the count allows."""
    if not 1 <= world_size <= n_stages:
        raise ValueError(f"need 1 <= world size ({world_size}) <= number of stages ({n_stages})")
    base, extra = divmod(n_stages, world_size)
    return [base + (r < extra) for r in range(world_size)]


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
    ``placement`` (stages per rank, contiguous; default :func:`balanced_placement`) gives its
    rank. Its local stages are moved to ``device``. ``backward_clip`` leaves the local stages'
    gradients in ``.grad`` and returns the clip loss on every rank (broadcast from the top rank)
    and the per-frame outputs on the top rank (None elsewhere).
    """

    def __init__(self, stages: Sequence[torch.nn.Module], loss_fn=None, mode: str = "sideways", *,
                 placement: Optional[Sequence[int]] = None, group=None, device=None, timeout: float = 60.0,
                 **kwargs):
        if not dist.is_initialized():
            raise RuntimeError("DistributedSidewaysPipeline needs torch.distributed initialised "
                               "(torchrun, then dist.init_process_group)")
        if kwargs.get("devices") is not None:
            raise ValueError("use device= (this rank's device); devices= is for one process")
        super().__init__(stages, loss_fn, mode, **kwargs)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        placement = list(placement) if placement is not None else balanced_placement(len(self.stages), world)
        if len(placement) != world or any(n < 1 for n in placement) or sum(placement) != len(self.stages):
            raise ValueError(f"placement must give each of the {world} ranks at least one stage and "
                             f"{len(self.stages)} in all, got {placement}")
        self._lo = sum(placement[:rank])
        self._hi = self._lo + placement[rank]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.devices = [self.device] * len(self.stages)  # only the local ones ever run
        for stage in self.stages[self._lo:self._hi]:
            stage.to(self.device)
        peer = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
        self.rank, self.world_size, self.group = rank, world, group
        self._top_rank = peer(world - 1)
        self._check_same_pipeline(placement, mode)
        self._boundary = _Boundary(rank, peer(rank - 1) if rank > 0 else None,
                                   peer(rank + 1) if rank < world - 1 else None, self.device, group, timeout)

    def _check_same_pipeline(self, placement: list, mode: str) -> None:
        """Every rank must have built the same stages, placement and mode: compared once here
        (a collective), so a mismatch is an error naming the rank instead of a wrong tick."""
        mine = (placement, mode, [[tuple(p.shape) for p in stage.parameters()] for stage in self.stages])
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        for r, theirs in enumerate(everyone):
            if theirs != mine:
                raise ValueError(f"rank {r} built another pipeline than rank {self.rank} (placement, mode or "
                                 f"stage parameter shapes differ): {theirs[:2]} vs {mine[:2]}")

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
        return list(self.stages[self._lo:self._hi])

    def _backward_bp(self, losses: list) -> None:
        self._boundary.backward_bp(torch.stack(losses).sum() if losses else None)

    def _clip_loss(self, losses: list) -> torch.Tensor:
        loss = torch.stack([l.detach() for l in losses]).sum() if losses else torch.zeros((), dtype=torch.float64)
        loss = loss.to(device=self.device, dtype=torch.float64)
        dist.broadcast(loss, src=self._top_rank, group=self.group)
        return loss
