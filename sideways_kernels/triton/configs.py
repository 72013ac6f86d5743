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

__all__ = ["Config", "CONFIGS", "FP32", "SHARED_MEMORY", "configs_for", "every_config", "prune", "split_k", "DEFAULT"]


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


C = Config
# Per kernel kind and architecture, 16-bit activations (tensor cores: wgmma on sm_90a, mma on sm_80).
# Started from public Hopper/Ampere GEMM and conv lists (Triton's tutorials, torch inductor's mm
# and conv configs) and kept to what `make gpu-check` compiles without a spill for every kernel
# of the kind: the weight update's SGD epilogue holds the weight and momentum tiles beside the
# accumulator, so it needs smaller tiles per thread than the accumulating one.
CONFIGS = {
    "gemm": {  # ring_conv_forward and window_input_grad
        90: [C(128, 128, 64, 4, 8), C(128, 64, 64, 4, 4), C(64, 128, 64, 4, 4), C(64, 64, 64, 5, 4)],
        80: [C(128, 256, 32, 3, 8), C(128, 128, 32, 4, 8), C(256, 64, 32, 3, 8), C(128, 64, 32, 4, 4),
             C(64, 128, 32, 4, 4), C(64, 64, 32, 5, 4)],
    },
    "weight_update": {
        90: [C(128, 128, 64, 3, 8), C(128, 64, 64, 4, 8), C(64, 128, 64, 4, 8), C(64, 64, 64, 4, 8), C(64, 64, 64, 5, 4)],
        80: [C(128, 128, 32, 3, 8), C(256, 64, 32, 3, 8), C(128, 64, 32, 4, 8), C(64, 128, 32, 4, 8), C(64, 64, 32, 4, 8),
             C(64, 64, 32, 5, 4)],
    },
    "weight_update:sgd": {
        90: [C(128, 64, 64, 4, 8), C(64, 128, 64, 4, 8), C(128, 64, 64, 3, 8), C(64, 64, 64, 4, 8)],
        80: [C(128, 64, 32, 4, 8), C(64, 128, 32, 4, 8), C(64, 64, 32, 4, 8), C(64, 64, 32, 5, 4)],
    },
}
# fp32 activations run exact fp32 FMA (no tensor cores): small tiles, the same for every kernel.
FP32 = {90: [C(64, 32, 32, 3, 4), C(32, 64, 32, 3, 4)], 80: [C(64, 32, 32, 3, 4), C(32, 64, 32, 3, 4)]}
SHARED_MEMORY = {90: 227 * 1024, 80: 163 * 1024}  # the opt-in maximum per block (H100, A100)
# The interpreter's, when a test does not name one: large tiles, since the interpreter's time goes
# with programs x loop steps (the tests run every listed config too).
DEFAULT = Config(128, 128, 64, 1, 4)


def configs_for(kind: str, capability: int, element_size: int = 2) -> list[Config]:
    """The list for a kernel kind ("gemm", "weight_update", "weight_update:sgd"), the nearest
    architecture at or below ``capability`` (e.g. 89 -> sm_80's), and the activations' size."""
    arch = max((c for c in SHARED_MEMORY if c <= capability), default=min(SHARED_MEMORY))
    return FP32[arch] if element_size == 4 else CONFIGS[kind][arch]


def every_config() -> list[Config]:
    """All configs of all lists (the interpreter tests run each)."""
    return sorted({c for lists in (*CONFIGS.values(), FP32) for cs in lists.values() for c in cs} | {DEFAULT})


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
