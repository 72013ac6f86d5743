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
        B, C, H, W, C_OUT, H_OUT, W_OUT, R, slot,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, dil_t, groups,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b, g*Mg+n, oy, ox] = sum over (c, j, kh, kw) of ring[tap j] x weight; M = B*H_OUT*W_OUT
    output pixels, N = C_OUT/groups output channels, K = C/groups * KT*KH*KW."""
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cg, mg = C // groups, C_OUT // groups
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b, oy, ox = m // (H_OUT * W_OUT), (m // W_OUT) % H_OUT, m % W_OUT
    m_ok, n_ok = m < B * H_OUT * W_OUT, n < mg
    k_total = cg * KT * KH * KW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_total, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_total
        c, rest = k // (KT * KH * KW), k % (KT * KH * KW)
        j, kh, kw = rest // (KH * KW), (rest // KW) % KH, rest % KW
        s = _tap_slot(slot, j, KT, dil_t, R)
        y = oy[:, None] * stride_h - pad_h + kh[None, :] * dil_h
        x = ox[:, None] * stride_w - pad_w + kw[None, :] * dil_w
        a_ok = m_ok[:, None] & k_ok[None, :] & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        a = tl.load(ring + s[None, :] * s_r + b[:, None] * s_b + (g * cg + c)[None, :] * s_c + y * s_h + x * s_w,
                    mask=a_ok, other=0.0)
        w = tl.load(weight + (g * mg + n)[None, :] * w_o + c[:, None] * w_c + j[:, None] * w_t + kh[:, None] * w_h
                    + kw[:, None] * w_w, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + g * mg + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + b[:, None] * o_b + (g * mg + n)[None, :] * o_c + oy[:, None] * o_h + ox[:, None] * o_w,
             acc.to(out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _window_input_grad_kernel(
        grad_out, wsum, grad_in,
        g_b, g_c, g_h, g_w,  # grad_out strides
        w_o, w_c, w_h, w_w,  # summed-weight strides [C_out, C/groups, KH, KW]
        i_b, i_c, i_h, i_w,  # grad_in strides
        B, C, H, W, C_OUT, H_OUT, W_OUT,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups,
        KH: tl.constexpr, KW: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_in[b, g*Cg+n, y, x] = sum over (co, kh, kw) of grad_out[b, co, oy, ox] * wsum[co, n, kh, kw]
    where oy*stride = y + pad - kh*dil: the transposed conv with the taps' weights summed."""
    pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cg, mg = C // groups, C_OUT // groups
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b, y, x = m // (H * W), (m // W) % H, m % W
    m_ok, n_ok = m < B * H * W, n < cg
    k_total = mg * KH * KW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_total, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_total
        co, kh, kw = k // (KH * KW), (k // KW) % KH, k % KW
        ty = y[:, None] + pad_h - kh[None, :] * dil_h
        tx = x[:, None] + pad_w - kw[None, :] * dil_w
        oy, ox = ty // stride_h, tx // stride_w
        a_ok = (m_ok[:, None] & k_ok[None, :] & (ty >= 0) & (tx >= 0) & (ty % stride_h == 0) & (tx % stride_w == 0)
                & (oy < H_OUT) & (ox < W_OUT))
        a = tl.load(grad_out + b[:, None] * g_b + (g * mg + co)[None, :] * g_c + oy * g_h + ox * g_w, mask=a_ok,
                    other=0.0)
        w = tl.load(wsum + (g * mg + co)[:, None] * w_o + n[None, :] * w_c + kh[:, None] * w_h + kw[:, None] * w_w,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
    tl.store(grad_in + b[:, None] * i_b + (g * cg + n)[None, :] * i_c + y[:, None] * i_h + x[:, None] * i_w,
             acc.to(grad_in.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _weight_epilogue(acc, target, momentum_buffer, offs, ok, lr, momentum, dampening, weight_decay,
                     SGD: tl.constexpr, HAS_BUFFER: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr):
    """Add the tile's weight gradient ``acc`` to grad_weight (``target``), or apply
    torch.optim.SGD's step with it to the weight."""
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
def _weight_update_kernel(
        grad_out, ring, target, momentum_buffer, partials, counters,
        g_b, g_c, g_h, g_w,  # grad_out strides
        s_r, s_b, s_c, s_h, s_w,  # ring strides
        t_o, t_c, t_t, t_h, t_w,  # target (grad_weight or weight) strides; the buffer shares them
        B, C, H, W, C_OUT, H_OUT, W_OUT, R, slot,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, dil_t, groups,
        lr, momentum, dampening, weight_decay,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SGD: tl.constexpr, HAS_BUFFER: tl.constexpr,
        NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight gradient of one frame pair, dW[m, n] = sum over (b, oy, ox) of grad_out x ring[tap j],
    M = C_OUT/groups, N = C/groups*KT*KH*KW, K = B*H_OUT*W_OUT. Grid: (output tiles, splits, groups).

    Split-K: the programs of axis 1 share a tile's reduction, each over its own range of K, and
    leave fp32 partials in ``partials``; an atomic counter per tile tells the program that
    finishes last, which sums the partials in split order (deterministic, whoever is last) and
    runs the epilogue — accumulate into grad_weight, or the whole SGD step — then resets the
    counter. No program waits for another, so it is also right under the interpreter, which runs
    programs one after another. With one split the tile goes straight to the epilogue."""
    pid_tile, split, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(1)
    cg, mg = C // groups, C_OUT // groups
    n_total = cg * KT * KH * KW
    tiles_n = tl.cdiv(n_total, BLOCK_N)
    pid_m, pid_n = pid_tile // tiles_n, pid_tile % tiles_n
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < mg, n < n_total
    c, rest = n // (KT * KH * KW), n % (KT * KH * KW)
    j, kh, kw = rest // (KH * KW), (rest // KW) % KH, rest % KW
    s = _tap_slot(slot, j, KT, dil_t, R)
    k_total = B * H_OUT * W_OUT
    chunk = tl.cdiv(tl.cdiv(k_total, BLOCK_K), splits) * BLOCK_K
    k_lo = split * chunk
    k_hi = tl.minimum(k_lo + chunk, k_total)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        b, oy, ox = k // (H_OUT * W_OUT), (k // W_OUT) % H_OUT, k % W_OUT
        e = tl.load(grad_out + b[None, :] * g_b + (g * mg + m)[:, None] * g_c + oy[None, :] * g_h + ox[None, :] * g_w,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        y = oy[:, None] * stride_h - pad_h + kh[None, :] * dil_h
        x = ox[:, None] * stride_w - pad_w + kw[None, :] * dil_w
        a_ok = k_ok[:, None] & n_ok[None, :] & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        a = tl.load(ring + s[None, :] * s_r + b[:, None] * s_b + (g * cg + c)[None, :] * s_c + y * s_h + x * s_w,
                    mask=a_ok, other=0.0)
        acc += tl.dot(e, a.to(e.dtype), input_precision=PRECISION)
    offs = (g * mg + m)[:, None] * t_o + c[None, :] * t_c + j[None, :] * t_t + kh[None, :] * t_h + kw[None, :] * t_w
    ok = m_ok[:, None] & n_ok[None, :]
    if splits == 1:
        _weight_epilogue(acc, target, momentum_buffer, offs, ok, lr, momentum, dampening, weight_decay,
                         SGD, HAS_BUFFER, NESTEROV, FIRST_STEP)
    else:
        tile = g * tl.num_programs(0) + pid_tile
        cell = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(partials + (tile * splits + split) * (BLOCK_M * BLOCK_N) + cell, acc)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(counters + tile, 1, sem="acq_rel")
        if arrived == splits - 1:  # the last of this tile's programs: the others' partials are all in
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for part in range(0, splits):  # in split order, whichever program came last
                total += tl.load(partials + (tile * splits + part) * (BLOCK_M * BLOCK_N) + cell, cache_modifier=".cg")
            _weight_epilogue(total, target, momentum_buffer, offs, ok, lr, momentum, dampening, weight_decay,
                             SGD, HAS_BUFFER, NESTEROV, FIRST_STEP)
            tl.atomic_xchg(counters + tile, 0)  # ready for the next launch
