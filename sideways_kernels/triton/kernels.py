"""Triton kernels of the sideways ops: implicit GEMMs over the ring, fp32 accumulation.
On CPU they run under TRITON_INTERPRET=1 (float32/float16), which is how CI checks them.

Index conventions match csrc/ (see sideways_kernels/ops.py): ring [R, B, C, H, W], weight
[C_out, C/groups, k_t, k_h, k_w], tap j reads slot (slot - (k_t-1-j)*dil_t) mod R.
"""
import triton
import triton.language as tl


@triton.jit
def _tap_slot(slot, j, KT: tl.constexpr, dil_t, R):
    return ((slot - (KT - 1 - j) * dil_t) % R + R) % R


@triton.jit
def _ring_conv_forward_kernel(
        ring, weight, bias, out,
        s_r, s_b, s_c, s_h, s_w,  # ring strides
        w_o, w_c, w_t, w_h, w_w,  # weight strides
        o_b, o_c, o_h, o_w,  # out strides
        B, cg, H, W, mg, H_OUT, W_OUT, R, slot,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, dil_t,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
        FOLD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b, g*Mg+n, oy, ox] = sum over taps (j, kh, kw) and channels c of ring[tap j] x weight;
    M = B*H_OUT*W_OUT output pixels, N = mg output channels of a group, K = taps x cg.

    Tap-major: one loop over (tap, channel block); for a fixed tap the ring operand is a dense
    2-D slice [pixels, channels] of the channels-last frame, addressed as a per-pixel row offset
    plus a per-channel offset (as a plain GEMM), so index math stays on [BLOCK_M] vectors.
    ``cg``, ``mg``: input and output channels per group, arguments (not derived from the totals)
    so that Triton's specialisation sees a multiple of 16 in them and in a group's channel offset,
    which moves the tensors' bases once: a grouped conv loads whole 16-byte vectors, pipelined, as
    one group does. ``FOLD``: few channels (an RGB stem's 3, a depthwise conv's 1; the count, as a
    constant, or 0): K is walked as one run of (tap, channel) pairs, each K step gathering BLOCK_K
    of them, so 3 channels x 27 taps cost 81 columns of the MMA, not 27 blocks of channels."""
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # the group's channels: the tensors' bases moved to them once (the per-element math is one group's)
    ring += g * cg * s_c
    weight += g * mg * w_o
    bias += g * mg
    out += g * mg * o_c
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b, oy, ox = m // (H_OUT * W_OUT), (m // W_OUT) % H_OUT, m % W_OUT
    m_ok, n_ok = m < B * H_OUT * W_OUT, n < mg
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FOLD:
        pairs = KT * KH * KW * FOLD
        for k0 in range(0, pairs, BLOCK_K):
            f = k0 + rk  # (tap, channel) pairs
            tap, c = f // FOLD, f % FOLD
            j, kh, kw = tap // (KH * KW), (tap // KW) % KH, tap % KW
            y = oy[:, None] * stride_h - pad_h + (kh * dil_h)[None, :]
            x = ox[:, None] * stride_w - pad_w + (kw * dil_w)[None, :]
            ok = m_ok[:, None] & (f < pairs)[None, :] & (y >= 0) & (y < H) & (x >= 0) & (x < W)
            column = _tap_slot(slot, j, KT, dil_t, R).to(tl.int64) * s_r + c * s_c
            a = tl.load(ring + (b.to(tl.int64) * s_b)[:, None] + column[None, :] + y * s_h + x * s_w, mask=ok,
                        other=0.0)
            w = tl.load(weight + n[None, :] * w_o + (c * w_c + j * w_t + kh * w_h + kw * w_w)[:, None],
                        mask=(f < pairs)[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
    else:
        c_blocks = tl.cdiv(cg, BLOCK_K)
        for kk in range(0, KT * KH * KW * c_blocks):
            tap = kk // c_blocks
            c = (kk % c_blocks) * BLOCK_K + rk
            j, kh, kw = tap // (KH * KW), (tap // KW) % KH, tap % KW
            y = oy * stride_h - pad_h + kh * dil_h
            x = ox * stride_w - pad_w + kw * dil_w
            row_ok = m_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
            row = _tap_slot(slot, j, KT, dil_t, R) * s_r + b.to(tl.int64) * s_b + y * s_h + x * s_w
            c_ok = c < cg
            a = tl.load(ring + row[:, None] + c[None, :] * s_c, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(weight + n[None, :] * w_o + c[:, None] * w_c + (j * w_t + kh * w_h + kw * w_w),
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + b.to(tl.int64)[:, None] * o_b + n[None, :] * o_c + oy[:, None] * o_h + ox[:, None] * o_w,
             acc.to(out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _window_input_grad_kernel(
        grad_out, wsum, grad_in,
        g_b, g_c, g_h, g_w,  # grad_out strides
        w_o, w_c, w_h, w_w,  # summed-weight strides [C_out, C/groups, KH, KW]
        i_b, i_c, i_h, i_w,  # grad_in strides
        B, cg, H, W, mg, H_OUT, W_OUT,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_in[b, g*Cg+n, y, x] = sum over (kh, kw) and co of grad_out[b, co, oy, ox] * wsum[co, n, kh, kw]
    where oy*stride = y + pad - kh*dil: the transposed conv with the taps' weights summed.
    Tap-major like the forward: per (kh, kw) a dense [pixels, output channels] slice of grad_out."""
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    grad_out += g * mg * g_c  # the group's channels (as the forward's)
    wsum += g * mg * w_o
    grad_in += g * cg * i_c
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b, y, x = m // (H * W), (m // W) % H, m % W
    m_ok, n_ok = m < B * H * W, n < cg
    rk = tl.arange(0, BLOCK_K)
    co_blocks = tl.cdiv(mg, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, KH * KW * co_blocks):
        tap = kk // co_blocks
        co = (kk % co_blocks) * BLOCK_K + rk
        kh, kw = tap // KW, tap % KW
        ty = y + pad_h - kh * dil_h
        tx = x + pad_w - kw * dil_w
        oy, ox = ty // stride_h, tx // stride_w
        row_ok = (m_ok & (ty >= 0) & (tx >= 0) & (ty % stride_h == 0) & (tx % stride_w == 0) & (oy < H_OUT)
                  & (ox < W_OUT))
        row = b.to(tl.int64) * g_b + oy * g_h + ox * g_w
        co_ok = co < mg
        a = tl.load(grad_out + row[:, None] + co[None, :] * g_c, mask=row_ok[:, None] & co_ok[None, :],
                    other=0.0)
        w = tl.load(wsum + co[:, None] * w_o + n[None, :] * w_c + (kh * w_h + kw * w_w),
                    mask=co_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
    tl.store(grad_in + b.to(tl.int64)[:, None] * i_b + n[None, :] * i_c + y[:, None] * i_h
             + x[:, None] * i_w, acc.to(grad_in.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _weight_epilogue(acc, target, momentum_buffer, offs, ok, lr, momentum, dampening, weight_decay,
                     SGD: tl.constexpr, HAS_BUFFER, NESTEROV: tl.constexpr, FIRST_STEP):
    """Add the weight gradient ``acc`` to grad_weight (``target``), or apply torch.optim.SGD's
    step with it to the weight; ``offs``/``ok``: the elements' offsets and which are real.
    ``HAS_BUFFER`` and ``FIRST_STEP`` are constants in one layer's launch and read from the
    problem table in a grouped one."""
    p = tl.load(target + offs, mask=ok, other=0.0).to(tl.float32)
    if SGD:
        d = acc + weight_decay * p
        if HAS_BUFFER:
            if FIRST_STEP:
                v = d
            else:
                v = momentum * tl.load(momentum_buffer + offs, mask=ok, other=0.0).to(tl.float32) + (1 - dampening) * d
            tl.store(momentum_buffer + offs, v.to(momentum_buffer.dtype.element_ty), mask=ok)
            if NESTEROV:
                d = d + momentum * v
            else:
                d = v
        p = p - lr * d
    else:
        p = p + acc
    tl.store(target + offs, p.to(target.dtype.element_ty), mask=ok)


@triton.jit
def _store_partial(partials, split, tap, row0, rows_valid, col0, cols_valid, C_OUT, CG, TAPS: tl.constexpr, acc,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A program's fp32 partial of the weight gradient: ``acc`` is dW of output channels ``row0 + i``
    (``i < rows_valid``) x input channels ``col0 + j`` (``j < cols_valid``) of ``tap`` over the
    program's range of K, stored at ``partials[split, tap, row, col]`` (dense ``[splits, TAPS,
    C_OUT, CG]``), where :func:`_weight_finish_kernel` sums the splits."""
    i, j = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    rows = ((split * TAPS + tap) * C_OUT + row0 + i).to(tl.int64) * CG
    tl.store(partials + rows[:, None] + (col0 + j)[None, :], acc,
             mask=(i < rows_valid)[:, None] & (j < cols_valid)[None, :])


@triton.jit
def _finish_pairs(partials, target, momentum_buffer, block, splits, C_OUT, CG, t_o, t_c, t_t, t_h, t_w,
                  lr, momentum, dampening, weight_decay, KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                  SGD: tl.constexpr, HAS_BUFFER, NESTEROV: tl.constexpr, FIRST_STEP, DENSE: tl.constexpr,
                  TAPS_P2: tl.constexpr, BLOCK_MC: tl.constexpr):
    """Block ``block`` of a weight update's finish: every tap of BLOCK_MC (output, input channel)
    pairs, the splits' partials (``partials``: dense ``[splits, taps, C_OUT, CG]``, fp32) summed in
    split order, then the epilogue on ``target`` (strides ``t_*``)."""
    TAPS: tl.constexpr = KT * KH * KW
    tap = tl.arange(0, TAPS_P2)
    mc = block * BLOCK_MC + tl.arange(0, BLOCK_MC)  # m · CG + c
    ok = (tap < TAPS)[:, None] & (mc < C_OUT * CG)[None, :]
    plane = TAPS * C_OUT * CG  # one split's partials
    cell = tap[:, None] * (C_OUT * CG) + mc[None, :]
    acc = tl.zeros((TAPS_P2, BLOCK_MC), dtype=tl.float32)
    for split in tl.range(0, splits, num_stages=3):  # loads pipelined (configs.FINISH), the sum in split order
        acc += tl.load(partials + cell + split * plane, mask=ok, other=0.0)
    if DENSE:
        offs = mc[None, :] * TAPS + tap[:, None]
    else:
        m, c = mc // CG, mc % CG
        j, kh, kw = tap // (KH * KW), (tap // KW) % KH, tap % KW
        offs = (m * t_o + c * t_c)[None, :] + (j * t_t + kh * t_h + kw * t_w)[:, None]
    _weight_epilogue(acc, target, momentum_buffer, offs, ok, lr, momentum, dampening, weight_decay, SGD, HAS_BUFFER,
                     NESTEROV, FIRST_STEP)


@triton.jit
def _weight_finish_kernel(
        partials, target, momentum_buffer, splits, C_OUT, CG,
        t_o, t_c, t_t, t_h, t_w,  # target (grad_weight or weight) strides; the buffer shares them
        lr, momentum, dampening, weight_decay,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SGD: tl.constexpr, HAS_BUFFER: tl.constexpr,
        NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, DENSE: tl.constexpr, TAPS_P2: tl.constexpr,
        BLOCK_MC: tl.constexpr):
    """The weight update's second launch: dW[tap, m, c] = the splits' partials (``partials``, dense
    ``[splits, taps, C_OUT, CG]``, fp32) summed in split order — the same bits however the first
    launch's programs ran — then the epilogue: add to grad_weight, or torch.optim.SGD's whole
    step on the weight. A program takes every tap of BLOCK_MC (output, input channel) pairs: the
    partials are contiguous along the pairs, a weight ``[C_OUT, CG, k_t, k_h, k_w]`` along the taps
    (``DENSE``: laid out so, its offsets written as such, which lets Triton coalesce both sides;
    else its strides), and a tile holds both runs. Every program is independent. (The sum used to
    run in the first launch, by the program arriving last at a tile: that program summed all
    splits alone, a chain of dependent loads, while the other SMs idled — on an H100 more than
    half of the update.)"""
    _finish_pairs(partials, target, momentum_buffer, tl.program_id(0), splits, C_OUT, CG, t_o, t_c, t_t, t_h, t_w,
                  lr, momentum, dampening, weight_decay, KT, KH, KW, SGD, HAS_BUFFER, NESTEROV, FIRST_STEP, DENSE,
                  TAPS_P2, BLOCK_MC)


# A grouped launch takes at most this many problems: their tensors' addresses are kernel
# arguments (a CUDA graph captures arguments; a device table of addresses would have to be copied
# from the host inside the capture, where the addresses are first known).
GROUP = 16


@triton.jit
def _address(g, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15):
    """Argument ``a<g>``, an address (int64): problem ``g``'s tensor in a grouped launch."""
    a = a0
    a = tl.where(g == 1, a1, a)
    a = tl.where(g == 2, a2, a)
    a = tl.where(g == 3, a3, a)
    a = tl.where(g == 4, a4, a)
    a = tl.where(g == 5, a5, a)
    a = tl.where(g == 6, a6, a)
    a = tl.where(g == 7, a7, a)
    a = tl.where(g == 8, a8, a)
    a = tl.where(g == 9, a9, a)
    a = tl.where(g == 10, a10, a)
    a = tl.where(g == 11, a11, a)
    a = tl.where(g == 12, a12, a)
    a = tl.where(g == 13, a13, a)
    a = tl.where(g == 14, a14, a)
    a = tl.where(g == 15, a15, a)
    return a


@triton.jit
def _field(row, i):
    """Field ``i`` of a problem's row of a grouped launch's table, as int32."""
    return tl.load(row + i).to(tl.int32)


@triton.jit
def _problem(starts, G, index, G_P2: tl.constexpr):
    """The problem whose range of work (``starts[g]`` up to ``starts[g + 1]``) holds ``index``."""
    first = tl.load(starts + tl.arange(0, G_P2), mask=tl.arange(0, G_P2) < G, other=2 ** 62)
    return tl.sum((first <= index).to(tl.int32)) - 1


@triton.jit
def _grouped_weight_finish_kernel(
        partials, table, hyper, G,
        t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15,  # targets' addresses
        b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15,  # momentum buffers' (or a target's)
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SGD: tl.constexpr, NESTEROV: tl.constexpr,
        TARGET: tl.constexpr, G_P2: tl.constexpr, TAPS_P2: tl.constexpr, BLOCK_MC: tl.constexpr):
    """The finish of :func:`_weight_finish_kernel` for every problem of a grouped weight update
    (each layer of a tick whose kernel has this shape, and each layer's bias as a problem of one
    tap) in one launch: program ``p`` finishes block ``p - starts[g]`` of problem ``g``. ``table``
    (int64): per problem its partials' offset, splits, C_OUT, CG, has-buffer, first-step, whether
    it is a bias (7 fields), then ``starts`` (G + 1: each problem's first block, then their total);
    ``hyper`` (fp32): per problem lr, momentum, dampening, weight decay. Targets are dense, of
    ``TARGET``."""
    block = tl.program_id(0)
    g = _problem(table + 7 * G, G, block, G_P2)
    row = table + g * 7
    target = _address(g, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15)
    buffer = _address(g, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15)
    lr, momentum = tl.load(hyper + g * 4), tl.load(hyper + g * 4 + 1)
    dampening, weight_decay = tl.load(hyper + g * 4 + 2), tl.load(hyper + g * 4 + 3)
    target, buffer = target.to(tl.pointer_type(TARGET)), buffer.to(tl.pointer_type(TARGET))
    block -= tl.load(table + 7 * G + g)
    splits, c_out, cg = _field(row, 1), _field(row, 2), _field(row, 3)
    has_buffer, first = tl.load(row + 4) != 0, tl.load(row + 5) != 0
    if tl.load(row + 6) != 0:  # a bias: one tap
        _finish_pairs(partials + tl.load(row), target, buffer, block, splits, c_out, cg, 0, 0, 0, 0, 0, lr, momentum,
                      dampening, weight_decay, 1, 1, 1, SGD, has_buffer, NESTEROV, first, True, 1, BLOCK_MC)
    else:
        _finish_pairs(partials + tl.load(row), target, buffer, block, splits, c_out, cg, 0, 0, 0, 0, 0, lr, momentum,
                      dampening, weight_decay, KT, KH, KW, SGD, has_buffer, NESTEROV, first, True, TAPS_P2, BLOCK_MC)


@triton.jit
def _weight_update_kernel(
        grad_out, ring, partials,
        g_b, g_c, g_h, g_w,  # grad_out strides
        s_r, s_b, s_c, s_h, s_w,  # ring strides
        B, cg, H, W, mg, H_OUT, W_OUT, R, slot,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, dil_t, split_rotation,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PRECISION: tl.constexpr,
        FOLD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight gradient of one frame pair, dW[m, c, tap] = sum over (b, oy, ox) of grad_out x ring[tap],
    M = mg output channels of a group (``cg``, ``mg``: per group, as the forward's), K = B*H_OUT*W_OUT.
    Grid: (output tiles, splits, groups); an output tile is BLOCK_M output channels x BLOCK_N input
    channels of one tap (tap-major: per tap the ring operand is a dense [pixels, channels] slice,
    so the index math stays on [BLOCK_K] vectors).

    Split-K: the programs of axis 1 share a tile's reduction, each over its own range of K, and
    leave fp32 partials (:func:`_store_partial`) that :func:`_weight_finish_kernel` sums and
    applies. ``split_rotation`` renumbers the splits (0 in the ops; tests check that the result
    does not depend on which program ran which split). ``FOLD``: as the forward's, a tile's
    BLOCK_N columns are (tap, input channel) pairs of one run over every tap."""
    pid_tile, g = tl.program_id(0), tl.program_id(2)
    splits = tl.num_programs(1)
    split = (tl.program_id(1) + split_rotation) % splits
    grad_out += g * mg * g_c  # the group's channels (as the forward's)
    ring += g * cg * s_c
    gm = g * mg  # its first output channel: the partials' rows
    c_out = mg * tl.num_programs(2)  # every group's: the partials' rows
    if FOLD:  # a tile's columns: BLOCK_N of the (tap, channel) pairs; per column its tap's offsets
        pairs = KT * KH * KW * FOLD
        tiles_n = tl.cdiv(pairs, BLOCK_N)
        f = (pid_tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        tap, c = f // FOLD, f % FOLD
        c_ok = f < pairs
    else:  # a tile's columns: BLOCK_N input channels of one tap
        c_tiles = tl.cdiv(cg, BLOCK_N)
        tiles_n = KT * KH * KW * c_tiles
        tap, c_tile = (pid_tile % tiles_n) // c_tiles, (pid_tile % tiles_n) % c_tiles
        c = c_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ok = c < cg
    pid_m = pid_tile // tiles_n
    j, kh, kw = tap // (KH * KW), (tap // KW) % KH, tap % KW
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < mg
    tap_base = _tap_slot(slot, j, KT, dil_t, R).to(tl.int64) * s_r
    k_total = B * H_OUT * W_OUT
    chunk = tl.cdiv(tl.cdiv(k_total, BLOCK_K), splits) * BLOCK_K
    k_lo = split * chunk
    k_hi = tl.minimum(k_lo + chunk, k_total)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        b, oy, ox = k // (H_OUT * W_OUT), (k // W_OUT) % H_OUT, k % W_OUT
        e = tl.load(grad_out + (b.to(tl.int64) * g_b + oy * g_h + ox * g_w)[None, :] + m[:, None] * g_c,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if FOLD:  # [positions, pairs]: each column its own tap's shift and slot
            y = oy[:, None] * stride_h - pad_h + (kh * dil_h)[None, :]
            x = ox[:, None] * stride_w - pad_w + (kw * dil_w)[None, :]
            ok = k_ok[:, None] & c_ok[None, :] & (y >= 0) & (y < H) & (x >= 0) & (x < W)
            a = tl.load(ring + (b.to(tl.int64) * s_b)[:, None] + (tap_base + c * s_c)[None, :] + y * s_h
                        + x * s_w, mask=ok, other=0.0)
        else:
            y = oy * stride_h - pad_h + kh * dil_h
            x = ox * stride_w - pad_w + kw * dil_w
            row_ok = k_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
            row = tap_base + b.to(tl.int64) * s_b + y * s_h + x * s_w
            a = tl.load(ring + row[:, None] + c[None, :] * s_c, mask=row_ok[:, None] & c_ok[None, :],
                        other=0.0)
        acc += tl.dot(e, a.to(e.dtype), input_precision=PRECISION)
    if FOLD:
        i = tl.arange(0, BLOCK_M)  # partials[split, tap, row, c] (_store_partial's layout), per column
        rows = (split * KT * KH * KW + tap[None, :]) * c_out + (gm + pid_m * BLOCK_M + i)[:, None]
        tl.store(partials + rows.to(tl.int64) * FOLD + c[None, :], acc, mask=m_ok[:, None] & c_ok[None, :])
    else:
        _store_partial(partials, split, tap, gm + pid_m * BLOCK_M, mg - pid_m * BLOCK_M, c_tile * BLOCK_N,
                       cg - c_tile * BLOCK_N, c_out, cg, KT * KH * KW, acc, BLOCK_M, BLOCK_N)


@triton.jit
def _column_sum_kernel(x, partials, M, C, stride_m, rows_per_program, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                       STAGES: tl.constexpr):
    """partials[p, c] = the fp32 sum of x[r, c] over program p's rows (``rows_per_program``, a
    multiple of BLOCK_M): the first pass of a bias gradient, the error [B, C, H, W] channels-last
    read as M = B·H·W rows of C. Rows are read whole (the channels are contiguous), so a tile is
    one coalesced block where ATen's column reduction spreads few columns over many threads; the
    loop's loads are pipelined ``STAGES`` deep (Triton pipelines a loop without a dot only when
    asked)."""
    p, cb = tl.program_id(0), tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    end = tl.minimum(p * rows_per_program + rows_per_program, M)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in tl.range(p * rows_per_program, end, BLOCK_M, num_stages=STAGES):
        r = r0 + tl.arange(0, BLOCK_M)
        acc += tl.load(x + r.to(tl.int64)[:, None] * stride_m + c[None, :], mask=(r < end)[:, None] & c_ok[None, :],
                       other=0.0).to(tl.float32)
    tl.store(partials + p * C + c, tl.sum(acc, axis=0), mask=c_ok)


@triton.jit
def _column_sum_finish_kernel(partials, out, P, C, ACCUMULATE: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
    """out[c] = (out[c] +) the sum over p of partials[p, c], in p's order: the same bits on every
    run (no atomics), whatever the GPU's scheduling."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in tl.range(0, P, BLOCK_P, num_stages=STAGES):
        p = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(partials + p[:, None] * C + c[None, :], mask=(p < P)[:, None] & c_ok[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    if ACCUMULATE:
        total += tl.load(out + c, mask=c_ok).to(tl.float32)
    tl.store(out + c, total.to(out.dtype.element_ty), mask=c_ok)


@triton.jit
def _split_sum_kernel(partials, bias, out, splits, total, C_OUT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """The split-K box forward's second launch (:func:`.boxes._box_forward_kernel`): ``out`` (dense,
    channels innermost: ``total`` = positions · C_OUT elements) = the sum of the splits' fp32
    partials in split order (the same bits every run), + the bias, in ``out``'s dtype."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    at = partials + i
    for _ in range(splits):
        acc += tl.load(at, mask=ok, other=0.0)
        at += total
    if HAS_BIAS:
        acc += tl.load(bias + i % C_OUT, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + i, acc.to(out.dtype.element_ty), mask=ok)
