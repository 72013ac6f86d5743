"""The Hopper path of the Triton kernels: implicit GEMMs whose operands are TMA boxes.

A ring slot is a channels-last frame ``[B, H, W, C]``. For a tap ``(j, kh, kw)`` the operand of
an output box of positions is the same-sized box of slot ``j`` shifted by ``(kh·dil_h − pad_h,
kw·dil_w − pad_w)``: a tensor descriptor over the ring ``[R, B, H, W, C]`` loads it at those
coordinates, and the hardware zero-fills whatever lies outside the frame — which is exactly the
convolution's zero padding, so there are no masks and no per-element index math (DESIGN.md §6).
On sm_90 the descriptors become TMA copies into shared memory and the dots ``wgmma``; Triton
software-pipelines the K loop (``num_stages``) and every kernel is persistent: one program per
SM walking the tiles.

Which problems come here is decided in ``__init__.py`` (:func:`box_path`): spatial stride 1
(a box cannot skip positions; dilation and any padding are fine), one group, channels innermost
with 16-byte aligned strides and base, and a GPU with TMA (sm_90+) or the interpreter. The rest
takes the general kernels of :mod:`.kernels`, with the same results.

Tiles: an output tile is a ``BH × BW`` box of positions (``BLOCK_M = BH·BW`` GEMM rows) of one
image, so a tile at the frame's right or bottom edge computes some positions past it; their
operands are zero-filled and the TMA store clips them. ``configs.py`` chooses ``BW`` per problem
to keep that waste small.
"""
import triton
import triton.language as tl

from .kernels import _store_partial, _tap_slot


@triton.jit
def _tap(tap, KH: tl.constexpr, KW: tl.constexpr):
    """Tap index (flattened ``[k_t, k_h, k_w]``) -> (j, kh, kw)."""
    return tap // (KH * KW), (tap // KW) % KH, tap % KW


@triton.jit
def _ring_box(ring_d, slot, tap, b, y0, x0, c0, pad_h, pad_w, dil_h, dil_w, dil_t, R,
              KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The ``[ROWS positions, COLS channels]`` operand of ``tap`` for the box of outputs at
    ``(b, y0, x0)``: the ring slot's box shifted by the tap, zero outside the frame."""
    j, kh, kw = _tap(tap, KH, KW)
    box = ring_d.load([_tap_slot(slot, j, KT, dil_t, R), b, y0 - pad_h + kh * dil_h, x0 - pad_w + kw * dil_w, c0])
    return box.reshape(ROWS, COLS)


@triton.jit
def _box_of(index, boxes_h, boxes_w, BH: tl.constexpr, BW: tl.constexpr):
    """Box ``index`` of a ``[B, boxes_h, boxes_w]`` walk -> (b, y0, x0)."""
    return index // (boxes_h * boxes_w), (index // boxes_w) % boxes_h * BH, index % boxes_w * BW


@triton.jit
def _box_forward_kernel(
        ring, weight, bias, out,
        s_r, s_b, s_h, s_w,  # ring strides (channels: 1)
        o_b, o_h, o_w,  # out strides (channels: 1)
        B, C, H, W, C_OUT, H_OUT, W_OUT, R, slot, pad_h, pad_w, dil_h, dil_w, dil_t,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BOX_W: tl.constexpr):
    """out[b, y, x, n] = sum over taps and channels of ring[tap slot, b, y - pad + kh·dil, x - pad + kw·dil, c]
    · weight[tap, c, n]; ``weight`` is the GEMM layout ``[taps·C, C_OUT]`` (channels of a tap, then
    output channels innermost). Tile: a BH x BW box of output positions x BLOCK_N output channels;
    K steps: (tap, channel block). A K block past C reads zeros from the ring box, so the weight
    rows it pairs with (the next tap's) add nothing.

    The input gradient is this kernel too: at stride 1 the transposed convolution is a
    convolution of the error (a one-slot ring) with the taps' sum flipped in space and padding
    ``dil·(k−1) − pad`` (which may be negative: a box shifts either way)."""
    BH: tl.constexpr = BLOCK_M // BOX_W
    ring_d = tl.make_tensor_descriptor(ring, [R, B, H, W, C], [s_r, s_b, s_h, s_w, 1], [1, 1, BH, BOX_W, BLOCK_K])
    w_d = tl.make_tensor_descriptor(weight, [KT * KH * KW * C, C_OUT], [C_OUT, 1], [BLOCK_K, BLOCK_N])
    out_d = tl.make_tensor_descriptor(out, [B, H_OUT, W_OUT, C_OUT], [o_b, o_h, o_w, 1], [1, BH, BOX_W, BLOCK_N])
    boxes_h, boxes_w = tl.cdiv(H_OUT, BH), tl.cdiv(W_OUT, BOX_W)
    tiles_n = tl.cdiv(C_OUT, BLOCK_N)
    c_blocks = tl.cdiv(C, BLOCK_K)
    for tile in tl.range(tl.program_id(0), B * boxes_h * boxes_w * tiles_n, tl.num_programs(0)):
        b, y0, x0 = _box_of(tile // tiles_n, boxes_h, boxes_w, BH, BOX_W)
        n0 = tile % tiles_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(KT * KH * KW * c_blocks):
            tap, c0 = kk // c_blocks, kk % c_blocks * BLOCK_K
            a = _ring_box(ring_d, slot, tap, b, y0, x0, c0, pad_h, pad_w, dil_h, dil_w, dil_t, R, KT, KH, KW,
                          BLOCK_M, BLOCK_K)
            acc = tl.dot(a, w_d.load([tap * C + c0, n0]), acc)
        if HAS_BIAS:
            n = n0 + tl.arange(0, BLOCK_N)
            acc += tl.load(bias + n, mask=n < C_OUT, other=0.0).to(tl.float32)[None, :]
        out_d.store([b, y0, x0, n0], acc.to(out.dtype.element_ty).reshape(1, BH, BOX_W, BLOCK_N))


@triton.jit
def _box_weight_update_kernel(
        grad_out, ring, partials,
        g_b, g_h, g_w,  # grad_out strides (channels: 1)
        s_r, s_b, s_h, s_w,  # ring strides (channels: 1)
        B, C, H, W, C_OUT, H_OUT, W_OUT, R, slot, pad_h, pad_w, dil_h, dil_w, dil_t, splits, split_rotation,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BOX_W: tl.constexpr):
    """dW[m, c, tap] = sum over positions (b, y, x) of grad_out[b, y, x, m] · ring[tap slot, b, shifted, c].
    M = C_OUT, N = C, K = positions, stepped one BH x BW box of output positions at a time.

    A tile is BLOCK_M output channels x BLOCK_N input channels of TAPS consecutive taps (1-3): the
    error box of a K step is loaded once and meets each tap's shifted ring box, one accumulator
    per tap. Work items are (tile, split): each split runs its share of the tile's boxes and
    leaves fp32 partials (:func:`.kernels._store_partial`), which the second launch
    (:func:`.kernels._weight_finish_kernel`) sums in split order and applies.
    ``split_rotation`` renumbers the splits (0 in the ops; tests check that the result does not
    depend on which program ran which split)."""
    BH: tl.constexpr = BLOCK_K // BOX_W
    g_d = tl.make_tensor_descriptor(grad_out, [B, H_OUT, W_OUT, C_OUT], [g_b, g_h, g_w, 1], [1, BH, BOX_W, BLOCK_M])
    ring_d = tl.make_tensor_descriptor(ring, [R, B, H, W, C], [s_r, s_b, s_h, s_w, 1], [1, 1, BH, BOX_W, BLOCK_N])
    boxes_h, boxes_w = tl.cdiv(H_OUT, BH), tl.cdiv(W_OUT, BOX_W)
    boxes = B * boxes_h * boxes_w
    tiles_m, tiles_n = tl.cdiv(C_OUT, BLOCK_M), tl.cdiv(C, BLOCK_N)
    tiles = tiles_m * tiles_n * (KT * KH * KW // TAPS)
    chunk = tl.cdiv(boxes, splits)
    for item in tl.range(tl.program_id(0), tiles * splits, tl.num_programs(0)):
        tile = item // splits
        split = (item % splits + split_rotation) % splits
        tap0 = tile // (tiles_m * tiles_n) * TAPS
        m0 = tile // tiles_n % tiles_m * BLOCK_M
        c0 = tile % tiles_n * BLOCK_N
        acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for box in range(split * chunk, tl.minimum(split * chunk + chunk, boxes)):
            b, y0, x0 = _box_of(box, boxes_h, boxes_w, BH, BOX_W)
            e = tl.trans(g_d.load([b, y0, x0, m0]).reshape(BLOCK_K, BLOCK_M))  # loaded once, used by every tap
            acc0 = tl.dot(e, _ring_box(ring_d, slot, tap0, b, y0, x0, c0, pad_h, pad_w, dil_h, dil_w, dil_t, R,
                                       KT, KH, KW, BLOCK_K, BLOCK_N), acc0)
            if TAPS > 1:
                acc1 = tl.dot(e, _ring_box(ring_d, slot, tap0 + 1, b, y0, x0, c0, pad_h, pad_w, dil_h, dil_w, dil_t,
                                           R, KT, KH, KW, BLOCK_K, BLOCK_N), acc1)
            if TAPS > 2:
                acc2 = tl.dot(e, _ring_box(ring_d, slot, tap0 + 2, b, y0, x0, c0, pad_h, pad_w, dil_h, dil_w, dil_t,
                                           R, KT, KH, KW, BLOCK_K, BLOCK_N), acc2)
        _store_partial(partials, split, tap0, m0, C_OUT - m0, c0, C - c0, C_OUT, C, KT * KH * KW, acc0,
                       BLOCK_M, BLOCK_N)
        if TAPS > 1:
            _store_partial(partials, split, tap0 + 1, m0, C_OUT - m0, c0, C - c0, C_OUT, C, KT * KH * KW, acc1,
                           BLOCK_M, BLOCK_N)
        if TAPS > 2:
            _store_partial(partials, split, tap0 + 2, m0, C_OUT - m0, c0, C - c0, C_OUT, C, KT * KH * KW, acc2,
                           BLOCK_M, BLOCK_N)
