"""Weights' derived forms — a 16-bit cast, a relayout for a GEMM, the taps' sum, the taps folded
for a ring slot — made once for a run that changes no weight, instead of at every op call.

A backend's op derives what it reads from the fp32 master weight at each call (two to four
kernels and passes over the weight a forward or an input gradient), inside CUDA graphs too,
since a replay runs no Python that could tell whether the weight moved. A run without a
per-tick optimizer (``update="clip"``, streaming inference) changes no weight, so the engine
holds each weight's forms for it (:func:`held`): made at the run's start, eagerly, before any
tick is captured or replayed, and rewritten in place at the next run's start (one address from
run to run: a graph captured in one run reads them in the next). The ops read a held form
(:func:`get`) only while its run is on and its weight's version is the one it was made from;
anything else derives as before. Made lazily instead — at the first call in a run — a form's
refresh would be recorded in the graph of whichever tick first used it while capturing, and a
run whose first use is a replay of a graph captured where the form was already fresh would read
the last run's. Forms live while their weight does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Callable, Hashable, Iterable, Optional

import torch

__all__ = ["held", "get", "tensors_of"]


@dataclasses.dataclass
class _Form:
    weight: weakref.ref
    version: int
    tensor: torch.Tensor
    active: bool = False


_forms: dict = {}  # (id(weight), key) -> _Form


def get(weight: torch.Tensor, key: Hashable) -> Optional[torch.Tensor]:
    """The form ``key`` of ``weight`` held for the run now on, or None (derive it)."""
    form = _forms.get((id(weight), key))
    if form is None or not form.active or form.weight() is not weight or form.version != weight._version:
        return None
    return form.tensor


@contextlib.contextmanager
def held(forms: Iterable[tuple]):
    """For a run: each ``(weight, key, make)``'s form made now (``make()``: the form as the op
    would derive it) and read by the ops until the run ends."""
    made = []
    try:
        with torch.no_grad():
            for weight, key, make in forms:
                made.append(_hold(weight, key, make))
        yield
    finally:
        for form in made:
            form.active = False


def _hold(weight: torch.Tensor, key: Hashable, make: Callable[[], torch.Tensor]) -> _Form:
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):  # as the ops derive: dtypes
        fresh = make()  # as given
    form = _forms.get((id(weight), key))
    if (form is None or form.weight() is not weight or form.tensor.shape != fresh.shape
            or form.tensor.dtype != fresh.dtype or form.tensor.stride() != fresh.stride()):
        ref = weakref.ref(weight, lambda _, at=id(weight): _forget(at))
        form = _forms[(id(weight), key)] = _Form(ref, weight._version, fresh)
    else:  # in place: a graph captured in an earlier run reads this tensor
        form.tensor.copy_(fresh)
        form.version = weight._version
    form.active = True
    return form


def _forget(at: int) -> None:
    """A weight died: its forms go with it (a new weight may reuse its id)."""
    for k in [k for k, form in _forms.items() if k[0] == at and form.weight() is None]:
        del _forms[k]


def tensors_of(weights: Iterable[torch.Tensor]) -> list:
    """The forms held for ``weights`` (what they cost in memory)."""
    ids = {id(w) for w in weights}
    return [form.tensor for (at, _), form in list(_forms.items()) if at in ids and form.weight() is not None]
