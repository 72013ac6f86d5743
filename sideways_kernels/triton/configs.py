"""Tile configurations of the Triton kernels, per architecture, and how a problem prunes them.

Each config is (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). The lists start from public
Hopper/Ampere GEMM and conv kernels (Triton's tutorials, torch inductor's mm configs); a GPU
run's autotuner picks among them per problem shape and dtype. Every tile of these lists (its
blocks: the interpreter ignores warps and stages) runs under ``TRITON_INTERPRET=1`` in the tests
(python_tests/test_triton.py), and every config compiles for sm_90a
and sm_80 in ``make gpu-check`` (no spills, shared memory within the device's limit, tensor-core
instructions for 16-bit inputs), so whatever the autotuner picks has been checked ahead of time.

The weight update additionally splits its long reduction (K = B·H·W) over ``split_k`` programs
per output tile when its tiles alone would leave SMs idle (:func:`split_k`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["Config", "CONFIGS", "UNALIGNED", "ANY_INT", "BOX", "FP32", "SHARED_MEMORY", "configs_for", "every_config",
           "prune", "prune_boxes", "aligned", "box_waste", "channel_block", "fit_channels", "split_k", "DEFAULT",
           "DEFAULT_BOX", "FINISH", "COLUMN_SUM", "SPLIT_SUM", "SMALL_CHANNELS", "FOLD_CHANNELS"]


class Config(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_stages: int
    num_warps: int
    BOX_W: int = 0  # box kernels (boxes.py): the width of a tile's box of positions; 0 for the general ones

    @property
    def name(self) -> str:
        box = f"-bw{self.BOX_W}" if self.BOX_W else ""
        return f"{self.BLOCK_M}x{self.BLOCK_N}x{self.BLOCK_K}-s{self.num_stages}-w{self.num_warps}{box}"

    @property
    def tile(self) -> tuple:
        """The blocks (and box width): what a config changes in a kernel's results and masks —
        warps and stages change only its speed (the interpreter ignores both)."""
        return self.BLOCK_M, self.BLOCK_N, self.BLOCK_K, self.BOX_W

    def meta(self) -> dict:
        meta = dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K)
        return {**meta, "BOX_W": self.BOX_W} if self.BOX_W else meta


C = Config
# Per kernel kind and architecture, 16-bit activations (tensor cores: wgmma on sm_90a, mma on sm_80).
# Started from public Hopper/Ampere GEMM and conv lists (Triton's tutorials, torch inductor's mm
# and conv configs) and kept to what `make gpu-check` compiles without a spill for every kernel
# of the kind. The weight update's kind is its split-K GEMM, the same for accumulating and for
# the SGD step (both run in the second, untuned launch: kernels._weight_finish_kernel).
CONFIGS = {
    "gemm": {  # ring_conv_forward and window_input_grad; the last: few channels (fit_channels), K steps of 16
        90: [C(128, 128, 64, 4, 8), C(128, 64, 64, 4, 4), C(64, 128, 64, 4, 4), C(64, 64, 64, 5, 4),
             C(128, 64, 16, 4, 4)],
        80: [C(128, 256, 32, 3, 8), C(128, 128, 32, 4, 8), C(256, 64, 32, 3, 8), C(128, 64, 32, 4, 4),
             C(64, 128, 32, 4, 4), C(64, 64, 32, 5, 4), C(128, 64, 16, 4, 8)],
    },
    "weight_update": {  # the last: few channels, tiles of 16 input channels
        90: [C(128, 128, 64, 3, 8), C(128, 64, 64, 4, 8), C(64, 128, 64, 4, 8), C(64, 64, 64, 4, 8), C(64, 64, 64, 5, 4),
             C(64, 16, 64, 4, 4)],
        80: [C(128, 128, 32, 3, 8), C(256, 64, 32, 3, 8), C(128, 64, 32, 4, 8), C(64, 128, 32, 4, 8), C(64, 64, 32, 4, 8),
             C(64, 64, 32, 5, 4), C(64, 16, 32, 4, 4)],
    },
}
# The same kinds for problems whose channel counts or strides are not all multiples of 16
# (:func:`aligned`: an RGB stem's 3 channels, R(2+1)D's 45, a grouped conv's few per group). Triton
# then knows no alignment of a row, so it loads element by element into registers, each with its
# own address — no 16-byte vectors, no cp.async pipeline — and the lists above spill there (sm_90a
# bf16, Triton 3.9: every forward and input-gradient config, 472-2,376 B of stack at 255 registers;
# half the weight update's). Kept to what `make gpu-check` compiles without a spill in those
# specialisations (``_unaligned``, ``_fold``, ``_depthwise``): smaller tiles, more warps.
UNALIGNED = {
    "gemm": {
        90: [C(64, 128, 32, 4, 8), C(64, 64, 32, 4, 8), C(64, 64, 16, 4, 4)],
        80: [C(64, 128, 32, 4, 8), C(128, 64, 32, 4, 8), C(64, 64, 32, 5, 4), C(64, 64, 16, 4, 4)],
    },
    "weight_update": {
        90: [C(128, 64, 64, 4, 8), C(64, 64, 64, 4, 8), C(64, 16, 64, 4, 4)],
        80: [C(128, 64, 32, 4, 8), C(64, 128, 32, 4, 8), C(64, 64, 32, 4, 8), C(64, 16, 32, 4, 4)],
    },
}
# A general kernel's int arguments that take any value (positions, counts, offsets): every other
# one is a channel count or stride, a multiple of 16 in an aligned problem (:func:`aligned`).
ANY_INT = frozenset({"slot", "B", "H", "W", "H_OUT", "W_OUT", "R", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h",
                     "dil_w", "dil_t", "splits", "split_rotation", "G", "M", "P", "rows_per_program"})
# The box kernels (boxes.py, sm_90: TMA + wgmma, persistent), 16-bit. A forward/input-gradient
# tile is a box of BLOCK_M positions BOX_W wide x BLOCK_N channels; a weight-update tile is
# BLOCK_M output x BLOCK_N input channels of up to three taps (one accumulator each), its K step a
# box of BLOCK_K positions BOX_W wide. Each shape comes in box widths 8 and 16 so that early
# pruning can pick the one that wastes least at the frame's edge (:func:`box_waste`).
BOX = {
    "box_gemm": {
        90: [C(128, 128, 64, 4, 8, 16), C(128, 128, 64, 4, 8, 8), C(128, 256, 64, 3, 8, 16), C(128, 256, 64, 3, 8, 8),
             C(128, 64, 64, 4, 4, 16), C(128, 64, 64, 4, 4, 8), C(64, 128, 64, 4, 4, 8),
             C(128, 64, 16, 4, 4, 16), C(128, 64, 16, 4, 4, 8)],  # few channels: K steps of 16
    },
    "box_weight_update": {
        90: [C(128, 64, 64, 4, 8, 8), C(128, 64, 64, 4, 8, 16), C(128, 64, 128, 3, 8, 16), C(128, 64, 128, 3, 8, 8),
             C(64, 64, 64, 4, 4, 8), C(64, 64, 64, 4, 4, 16),
             C(64, 16, 64, 4, 4, 8), C(64, 16, 64, 4, 4, 16)],  # few channels: tiles of 16 input channels
    },
    # A tick's layers in one launch (boxes._grouped_box_weight_update_kernel), not autotuned: the
    # first shape, in the box width that wastes least. Each item reads its problem's geometry from
    # a table, which takes registers the single-layer kernel has as arguments: its tiles spill
    # with 4 warps or 128 rows (255 registers), 64x64 with 8 warps takes 162.
    "box_grouped_weight_update": {
        90: [C(64, 64, 64, 4, 8, 8), C(64, 64, 64, 4, 8, 16), C(64, 64, 64, 3, 8, 8), C(64, 64, 64, 3, 8, 16)],
    },
    # A tick's forwards in one launch (boxes._grouped_box_forward_kernel), not autotuned: the
    # first shape, in the box width that wastes least on the largest frame.
    "box_grouped_forward": {
        90: [C(128, 128, 64, 4, 8, 16), C(128, 128, 64, 4, 8, 8)],
    },
}
# Problems of at most this many channels (the RGB stem's 3; a grouped conv's few per group) step
# through them in blocks this wide: a forward's or input gradient's K step, a weight update tile's
# input channels — in the grouped launches by a branch of their own (boxes.SMALL_CHANNELS), in the
# autotuned lists by their configs of this block (:func:`fit_channels`). 16: the tensor cores' K
# for 16-bit operands, and a TMA box row of 32 bytes.
SMALL_CHANNELS = 16
# The general kernels fold the taps of problems of at most this many channels (per group) into
# their K (``FOLD``: one run of (tap, channel) pairs — an RGB stem's 3 x 27 taps are 81 columns
# of the MMA, where 27 K steps of SMALL_CHANNELS are 432); their channel block is then chosen for
# taps x channels (:func:`fit_channels`). Few: the pairs are gathered element by element.
FOLD_CHANNELS = 4
# The weight update's second launch (kernels._weight_finish_kernel), not tuned: BLOCK_M weight
# elements a program (every tap of BLOCK_M / taps (output, input channel) pairs), small so that
# many run at once, its loop over the splits pipelined num_stages deep.
FINISH = C(1024, 0, 0, 3, 4)
# The split-K box forward's second launch (kernels._split_sum_kernel), not tuned: BLOCK_M output
# elements a program, every split's partial of each read in turn.
SPLIT_SUM = C(1024, 0, 0, 1, 4)
# The bias gradient's column sum (kernels._column_sum_kernel and its finish), not tuned: BLOCK_M
# rows of BLOCK_N channels a step (64 bf16 channels: one 128-byte row), the finish's BLOCK_K
# partial rows a step.
COLUMN_SUM = C(64, 64, 64, 3, 4)
# The interpreter's box config when a test does not name one.
DEFAULT_BOX = Config(64, 64, 64, 1, 4, 8)
# fp32 activations run exact fp32 FMA (no tensor cores): small tiles, the same for every kernel.
# (Of the candidates compiled for aligned, unaligned, folded and depthwise problems with Triton 3.9
# and 3.6, these two never spilled; 64x32 tiles did, by 8-250 bytes, in one specialisation or another.)
FP32 = {90: [C(32, 64, 32, 2, 8), C(32, 32, 32, 2, 4)], 80: [C(32, 64, 32, 2, 8), C(32, 32, 32, 2, 4)]}
SHARED_MEMORY = {90: 227 * 1024, 80: 163 * 1024}  # the opt-in maximum per block (H100, A100)
# The interpreter's, when a test does not name one: large tiles, since the interpreter's time goes
# with programs x loop steps (the tests run every listed config too).
DEFAULT = Config(128, 128, 64, 1, 4)


def configs_for(kind: str, capability: int, element_size: int = 2, is_aligned: bool = True) -> list[Config]:
    """The list for a kernel kind ("gemm", "weight_update", or a box kind: "box_gemm",
    "box_weight_update"), the nearest architecture at or
    below ``capability`` (e.g. 89 -> sm_80's), the activations' size, and whether the problem is
    :func:`aligned` (a general kernel's: else the UNALIGNED list)."""
    if kind in BOX:  # sm_90 only (box_path() sends nothing older here); fp32 only when a test forces it
        return BOX[kind][90]
    arch = max((c for c in SHARED_MEMORY if c <= capability), default=min(SHARED_MEMORY))
    return FP32[arch] if element_size == 4 else (CONFIGS if is_aligned else UNALIGNED)[kind][arch]


def aligned(ints: dict) -> bool:
    """Whether a general kernel's launch is the aligned specialisation `make gpu-check` compiles
    the CONFIGS lists in: its channels per group (``cg``, ``mg``) are multiples of 16, and every
    other int argument but ANY_INT's (the strides) a multiple of 16 or 1 — Triton's JIT specialises
    on both: 16 lets rows load as 16-byte vectors, 1 is a constant (a unit stride). A depthwise
    conv's one channel is not aligned: nothing to load as a vector. ``ints``: the launch's by name."""
    return all(v % 16 == 0 or (v == 1 and name not in ("cg", "mg")) for name, v in ints.items()
               if name not in ANY_INT)


def every_config(box: bool = False) -> list[Config]:
    """Every tile of all lists of the general kernels, or of the box kernels — one config each
    (:attr:`Config.tile`): the interpreter tests run each."""
    if box:
        configs = {c for lists in BOX.values() for cs in lists.values() for c in cs} | {DEFAULT_BOX}
    else:
        configs = {c for lists in (*CONFIGS.values(), *UNALIGNED.values(), FP32) for cs in lists.values()
                   for c in cs} | {DEFAULT}
    return sorted({c.tile: c for c in sorted(configs)}.values())


def box_waste(height: int, width: int, positions: int, box_w: int) -> float:
    """How many positions a walk of ``positions``-sized boxes ``box_w`` wide computes per real
    one of a ``height x width`` frame (1.0: none wasted; boxes past the edge compute zeros)."""
    box_h = positions // box_w
    return math.ceil(height / box_h) * box_h * math.ceil(width / box_w) * box_w / (height * width)


def channel_block(channels: int, wide: int) -> int:
    """The block a problem of ``channels`` steps through them by: SMALL_CHANNELS for that many or
    fewer, else ``wide`` (a config's)."""
    return SMALL_CHANNELS if channels <= SMALL_CHANNELS else wide


def fit_channels(configs: list[Config], channels: int, block_of) -> list[Config]:
    """Of a kind's configs, those whose channel block (``block_of(cfg)``: a forward's BLOCK_K, a
    weight update's BLOCK_N) is SMALL_CHANNELS for a problem of at most that many channels, and
    wider for any other (all of them where none is: fp32's lists)."""
    few = channels <= SMALL_CHANNELS
    return [c for c in configs if (block_of(c) <= SMALL_CHANNELS) == few] or configs


def prune_boxes(configs: list[Config], height: int, width: int, positions_of) -> list[Config]:
    """Of the configs that differ only in box width, the one wasting least at the frame's edges
    (the wider box on a tie: longer rows per TMA copy). ``positions_of(cfg)``: its box size."""
    best: dict = {}
    for c in configs:
        key = c._replace(BOX_W=0)
        waste = box_waste(height, width, positions_of(c), c.BOX_W)
        if key not in best or (waste, -c.BOX_W) < best[key][0]:
            best[key] = ((waste, -c.BOX_W), c)
    return [c for _, c in best.values()]


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
    """How many programs share one output tile's reduction when there are fewer tiles than SMs:
    the count that makes the launch shortest — its time goes as waves / splits, a wave being
    ``sms`` programs — while each program still runs at least four BLOCK_K steps; of the counts
    within 5% of the best, the fewest (each split writes and the finish reads a partial). A
    split too many starts a second wave for a few programs and doubles the time (an H100, 9
    tiles: 15 splits are 135 programs on 132 SMs; 14 are one wave)."""
    if tiles >= sms:
        return 1
    most = max(1, min(max_split, k // (4 * block_k)))
    time = {s: math.ceil(tiles * s / sms) / s for s in range(1, most + 1)}
    best = min(time.values())
    return min(s for s, t in time.items() if t <= best * 1.05)
