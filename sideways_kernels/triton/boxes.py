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

from . import configs
from .kernels import _address, _field, _problem, _store_partial, _tap_slot

# The channel block of a grouped launch's problems of at most this many channels (the RGB stem's
# 3, in 16-byte rows): their K step (forward) or tile's input channels (weight update) is this
# wide, not the launch's 64 — a 64-channel block of 3 real ones is 21x the work.
SMALL_CHANNELS = tl.constexpr(configs.SMALL_CHANNELS)


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
def _forward_tile(ring_d, frame_d, w_d, b, y0, x0, n0, first, last, older, c_blocks, C, slot, pad_h, pad_w, dil_h,
                  dil_w, dil_t, R, KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PUSH: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 sum of K steps ``first .. last`` (taps x channel blocks) of the forward's output
    tile at ``(b, y0, x0)``, channels ``n0 ..``: steps before ``older`` read the ring, the rest (the
    newest tap's, with ``PUSH``) the tick's frame, shifted as the tap shifts its slot."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(first, tl.minimum(last, older)):
        tap, c0 = kk // c_blocks, kk % c_blocks * BLOCK_K
        a = _ring_box(ring_d, slot, tap, b, y0, x0, c0, pad_h, pad_w, dil_h, dil_w, dil_t, R, KT, KH, KW,
                      BLOCK_M, BLOCK_K)
        acc = tl.dot(a, w_d.load([tap * C + c0, n0]), acc)
    if PUSH:
        for kk in range(tl.maximum(first, older), last):
            tap, c0 = kk // c_blocks, kk % c_blocks * BLOCK_K
            _, kh, kw = _tap(tap, KH, KW)
            a = frame_d.load([b, y0 - pad_h + kh * dil_h, x0 - pad_w + kw * dil_w, c0]).reshape(BLOCK_M, BLOCK_K)
            acc = tl.dot(a, w_d.load([tap * C + c0, n0]), acc)
    return acc


@triton.jit
def _push_box(ring_d, frame_d, box, slot, c_blocks, H, W, BH: tl.constexpr, BOX_W: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Box ``box`` of a ``[B, H/BH, W/BOX_W, C/BLOCK_K]`` walk of the frame into its ring slot (the
    store clips it at the frame's edge)."""
    b, y0, x0 = _box_of(box // c_blocks, tl.cdiv(H, BH), tl.cdiv(W, BOX_W), BH, BOX_W)
    c0 = box % c_blocks * BLOCK_K
    ring_d.store([slot, b, y0, x0, c0], frame_d.load([b, y0, x0, c0]).reshape(1, 1, BH, BOX_W, BLOCK_K))


@triton.jit
def _box_forward_kernel(
        ring, frame, weight, bias, out, partials,
        s_r, s_b, s_h, s_w,  # ring strides (channels: 1)
        f_b, f_h, f_w,  # frame strides (channels: 1)
        o_b, o_h, o_w,  # out strides (channels: 1)
        B, C, H, W, C_OUT, H_OUT, W_OUT, R, slot, pad_h, pad_w, dil_h, dil_w, dil_t, splits,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, PUSH: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BOX_W: tl.constexpr):
    """out[b, y, x, n] = sum over taps and channels of ring[tap slot, b, y - pad + kh·dil, x - pad + kw·dil, c]
    · weight[tap, c, n]; ``weight`` is the GEMM layout ``[taps·C, C_OUT]`` (channels of a tap, then
    output channels innermost). Tile: a BH x BW box of output positions x BLOCK_N output channels;
    K steps: (tap, channel block). A K block past C reads zeros from the ring box, so the weight
    rows it pairs with (the next tap's) add nothing.

    Split-K where tiles are few (small frames, many channels: 256 channels at 14², B8, are 32
    tiles of 128x128 for 132 SMs, each 108 K steps long): work items are (tile, split), split s
    running K steps ``s·chunk ..``; with ``splits`` > 1 each leaves its fp32 tile in
    ``partials`` ``[splits, B, H_OUT, W_OUT, C_OUT]`` (masked at the frame's edge) and
    :func:`.kernels._split_sum_kernel` adds them in split order, the bias and the cast.

    ``PUSH``: the tick's new ``frame`` (``[B, H, W, C]``, channels innermost) goes into ring
    ``slot`` in this launch, not in a copy launched before it. Only the newest tap reads that
    slot (the others read older ones: ``R`` > (KT−1)·dil_t), and its K steps are the last ones
    (taps are ``(j, kh, kw)``, newest ``j`` last), so they read ``frame`` instead; nothing else
    in the launch reads the slot, so the programs also copy the frame there, box by box.

    The input gradient is this kernel too: at stride 1 the transposed convolution is a
    convolution of the error (a one-slot ring) with the taps' sum flipped in space and padding
    ``dil·(k−1) − pad`` (which may be negative: a box shifts either way)."""
    BH: tl.constexpr = BLOCK_M // BOX_W
    ring_d = tl.make_tensor_descriptor(ring, [R, B, H, W, C], [s_r, s_b, s_h, s_w, 1], [1, 1, BH, BOX_W, BLOCK_K])
    w_d = tl.make_tensor_descriptor(weight, [KT * KH * KW * C, C_OUT], [C_OUT, 1], [BLOCK_K, BLOCK_N])
    out_d = tl.make_tensor_descriptor(out, [B, H_OUT, W_OUT, C_OUT], [o_b, o_h, o_w, 1], [1, BH, BOX_W, BLOCK_N])
    if PUSH:  # (made once: a descriptor made on the device is written to global scratch)
        frame_d = tl.make_tensor_descriptor(frame, [B, H, W, C], [f_b, f_h, f_w, 1], [1, BH, BOX_W, BLOCK_K])
    else:
        frame_d = ring_d  # (never read)
    boxes_h, boxes_w = tl.cdiv(H_OUT, BH), tl.cdiv(W_OUT, BOX_W)
    tiles_n = tl.cdiv(C_OUT, BLOCK_N)
    c_blocks = tl.cdiv(C, BLOCK_K)
    steps = KT * KH * KW * c_blocks
    older = (KT - 1) * KH * KW * c_blocks if PUSH else steps  # the K steps that read the ring
    chunk = tl.cdiv(steps, splits)
    for item in tl.range(tl.program_id(0), B * boxes_h * boxes_w * tiles_n * splits, tl.num_programs(0)):
        tile, split = item // splits, item % splits
        b, y0, x0 = _box_of(tile // tiles_n, boxes_h, boxes_w, BH, BOX_W)
        n0 = tile % tiles_n * BLOCK_N
        first, last = split * chunk, tl.minimum(split * chunk + chunk, steps)
        acc = _forward_tile(ring_d, frame_d, w_d, b, y0, x0, n0, first, last, older, c_blocks, C, slot, pad_h, pad_w,
                            dil_h, dil_w, dil_t, R, KT, KH, KW, PUSH, BLOCK_M, BLOCK_N, BLOCK_K)
        if splits == 1:
            if HAS_BIAS:
                n = n0 + tl.arange(0, BLOCK_N)
                acc += tl.load(bias + n, mask=n < C_OUT, other=0.0).to(tl.float32)[None, :]
            out_d.store([b, y0, x0, n0], acc.to(out.dtype.element_ty).reshape(1, BH, BOX_W, BLOCK_N))
        else:  # plain stores: a TMA store would stage the fp32 tile in shared memory beside the pipeline's
            m = tl.arange(0, BLOCK_M)
            y, x, n = y0 + m // BOX_W, x0 + m % BOX_W, n0 + tl.arange(0, BLOCK_N)
            row = ((split * B + b).to(tl.int64) * H_OUT + y) * W_OUT + x
            tl.store(partials + row[:, None] * C_OUT + n[None, :], acc,
                     mask=((y < H_OUT) & (x < W_OUT))[:, None] & (n < C_OUT)[None, :])
    if PUSH:  # the frame into its slot (the stores clip the boxes at the frame's edge)
        for box in tl.range(tl.program_id(0), B * tl.cdiv(H, BH) * tl.cdiv(W, BOX_W) * c_blocks, tl.num_programs(0)):
            _push_box(ring_d, frame_d, box, slot, c_blocks, H, W, BH, BOX_W, BLOCK_K)


FORWARD_FIELDS = tl.constexpr(32)  # a problem's row in a grouped forward's table


@triton.jit
def _grouped_box_forward_kernel(
        table, G,
        r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15,  # the rings' addresses
        f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11, f12, f13, f14, f15,  # the frames' (PUSH; else any)
        w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15,  # the weights' (GEMM layout)
        b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15,  # the biases' (or any)
        o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15,  # the outputs'
        e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15,  # the errors masked (or any)
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15,  # POOL: the errors at the convs'
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PUSH: tl.constexpr, POOL: tl.constexpr,
        DTYPE: tl.constexpr,
        BIAS: tl.constexpr, G_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, BOX_W: tl.constexpr):
    """:func:`_box_forward_kernel` for several problems at once — the forwards of a tick's layers
    whose kernel has this shape — in one persistent launch (no split-K: the layers' tiles together
    fill the SMs). ``table`` (int64): per problem (FORWARD_FIELDS) the ring's strides (r, b, h, w),
    the frame's (b, h, w), the output's (b, h, w), B, C, H, W, C_OUT, H_OUT, W_OUT, R, slot,
    pad_h, pad_w, dil_h, dil_w, dil_t, whether it has a bias, its epilogue (bit 0: a ReLU; bit 1: the
    error waiting at this output masked in place by the output's ReLU mask), the error's strides
    (b, h, w), the conv-resolution error's strides (b, h, w; ``POOL``); then each problem's first
    tile and their total (G + 1), and with ``PUSH`` each problem's first box of its frame's copy
    into its slot and their total (G + 1). ``DTYPE``: the activations'; ``BIAS``: the biases'. A
    problem's descriptors are made where its item is taken; one of at most SMALL_CHANNELS channels
    takes K steps of SMALL_CHANNELS, not BLOCK_K.

    The epilogue is a stage of a Sideways chain (conv, ReLU): its output goes up as the next
    stage's sample, and the error that arrived from above for it (written last tick) meets this
    tick's ReLU, as autograd's ``threshold_backward`` would apply it — the mask taken from the
    output as stored (16-bit), so it is the mask of the ReLU a per-layer tick runs after the op.
    The input gradient and the weight update then read the masked error.

    ``POOL``: a 1x2x2 max pool follows the ReLU (C3D's blocks): the output is pooled (``out`` is
    ``[B, C_OUT, H_OUT/2, W_OUT/2]``, floor), the waiting error is the pooled output's, and the
    error at the conv's output goes to the ``c`` tensors — the pooled error at each window's first
    maximum (PyTorch's max pool backward), masked by the ReLU (:func:`_pool_epilogue`). A tile's
    box has even sides, so it holds whole windows."""
    BH: tl.constexpr = BLOCK_M // BOX_W
    tiles = table + FORWARD_FIELDS * G
    for item in tl.range(tl.program_id(0), tl.load(tiles + G), tl.num_programs(0)):
        g = _problem(tiles, G, item, G_P2)
        row = table + g * FORWARD_FIELDS
        ring = _address(g, r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15)
        frame = _address(g, f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11, f12, f13, f14, f15)
        weight = _address(g, w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15)
        tile = (item - tl.load(tiles + g)).to(tl.int32)
        if _field(row, 11) <= SMALL_CHANNELS:  # few channels (the RGB stem's): K steps of SMALL_CHANNELS
            acc, b, y0, x0, n0 = _grouped_forward_tile(row, tile, ring, frame, weight, KT, KH, KW, PUSH, DTYPE,
                                                       BH, BOX_W, BLOCK_M, BLOCK_N, SMALL_CHANNELS)
        else:
            acc, b, y0, x0, n0 = _grouped_forward_tile(row, tile, ring, frame, weight, KT, KH, KW, PUSH, DTYPE,
                                                       BH, BOX_W, BLOCK_M, BLOCK_N, BLOCK_K)
        B, C_OUT, H_OUT, W_OUT = _field(row, 10), _field(row, 14), _field(row, 15), _field(row, 16)
        out = _address(g, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15)
        if tl.load(row + 24) != 0:
            bias = _address(g, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15)
            acc += _bias_row(bias.to(tl.pointer_type(BIAS)), n0, C_OUT, BLOCK_N)
        _stage_store(acc, row, out, _address(g, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15),
                     _address(g, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15),
                     b, y0, x0, n0, B, C_OUT, H_OUT, W_OUT, 7, 25, 26, POOL, DTYPE, BH, BOX_W, BLOCK_N)
    if PUSH:  # every frame into its slot: no tile of the launch reads a slot being pushed
        boxes = tiles + G + 1
        for box in tl.range(tl.program_id(0), tl.load(boxes + G), tl.num_programs(0)):
            g = _problem(boxes, G, box, G_P2)
            ring_d, frame_d, B, C, H, W, R, slot = _forward_problem(
                table + g * FORWARD_FIELDS, _address(g, r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14,
                                                     r15),
                _address(g, f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11, f12, f13, f14, f15), PUSH, DTYPE, BH,
                BOX_W, BLOCK_K)
            _push_box(ring_d, frame_d, (box - tl.load(boxes + g)).to(tl.int32), slot, tl.cdiv(C, BLOCK_K), H, W, BH,
                      BOX_W, BLOCK_K)


@triton.jit
def _bias_row(bias, n0, C_OUT, BLOCK_N: tl.constexpr):
    """``[1, BLOCK_N]`` fp32: the bias of output channels ``n0 ..`` (0 past C_OUT)."""
    n = n0 + tl.arange(0, BLOCK_N)
    return tl.load(bias + n, mask=n < C_OUT, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _stage_store(acc, row, out, err, conv_err, b, y0, x0, n0, B, C_OUT, H_OUT, W_OUT, OUT_AT: tl.constexpr,
                 FLAGS_AT: tl.constexpr, ERR_AT: tl.constexpr, POOL: tl.constexpr, DTYPE: tl.constexpr,
                 BH: tl.constexpr, BOX_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """A Sideways chain stage's epilogue of the fp32 tile ``acc`` (its bias added) of a conv's
    output ``[B, H_OUT, W_OUT, C_OUT]`` at ``(b, y0, x0)``, channels ``n0 ..``: a ReLU (flag bit 0),
    the result in ``DTYPE`` stored to ``out`` and the error that arrived for it (``err``, written
    last tick) masked in place by the ReLU's mask (bit 1; the mask of the 16-bit output as stored,
    so autograd's ``threshold_backward`` to the bit); with ``POOL``, a 1x2x2 max pool after the ReLU
    (``out`` and ``err`` are the pooled output's, half the size, floor) and the error at the conv's
    output stored to ``conv_err`` (:func:`_pool_epilogue`; ReLU and error always: the host's rule).
    ``row``: the problem's table row — the output's strides (b, h, w) at ``OUT_AT``, the flags at
    ``FLAGS_AT``, the error's strides at ``ERR_AT`` and (``POOL``) the conv error's after them."""
    epilogue = tl.load(row + FLAGS_AT)
    if epilogue & 1:
        acc = tl.maximum(acc, 0.0)
    y = acc.to(DTYPE)
    o_b, o_h, o_w = tl.load(row + OUT_AT), tl.load(row + OUT_AT + 1), tl.load(row + OUT_AT + 2)
    e_b, e_h, e_w = tl.load(row + ERR_AT), tl.load(row + ERR_AT + 1), tl.load(row + ERR_AT + 2)
    if POOL:
        out_d = tl.make_tensor_descriptor(out.to(tl.pointer_type(DTYPE)), [B, H_OUT // 2, W_OUT // 2, C_OUT],
                                          [o_b, o_h, o_w, 1], [1, BH // 2, BOX_W // 2, BLOCK_N])
        err_d = tl.make_tensor_descriptor(err.to(tl.pointer_type(DTYPE)), [B, H_OUT // 2, W_OUT // 2, C_OUT],
                                          [e_b, e_h, e_w, 1], [1, BH // 2, BOX_W // 2, BLOCK_N])
        pooled, at_conv = _pool_epilogue(y, err_d.load([b, y0 // 2, x0 // 2, n0]).reshape(BH // 2, BOX_W // 2,
                                                                                           BLOCK_N),
                                         BH, BOX_W, BLOCK_N)
        out_d.store([b, y0 // 2, x0 // 2, n0], pooled.reshape(1, BH // 2, BOX_W // 2, BLOCK_N))
        conv_err_d = tl.make_tensor_descriptor(conv_err.to(tl.pointer_type(DTYPE)), [B, H_OUT, W_OUT, C_OUT],
                                               [tl.load(row + ERR_AT + 3), tl.load(row + ERR_AT + 4),
                                                tl.load(row + ERR_AT + 5), 1], [1, BH, BOX_W, BLOCK_N])
        conv_err_d.store([b, y0, x0, n0], at_conv.reshape(1, BH, BOX_W, BLOCK_N))
    else:
        out_d = tl.make_tensor_descriptor(out.to(tl.pointer_type(DTYPE)), [B, H_OUT, W_OUT, C_OUT],
                                          [o_b, o_h, o_w, 1], [1, BH, BOX_W, BLOCK_N])
        out_d.store([b, y0, x0, n0], y.reshape(1, BH, BOX_W, BLOCK_N))
        if epilogue & 2:
            err_d = tl.make_tensor_descriptor(err.to(tl.pointer_type(DTYPE)), [B, H_OUT, W_OUT, C_OUT],
                                              [e_b, e_h, e_w, 1], [1, BH, BOX_W, BLOCK_N])
            e = err_d.load([b, y0, x0, n0]).reshape(BH * BOX_W, BLOCK_N)
            err_d.store([b, y0, x0, n0], tl.where(y > 0, e, tl.zeros_like(e)).reshape(1, BH, BOX_W, BLOCK_N))


EPILOGUE_FIELDS = tl.constexpr(18)  # a problem's row in a grouped stage epilogue's table


@triton.jit
def _grouped_stage_epilogue_kernel(
        table, G,
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,  # the convs' outputs (no bias)
        b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15,  # the biases' (or any)
        o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15,  # the outputs'
        e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15,  # the errors masked (or any)
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15,  # POOL: the errors at the convs'
        POOL: tl.constexpr, DTYPE: tl.constexpr, BIAS: tl.constexpr, G_P2: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BOX_W: tl.constexpr):
    """The epilogues of :func:`_grouped_box_forward_kernel` (:func:`_stage_store`) for convs whose
    forwards ran elsewhere (cuDNN, where the dispatch sends them, or a conv off the box path): one
    persistent launch over every such stage's output tiles instead of a bias add, a ReLU, a pool,
    a copy into the next stage's buffer and their backwards per stage. ``table`` (int64): per
    problem (EPILOGUE_FIELDS) the conv output's strides (b, h, w), B, C_OUT, H_OUT, W_OUT, whether
    it has a bias, the output's strides (b, h, w), the flags, the error's strides (b, h, w) and the
    conv error's (``POOL``); then each problem's first tile and their total (G + 1). A bias given
    here is one the conv output does not hold yet (cuDNN's, which the torch backend adds after the
    convolution): added in fp32 before the one rounding to ``DTYPE``, as that ``add_`` rounds."""
    BH: tl.constexpr = BLOCK_M // BOX_W
    tiles = table + EPILOGUE_FIELDS * G
    for item in tl.range(tl.program_id(0), tl.load(tiles + G), tl.num_programs(0)):
        g = _problem(tiles, G, item, G_P2)
        row = table + g * EPILOGUE_FIELDS
        B, C_OUT, H_OUT, W_OUT = _field(row, 3), _field(row, 4), _field(row, 5), _field(row, 6)
        conv = _address(g, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
        conv_d = tl.make_tensor_descriptor(conv.to(tl.pointer_type(DTYPE)), [B, H_OUT, W_OUT, C_OUT],
                                           [tl.load(row), tl.load(row + 1), tl.load(row + 2), 1],
                                           [1, BH, BOX_W, BLOCK_N])
        tiles_n = tl.cdiv(C_OUT, BLOCK_N)
        tile = (item - tl.load(tiles + g)).to(tl.int32)
        b, y0, x0 = _box_of(tile // tiles_n, tl.cdiv(H_OUT, BH), tl.cdiv(W_OUT, BOX_W), BH, BOX_W)
        n0 = tile % tiles_n * BLOCK_N
        acc = conv_d.load([b, y0, x0, n0]).reshape(BLOCK_M, BLOCK_N).to(tl.float32)
        if tl.load(row + 7) != 0:
            bias = _address(g, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15)
            acc += _bias_row(bias.to(tl.pointer_type(BIAS)), n0, C_OUT, BLOCK_N)
        _stage_store(acc, row, _address(g, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15),
                     _address(g, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15),
                     _address(g, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15),
                     b, y0, x0, n0, B, C_OUT, H_OUT, W_OUT, 8, 11, 12, POOL, DTYPE, BH, BOX_W, BLOCK_N)


@triton.jit
def _pool_epilogue(y, pooled_error, BH: tl.constexpr, BW: tl.constexpr, N: tl.constexpr):
    """A ``[BH·BW positions, N]`` tile of ReLU outputs (rows: a BH x BW box, row-major) through a
    2x2 max pool: (the pooled ``[BH/2, BW/2, N]`` tile, the error at the tile's positions) — each
    window's ``pooled_error`` at its first maximum in row-major order (PyTorch's max pool backward
    sends it there), zero where the maximum is not positive (the ReLU's backward there)."""
    windows = tl.permute(y.reshape(BH // 2, 2, BW // 2, 2, N), (0, 2, 4, 1, 3))  # [BH/2, BW/2, N, dy, dx]
    left, right = tl.split(windows)
    v00, v10 = tl.split(left)
    v01, v11 = tl.split(right)
    top = tl.maximum(tl.maximum(v00, v01), tl.maximum(v10, v11))
    f00 = v00 == top
    f01 = (v01 == top) & ~f00
    f10 = (v10 == top) & ~(f00 | f01)
    f11 = ~(f00 | f01 | f10)
    zero = tl.zeros_like(pooled_error)
    e = tl.where(top > 0, pooled_error, zero)
    left = tl.join(tl.where(f00, e, zero), tl.where(f10, e, zero))
    right = tl.join(tl.where(f01, e, zero), tl.where(f11, e, zero))
    return top, tl.permute(tl.join(left, right), (0, 3, 1, 4, 2)).reshape(BH * BW, N)


@triton.jit
def _grouped_forward_tile(row, tile, ring, frame, weight, KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                          PUSH: tl.constexpr, DTYPE: tl.constexpr, BH: tl.constexpr, BOX_W: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Output tile ``tile`` of a grouped forward's problem (its ``row`` of the table; its ring's,
    frame's and weight's addresses), in K steps of BLOCK_K channels: (the fp32 sum, b, y0, x0, n0)."""
    ring_d, frame_d, B, C, H, W, R, slot = _forward_problem(row, ring, frame, PUSH, DTYPE, BH, BOX_W, BLOCK_K)
    C_OUT, H_OUT, W_OUT = _field(row, 14), _field(row, 15), _field(row, 16)
    w_d = tl.make_tensor_descriptor(weight.to(tl.pointer_type(DTYPE)), [KT * KH * KW * C, C_OUT], [C_OUT, 1],
                                    [BLOCK_K, BLOCK_N])
    tiles_n = tl.cdiv(C_OUT, BLOCK_N)
    c_blocks = tl.cdiv(C, BLOCK_K)
    steps = KT * KH * KW * c_blocks
    older = (KT - 1) * KH * KW * c_blocks if PUSH else steps
    b, y0, x0 = _box_of(tile // tiles_n, tl.cdiv(H_OUT, BH), tl.cdiv(W_OUT, BOX_W), BH, BOX_W)
    n0 = tile % tiles_n * BLOCK_N
    acc = _forward_tile(ring_d, frame_d, w_d, b, y0, x0, n0, 0, steps, older, c_blocks, C, slot, _field(row, 19),
                        _field(row, 20), _field(row, 21), _field(row, 22), _field(row, 23), R, KT, KH, KW, PUSH,
                        BLOCK_M, BLOCK_N, BLOCK_K)
    return acc, b, y0, x0, n0


@triton.jit
def _forward_problem(row, ring, frame, PUSH: tl.constexpr, DTYPE: tl.constexpr, BH: tl.constexpr,
                     BOX_W: tl.constexpr, BLOCK_K: tl.constexpr):
    """A grouped forward's problem (its ``row`` of the table, its ring's and frame's addresses): the
    descriptors of its ring and (``PUSH``) its frame, boxes of BLOCK_K channels, and B, C, H, W, R,
    slot."""
    B, C, H, W = _field(row, 10), _field(row, 11), _field(row, 12), _field(row, 13)
    R, slot = _field(row, 17), _field(row, 18)
    ring_d = tl.make_tensor_descriptor(ring.to(tl.pointer_type(DTYPE)), [R, B, H, W, C],
                                       [tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), 1],
                                       [1, 1, BH, BOX_W, BLOCK_K])
    if PUSH:
        frame_d = tl.make_tensor_descriptor(frame.to(tl.pointer_type(DTYPE)), [B, H, W, C],
                                            [tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), 1],
                                            [1, BH, BOX_W, BLOCK_K])
    else:
        frame_d = ring_d  # (never read)
    return ring_d, frame_d, B, C, H, W, R, slot


@triton.jit
def _box_weight_item(g_d, ring_d, partials, tile, split, chunk, boxes, boxes_h, boxes_w, tiles_m, tiles_n, C, C_OUT, R,
                     slot, pad_h, pad_w, dil_h, dil_w, dil_t,
                     KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BOX_W: tl.constexpr):
    """One work item of a weight update: split ``split`` (boxes ``split·chunk`` onwards) of output
    tile ``tile`` (BLOCK_M output x BLOCK_N input channels of TAPS consecutive taps), left as fp32
    partials (:func:`.kernels._store_partial`). The error box of a K step is loaded once and meets
    each tap's shifted ring box, one accumulator per tap."""
    BH: tl.constexpr = BLOCK_K // BOX_W
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


@triton.jit
def _box_bias_item(g_d, bias_partials, m_tile, split, chunk, boxes, boxes_h, boxes_w, C_OUT, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr, BOX_W: tl.constexpr):
    """The bias gradient's work item of a grouped weight update: the error's sum over split
    ``split``'s boxes for output channels ``m_tile·BLOCK_M ..``, at ``bias_partials[split, m]``. Its
    own item, not a sum inside the GEMM's: that would pull each error box from shared memory into
    registers beside the accumulators (on sm_90a: 255 registers and spills)."""
    BH: tl.constexpr = BLOCK_K // BOX_W
    m0 = m_tile * BLOCK_M
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for box in range(split * chunk, tl.minimum(split * chunk + chunk, boxes)):
        b, y0, x0 = _box_of(box, boxes_h, boxes_w, BH, BOX_W)
        acc += tl.sum(g_d.load([b, y0, x0, m0]).reshape(BLOCK_K, BLOCK_M).to(tl.float32), axis=0)
    m = m0 + tl.arange(0, BLOCK_M)
    tl.store(bias_partials + split * C_OUT + m, acc, mask=m < C_OUT)


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

    A tile is BLOCK_M output channels x BLOCK_N input channels of TAPS consecutive taps (1-3).
    Work items are (tile, split) (:func:`_box_weight_item`): each split runs its share of the
    tile's boxes and leaves fp32 partials, which the second launch
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
        _box_weight_item(g_d, ring_d, partials, item // splits, (item % splits + split_rotation) % splits, chunk,
                         boxes, boxes_h, boxes_w, tiles_m, tiles_n, C, C_OUT, R, slot, pad_h, pad_w, dil_h, dil_w,
                         dil_t, KT, KH, KW, TAPS, BLOCK_M, BLOCK_N, BLOCK_K, BOX_W)


@triton.jit
def _grouped_box_weight_update_kernel(
        partials, table, G,
        e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15,  # the errors' addresses
        r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15,  # the rings'
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr, DTYPE: tl.constexpr,
        G_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BOX_W: tl.constexpr):
    """:func:`_box_weight_update_kernel` for several problems at once — each layer of a tick whose
    kernel has this shape — in one persistent launch: the programs walk the problems' work items
    together, so small layers fill the SMs beside large ones and a tick's updates cost one launch.
    ``table`` (int64): per problem (24 fields) its partials' offset, its bias partials' offset (-1:
    no bias; else its items are followed by :func:`_box_bias_item`'s), the error's strides (b, h, w), the ring's (r, b,
    h, w), B, C, H, W, C_OUT, H_OUT, W_OUT, R, slot, pad_h, pad_w, dil_h, dil_w, dil_t, splits; then
    ``starts`` (G + 1: each problem's first item, then their total). ``DTYPE``: the activations'.
    A problem's descriptors are made where its item is taken; one of at most SMALL_CHANNELS input
    channels takes tiles of SMALL_CHANNELS of them, not BLOCK_N."""
    BH: tl.constexpr = BLOCK_K // BOX_W
    starts = table + 24 * G
    for item in tl.range(tl.program_id(0), tl.load(starts + G), tl.num_programs(0)):
        g = _problem(starts, G, item, G_P2)
        row = table + g * 24
        grad_out = _address(g, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15)
        ring = _address(g, r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15)
        bias_at = tl.load(row + 1)
        B, C, H, W = _field(row, 9), _field(row, 10), _field(row, 11), _field(row, 12)
        C_OUT, H_OUT, W_OUT, R = _field(row, 13), _field(row, 14), _field(row, 15), _field(row, 16)
        splits = _field(row, 23)
        g_d = tl.make_tensor_descriptor(grad_out.to(tl.pointer_type(DTYPE)), [B, H_OUT, W_OUT, C_OUT],
                                        [tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), 1],
                                        [1, BH, BOX_W, BLOCK_M])
        boxes_h, boxes_w = tl.cdiv(H_OUT, BH), tl.cdiv(W_OUT, BOX_W)
        boxes = B * boxes_h * boxes_w
        few = C <= SMALL_CHANNELS  # few channels (the RGB stem's): tiles of SMALL_CHANNELS input channels
        tiles_m, tiles_n = tl.cdiv(C_OUT, BLOCK_M), tl.cdiv(C, tl.where(few, SMALL_CHANNELS, BLOCK_N))
        local = (item - tl.load(starts + g)).to(tl.int32)
        gemm_items = tiles_m * tiles_n * (KT * KH * KW // TAPS) * splits
        if local < gemm_items:
            if few:
                _grouped_weight_item(g_d, ring, row, partials, local, splits, boxes, boxes_h, boxes_w, tiles_m,
                                     tiles_n, B, C, H, W, C_OUT, R, KT, KH, KW, TAPS, DTYPE, BLOCK_M,
                                     SMALL_CHANNELS, BLOCK_K, BOX_W)
            else:
                _grouped_weight_item(g_d, ring, row, partials, local, splits, boxes, boxes_h, boxes_w, tiles_m,
                                     tiles_n, B, C, H, W, C_OUT, R, KT, KH, KW, TAPS, DTYPE, BLOCK_M, BLOCK_N,
                                     BLOCK_K, BOX_W)
        else:
            local -= gemm_items
            _box_bias_item(g_d, partials + bias_at, local // splits, local % splits, tl.cdiv(boxes, splits), boxes,
                           boxes_h, boxes_w, C_OUT, BLOCK_M, BLOCK_K, BOX_W)


@triton.jit
def _grouped_weight_item(g_d, ring, row, partials, local, splits, boxes, boxes_h, boxes_w, tiles_m, tiles_n, B, C, H,
                         W, C_OUT, R, KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr,
                         DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BOX_W: tl.constexpr):
    """GEMM item ``local`` of a grouped weight update's problem (its table ``row``), in tiles of
    BLOCK_N input channels: its ring's descriptor in boxes that wide, then :func:`_box_weight_item`."""
    BH: tl.constexpr = BLOCK_K // BOX_W
    ring_d = tl.make_tensor_descriptor(ring.to(tl.pointer_type(DTYPE)), [R, B, H, W, C],
                                       [tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), 1],
                                       [1, 1, BH, BOX_W, BLOCK_N])
    _box_weight_item(g_d, ring_d, partials + tl.load(row), local // splits, local % splits, tl.cdiv(boxes, splits),
                     boxes, boxes_h, boxes_w, tiles_m, tiles_n, C, C_OUT, R, _field(row, 17), _field(row, 18),
                     _field(row, 19), _field(row, 20), _field(row, 21), _field(row, 22), KT, KH, KW, TAPS, BLOCK_M,
                     BLOCK_N, BLOCK_K, BOX_W)
