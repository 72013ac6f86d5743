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

    def _wait(self, works, tick, what: str) -> None:
        for work in works:
            try:
                ok = work.wait(self.timeout)
            except RuntimeError as exc:
                raise RuntimeError(f"rank {self.rank}: {what} at tick {tick} failed — "
                                   f"rank {self._peers()} died or stalled ({exc})") from None
            if ok is False:
                raise RuntimeError(f"rank {self.rank}: {what} at tick {tick} timed out after "
                                   f"{self.timeout.total_seconds():.0f} s — rank {self._peers()} died or stalled")

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
        (error or None) to the rank below; return what they sent this tick, for the next."""
        ops, headers = [], {}
        act, frame, offset = up if up is not None else (None, -1, 0)
        if self.above is not None:
            ops.append(dist.P2POp(dist.isend, self._header(act, frame, offset), self.above, self.group, tag=0))
            headers["err"] = self._header(None)
            ops.append(dist.P2POp(dist.irecv, headers["err"], self.above, self.group, tag=1))
        if self.below is not None:
            ops.append(dist.P2POp(dist.isend, self._header(down), self.below, self.group, tag=1))
            headers["act"] = self._header(None)
            ops.append(dist.P2POp(dist.irecv, headers["act"], self.below, self.group, tag=0))
        if not ops:
            return None, None
        self._wait(dist.batch_isend_irecv(ops), tick, "exchanging message headers")
        ops, got = [], {}
        if self.above is not None and act is not None:
            payload = act.detach().contiguous()
            ops.append(dist.P2POp(dist.isend, payload, self.above, self.group, tag=0))
            if mode == "bp":
                self.sent.append(act)
        if self.below is not None and down is not None:
            ops.append(dist.P2POp(dist.isend, down.contiguous(), self.below, self.group, tag=1))
        for key, peer, tag in (("act", self.below, 0), ("err", self.above, 1)):
            if key in headers:
                got[key] = self._empty(headers[key])
                if got[key] is not None:
                    ops.append(dist.P2POp(dist.irecv, got[key], peer, self.group, tag=tag))
        if ops:
            self._wait(dist.batch_isend_irecv(ops), tick, "exchanging activations and errors")
        received_act = None
        if got.get("act") is not None:
            h = headers["act"].tolist()
            tensor = got["act"]
            if mode == "bp":
                tensor.requires_grad_()
                self.received.append(tensor)
            received_act = (tensor, h[1], h[2])
        return received_act, got.get("err")

    def backward_bp(self, top_loss: Optional[torch.Tensor]) -> None:
        """bp mode after the ticks: the top rank back-propagates the clip loss, then each rank
        passes the gradients of the activations it received down to the rank that sent them."""
        if self.above is not None:
            grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in self.sent]
            if grads:
                self._wait(dist.batch_isend_irecv([dist.P2POp(dist.irecv, g, self.above, self.group, tag=2)
                                                  for g in grads]), -1, "receiving bp gradients")
                torch.autograd.backward(self.sent, grads)
        elif top_loss is not None:
            top_loss.backward()
        if self.below is not None and self.received:
            grads = [(t.grad if t.grad is not None else torch.zeros_like(t)).contiguous() for t in self.received]
            self._wait(dist.batch_isend_irecv([dist.P2POp(dist.isend, g, self.below, self.group, tag=2)
                                              for g in grads]), -1, "sending bp gradients")
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
        self._boundary = _Boundary(rank, peer(rank - 1) if rank > 0 else None,
                                   peer(rank + 1) if rank < world - 1 else None, self.device, group, timeout)

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
