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
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .pipeline import SidewaysPipeline

__all__ = ["DistributedSidewaysPipeline", "balanced_placement"]

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_HEADER = 11  # present, frame, offset, dtype, ndim, 6 sizes


def balanced_placement(n_stages: int, world_size: int) -> list[int]:
    """Stages per rank, contiguous and as even as the count allows."""
    if not 1 <= world_size <= n_stages:
        raise ValueError(f"need 1 <= world size ({world_size}) <= number of stages ({n_stages})")
    base, extra = divmod(n_stages, world_size)
    return [base + (r < extra) for r in range(world_size)]


class _Boundary:
    """The messages between this rank and its neighbours, one exchange per tick."""

    def __init__(self, rank: int, below: Optional[int], above: Optional[int], device, group, timeout: float):
        self.rank, self.below, self.above, self.device, self.group = rank, below, above, device, group
        self.timeout = datetime.timedelta(seconds=timeout)
        self.received: list = []  # bp mode: activations from below, as graph leaves
        self.sent: list = []  # bp mode: activations sent up, still in the graph
        self.shape: dict = {}  # per stream ("up", "down" sent; "act", "err" received): its tensors' shape
        self.dtype: dict = {}
        self.pending: list = []  # send works of the last tick
        self._keep: list = []  # ... and their tensors, alive until those complete

    def _failed(self, what: str, tick: int, why) -> RuntimeError:
        return RuntimeError(f"rank {self.rank}: {what} at tick {tick} failed — rank {self._peers()} died or "
                            f"stalled ({why})")

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

    def _peers(self) -> str:
        return " or ".join(str(p) for p in (self.below, self.above) if p is not None)

    def _header(self, tensor, frame=-1, offset=0) -> torch.Tensor:
        h = torch.zeros(_HEADER, dtype=torch.int64)
        if tensor is not None:
            h[:5] = torch.tensor([1, frame, offset, _DTYPES.index(tensor.dtype), tensor.dim()])
            h[5:5 + tensor.dim()] = torch.tensor(tensor.shape)
        return h.to(self.device)

    def _empty(self, header: torch.Tensor) -> Optional[torch.Tensor]:
        h = header.tolist()
        if not h[0]:
            return None
        return torch.empty(h[5:5 + h[4]], dtype=_DTYPES[h[3]], device=self.device)

    def exchange(self, tick: int, up, down, mode: str):
        """Send ``up`` ((activation, frame, offset) or None) to the rank above and ``down``
        (error or None) to the rank below; return what they sent this tick, for the next.

        A stream's first message with a tensor announces its shape in a header, and the
        tensor follows in a second round; from then on, for the rest of the run, header and
        tensor (zeros when there is none) travel together in one round. Both sides know which
        case they are in from the headers they exchanged. Sends are waited one tick later."""
        if self.above is None and self.below is None:  # a single rank: nothing to exchange
            return None, None
        if tick == 0:  # a new run: shapes may have changed
            self.shape = {"up": None, "down": None, "act": None, "err": None}
        self._wait(self.pending, tick, "sending the last tick's messages")
        act, frame, offset = up if up is not None else (None, -1, 0)
        outgoing = [("up", self.above, act, frame, offset, 0), ("down", self.below, down, -1, 0, 1)]
        incoming = [("act", self.below, 0), ("err", self.above, 1)]
        sends, recvs, headers, got, late = [], [], {}, {}, []
        for key, peer, tensor, f, o, tag in outgoing:
            if peer is None:
                continue
            sends.append(dist.P2POp(dist.isend, self._header(tensor, f, o), peer, self.group, tag=tag))
            if self.shape[key] is not None:  # established: the tensor (or zeros) rides along
                payload = tensor if tensor is not None else torch.zeros(self.shape[key], dtype=self.dtype[key],
                                                                        device=self.device)
                sends.append(dist.P2POp(dist.isend, payload.detach().contiguous(), peer, self.group, tag=tag))
            elif tensor is not None:  # announced now, sent in the second round
                self.shape[key], self.dtype[key] = tuple(tensor.shape), tensor.dtype
                late.append(dist.P2POp(dist.isend, tensor.detach().contiguous(), peer, self.group, tag=tag))
            if mode == "bp" and key == "up" and tensor is not None:
                self.sent.append(tensor)
        for key, peer, tag in incoming:
            if peer is None:
                continue
            headers[key] = self._header(None)
            recvs.append(dist.P2POp(dist.irecv, headers[key], peer, self.group, tag=tag))
            if self.shape[key] is not None:
                got[key] = torch.empty(self.shape[key], dtype=self.dtype[key], device=self.device)
                recvs.append(dist.P2POp(dist.irecv, got[key], peer, self.group, tag=tag))
        works = self._post(sends + recvs, tick, "exchanging activations and errors")
        self._wait(works[len(sends):], tick, "receiving activations and errors")
        pending = works[:len(sends)]
        for key, peer, tag in incoming:
            if peer is None or self.shape[key] is not None:
                continue
            fresh = self._empty(headers[key])  # the stream's first tensor: its shape is in the header
            if fresh is not None:
                self.shape[key], self.dtype[key] = tuple(fresh.shape), fresh.dtype
                got[key] = fresh
                late.append(dist.P2POp(dist.irecv, fresh, peer, self.group, tag=tag))
        if late:
            late_works = self._post(late, tick, "exchanging activations and errors")
            self._wait(late_works, tick, "receiving activations and errors")
        self.pending = pending  # kept (with their tensors) until the next exchange
        self._keep = sends
        received_act = received_err = None
        if "act" in got and headers["act"][0].item():
            h = headers["act"].tolist()
            tensor = got["act"]
            if mode == "bp":
                tensor.requires_grad_()
                self.received.append(tensor)
            received_act = (tensor, h[1], h[2])
        if "err" in got and headers["err"][0].item():
            received_err = got["err"]
        return received_act, received_err

    def backward_bp(self, top_loss: Optional[torch.Tensor]) -> None:
        """bp mode after the ticks: the top rank back-propagates the clip loss, then each rank
        passes the gradients of the activations it received down to the rank that sent them."""
        self._wait(self.pending, -1, "sending the last tick's messages")
        self.pending, self._keep = [], []
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
