"""
The drifting field and the drifting loss of "Generative Modeling via Drifting" (Deng et al. 2026).

compute_V          Algorithm 2 of the paper: the mean-shift field V_{p,q}(x) on raw coordinates.
drift_loss         the loss as the official release computes it (drift_loss.py): one distance scale per
                   call, temperatures relative to it, per-temperature force normalization, summed.
feature_sets       the vectors drifted in feature space (Sec. 3.4, A.5): per location, global and 2x2 /
                   4x4 patch means and stds of every encoder map, plus norm_x and the raw output.
feature_drift_loss one drift_loss per feature name, classes x locations folded into the group axis; names of one
                   width batched into one computation that keeps each name's statistics apart.
cfg_weight, sample_alpha   classifier-free guidance (Sec. 3.5, A.7) as the official train_step does it.

On GPUs the kernel's coefficients (softmaxes, clamp, row sums) come from one Triton kernel, elsewhere from torch ops,
and the distances and forces are matmuls of bf16 targets summed in float32 (the official's arithmetic on TPUs), the
forces stored in bf16; elsewhere all float32.

`python drift.py` runs the 2D toy of Figures 3-4 on the CPU and writes toy.png.
"""
import math

import torch

try:  # CUDA builds of torch ship Triton; elsewhere the chain runs as torch ops
    import triton
    import triton.language as tl
except ImportError:
    triton = None

TEMPERATURES = (0.02, 0.05, 0.2)


def _cdist(x, y, n=None):
    # Batched L2 distance through one matmul: (G, N, D) x (G, M, D) -> (G, N, M), no (G, N, M, D) difference.
    # n: x is y[:, :n], whose squared norms are then y's. Clamped at 1e-8 like the official, so rounding below 0 or
    # a zero distance stays finite under sqrt. bf16 inputs: their exact products summed in float32, out in float32.
    y_sq = y.float().square().sum(-1)
    x_sq = x.float().square().sum(-1) if n is None else y_sq[:, :n]
    if x.is_cuda and x.dtype == torch.bfloat16:
        xy = torch.bmm(x, y.transpose(1, 2), out_dtype=torch.float32)
    else:  # (the same arithmetic where bmm has no out_dtype: CPU)
        xy = torch.bmm(x.float(), y.float().transpose(1, 2))
    return (x_sq[:, :, None] + y_sq[:, None, :] - 2 * xy).clamp_min(1e-8).sqrt()


def _sqrt_softmax(logits):
    # sqrt(softmax over y * softmax over x) of logits (..., N, M), without forming either softmax, written into
    # logits (every caller runs without autograd; in place keeps eager's peak memory down)
    lse = logits.logsumexp(-1, keepdim=True) + logits.logsumexp(-2, keepdim=True)
    return logits.sub_(lse.mul_(0.5)).exp_()


@torch.no_grad()
def compute_V(x, y_pos, y_neg, T, mask_self=True):
    """Alg. 2: V = W_pos @ y_pos - W_neg @ y_neg for x (N, D) or (G, N, D); y_neg is usually x itself.
    V sits inside the stop-gradient, so it is computed without autograd."""
    if x.dim() not in (2, 3) or y_pos.dim() != x.dim() or y_neg.dim() != x.dim():
        raise ValueError(f"expected x, y_pos, y_neg all (N, D) or all (G, N, D), got "
                         f"{tuple(x.shape)}, {tuple(y_pos.shape)}, {tuple(y_neg.shape)}")
    if mask_self and y_neg.shape[-2] != x.shape[-2]:
        raise ValueError(f"mask_self needs y_neg to be x's own samples, got {y_neg.shape[-2]} vs {x.shape[-2]}")
    single = x.dim() == 2
    if single:
        x, y_pos, y_neg = x[None], y_pos[None], y_neg[None]
    dist_pos, dist_neg = _cdist(x, y_pos), _cdist(x, y_neg)  # (G, N, Np), (G, N, Nn)
    if mask_self:  # a sample never repels itself
        dist_neg.diagonal(dim1=1, dim2=2).add_(1e6)
    A = _sqrt_softmax(torch.cat([dist_pos, dist_neg], dim=-1) / -T)  # (G, N, Np + Nn)
    A_pos, A_neg = A.split([y_pos.shape[1], y_neg.shape[1]], dim=-1)
    W_pos = A_pos * A_neg.sum(-1, keepdim=True)
    W_neg = A_neg * A_pos.sum(-1, keepdim=True)
    V = W_pos @ y_pos - W_neg @ y_neg  # (G, N, D)
    return V[0] if single else V


def _segment_sum(x, seg, n_seg):
    # Sums of the rows of x (G, ...) per segment: (n_seg, ...). index_add (not a one-hot matmul, which TF32 rounds)
    # accumulates in sequence, so in float64: over ~10^4 groups float32 would lose ~1e-4 relative.
    return x.new_zeros(n_seg, *x.shape[1:], dtype=torch.float64).index_add_(0, seg, x.double()).to(x.dtype)


def _coefficients(dist, scale, w, Ng, Nn, temperatures, attraction, repulsion, softmax):
    """
    The kernel's coefficients C (G, K, Ng, Nt) from the distances dist (G, Ng, Nt) of gen to the targets
    [gen | neg | pos], their weights w (G, Nt) and each group's distance scale (G,), so that each temperature's
    force is C @ targets: C_pos = a A_pos rowsum(A_neg), C_neg = -b A_neg rowsum(A_pos).
    """
    self_pair = torch.eye(Ng, dist.shape[2], device=dist.device)
    dist = dist / scale[:, None, None] + self_pair * 100.0  # the self pair: +100 after scaling
    logits = torch.stack([dist * (-1.0 / T) for T in temperatures], dim=1)  # (G, K, Ng, Nt)
    if softmax == "both":  # clamped as the official sqrt(clip(product, 1e-6))
        A = _sqrt_softmax(logits).clamp_min_(1e-3)
    else:  # Table 11 ablation "y only": the plain row softmax (the paper gives no clamp for it)
        A = logits.softmax(-1)
    del logits
    A.mul_(w[:, None, None, :])  # weights enter after the sqrt
    A_neg, A_pos = A[..., :Ng + Nn], A[..., Ng + Nn:]
    sum_neg, sum_pos = A_neg.sum(-1, keepdim=True), A_pos.sum(-1, keepdim=True)  # (G, K, Ng, 1)
    C = torch.cat([A_neg * (sum_pos * -repulsion), A_pos * (sum_neg * attraction)], dim=-1)
    if attraction != repulsion:
        # The official subtracts (row sum of coefficients) * x, making the force a sum of (y - x) terms. That row
        # sum is (a - b) rowsum(A_pos) rowsum(A_neg): zero for the paper's a = b, else folded into the self pair's
        # coefficient (x is one of the targets). Table 1's a V+ - b V- ablation.
        C = C - self_pair * ((attraction - repulsion) * sum_pos * sum_neg)
    return C


def _coefficients_triton(dist, scale, w, Ng, Nn, temperatures, attraction, repulsion, dtype=torch.float32):
    # _coefficients (softmax "both") as one Triton kernel: one read of the distances, one write of C (computed in
    # float32, stored as dtype), against the ~5 passes over (G, K, Ng, Nt) that torch.compile makes of the torch
    # code (H200, ablation shape: 6.6 against 21.9 ms a call).
    G, _, Nt = dist.shape
    K, Np = len(temperatures), Nt - Ng - Nn
    C = torch.empty(G, K, Ng, Nt, device=dist.device, dtype=dtype)
    neg_inv_t = torch.tensor([-1.0 / T for T in temperatures]).to(dist.device, non_blocking=True)  # no stream sync
    p2 = triton.next_power_of_2
    BG, BN, BP = p2(Ng), p2(max(Nn, 1)), p2(Np)
    # 4 warps for 64 x 64 tiles (timed: 2 and 8 were slower); larger tiles keep its 32 floats a thread (not timed)
    warps = min(16, max(4, BG * max(BG, BN, BP) // 1024))
    _coefficients_kernel[(G, K)](dist.contiguous(), 1.0 / scale, w.contiguous(), neg_inv_t, C, float(attraction),
                                 float(repulsion), Ng=Ng, Nn=Nn, Np=Np, BG=BG, BN=BN, BP=BP, num_warps=warps)
    return C


if triton is not None:
    @triton.jit
    def _logits_tile(base, col0, n, rows, inv_s, t, Ng: tl.constexpr, BC: tl.constexpr, SELF: tl.constexpr):
        # One block of columns [col0, col0 + n) of a group's logits -dist / (scale T) (padding -1e30), the self
        # pair +100 after scaling on the gen block's diagonal.
        cols = tl.arange(0, BC)
        valid = (rows < Ng)[:, None] & (cols < n)[None, :]
        d = tl.load(base + col0 + cols[None, :], mask=valid, other=0.0) * inv_s
        if SELF:
            d += tl.where(rows[:, None] == cols[None, :], 100.0, 0.0)
        return tl.where(valid, d * t, -1e30), valid, cols

    @triton.jit
    def _col_lse(L):
        m = tl.max(L, 0)
        return m + tl.log(tl.sum(tl.exp(L - m[None, :]), 0))

    @triton.jit
    def _online_lse(m, s, L):
        # The running row max m and sum s of exp(L - m) over the blocks so far, updated with the block L
        m_new = tl.maximum(m, tl.max(L, 1))
        return m_new, s * tl.exp(m - m_new) + tl.sum(tl.exp(L - m_new[:, None]), 1)

    @triton.jit
    def _kernel_tile(base, w_g, col0, n, rows, inv_s, t, half_r, half_c, Ng: tl.constexpr, BC: tl.constexpr,
                     SELF: tl.constexpr):
        # The block's sqrt(softmax over y * softmax over x) = exp(L - lse_row / 2 - lse_col / 2), clamped as the
        # official, times the targets' weights (padding 0); and the block's mask and columns
        L, valid, cols = _logits_tile(base, col0, n, rows, inv_s, t, Ng, BC, SELF)
        w = tl.load(w_g + col0 + cols, mask=cols < n, other=0.0)
        A = tl.where(valid, tl.maximum(tl.exp(L - half_r[:, None] - half_c[None, :]), 1e-3), 0.0) * w[None, :]
        return A, valid, cols

    @triton.jit
    def _coefficients_kernel(dist_ptr, inv_scale_ptr, w_ptr, neg_inv_t_ptr, c_ptr, a, b, Ng: tl.constexpr,
                             Nn: tl.constexpr, Np: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
                             BP: tl.constexpr):
        # One program per (group, temperature). The columns [gen | neg | pos] are three blocks, each padded to a
        # power of 2 on its own (64 | 16 | 64 at the ablation shape: no padding), one block live at a time over
        # three passes: logsumexps, row sums, coefficients.
        g, k, K = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.num_programs(1)
        Nt = Ng + Nn + Np
        rows = tl.arange(0, BG)
        base = dist_ptr + g * Ng * Nt + rows[:, None] * Nt
        w_g = w_ptr + g * Nt
        inv_s, t = tl.load(inv_scale_ptr + g), tl.load(neg_inv_t_ptr + k)
        # pass 1: each block's column logsumexp, and the row logsumexp over all blocks (online)
        L, v, c = _logits_tile(base, 0, Ng, rows, inv_s, t, Ng, BG, True)
        hc_gen = 0.5 * _col_lse(L)
        m = tl.max(L, 1)
        s = tl.sum(tl.exp(L - m[:, None]), 1)
        L, v, c = _logits_tile(base, Ng + Nn, Np, rows, inv_s, t, Ng, BP, False)
        hc_pos = 0.5 * _col_lse(L)
        m, s = _online_lse(m, s, L)
        if Nn > 0:
            L, v, c = _logits_tile(base, Ng, Nn, rows, inv_s, t, Ng, BN, False)
            hc_neg = 0.5 * _col_lse(L)
            m, s = _online_lse(m, s, L)
        half_r = 0.5 * (m + tl.log(s))
        # pass 2: row sums of the weighted kernel over the negatives [gen | neg] and over the positives
        A, v, c = _kernel_tile(base, w_g, 0, Ng, rows, inv_s, t, half_r, hc_gen, Ng, BG, True)
        sum_neg = tl.sum(A, 1)
        A, v, c = _kernel_tile(base, w_g, Ng + Nn, Np, rows, inv_s, t, half_r, hc_pos, Ng, BP, False)
        sum_pos = tl.sum(A, 1)
        if Nn > 0:
            A, v, c = _kernel_tile(base, w_g, Ng, Nn, rows, inv_s, t, half_r, hc_neg, Ng, BN, False)
            sum_neg += tl.sum(A, 1)
        # pass 3: C = [-b A_neg sum_pos | a A_pos sum_neg], minus (a - b) sum_pos sum_neg on the self pair
        out = c_ptr + (g * K + k) * Ng * Nt + rows[:, None] * Nt
        A, v, c = _kernel_tile(base, w_g, 0, Ng, rows, inv_s, t, half_r, hc_gen, Ng, BG, True)
        self_pair = tl.where(rows[:, None] == c[None, :], ((a - b) * sum_pos * sum_neg)[:, None], 0.0)
        tl.store(out + c[None, :], A * (-b * sum_pos)[:, None] - self_pair, mask=v)
        A, v, c = _kernel_tile(base, w_g, Ng + Nn, Np, rows, inv_s, t, half_r, hc_pos, Ng, BP, False)
        tl.store(out + Ng + Nn + c[None, :], A * (a * sum_neg)[:, None], mask=v)
        if Nn > 0:
            A, v, c = _kernel_tile(base, w_g, Ng, Nn, rows, inv_s, t, half_r, hc_neg, Ng, BN, False)
            tl.store(out + Ng + c[None, :], A * (-b * sum_pos)[:, None], mask=v)


def _matmul_dtype(device):
    # The dtype of the targets, so of the distance and force matmuls' inputs, and of the forces (_targets,
    # _drift_step); a function, so that a CPU test can switch it to bf16
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _drift_step(targets, w, seg, counts, Ng, Nn, temperatures, reduce, attraction, repulsion, softmax):
    """
    The frozen drift of drift_loss for several independent sets at once. targets (G, Nt, D) = [gen | neg | pos]
    (centred, in _matmul_dtype: _targets), w (G, Nt) their weights; seg (G,) the set of each group and counts (S,)
    the groups per set (float). Each set keeps its own statistics, as if computed alone.
    Returns the step goal - gen (G, Ng, D) in input coordinates, each group's coordinate scale s (G,) (gen~ = gen / s),
    and per set the distance scale (S,) and each temperature's force mean square (S, K). All temperatures are
    computed at once, stacked on a second axis (K). Written out of place, for torch.compile (compile_drift) to fuse.
    """
    G, Nt, D = targets.shape
    S = counts.shape[0]
    self_pair = torch.eye(Ng, Nt, device=targets.device)  # gen i against target i, itself
    dist = _cdist(targets[:, :Ng], targets, n=Ng)  # (G, Ng, Nt)
    dist = torch.where(self_pair > 0, 1e-4, dist)  # the official's sqrt(1e-8) in exact arithmetic, not rounding

    # One scale per set: the weighted mean distance over its groups (and ranks, via reduce; one call for all sets).
    per_group = torch.stack([(dist.sum(1) * w).sum(-1) / (Ng * Nt), w.sum(-1) / Nt], dim=-1)  # (G, 2)
    stats = _segment_sum(per_group, seg, S) / counts[:, None]  # (S, 2)
    if reduce is not None:
        stats = reduce(stats)
    scale = stats[:, 0] / stats[:, 1]  # (S,)
    scale_in = (scale / math.sqrt(D)).clamp_min(1e-3)  # rescaled coordinates have mean distance sqrt(D)
    scale_dist = scale.clamp_min(1e-3)[seg]  # (G,) temperatures are relative to the mean distance
    # On GPUs the forces C @ targets, like the distances, take bf16 inputs with float32 accumulation, the official's
    # arithmetic on TPUs (JAX's default matmul precision), and are stored in bf16: half the memory traffic of the
    # largest tensors. Gradient within a few 1e-3 of float32 (README).
    if softmax == "both" and dist.is_cuda and triton is not None:
        C = _coefficients_triton(dist, scale_dist, w, Ng, Nn, temperatures, attraction, repulsion, targets.dtype)
    else:
        C = _coefficients(dist, scale_dist, w, Ng, Nn, temperatures, attraction, repulsion, softmax).to(targets.dtype)
    K = C.shape[1]
    # Formed transposed, (G, D, K, Ng): cuBLAS writes that layout faster (H200, ablation shape: 8.6 against 9.7 ms)
    force = torch.bmm(targets.transpose(1, 2), C.view(G, K * Ng, Nt).transpose(1, 2))
    force = force.view(G, D, K, Ng).float()

    # Each temperature's force divided by its RMS over its set (in rescaled coordinates), then summed.
    mean_sq = _segment_sum(force.square().sum((1, 3)), seg, S) / (counts[:, None] * (Ng * D))  # (S, K)
    mean_sq = mean_sq / scale_in[:, None].square()
    if reduce is not None:
        mean_sq = reduce(mean_sq)
    step = (force * mean_sq.clamp_min(1e-8).rsqrt()[seg, None, :, None]).sum(2).transpose(1, 2)  # (G, Ng, D)
    return step, scale_in[seg], scale, mean_sq


def _targets(sets, dtype):
    # [gen | neg | pos] of every group of every set in one (G, Nt, D) buffer of dtype, centred in float32 on each
    # group's mean generated sample (the field is translation invariant, and centring keeps the distances accurate
    # in bf16 or TF32 for features far from the origin), and their weights (G, Nt). Written as cats of
    # centred pieces, which torch.compile turns into one pass over the inputs (strided views included; gen is read
    # twice, for its mean and for the copy).
    parts, weights = [], []
    for gen, pos, neg, w_gen, w_pos, w_neg in sets:
        cols = [x.float() for x in ([gen, pos] if neg is None else [gen, neg, pos])]
        mean = cols[0].mean(-2, keepdim=True)
        parts.append(torch.cat([(x - mean).to(dtype) for x in cols], dim=-2).flatten(0, -3))
        ws = [w_gen, w_pos] if neg is None else [w_gen, w_neg, w_pos]
        weights.append(torch.cat([x.new_ones(x.shape[:-1]) if w is None else w.float().expand(x.shape[:-1])
                                  for x, w in zip(cols, ws)], dim=-1).flatten(0, -2))
    return torch.cat(parts), torch.cat(weights)


@torch.no_grad()
def _frozen(sets, seg, counts, temperatures, reduce, attraction, repulsion, softmax, per_set):
    # Everything inside the stop-gradient, for a list of sets (see _drift_step): the loss per group (G,), its
    # value mean(step~^2), or with per_set each set's mean (S,); and per set the loss's gradient for a unit
    # upstream gradient, laid out as the set's gen.
    Ng, Nn = sets[0][0].shape[-2], 0 if sets[0][2] is None else sets[0][2].shape[-2]
    targets, w = _targets(sets, _matmul_dtype(sets[0][0].device))
    step, scale_in, scale, mean_sq = _drift_step(targets, w, seg, counts, Ng, Nn, temperatures, reduce,
                                                 attraction, repulsion, softmax)
    n = Ng * step.shape[2] * scale_in.square()  # (G,) Ng D s^2
    loss = step.square().sum((1, 2)) / n
    if per_set:
        n = n * counts[seg]
        loss = _segment_sum(loss, seg, counts.shape[0]) / counts
    # d loss / d gen = -2 step~ / (s Ng D) with step~ = step / s: the goal is never formed. Written in each gen's
    # own memory layout, so that the backward is one plain multiply per set.
    grad = step * (-2.0 / n)[:, None, None]
    grads, off = [], 0
    for gen, *_ in sets:
        k = math.prod(gen.shape[:-2])
        grads.append(torch.empty_like(gen).copy_(grad[off:off + k].view(gen.shape)))
        off += k
    return loss, grads, scale, mean_sq


_frozen_fn = _frozen  # compile_drift() swaps in the compiled version


def compile_drift(mode=None):
    """Run the frozen part of the drift (targets, field, loss value and gradient) through torch.compile, one graph
    per feature width (six for our MAEs' feature sets), as train.py does on GPUs. mode: torch.compile's."""
    global _frozen_fn
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    _frozen_fn = torch.compile(_frozen, dynamic=False, mode=mode)


class _Regression(torch.autograd.Function):
    """
    The loss per group (G,), mean over (Ng, D) of (gen~ - stopgrad(goal~))^2, or with per_set each set's mean
    (S,), computed inside the stop-gradient, attached to the generated samples of n sets: gens (*B_i, Ng, D) of
    prod(B_i) groups each, in order, whose gradients for a unit upstream gradient are grads (the set's gen's shape).
    With per_set, gens may be any tensors, one per loss entry (feature_drift_loss's inputs).
    """

    @staticmethod
    def forward(ctx, loss, per_set, n, *grads_and_gens):
        ctx.save_for_backward(*grads_and_gens[:n])
        ctx.per_set = per_set
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        out, off = [], 0
        for i, g in enumerate(ctx.saved_tensors):
            k = math.prod(g.shape[:-2])
            # per_set: one scalar per set, a plain multiply over g's memory (faster than one factor per group)
            out.append(g * (grad[i] if ctx.per_set else grad[off:off + k].view(*g.shape[:-2], 1, 1).to(g.dtype)))
            off += k
        return None, None, None, *[None] * len(out), *out


def _loss(sets, temperatures, reduce, attraction, repulsion, softmax, per_set=False):
    # drift_loss for a list of independent sets (gen, pos, neg, w_gen, w_pos, w_neg) with groups of any shape B_i:
    # gen (*B_i, Ng, D), pos (*B_i, Np, D), neg (*B_i, Nn, D) or None, w_* (*B_i, N*) or None; Ng, Np, Nn, D shared
    # by all sets; the inputs may be strided views. All groups run as one batch, but every set keeps its own
    # distance scale and force normalization. Returns the loss per group (G,) (sets in order, groups flattened)
    # or with per_set per set (S,), the mean over its groups, as a value (_attach gives it its gradient); per set
    # its gradient for a unit upstream gradient, laid out as its gen; and per set its scale (S,) and force mean
    # squares (S, K) (formatted by _info outside, so that the frozen part compiles into one graph).
    sizes = [math.prod(s[0].shape[:-2]) for s in sets]
    G, S, device = sum(sizes), len(sets), sets[0][0].device
    # The set of each group, built on the host and sent without a stream sync.
    seg = torch.repeat_interleave(torch.arange(S), torch.tensor(sizes), output_size=G).to(device, non_blocking=True)
    counts = torch.tensor(sizes, dtype=torch.float32).to(device, non_blocking=True)
    with torch.autocast(device.type, enabled=False):  # the distances' sums need float32 even under bf16
        # any dtype: _targets computes in float32, the gradients come in gen's dtype
        frozen = [tuple(None if x is None else x.detach() for x in s) for s in sets]
        return _frozen_fn(frozen, seg, counts, temperatures, reduce, attraction, repulsion, softmax, per_set)


def _attach(loss, grads, gens, per_set):
    # the loss (no graph) as a function of gens, whose gradients for a unit upstream gradient are grads
    return _Regression.apply(loss, per_set, len(grads), *grads, *gens)


def _info(scale, mean_sq, temperatures):
    return {"scale": scale, **{f"drift_{T:g}": mean_sq[k] for k, T in enumerate(temperatures)}}


def _check(gen, pos, neg, weights, temperatures, softmax, layout, what=""):
    # Cheap shape checks, one ValueError that says what was expected. gen, pos, neg share every dim but the
    # sample dim 1; each weight has its samples' first two dims.
    got = ", ".join(f"{k} {tuple(t.shape)}" for k, t in (("gen", gen), ("pos", pos), ("neg", neg)) if t is not None)
    sets = [t for t in (gen, pos, neg) if t is not None]
    if any(t.dim() != layout.count(",") + 1 for t in sets):
        raise ValueError(f"{what}expected gen, pos and neg as {layout}, got {got}")
    if any(t.shape[:1] + t.shape[2:] != gen.shape[:1] + gen.shape[2:] for t in sets):
        raise ValueError(f"{what}expected gen, pos and neg {layout} to differ only in N, got {got}")
    if gen.shape[1] == 0 or pos.shape[1] == 0:
        raise ValueError(f"{what}expected at least one generated and one positive sample, got {got}")
    for name, (w, x) in weights.items():
        if w is not None and x is None:
            raise ValueError(f"{what}expected {name} only with its samples, got {name} {tuple(w.shape)} alone")
        if w is not None and w.shape != x.shape[:2]:
            raise ValueError(f"{what}expected {name} of shape {tuple(x.shape[:2])}, got {tuple(w.shape)}")
    if len(temperatures) == 0:
        raise ValueError("expected at least one temperature")
    if softmax not in ("both", "y"):
        raise ValueError(f"expected softmax 'both' or 'y', got {softmax!r}")


def drift_loss(gen, pos, neg=None, w_gen=None, w_pos=None, w_neg=None,
               temperatures=TEMPERATURES, reduce=None, attraction=1.0, repulsion=1.0, softmax="both"):
    """
    Drifting loss per group, as the official drift_loss.py.
    gen (G, Ng, D) generated samples, also the negatives; pos (G, Np, D); neg (G, Nn, D) extra negatives
    (CFG's unconditional reals); w_* (G, N*) weights in the kernel and in the distance scale (default 1).
    reduce: optional callable t -> mean of t over DDP ranks (t is a small float32 tensor; every rank must
    call drift_loss with the same shapes), applied to the batch-wide statistics (distance scale numerator and
    denominator, per-temperature force mean squares) so that N ranks equal one big batch.
    Returns loss (G,) = mean over (Ng, D) of (gen~ - stopgrad(goal~))^2, i.e. of the summed normalized drift
    squared, and a dict of 0-dim tensors: 'scale' (weighted mean distance) and 'drift_T' (mean square of the
    raw force at temperature T, in rescaled coordinates).
    Ablations only: attraction a and repulsion b give a V+ - b V- (Table 1); softmax="y" normalizes the
    kernel over the targets only (Table 11).
    """
    _check(gen, pos, neg, {"w_gen": (w_gen, gen), "w_pos": (w_pos, pos), "w_neg": (w_neg, neg)},
           temperatures, softmax, "(G, N, D)")
    loss, grads, scale, mean_sq = _loss([(gen, pos, neg, w_gen, w_pos, w_neg)], temperatures, reduce, attraction,
                                        repulsion, softmax)
    return _attach(loss, grads, [gen], per_set=False), _info(scale[0], mean_sq[0], temperatures)


def safe_std(x, dim):
    # Population std with the official's epsilon inside the sqrt. On GPUs torch.var: compiled, the ablation's feature
    # sets took 18.2 ms forward and backward against 21.5 with the official's two passes (the mean, then the mean
    # squared deviation; H200). On a CPU the two passes are faster: the fmnist_cpu generator 1.1-1.2 s/step, not 2.1.
    if x.is_cuda:
        return (x.var(dim=dim, unbiased=False) + 1e-6).sqrt()
    x = x - x.mean(dim=dim, keepdim=True)
    return (x.square().mean(dim=dim) + 1e-6).sqrt()


def feature_sets(maps, x=None, raw=None):
    """
    The vector sets drifted in feature space, name -> (B, L, C), from encoder maps name -> (B, C, H, W):
    per-location vectors (name), global mean/std (name_mean, name_std), 2x2 and 4x4 patch means/stds
    (name_mean_2, name_std_2, name_mean_4, name_std_4) where H and W divide, as the official
    get_activations. x: the patchified encoder input (B, C0, H0, W0), gives 'norm_x' (B, 1, C0).
    raw: the generator output (B, ...), gives 'global' (B, 1, numel / B): the official's vanilla drift.
    """
    out = {}
    if raw is not None:
        out["global"] = raw.float().reshape(raw.shape[0], 1, -1)
    if x is not None:
        out["norm_x"] = (x.float().pow(2).mean(dim=(2, 3)) + 1e-6).sqrt()[:, None, :]
    for name, fmap in maps.items():
        if fmap.dim() != 4:
            raise ValueError(f"expected map {name} as (B, C, H, W), got {tuple(fmap.shape)}")
        out[name] = fmap.flatten(2).transpose(1, 2)  # (B, H*W, C) in the map's dtype: no float32 copy of bf16 maps
        fmap = fmap.float()
        B, C, H, W = fmap.shape
        out[f"{name}_mean"] = fmap.mean(dim=(2, 3))[:, None, :]
        out[f"{name}_std"] = safe_std(fmap.flatten(2), dim=2)[:, None, :]
        for s in (2, 4):
            if H % s == 0 and W % s == 0:
                # (B, C, H/s, s, W/s, s) -> patches (B, L, C, s*s), locations row-major
                patches = fmap.reshape(B, C, H // s, s, W // s, s).permute(0, 2, 4, 1, 3, 5)
                patches = patches.reshape(B, (H // s) * (W // s), C, s * s)
                out[f"{name}_mean_{s}"] = patches.mean(-1)
                out[f"{name}_std_{s}"] = safe_std(patches, dim=-1)
    return out


def feature_drift_loss(gen, pos, neg=None, w_neg=None, temperatures=TEMPERATURES, reduce=None,
                       attraction=1.0, repulsion=1.0, softmax="both", inputs=None):
    """
    Sum over feature names of the mean drift_loss. gen/pos/neg: dicts name -> (Nc, N*, L, C), classes first;
    w_neg (Nc, Nn) the per-class CFG weight. Each location is its own drift problem, but all classes and
    locations of one name share one distance scale and one force normalization (as official).
    Names of one width C run as one batch (one _loss call: a few hundred kernels, not that many per name).
    attraction, repulsion, softmax: the ablations of drift_loss.
    inputs: optionally the tensor gen was computed from (the generated samples): the sets' gradient is then pulled
    back to it at once, and the loss is attached to inputs rather than to gen, so that the backward scales the
    inputs' gradient by the loss's upstream gradient instead of every feature (the ablation step 361.7-364.2
    against 365.0-367.5 ms on an H200: NOTES.md, Throughput). The same gradient either way.
    """
    batches = {}  # (Ng, Np, Nn, C) -> names
    for name, g in gen.items():
        if name not in pos or (neg is not None and name not in neg):
            raise ValueError(f"expected every feature of gen in pos and neg, {name} is missing")
        p, n = pos[name], None if neg is None else neg[name]
        _check(g, p, n, {"w_neg": (w_neg, n)}, temperatures, softmax, "(Nc, N, L, C)", f"feature {name}: ")
        batches.setdefault((g.shape[1], p.shape[1], 0 if n is None else n.shape[1], g.shape[3]), []).append(name)
    total, results, gens, grads = 0.0, {}, [], []
    for names in batches.values():
        sets = []
        for name in names:
            # Every (class, location) is its own group: (Nc, N, L, C) -> (Nc, L, N, C) views, folded by _loss's copy.
            g, p, n = gen[name], pos[name], None if neg is None else neg[name]
            w = None if w_neg is None else w_neg[:, None, :].expand(g.shape[0], g.shape[2], -1)  # (Nc, L, Nn)
            sets.append((g.transpose(1, 2), p.transpose(1, 2), None if n is None else n.transpose(1, 2), None, None, w))
        loss, set_grads, scale, mean_sq = _loss(sets, temperatures, reduce, attraction, repulsion, softmax,
                                                per_set=True)
        if inputs is None:
            loss = _attach(loss, set_grads, [s[0] for s in sets], per_set=True)
        else:
            gens += [s[0] for s in sets]
            grads += set_grads
        total = total + loss.sum()
        results.update({name: (loss[i], scale[i], mean_sq[i]) for i, name in enumerate(names)})
    if inputs is not None:
        with torch.autocast(inputs.device.type, enabled=False):  # a backward, run as outside the forward's autocast
            grad_in = torch.autograd.grad(gens, inputs, grads)
        total = _attach(total[None], grad_in, [inputs], per_set=True)[0]
    info = {}
    for name in gen:  # info in the order of gen
        loss, scale, mean_sq = results[name]
        info[f"loss/{name}"] = loss.detach()
        info.update({f"{k}/{name}": v for k, v in _info(scale, mean_sq, temperatures).items()})
    return total, info


def cfg_weight(alpha, n_gen, n_unc):
    """Weight of each unconditional negative so the target is alpha p(.|c) - (alpha - 1) p(.) (Sec. 3.5)."""
    return (alpha - 1) * (n_gen - 1) / max(1, n_unc)  # n_gen - 1: a sample's own pair is masked


def sample_alpha(n, power, lo=1.0, hi=4.0, p_one=0.0, generator=None, device=None):
    """n CFG scales with density ~ alpha^-power on [lo, hi] (inverse CDF), a share p_one set to exactly 1."""
    u = torch.rand(n, generator=generator, device=device)
    e = 1.0 - power
    if abs(e) < 1e-6:  # power 1: log-uniform
        alpha = lo * torch.exp(u * math.log(hi / lo))
    else:
        alpha = (lo ** e + u * (hi ** e - lo ** e)) ** (1.0 / e)
    one = torch.rand(n, generator=generator, device=device) < p_one
    return torch.where(one, torch.ones_like(alpha), alpha)


# --- 2D toy (Sec. 5.1, Fig. 3-4): a small MLP generator drifted onto a bimodal p with compute_V. ---
TOY_MODES = ((-0.5, 0.0), (0.5, 0.0))
TOY_STARTS = {"between": (0.0, 0.0), "far": (-0.9, 0.9), "collapsed": (0.5, 0.0)}


def toy_target(n, generator=None):
    # p: two Gaussian blobs (std 0.1) in raw coordinates within [-1, 1], as the authors' toy demo.
    modes = torch.tensor(TOY_MODES)
    which = torch.randint(0, len(modes), (n,), generator=generator)
    return modes[which] + 0.1 * torch.randn(n, 2, generator=generator)


def train_toy(start, steps=500, batch=1024, lr=1e-2, T=0.05, seed=0, snapshots=()):
    """Train an MLP generator from a small blob at `start`; returns (samples at snapshot steps, ||V||^2 curve)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128),
                              torch.nn.SiLU(), torch.nn.Linear(128, 2))
    with torch.no_grad():  # q starts as a blob of about a mode's width (std ~0.1) at `start`
        net[-1].weight.mul_(2.0)
        net[-1].bias.copy_(torch.tensor(start))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    # Cosine decay to zero: q settles instead of jittering around p, so the last ||V||^2 nears the minibatch floor.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    shots, curve = {}, []
    for step in range(steps + 1):
        x = net(torch.randn(batch, 16, generator=g))
        if step in snapshots:
            shots[step] = x.detach().clone()
        if step == steps:
            break
        V = compute_V(x, toy_target(batch, g), x, T)  # computed without autograd
        loss = (x - (x + V).detach()).pow(2).sum(-1).mean()  # value = mean ||V||^2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        curve.append(loss.item())
    return shots, curve


if __name__ == "__main__":
    from PIL import Image, ImageDraw

    torch.set_num_threads(1)  # small ops: one thread avoids OpenMP sync cost, notably on a shared CPU
    snaps, cell = (0, 50, 150, 500), 200
    img = Image.new("RGB", (cell * (len(snaps) + 1), cell * len(TOY_STARTS) + 20), "white")
    draw = ImageDraw.Draw(img)
    to_px = lambda v: (v + 1.1) / 2.2 * cell  # noqa: E731  [-1.1, 1.1] -> pixels
    ref = toy_target(1000, torch.Generator().manual_seed(1))
    for row, (name, start) in enumerate(TOY_STARTS.items()):
        shots, curve = train_toy(start, steps=max(snaps), snapshots=snaps)
        print(f"{name:10s} ||V||^2 first {curve[0]:.2e} last {curve[-1]:.2e}")
        y0 = 20 + row * cell
        for col, step in enumerate(snaps):
            x0 = col * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline="gray")
            for pts, color in ((ref, (120, 120, 220)), (shots[step][:1000], (230, 120, 20))):
                for px, py in pts.tolist():
                    u, v = x0 + to_px(px), y0 + cell - to_px(py)
                    draw.rectangle([u, v, u + 1, v + 1], fill=color)
            draw.text((x0 + 4, y0 + 4), f"{name} step {step}", fill="black")
        # ||V||^2 on a log scale, each curve normalised to its own range
        x0, logs = len(snaps) * cell, torch.tensor(curve).clamp_min(1e-12).log10()
        lo, hi = logs.min().item(), logs.max().item()
        pts = [(x0 + 10 + i / len(logs) * (cell - 20), y0 + 10 + (hi - l) / max(hi - lo, 1e-9) * (cell - 30))
               for i, l in enumerate(logs.tolist())]
        draw.line(pts, fill="black")
        draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline="gray")
        draw.text((x0 + 4, y0 + cell - 14), f"log ||V||^2: {hi:.1f} -> {logs[-1].item():.1f}", fill="black")
    draw.text((4, 4), "drifting toy: p (blue) vs q (orange); right: ||V||^2 per step", fill="black")
    img.save("toy.png")
    print("wrote toy.png")
