"""Tile configurations of the Triton kernels, per architecture, and how a problem prunes them.

Each config is (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). The lists start from public
Hopper/Ampere GEMM and conv kernels (Triton's tutorials, torch inductor's mm configs); a GPU
run's autotuner picks among them per problem shape and dtype. Every config in these lists runs
under ``TRITON_INTERPRET=1`` in the tests (python_tests/test_triton.py) and compiles for sm_90a
and sm_80 in ``make gpu-check`` (no spills, shared memory within the device's limit, tensor-core
instructions for 16-bit inputs), so whatever the autotuner picks has been checked ahead of time.

The weight update additionally splits its long reduction (K = B·H·W) over ``split_k`` programs
per output tile when its tiles alone would leave SMs idle (:func:`split_k`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["Config", "CONFIGS", "SHARED_MEMORY", "configs_for", "prune", "split_k", "DEFAULT"]


class Config(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_stages: int
    num_warps: int

    @property
    def name(self) -> str:
        return f"{self.BLOCK_M}x{self.BLOCK_N}x{self.BLOCK_K}-s{self.num_stages}-w{self.num_warps}"

    def meta(self) -> dict:
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K)


CONFIGS = {
    90: [Config(128, 256, 64, 3, 8), Config(128, 128, 64, 4, 8), Config(128, 128, 128, 3, 8), Config(64, 256, 64, 4, 4),
         Config(128, 64, 64, 4, 4), Config(64, 128, 64, 4, 4), Config(64, 64, 64, 5, 4)],
    80: [Config(128, 256, 32, 3, 8), Config(128, 128, 32, 4, 8), Config(256, 64, 32, 3, 8), Config(64, 256, 32, 4, 4),
         Config(128, 64, 32, 4, 4), Config(64, 128, 32, 4, 4), Config(64, 64, 32, 5, 4)],
}
SHARED_MEMORY = {90: 227 * 1024, 80: 163 * 1024}  # the opt-in maximum per block (H100, A100)
DEFAULT = Config(32, 32, 32, 1, 4)  # the interpreter's, when a test does not name one


def configs_for(capability: int) -> list[Config]:
    """The list of the nearest architecture at or below ``capability`` (e.g. 89 -> sm_80's)."""
    return CONFIGS[max((c for c in CONFIGS if c <= capability), default=min(CONFIGS))]


def shared_bytes(cfg: Config, element_size: int) -> int:
    """What a config's pipelined A and B tiles take in shared memory."""
    return (cfg.BLOCK_M * cfg.BLOCK_K + cfg.BLOCK_K * cfg.BLOCK_N) * element_size * cfg.num_stages


def prune(configs: list[Config], m: int, n: int, element_size: int, capability: int) -> list[Config]:
    """Configs that fit the device's shared memory and do not tile far past the problem: a
    BLOCK_M (BLOCK_N) more than twice the next power of two of M (N) is only masked-off work."""
    limit = SHARED_MEMORY.get(capability, SHARED_MEMORY[max(SHARED_MEMORY)])
    fits = [c for c in configs if shared_bytes(c, element_size) <= limit]
    m2, n2 = 1 << max(m - 1, 0).bit_length(), 1 << max(n - 1, 0).bit_length()
    useful = [c for c in fits if c.BLOCK_M <= max(2 * m2, 64) and c.BLOCK_N <= max(2 * n2, 64)]
    return useful or fits[-1:]


def split_k(tiles: int, k: int, block_k: int, sms: int, max_split: int = 16) -> int:
    """How many programs share one output tile's reduction: enough that the launch fills the
    SMs once or twice, while each program still runs at least four BLOCK_K steps."""
    if tiles >= sms:
        return 1
    want = math.ceil(sms / tiles)  # one wave
    most = max(1, k // (4 * block_k))
    return max(1, min(want, most, max_split))
