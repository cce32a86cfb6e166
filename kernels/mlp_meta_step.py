"""Triton kernel of the fused MAML meta-step of an MLP: one program per task, one launch per
meta-step (the math is the fused CPU core's, csrc/core/network_task.h and its layers).

Per task t, with θ the flattened parameters and α_s = lrs[s]:
  g_s = ∇L_support(θ_s), θ_{s+1} = θ_s − α_s ⊙ g_s;  task loss Σ_s w_s L_query(θ_s);
  v_S = w_S ∇L_query(θ_S), v_s = v_{s+1} − H_s(α_s ⊙ v_{s+1}) + w_s ∇L_query(θ_s) (first order
  drops H_s), ∂/∂α_s = −g_s ⊙ v_{s+1}; the task's meta-gradient is v_0.
H_s u is Pearlmutter's R-operator (forward-over-reverse) on the support set, from the
activations and δs that inner step s left in the program's workspace.

Layout: every layer's width is padded to a power of two ≥ 16 (so that tl.dot applies) and the
points of a task to KB, a power of two ≥ 16; real widths are compile-time constants, so every
ragged edge is a constant mask. Each program keeps its θ_s, activations and vectors in a
global workspace slice (L2-resident on a GPU). The last program to finish (an atomic counter)
takes the means over tasks in task order, so results do not depend on scheduling.

Workspace ordering: Triton orders only the shared memory it allocates itself. A workspace tile
is written by one phase and read back by the next, in another layout or replicated over the
threads, so a thread may read what another thread writes. Every store into the workspace
therefore stands between two block barriers (tl.debug_barrier, bar.sync): the first makes it
wait for the program's earlier reads of that memory (write after read), the second makes the
later reads wait for it (read after write); bar.sync orders the block's global accesses as well
as its shared ones. The handoff to the last program is the documented reduction pattern: every
thread's results stored, a barrier, one thread's release-acquire atomic on the counter (fence
and atomic in one instruction), a barrier, then loads of the other programs' results that
bypass L1 (cache_modifier=".cg").

Precision: tl.dot runs with input_precision="ieee" (full fp32), since the meta-gradient is
compared with float64 references at 1e-4; tf32 would be faster on Ampere and later GPUs.

File pattern (Liger-Kernel): the @triton.jit kernel and its helpers, the host launcher
`mlp_meta_step_triton`, then the torch.library op `pymaml::meta_step_triton` (the network schema).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..ops.meta_step.network import as_mlp
from ..ops.meta_step.op import FusedImplementation, meta_step_backward, meta_step_fake, meta_step_setup_context

DOT_PRECISION: tl.constexpr = tl.constexpr("ieee")
# Multiply-adds contract to FMAs, as in the C++ core; asked for explicitly (Triton's default changes in 3.10).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
MAX_PADDED_WIDTH = 128  # one layer's [KB, width] and [width, width] tiles live in registers
MAX_PADDED_POINTS = 64
# A thread's share of the largest tile; more warps for wider layers keep the registers per thread,
# and the code the compiler unrolls per thread, bounded.
ELEMENTS_PER_THREAD = 32
ACTIVATION_CODES = {"none": 0, "relu": 1, "tanh": 2, "sigmoid": 3}
LOSS_CODES = {"mse": 0, "cross_entropy": 1}


# ---------------------------------------------------------------------------------------------
# Elementwise helpers: σ, σ' and σ'' from a = σ(z). NaN and Inf propagate as in torch: relu(NaN) =
# NaN (tl.maximum may drop a NaN operand), and ReLU's backward is torch's threshold_backward on
# the result, a select rather than a product: the incoming value where a is not <= 0 (NaN
# included), else exactly 0 even for a NaN or infinite incoming value.


@triton.jit
def _activate(z, ACT: tl.constexpr):
    out = z
    if ACT == 1:
        out = tl.where(z < 0, 0.0, z)
    elif ACT == 2:  # tanh through exp(−2|z|): no overflow, full relative accuracy near 0
        e = tl.exp(-2.0 * tl.abs(z))
        out = tl.where(z >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
    elif ACT == 3:
        out = tl.sigmoid(z)
    return out


@triton.jit
def _slope(a, ACT: tl.constexpr):
    """σ' of the activations with curvature (tanh, sigmoid); 1 otherwise."""
    out = tl.full(a.shape, 1.0, tl.float32)
    if ACT == 2:
        out = 1.0 - a * a
    elif ACT == 3:
        out = a * (1.0 - a)
    return out


@triton.jit
def _slope_times(a, r, ACT: tl.constexpr):
    """σ'(z) · r from a = σ(z)."""
    out = r
    if ACT == 1:
        out = tl.where(a <= 0, 0.0, r)
    elif ACT >= 2:
        out = _slope(a, ACT) * r
    return out


@triton.jit
def _curvature(a, slope, ACT: tl.constexpr):
    out = tl.zeros(a.shape, tl.float32)
    if ACT == 2:
        out = -2.0 * a * slope
    elif ACT == 3:
        out = slope * (1.0 - 2.0 * a)
    return out


# ---------------------------------------------------------------------------------------------
# Tiles of the padded parameter layout: layer l's W [PAD[l+1], PAD[l]] (out × in) at W_OFF[l],
# its bias [PAD[l+1]] at B_OFF[l]; both zero outside the real widths.


@triton.jit
def _load_w(base, l: tl.constexpr, PAD: tl.constexpr, W_OFF: tl.constexpr):
    rows = tl.arange(0, PAD[l + 1])[:, None]
    cols = tl.arange(0, PAD[l])[None, :]
    return tl.load(base + W_OFF[l] + rows * PAD[l] + cols)


@triton.jit
def _load_b(base, l: tl.constexpr, PAD: tl.constexpr, B_OFF: tl.constexpr):
    return tl.load(base + B_OFF[l] + tl.arange(0, PAD[l + 1]))


@triton.jit
def _store_layer(base, l: tl.constexpr, w, b, ACCUMULATE: tl.constexpr, WIDTHS: tl.constexpr, PAD: tl.constexpr,
                 W_OFF: tl.constexpr, B_OFF: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Stores (or adds) a layer's weight and bias tiles, zeroing everything outside the real widths."""
    rows = tl.arange(0, PAD[l + 1])
    cols = tl.arange(0, PAD[l])
    inside = (rows[:, None] < WIDTHS[l + 1]) & (cols[None, :] < WIDTHS[l])
    b_inside = rows < WIDTHS[l + 1]
    if not HAS_BIAS:
        b_inside = rows < 0
    w = tl.where(inside, w, 0.0)
    b = tl.where(b_inside, b, 0.0)
    w_ptr = base + W_OFF[l] + rows[:, None] * PAD[l] + cols[None, :]
    b_ptr = base + B_OFF[l] + rows
    if ACCUMULATE:
        w += tl.load(w_ptr)
        b += tl.load(b_ptr)
    tl.debug_barrier()
    tl.store(w_ptr, w)
    tl.store(b_ptr, b)
    tl.debug_barrier()


@triton.jit
def _store_scalar(ptr, value):
    """A scalar into the workspace, between barriers like every workspace store."""
    tl.debug_barrier()
    tl.store(ptr, value)
    tl.debug_barrier()


@triton.jit
def _load_w_uncached(base, l: tl.constexpr, PAD: tl.constexpr, W_OFF: tl.constexpr):
    """_load_w for another program's results: the load bypasses L1, which is not coherent across SMs."""
    rows = tl.arange(0, PAD[l + 1])[:, None]
    cols = tl.arange(0, PAD[l])[None, :]
    return tl.load(base + W_OFF[l] + rows * PAD[l] + cols, cache_modifier=".cg")


@triton.jit
def _load_b_uncached(base, l: tl.constexpr, PAD: tl.constexpr, B_OFF: tl.constexpr):
    return tl.load(base + B_OFF[l] + tl.arange(0, PAD[l + 1]), cache_modifier=".cg")


@triton.jit
def _load_flat_layer(flat, l: tl.constexpr, WIDTHS: tl.constexpr, PAD: tl.constexpr, FW_OFF: tl.constexpr,
                     FB_OFF: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Layer l of a vector in the flat nn.Sequential layout (W row-major, then b), padded."""
    rows = tl.arange(0, PAD[l + 1])
    cols = tl.arange(0, PAD[l])
    inside = (rows[:, None] < WIDTHS[l + 1]) & (cols[None, :] < WIDTHS[l])
    w = tl.load(flat + FW_OFF[l] + rows[:, None] * WIDTHS[l] + cols[None, :], mask=inside, other=0.0)
    if HAS_BIAS:
        b = tl.load(flat + FB_OFF[l] + rows, mask=rows < WIDTHS[l + 1], other=0.0)
    else:
        b = tl.zeros((PAD[l + 1],), tl.float32)
    return w, b


@triton.jit
def _store_flat_layer(flat, l: tl.constexpr, w, b, WIDTHS: tl.constexpr, PAD: tl.constexpr, FW_OFF: tl.constexpr,
                      FB_OFF: tl.constexpr, HAS_BIAS: tl.constexpr):
    rows = tl.arange(0, PAD[l + 1])
    cols = tl.arange(0, PAD[l])
    inside = (rows[:, None] < WIDTHS[l + 1]) & (cols[None, :] < WIDTHS[l])
    tl.store(flat + FW_OFF[l] + rows[:, None] * WIDTHS[l] + cols[None, :], w, mask=inside)
    if HAS_BIAS:
        tl.store(flat + FB_OFF[l] + rows, b, mask=rows < WIDTHS[l + 1])


# ---------------------------------------------------------------------------------------------
# Per-point tiles [KB, PAD[l+1]] of a pass: Z, A, D (δ) and T (δ before the slope) per layer.
# A, D and the HVP's tangents are stored zero outside the real points and units: the products
# sum over those lanes, and a padding lane computed as 0 · NaN would make a real sum NaN.


@triton.jit
def _point_ptrs(base, l: tl.constexpr, KB: tl.constexpr, PAD: tl.constexpr, UNIT_OFF: tl.constexpr):
    rows = tl.arange(0, KB)[:, None]
    cols = tl.arange(0, PAD[l + 1])[None, :]
    return base + KB * UNIT_OFF[l] + rows * PAD[l + 1] + cols


@triton.jit
def _real(K, l: tl.constexpr, KB: tl.constexpr, PAD: tl.constexpr, WIDTHS: tl.constexpr):
    """The real points and units of a layer-l tile [KB, PAD[l+1]]."""
    rows = tl.arange(0, KB)[:, None]
    cols = tl.arange(0, PAD[l + 1])[None, :]
    return (rows < K) & (cols < WIDTHS[l + 1])


@triton.jit
def _layer_input(x_tile, pass_a, l: tl.constexpr, KB: tl.constexpr, PAD: tl.constexpr, UNIT_OFF: tl.constexpr):
    """a_{l-1}: the inputs X for l = 0, else the activations of layer l − 1."""
    if l == 0:
        h = tl.load(x_tile + tl.arange(0, KB)[:, None] * PAD[0] + tl.arange(0, PAD[0])[None, :])
    else:
        h = tl.load(_point_ptrs(pass_a, l - 1, KB, PAD, UNIT_OFF))
    return h


@triton.jit
def _load_points(src, K, dst, KB: tl.constexpr, N: tl.constexpr, NP: tl.constexpr):
    """Copies [K, N] rows into a zero-padded [KB, NP] tile."""
    rows = tl.arange(0, KB)[:, None]
    cols = tl.arange(0, NP)[None, :]
    values = tl.load(src + rows * N + cols, mask=(rows < K) & (cols < N), other=0.0)
    tl.debug_barrier()
    tl.store(dst + rows * NP + cols, values)
    tl.debug_barrier()


@triton.jit
def _forward(theta, x_tile, pz, pa, K, L: tl.constexpr, WIDTHS: tl.constexpr, PAD: tl.constexpr, W_OFF: tl.constexpr,
             B_OFF: tl.constexpr, KB: tl.constexpr, UNIT_OFF: tl.constexpr, ACT: tl.constexpr):
    """z_l = a_{l-1} W_l^T + b_l, a_l = σ(z_l) (zero outside the real points and widths)."""
    for l in tl.static_range(L):
        h = _layer_input(x_tile, pa, l, KB, PAD, UNIT_OFF)
        w = _load_w(theta, l, PAD, W_OFF)
        b = _load_b(theta, l, PAD, B_OFF)
        z = tl.dot(h, tl.trans(w), input_precision=DOT_PRECISION) + b[None, :]
        tl.debug_barrier()
        tl.store(_point_ptrs(pz, l, KB, PAD, UNIT_OFF), z)
        if l < L - 1:
            a = tl.where(_real(K, l, KB, PAD, WIDTHS), _activate(z, ACT), 0.0)
            tl.store(_point_ptrs(pa, l, KB, PAD, UNIT_OFF), a)
        tl.debug_barrier()


@triton.jit
def _loss(pz, pd, y_ptr, K, WITH_DELTA: tl.constexpr, L: tl.constexpr, WIDTHS: tl.constexpr, PAD: tl.constexpr,
          KB: tl.constexpr, UNIT_OFF: tl.constexpr, LOSS: tl.constexpr):
    """The task's loss (a mean over points, and outputs for MSE); δ_L = dL/dz_L into the pass.
    MSE: δ = 2(z − y)/(K n_L). Cross-entropy through log-sum-exp: δ = (softmax(z) − onehot(y))/K."""
    rows = tl.arange(0, KB)[:, None]
    cols = tl.arange(0, PAD[L])[None, :]
    n: tl.constexpr = WIDTHS[L]
    inside = (rows < K) & (cols < n)
    z = tl.load(_point_ptrs(pz, L - 1, KB, PAD, UNIT_OFF))
    if LOSS == 0:
        y = tl.load(y_ptr + rows * n + cols, mask=inside, other=0.0)
        diff = tl.where(inside, z - y, 0.0)
        scale = 1.0 / (K * n)
        value = tl.sum(tl.sum(diff * diff, axis=1), axis=0) * scale
        delta = 2.0 * scale * diff
    else:
        labels = tl.load(y_ptr + tl.arange(0, KB), mask=tl.arange(0, KB) < K, other=0)
        masked = tl.where(cols < n, z, float("-inf"))
        peak = tl.max(masked, axis=1)
        e = tl.where(cols < n, tl.exp(masked - peak[:, None]), 0.0)
        total = tl.sum(e, axis=1)
        lse = peak + tl.log(total)
        picked = tl.sum(tl.where(cols == labels[:, None], z, 0.0), axis=1)
        value = tl.sum(tl.where(tl.arange(0, KB) < K, lse - picked, 0.0), axis=0) / K
        onehot = tl.where(cols == labels[:, None], 1.0, 0.0)
        delta = tl.where(inside, (e / total[:, None] - onehot) / K, 0.0)
    if WITH_DELTA:
        tl.debug_barrier()
        tl.store(_point_ptrs(pd, L - 1, KB, PAD, UNIT_OFF), delta)
        tl.debug_barrier()
    return value


@triton.jit
def _backward(theta, x_tile, pz, pa, pd, pt, grad, K, ACCUMULATE: tl.constexpr, WITH_GRAD: tl.constexpr,
              L: tl.constexpr, WIDTHS: tl.constexpr, PAD: tl.constexpr, W_OFF: tl.constexpr, B_OFF: tl.constexpr,
              KB: tl.constexpr, UNIT_OFF: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """From δ_L in the pass: δ_{l-1} = t ⊙ σ'(z_{l-1}), t = δ_l W_l (kept for σ''), and, when
    WITH_GRAD, gW_l = δ_l^T a_{l-1}, gb_l = Σ_k δ_l into (or added to) grad."""
    for l in tl.static_range(L - 1, -1, -1):
        delta = tl.load(_point_ptrs(pd, l, KB, PAD, UNIT_OFF))
        if WITH_GRAD:
            h = _layer_input(x_tile, pa, l, KB, PAD, UNIT_OFF)
            gw = tl.dot(tl.trans(delta), h, input_precision=DOT_PRECISION)
            _store_layer(grad, l, gw, tl.sum(delta, axis=0), ACCUMULATE, WIDTHS, PAD, W_OFF, B_OFF, HAS_BIAS)
        if l > 0:
            w = _load_w(theta, l, PAD, W_OFF)
            t = tl.dot(delta, w, input_precision=DOT_PRECISION)
            a = tl.load(_point_ptrs(pa, l - 1, KB, PAD, UNIT_OFF))
            real = _real(K, l - 1, KB, PAD, WIDTHS)
            delta_prev = tl.where(real, _slope_times(a, t, ACT), 0.0)
            tl.debug_barrier()
            tl.store(_point_ptrs(pd, l - 1, KB, PAD, UNIT_OFF), delta_prev)
            tl.store(_point_ptrs(pt, l - 1, KB, PAD, UNIT_OFF), t)
            tl.debug_barrier()


@triton.jit
def _hvp_add(theta, u, x_tile, pz, pa, pd, pt, rz_buf, ra_buf, rd_buf, out, K, L: tl.constexpr, WIDTHS: tl.constexpr,
             PAD: tl.constexpr, W_OFF: tl.constexpr, B_OFF: tl.constexpr, KB: tl.constexpr, UNIT_OFF: tl.constexpr,
             ACT: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out += H u, the Hessian of the pass's loss at theta (R-operator, from the stored pass):
      R(z_l) = R(a_{l-1}) W_l^T + a_{l-1} U_l^T + u_b,  R(a_l) = σ'(z_l) R(z_l)
      R(δ_L): MSE 2 R(z_L)/(K n_L);  cross-entropy p ⊙ (R(z) − p·R(z))/K
      R(gW_l) = R(δ_l)^T a_{l-1} + δ_l^T R(a_{l-1}),  R(gb_l) = Σ_k R(δ_l)
      R(δ_{l-1}) = (R(δ_l) W_l + δ_l U_l) ⊙ σ'(z_{l-1}) + (δ_l W_l) ⊙ σ''(z_{l-1}) ⊙ R(z_{l-1})"""
    for l in tl.static_range(L):
        h = _layer_input(x_tile, pa, l, KB, PAD, UNIT_OFF)
        rz = tl.dot(h, tl.trans(_load_w(u, l, PAD, W_OFF)), input_precision=DOT_PRECISION)
        rz += _load_b(u, l, PAD, B_OFF)[None, :]
        if l > 0:
            ra_prev = tl.load(_point_ptrs(ra_buf, l - 1, KB, PAD, UNIT_OFF))
            rz += tl.dot(ra_prev, tl.trans(_load_w(theta, l, PAD, W_OFF)), input_precision=DOT_PRECISION)
        if l < L - 1:
            a = tl.load(_point_ptrs(pa, l, KB, PAD, UNIT_OFF))
            ra = tl.where(_real(K, l, KB, PAD, WIDTHS), _slope_times(a, rz, ACT), 0.0)
        tl.debug_barrier()
        tl.store(_point_ptrs(rz_buf, l, KB, PAD, UNIT_OFF), rz)
        if l < L - 1:
            tl.store(_point_ptrs(ra_buf, l, KB, PAD, UNIT_OFF), ra)
        tl.debug_barrier()
    rows = tl.arange(0, KB)[:, None]
    cols = tl.arange(0, PAD[L])[None, :]
    n: tl.constexpr = WIDTHS[L]
    inside = (rows < K) & (cols < n)
    rz = tl.load(_point_ptrs(rz_buf, L - 1, KB, PAD, UNIT_OFF))
    if LOSS == 0:
        rd = tl.where(inside, rz * (2.0 / (K * n)), 0.0)
    else:
        z = tl.load(_point_ptrs(pz, L - 1, KB, PAD, UNIT_OFF))
        masked = tl.where(cols < n, z, float("-inf"))
        e = tl.where(cols < n, tl.exp(masked - tl.max(masked, axis=1)[:, None]), 0.0)
        p = e / tl.sum(e, axis=1)[:, None]
        p_dot_rz = tl.sum(p * rz, axis=1)
        rd = tl.where(inside, p * (rz - p_dot_rz[:, None]) / K, 0.0)
    tl.debug_barrier()
    tl.store(_point_ptrs(rd_buf, L - 1, KB, PAD, UNIT_OFF), rd)
    tl.debug_barrier()
    for l in tl.static_range(L - 1, -1, -1):
        r_delta = tl.load(_point_ptrs(rd_buf, l, KB, PAD, UNIT_OFF))
        h = _layer_input(x_tile, pa, l, KB, PAD, UNIT_OFF)
        gw = tl.dot(tl.trans(r_delta), h, input_precision=DOT_PRECISION)
        if l > 0:
            delta = tl.load(_point_ptrs(pd, l, KB, PAD, UNIT_OFF))
            ra_prev = tl.load(_point_ptrs(ra_buf, l - 1, KB, PAD, UNIT_OFF))
            gw += tl.dot(tl.trans(delta), ra_prev, input_precision=DOT_PRECISION)
            rt = tl.dot(r_delta, _load_w(theta, l, PAD, W_OFF), input_precision=DOT_PRECISION)
            rt += tl.dot(delta, _load_w(u, l, PAD, W_OFF), input_precision=DOT_PRECISION)
            a = tl.load(_point_ptrs(pa, l - 1, KB, PAD, UNIT_OFF))
            r_prev = _slope_times(a, rt, ACT)
            if ACT >= 2:  # σ'' ≠ 0
                t = tl.load(_point_ptrs(pt, l - 1, KB, PAD, UNIT_OFF))
                rz_prev = tl.load(_point_ptrs(rz_buf, l - 1, KB, PAD, UNIT_OFF))
                r_prev += t * _curvature(a, _slope(a, ACT), ACT) * rz_prev
            r_prev = tl.where(_real(K, l - 1, KB, PAD, WIDTHS), r_prev, 0.0)
            tl.debug_barrier()
            tl.store(_point_ptrs(rd_buf, l - 1, KB, PAD, UNIT_OFF), r_prev)
            tl.debug_barrier()
        _store_layer(out, l, gw, tl.sum(r_delta, axis=0), True, WIDTHS, PAD, W_OFF, B_OFF, HAS_BIAS)


@triton.jit
def _mlp_meta_step_kernel(
    theta_ptr, lrs_ptr, step_weights_ptr, support_x_ptr, support_y_ptr, query_x_ptr, query_y_ptr,
    meta_loss_ptr, task_losses_ptr, pre_losses_ptr, step_losses_ptr, grad_theta_ptr, grad_lrs_ptr,
    workspace_ptr, counter_ptr, tasks, support_points, query_points,
    L: tl.constexpr, WIDTHS: tl.constexpr, PAD: tl.constexpr, W_OFF: tl.constexpr, B_OFF: tl.constexpr,
    FW_OFF: tl.constexpr, FB_OFF: tl.constexpr, P: tl.constexpr, PW: tl.constexpr, UNIT_OFF: tl.constexpr,
    UNITS: tl.constexpr, KB: tl.constexpr, S: tl.constexpr, ACT: tl.constexpr, LOSS: tl.constexpr,
    HAS_BIAS: tl.constexpr, FIRST_ORDER: tl.constexpr, LR_GRAD: tl.constexpr, ALL_STEP_LOSSES: tl.constexpr,
    WORKSPACE: tl.constexpr,
):
    t = tl.program_id(0)
    zero64 = tl.full([], 0, tl.int64)  # 64-bit slice offsets (T × WORKSPACE may pass 2^31)
    # This task's slice of the workspace (sizes in WorkspaceLayout below).
    ws = workspace_ptr + (t + zero64) * WORKSPACE
    PASS: tl.constexpr = 4 * KB * UNITS
    thetas = ws
    grads = thetas + (S + 1) * PW
    v = grads + S * PW
    u = v + PW
    qg = u + PW
    xs = qg + PW
    xq = xs + KB * PAD[0]
    passes = xq + KB * PAD[0]
    r_buf = passes + (S + 1) * PASS
    step_out = r_buf + 3 * KB * UNITS
    rz_buf = r_buf
    ra_buf = r_buf + KB * UNITS
    rd_buf = r_buf + 2 * KB * UNITS

    n0: tl.constexpr = WIDTHS[0]
    n_out: tl.constexpr = WIDTHS[L]
    for l in tl.static_range(L):
        w, b = _load_flat_layer(theta_ptr, l, WIDTHS, PAD, FW_OFF, FB_OFF, HAS_BIAS)
        _store_layer(thetas, l, w, b, False, WIDTHS, PAD, W_OFF, B_OFF, HAS_BIAS)
    _load_points(query_x_ptr + t * query_points * n0, query_points, xq, KB, n0, PAD[0])
    _load_points(support_x_ptr + t * support_points * n0, support_points, xs, KB, n0, PAD[0])
    if LOSS == 0:
        sy = support_y_ptr + t * support_points * n_out
        qy = query_y_ptr + t * query_points * n_out
    else:
        sy = support_y_ptr + t * support_points
        qy = query_y_ptr + t * query_points
    q_pass = passes + S * PASS
    qz, qa, qd, qt = q_pass, q_pass + KB * UNITS, q_pass + 2 * KB * UNITS, q_pass + 3 * KB * UNITS
    if S == 0:
        _forward(thetas, xq, qz, qa, query_points, L, WIDTHS, PAD, W_OFF, B_OFF, KB, UNIT_OFF, ACT)
        pre = _loss(qz, qd, qy, query_points, True, L, WIDTHS, PAD, KB, UNIT_OFF, LOSS)
        _backward(thetas, xq, qz, qa, qd, qt, v, query_points, False, True, L, WIDTHS, PAD, W_OFF, B_OFF, KB, UNIT_OFF,
                  ACT, HAS_BIAS)
        task_loss = pre
    else:
        _forward(thetas, xq, qz, qa, query_points, L, WIDTHS, PAD, W_OFF, B_OFF, KB, UNIT_OFF, ACT)
        pre = _loss(qz, qd, qy, query_points, False, L, WIDTHS, PAD, KB, UNIT_OFF, LOSS)
        # Inner loop; pass `step` keeps the support activations and δs at θ_step for its HVP.
        for step in range(0, S):
            theta = thetas + step * PW
            p = passes + step * PASS
            _forward(theta, xs, p, p + KB * UNITS, support_points, L, WIDTHS, PAD, W_OFF, B_OFF, KB, UNIT_OFF, ACT)
            _loss(p, p + 2 * KB * UNITS, sy, support_points, True, L, WIDTHS, PAD, KB, UNIT_OFF, LOSS)
            _backward(theta, xs, p, p + KB * UNITS, p + 2 * KB * UNITS, p + 3 * KB * UNITS, grads + step * PW,
                      support_points, False, True, L, WIDTHS, PAD, W_OFF, B_OFF, KB, UNIT_OFF, ACT, HAS_BIAS)
            for l in tl.static_range(L):
                lr_w, lr_b = _load_flat_layer(lrs_ptr + step * P, l, WIDTHS, PAD, FW_OFF, FB_OFF, HAS_BIAS)
                w = _load_w(theta, l, PAD, W_OFF) - lr_w * _load_w(grads + step * PW, l, PAD, W_OFF)
                b = _load_b(theta, l, PAD, B_OFF) - lr_b * _load_b(grads + step * PW, l, PAD, B_OFF)
                _store_layer(theta + PW, l, w, b, False, WIDTHS, PAD, W_OFF, B_OFF, HAS_BIAS)
        task_loss = 0.0
        for step in range(1, S):
            weight = tl.load(step_weights_ptr + step - 1)
            if ALL_STEP_LOSSES or weight != 0.0:
                _forward(thetas + step * PW, xq, qz, qa, query_points, L, WIDTHS, PAD, W_OFF, B_OFF, KB, UNIT_OFF, ACT)
                loss = _loss(qz, qd, qy, query_points, False, L, WIDTHS, PAD, KB, UNIT_OFF, LOSS)
                task_loss += weight * loss
                _store_scalar(step_out + step - 1, loss)
            else:
                _store_scalar(step_out + step - 1, float("nan"))
        # v_S = w_S ∇L_query(θ_S)
        _forward(thetas + S * PW, xq, qz, qa, query_points, L, WIDTHS, PAD, W_OFF, B_OFF, KB, UNIT_OFF, ACT)
        last = _loss(qz, qd, qy, query_points, True, L, WIDTHS, PAD, KB, UNIT_OFF, LOSS)
        _backward(thetas + S * PW, xq, qz, qa, qd, qt, v, query_points, False, True, L, WIDTHS, PAD, W_OFF, B_OFF, KB,
                  UNIT_OFF, ACT, HAS_BIAS)
        _store_scalar(step_out + S - 1, last)
        w_last = tl.load(step_weights_ptr + S - 1)
        task_loss += w_last * last
        for l in tl.static_range(L):
            _store_layer(v, l, w_last * _load_w(v, l, PAD, W_OFF), w_last * _load_b(v, l, PAD, B_OFF), False, WIDTHS,
                         PAD, W_OFF, B_OFF, HAS_BIAS)
        for i in range(0, S):
            at = S - 1 - i
            if at + 1 < S:  # v_{at+1} += w_{at+1} ∇L_query(θ_{at+1})
                weight = tl.load(step_weights_ptr + at)
                if weight != 0.0:
                    _forward(thetas + (at + 1) * PW, xq, qz, qa, query_points, L, WIDTHS, PAD, W_OFF, B_OFF, KB,
                             UNIT_OFF, ACT)
                    _loss(qz, qd, qy, query_points, True, L, WIDTHS, PAD, KB, UNIT_OFF, LOSS)
                    _backward(thetas + (at + 1) * PW, xq, qz, qa, qd, qt, qg, query_points, False, True, L, WIDTHS,
                              PAD, W_OFF, B_OFF, KB, UNIT_OFF, ACT, HAS_BIAS)
                    for l in tl.static_range(L):
                        _store_layer(v, l, weight * _load_w(qg, l, PAD, W_OFF), weight * _load_b(qg, l, PAD, B_OFF),
                                     True, WIDTHS, PAD, W_OFF, B_OFF, HAS_BIAS)
            for l in tl.static_range(L):
                lr_w, lr_b = _load_flat_layer(lrs_ptr + at * P, l, WIDTHS, PAD, FW_OFF, FB_OFF, HAS_BIAS)
                v_w = _load_w(v, l, PAD, W_OFF)
                v_b = _load_b(v, l, PAD, B_OFF)
                if LR_GRAD:  # ∂/∂α_at = −g_at ⊙ v_{at+1}, kept in the grads slot of step `at`
                    g = grads + at * PW
                    _store_layer(g, l, -_load_w(g, l, PAD, W_OFF) * v_w, -_load_b(g, l, PAD, B_OFF) * v_b, False,
                                 WIDTHS, PAD, W_OFF, B_OFF, HAS_BIAS)
                _store_layer(u, l, -lr_w * v_w, -lr_b * v_b, False, WIDTHS, PAD, W_OFF, B_OFF, HAS_BIAS)
            if not FIRST_ORDER:  # v += H_at(−α_at ⊙ v)
                p = passes + at * PASS
                _hvp_add(thetas + at * PW, u, xs, p, p + KB * UNITS, p + 2 * KB * UNITS, p + 3 * KB * UNITS, rz_buf,
                         ra_buf, rd_buf, v, support_points, L, WIDTHS, PAD, W_OFF, B_OFF, KB, UNIT_OFF, ACT, LOSS,
                         HAS_BIAS)
    tl.debug_barrier()  # the last program reads task_losses back: stored between barriers too
    tl.store(task_losses_ptr + t, task_loss)
    tl.store(pre_losses_ptr + t, pre)

    # The last program to get here takes the means over tasks, in task order. Handoff: all of this
    # program's results are stored before the barrier; one thread's atomic releases them and, in
    # the last program, acquires everyone else's; the barrier after it orders the block's loads.
    tl.debug_barrier()
    finished = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    if finished == tasks - 1:
        for l in tl.static_range(L):
            w_sum = tl.zeros((PAD[l + 1], PAD[l]), tl.float32)
            b_sum = tl.zeros((PAD[l + 1],), tl.float32)
            for other in range(0, tasks):
                v_other = workspace_ptr + (other + zero64) * WORKSPACE + (S + 1) * PW + S * PW
                w_sum += _load_w_uncached(v_other, l, PAD, W_OFF)
                b_sum += _load_b_uncached(v_other, l, PAD, B_OFF)
            _store_flat_layer(grad_theta_ptr, l, w_sum / tasks, b_sum / tasks, WIDTHS, PAD, FW_OFF, FB_OFF, HAS_BIAS)
            if LR_GRAD:
                for step in range(0, S):
                    w_sum = tl.zeros((PAD[l + 1], PAD[l]), tl.float32)
                    b_sum = tl.zeros((PAD[l + 1],), tl.float32)
                    for other in range(0, tasks):
                        g_other = workspace_ptr + (other + zero64) * WORKSPACE + (S + 1) * PW + step * PW
                        w_sum += _load_w_uncached(g_other, l, PAD, W_OFF)
                        b_sum += _load_b_uncached(g_other, l, PAD, B_OFF)
                    _store_flat_layer(grad_lrs_ptr + step * P, l, w_sum / tasks, b_sum / tasks, WIDTHS, PAD, FW_OFF,
                                      FB_OFF, HAS_BIAS)
        for step in range(0, S):
            total = 0.0
            for other in range(0, tasks):
                total += tl.load(workspace_ptr + (other + zero64) * WORKSPACE + (WORKSPACE - S) + step,
                                 cache_modifier=".cg")
            tl.store(step_losses_ptr + step, total / tasks)
        total = 0.0
        for other in range(0, tasks):
            total += tl.load(task_losses_ptr + other, cache_modifier=".cg")
        tl.store(meta_loss_ptr, total / tasks)
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _mlp_hvp_kernel(
    theta_ptr, v_ptr, x_ptr, y_ptr, hv_ptr, workspace_ptr, points,
    L: tl.constexpr, WIDTHS: tl.constexpr, PAD: tl.constexpr, W_OFF: tl.constexpr, B_OFF: tl.constexpr,
    FW_OFF: tl.constexpr, FB_OFF: tl.constexpr, P: tl.constexpr, PW: tl.constexpr, UNIT_OFF: tl.constexpr,
    UNITS: tl.constexpr, KB: tl.constexpr, ACT: tl.constexpr, LOSS: tl.constexpr, HAS_BIAS: tl.constexpr,
    WORKSPACE: tl.constexpr,
):
    """Batched Hessian-vector products: hv[t] = ∇²L(θ_t; x_t, y_t) v[t], one program per task, from
    the same forward, backward and R-operator passes as the meta-step."""
    t = tl.program_id(0)
    zero64 = tl.full([], 0, tl.int64)
    ws = workspace_ptr + (t + zero64) * WORKSPACE
    theta, u, hv = ws, ws + PW, ws + 2 * PW
    x_tile = ws + 3 * PW
    p = x_tile + KB * PAD[0]
    r_buf = p + 4 * KB * UNITS
    n0: tl.constexpr = WIDTHS[0]
    for l in tl.static_range(L):
        w, b = _load_flat_layer(theta_ptr + (t + zero64) * P, l, WIDTHS, PAD, FW_OFF, FB_OFF, HAS_BIAS)
        _store_layer(theta, l, w, b, False, WIDTHS, PAD, W_OFF, B_OFF, HAS_BIAS)
        w, b = _load_flat_layer(v_ptr + (t + zero64) * P, l, WIDTHS, PAD, FW_OFF, FB_OFF, HAS_BIAS)
        _store_layer(u, l, w, b, False, WIDTHS, PAD, W_OFF, B_OFF, HAS_BIAS)
        _store_layer(hv, l, tl.zeros((PAD[l + 1], PAD[l]), tl.float32), tl.zeros((PAD[l + 1],), tl.float32), False,
                     WIDTHS, PAD, W_OFF, B_OFF, HAS_BIAS)
    _load_points(x_ptr + t * points * n0, points, x_tile, KB, n0, PAD[0])
    if LOSS == 0:
        y = y_ptr + t * points * WIDTHS[L]
    else:
        y = y_ptr + t * points
    pz, pa, pd, pt = p, p + KB * UNITS, p + 2 * KB * UNITS, p + 3 * KB * UNITS
    _forward(theta, x_tile, pz, pa, points, L, WIDTHS, PAD, W_OFF, B_OFF, KB, UNIT_OFF, ACT)
    _loss(pz, pd, y, points, True, L, WIDTHS, PAD, KB, UNIT_OFF, LOSS)
    _backward(theta, x_tile, pz, pa, pd, pt, hv, points, False, False, L, WIDTHS, PAD, W_OFF, B_OFF, KB, UNIT_OFF, ACT,
              HAS_BIAS)
    _hvp_add(theta, u, x_tile, pz, pa, pd, pt, r_buf, r_buf + KB * UNITS, r_buf + 2 * KB * UNITS, hv, points, L,
             WIDTHS, PAD, W_OFF, B_OFF, KB, UNIT_OFF, ACT, LOSS, HAS_BIAS)
    for l in tl.static_range(L):
        _store_flat_layer(hv_ptr + (t + zero64) * P, l, _load_w(hv, l, PAD, W_OFF), _load_b(hv, l, PAD, B_OFF),
                          WIDTHS, PAD, FW_OFF, FB_OFF, HAS_BIAS)


# ---------------------------------------------------------------------------------------------
# Host launchers.


def _pad(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


@dataclass(frozen=True)
class WorkspaceLayout:
    """The compile-time shape of one launch: padded widths, offsets, and the per-task workspace."""

    widths: tuple
    pad: tuple
    w_off: tuple
    b_off: tuple
    fw_off: tuple
    fb_off: tuple
    params: int
    padded_params: int
    unit_off: tuple
    units: int
    points: int
    steps: int
    workspace: int


@lru_cache(maxsize=256)
def workspace_layout(widths: tuple, bias: bool, steps: int, points: int) -> WorkspaceLayout:
    """Per task: θ_0..θ_S and S inner gradients (PW each), v, u, q (PW each), the padded support
    and query inputs, S + 1 passes of 4·KB·U, the HVP's 3·KB·U tangents and S step losses."""
    pad = tuple(_pad(n) for n in widths)
    w_off, b_off, fw_off, fb_off, unit_off = [], [], [], [], []
    padded = flat = units = 0
    for l in range(len(widths) - 1):
        w_off.append(padded)
        padded += pad[l + 1] * pad[l]
        b_off.append(padded)
        padded += pad[l + 1]
        fw_off.append(flat)
        flat += widths[l + 1] * widths[l]
        fb_off.append(flat)
        flat += widths[l + 1] if bias else 0
        unit_off.append(units)
        units += pad[l + 1]
    kb = _pad(points)
    workspace = ((steps + 1) + steps + 3) * padded + 2 * kb * pad[0] + (steps + 1) * 4 * kb * units
    workspace += 3 * kb * units + steps
    return WorkspaceLayout(widths, pad, tuple(w_off), tuple(b_off), tuple(fw_off), tuple(fb_off), flat, padded,
                           tuple(unit_off), units, kb, steps, workspace)


def unsupported_reason(widths, dtype: torch.dtype, points: int | None = None) -> str | None:
    """Why the Triton kernel cannot run this configuration, or None."""
    if dtype != torch.float32:
        return f"the Triton kernel computes in float32, not {dtype}"
    if max(_pad(n) for n in widths) > MAX_PADDED_WIDTH:
        return f"the Triton kernel takes layer widths up to {MAX_PADDED_WIDTH}, got {max(widths)}"
    if points is not None and _pad(points) > MAX_PADDED_POINTS:
        return f"the Triton kernel takes up to {MAX_PADDED_POINTS} points per task, got {points}"
    return None


_COUNTERS: dict = {}


def _launch_device(tensors) -> contextlib.AbstractContextManager:
    """The tensors' device made the current one for a launch: Triton launches on the current
    device's current stream, which need not be the tensors' device."""
    device = tensors[0].device
    for tensor in tensors:
        if tensor.device != device:
            raise ValueError(f"the Triton kernel takes tensors on one device, got {device} and {tensor.device}")
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _counter(device: torch.device) -> torch.Tensor:
    """The int32 completion counter of one launch on `device`, which must be the current device
    (inside _launch_device): the kernel that used it leaves it at zero.

    Launches on one stream run one after another, so outside graph capture they share the
    counter of the current device's current stream; launches on other streams have their own.
    A launch being captured into a CUDA graph gets a counter of its own, zeroed inside the
    graph, since a replay may run on any stream beside other launches. On the CPU (the
    interpreter) each launch gets a fresh one, as threads may launch at once."""
    if device.type != "cuda":
        return torch.zeros(1, dtype=torch.int32, device=device)
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(1, dtype=torch.int32, device=device)
    key = (torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream)
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = _COUNTERS.setdefault(key, torch.zeros(1, dtype=torch.int32, device=device))
    return counter


def launch_options(layout: WorkspaceLayout) -> dict:
    """LAUNCH_OPTIONS and the warps of a layout: enough that the largest tile of a layer, a
    [PAD[l+1], PAD[l]] weight or a [KB, PAD[l+1]] per-point tile, holds at most
    ELEMENTS_PER_THREAD elements per thread, from 4 up to 16 warps."""
    largest = max(max(a * b for a, b in zip(layout.pad[1:], layout.pad[:-1])), layout.points * max(layout.pad))
    warps = 4
    while warps < 16 and largest > warps * 32 * ELEMENTS_PER_THREAD:
        warps *= 2
    return {**LAUNCH_OPTIONS, "num_warps": warps}


def kernel_arguments(layout: WorkspaceLayout, activation: str, loss: str, bias: bool, first_order: bool,
                     lr_grad: bool, all_step_losses: bool) -> dict:
    """The kernel's compile-time arguments for a layout and settings."""
    return dict(
        L=len(layout.widths) - 1, WIDTHS=layout.widths, PAD=layout.pad, W_OFF=layout.w_off, B_OFF=layout.b_off,
        FW_OFF=layout.fw_off, FB_OFF=layout.fb_off, P=layout.params, PW=layout.padded_params,
        UNIT_OFF=layout.unit_off, UNITS=layout.units, KB=layout.points, S=layout.steps,
        ACT=ACTIVATION_CODES[activation], LOSS=LOSS_CODES[loss], HAS_BIAS=bias, FIRST_ORDER=first_order,
        LR_GRAD=lr_grad, ALL_STEP_LOSSES=all_step_losses, WORKSPACE=layout.workspace,
    )


def mlp_meta_step_triton(theta, lrs, step_weights, support_x, support_y, query_x, query_y, widths, activation, bias,
                         loss, first_order, lr_grad, all_step_losses=True):
    """The outputs of pymaml::meta_step for the MLP of widths, activation and bias from one launch
    of the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    tasks, steps = support_x.shape[0], lrs.shape[0]
    points = max(support_x.shape[1], query_x.shape[1])
    reason = unsupported_reason(widths, theta.dtype, points)
    if reason is not None:
        raise ValueError(reason)
    if loss == "cross_entropy":
        for name, labels in (("support_y", support_y), ("query_y", query_y)):
            if not labels.numel():
                continue
            if labels.device.type == "cuda":
                # No host synchronisation (the step stays capturable in a CUDA graph): a label
                # outside the range fails a device-side assertion, raised at the next synchronisation.
                in_range = ((labels >= 0) & (labels < widths[-1])).all()
                torch._assert_async(in_range, f"pymaml: {name} has labels outside [0, {widths[-1]})")
            elif int(labels.min()) < 0 or int(labels.max()) >= widths[-1]:
                raise ValueError(f"{name} has labels outside [0, {widths[-1]})")
    layout = workspace_layout(tuple(widths), bool(bias), steps, points)
    if theta.shape != (layout.params,):
        raise ValueError(f"theta must have shape ({layout.params},) for widths {list(widths)}, got {tuple(theta.shape)}")
    empty = theta.new_empty
    meta_loss, task_losses, pre_losses = empty(()), empty(tasks), empty(tasks)
    step_losses, grad_theta = empty(steps), empty(layout.params)
    grad_lrs = empty(steps if lr_grad else 0, layout.params)
    workspace = empty(tasks * layout.workspace)
    contiguous = [t.detach().contiguous() for t in (theta, lrs, step_weights, support_x, support_y, query_x, query_y)]
    with _launch_device(contiguous):
        _mlp_meta_step_kernel[(tasks,)](
            *contiguous, meta_loss, task_losses, pre_losses, step_losses, grad_theta,
            grad_lrs if lr_grad else grad_theta, workspace, _counter(theta.device), tasks, support_x.shape[1],
            query_x.shape[1],
            **kernel_arguments(layout, activation, loss, bool(bias), bool(first_order), bool(lr_grad),
                               bool(all_step_losses)),
            **launch_options(layout),
        )
    return meta_loss, task_losses, pre_losses, step_losses, grad_theta, grad_lrs



def hvp_workspace(layout: WorkspaceLayout) -> int:
    """Per task: θ, v and hv padded, the inputs, one pass and the R-operator's tangents."""
    return 3 * layout.padded_params + layout.points * layout.pad[0] + 7 * layout.points * layout.units


def hvp_kernel_arguments(layout: WorkspaceLayout, activation: str, loss: str, bias: bool) -> dict:
    meta = kernel_arguments(layout, activation, loss, bias, False, False, True)
    keep = ("L", "WIDTHS", "PAD", "W_OFF", "B_OFF", "FW_OFF", "FB_OFF", "P", "PW", "UNIT_OFF", "UNITS", "KB", "ACT",
            "LOSS", "HAS_BIAS")
    return {**{name: meta[name] for name in keep}, "WORKSPACE": hvp_workspace(layout)}


def mlp_hvp_triton(theta, v, x, y, widths, activation, bias, loss):
    """hv[t] = ∇²L(θ_t) v[t] for every task (theta, v: [T, P]) from one launch of the Triton kernel."""
    tasks, points = x.shape[0], x.shape[1]
    reason = unsupported_reason(widths, theta.dtype, points)
    if reason is not None:
        raise ValueError(reason)
    layout = workspace_layout(tuple(widths), bool(bias), 0, points)
    hv = torch.empty_like(theta)
    workspace = theta.new_empty(tasks * hvp_workspace(layout))
    inputs = [theta.detach().contiguous(), v.detach().contiguous(), x.contiguous(), y.contiguous()]
    with _launch_device(inputs):
        _mlp_hvp_kernel[(tasks,)](
            *inputs, hv, workspace, points, **hvp_kernel_arguments(layout, activation, loss, bool(bias)),
            **launch_options(layout),
        )
    return hv


# ---------------------------------------------------------------------------------------------
# The torch.library op: the schema, fake kernel and autograd formula of pymaml::meta_step
# (pymaml/ops/meta_step), with the Triton launcher as its implementation.


def meta_step_triton(theta, lrs, step_weights, support_x, support_y, query_x, query_y, layers, layer_constants, loss,
                     first_order, lr_grad, all_step_losses=True):
    """pymaml::meta_step's outputs from the Triton kernel, which computes MLPs only: the encoded
    network must be one (pymaml.ops.meta_step.encode_mlp's form)."""
    mlp = as_mlp(layers, layer_constants)
    if mlp is None:
        raise ValueError("the Triton kernel computes MLPs (Linear layers with one activation between each two); "
                         "this network runs on the cpp or func backend")
    widths, activation, bias = mlp
    return mlp_meta_step_triton(theta, lrs, step_weights, support_x, support_y, query_x, query_y, widths, activation,
                                bias, loss, first_order, lr_grad, all_step_losses=all_step_losses)


@torch.library.custom_op("pymaml::meta_step_triton", mutates_args=())
def meta_step_triton_op(
    theta: torch.Tensor, lrs: torch.Tensor, step_weights: torch.Tensor, support_x: torch.Tensor,
    support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor, layers: list[int],
    layer_constants: list[float], loss: str, first_order: bool, lr_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return meta_step_triton(theta, lrs, step_weights, support_x, support_y, query_x, query_y, layers, layer_constants,
                            loss, first_order, lr_grad)


meta_step_triton_op.register_fake(meta_step_fake)
meta_step_triton_op.register_autograd(meta_step_backward, setup_context=meta_step_setup_context)
TRITON_IMPLEMENTATION = FusedImplementation(meta_step_triton, meta_step_triton_op)


def compile_ahead(target, kernel: str, widths, activation="relu", loss="mse", bias=True, steps=1, points=10,
                  first_order=False, lr_grad=False, all_step_losses=True):
    """triton.compile of kernel "meta_step" or "hvp" for a GPUTarget without a GPU (tests use it to
    catch what only the compiler sees); returns the compiled kernel (its .asm holds ptx and cubin)."""
    labels = "*i64" if loss == "cross_entropy" else "*fp32"
    layout = workspace_layout(tuple(widths), bias, steps if kernel == "meta_step" else 0, points)
    if kernel == "meta_step":
        fn, pointers = _mlp_meta_step_kernel, [
            "theta_ptr", "lrs_ptr", "step_weights_ptr", "support_x_ptr", "support_y_ptr", "query_x_ptr", "query_y_ptr",
            "meta_loss_ptr", "task_losses_ptr", "pre_losses_ptr", "step_losses_ptr", "grad_theta_ptr", "grad_lrs_ptr",
            "workspace_ptr"]
        scalars = {"counter_ptr": "*i32", "tasks": "i32", "support_points": "i32", "query_points": "i32"}
        constexprs = kernel_arguments(layout, activation, loss, bias, first_order, lr_grad, all_step_losses)
    else:
        fn, pointers = _mlp_hvp_kernel, ["theta_ptr", "v_ptr", "x_ptr", "y_ptr", "hv_ptr", "workspace_ptr"]
        scalars = {"points": "i32"}
        constexprs = hvp_kernel_arguments(layout, activation, loss, bias)
    signature = {name: labels if name in ("support_y_ptr", "query_y_ptr", "y_ptr") else "*fp32" for name in pointers}
    signature.update(scalars)
    signature.update({name: "constexpr" for name in constexprs})
    return triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                          options=launch_options(layout))
