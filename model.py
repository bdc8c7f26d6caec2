"""The one-step generator of Drifting Models: a DiT with the official release's conditioning.

References:
- Deng et al. 2026, "Generative Modeling via Drifting", Sec. 4 and A.2.
- The authors' JAX release, models/generator.py (DitGen wrapping LightningDiT): every detail the
  paper leaves open (alpha embedding, register tokens, RoPE layout, SwiGLU width, inits) follows it.
- Peebles & Xie 2023, DiT (adaLN-zero, patchify, presets); Yao et al. 2025, LightningDiT (SwiGLU,
  RMSNorm, QK-norm, RoPE).

Noise in, image (or latent) out, one forward pass. The conditioning vector is
class embedding + sum of 32 "style" embeddings (each one of 64 learned vectors, picked at random)
+ 0.02 * RMSNorm(MLP(sinusoid(alpha))), alpha being the CFG scale. It drives adaLN-zero in every
block and is also projected into 16 in-context register tokens prepended to the patch tokens.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # CUDA builds of torch ship Triton; elsewhere attention runs through SDPA
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# -----------------------------------------------------------------------------
# Helpers


def sincos_pos_embed_2d(dim, grid):
    """(grid*grid, dim) fixed sin-cos table (MAE/DiT): first half encodes the column, second the row."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        angles = np.outer(pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")
    return np.concatenate([one_axis(dim // 2, cols.reshape(-1)), one_axis(dim // 2, rows.reshape(-1))], axis=1)


def rope_tables(seq_len, head_dim, dtype=torch.float32):
    """cos/sin tables (T, 1, head_dim) of 1-D rotary embedding over the whole sequence (registers included), float32.
    dtype bfloat16: positions, frequencies, angles and cos/sin each rounded to bf16, as the official builds them for
    its attn_fp32=False models (the released latent B/2 and L/2): positions from 256 on round to even numbers."""
    half = head_dim // 2
    inv_freq = (1.0 / 10000 ** (torch.arange(half, dtype=torch.float32) / half)).to(dtype)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32).to(dtype), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (T, 1, hd), broadcast over heads
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x (B, T, heads, hd), computed in float32 as the official release does where it computes
    attention in float32 (attn_fp32; its latent B/2 and L/2 compute both in bf16: README)."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain; statistics in float32 so bf16 inputs normalize exactly."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


# -----------------------------------------------------------------------------
# Embedders and blocks


class AlphaEmbedder(nn.Module):
    """CFG scale alpha -> conditioning vector: DiT's timestep embedding (cos|sin of 128 frequencies,
    then Linear-SiLU-Linear), followed by RMSNorm, as the official release embeds cfg_scale."""

    def __init__(self, cond_dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.norm = RMSNorm(cond_dim)

    def forward(self, alpha):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=alpha.device, dtype=torch.float32) / half)
        angles = alpha.float()[:, None] * freqs[None]  # (B, half)
        return self.norm(self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1)))  # (B, Dc)


# Where the Triton kernels below do not apply (CPU, float32): SDPA, cuDNN's fused attention first (faster than
# flash at 272 tokens on an H100, 3.4 against 5.6 ms a layer forward and backward, with the same errors against a
# float32 reference: NOTES.md), then the others in this order.
SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
# Flash attention of our own for bf16/fp16 on GPUs (head sizes 16-128). cuDNN's kernels tile 272 tokens (256
# patches + 16 registers) in blocks of 128, badly (its forward takes 0.68 ms at 272 tokens, 0.30 at 256); these take
# blocks of 32 or 64 and one of 16. On an H200, DiT-B/2 at batch 512 compiled, forward and backward: 180.2-180.5 ms
# against cuDNN's 186.1-186.7; the whole step 354.6 against 359.9 ms (NOTES.md). ATTN_BLOCKS: each pass's rows,
# columns, warps and stages, timed there.
TRITON_ATTENTION = True
ATTN_BLOCKS = {"fwd": (64, 32, 4, 3), "dq": (64, 32, 4, 3), "dkdv": (32, 64, 4, 3)}
LOG2E = 1 / math.log(2)  # the kernels' softmax runs in base 2

if triton is not None:
    # FlashAttention-2 (Dao 2023) on q, k, v (B, T, H, hd) of any strides (k and v are views of the qkv matmul's
    # output), one program per block of rows and (batch, head); softmax in base 2, logsumexp kept for the
    # backward. Each loop runs over whole blocks, then over one masked tail block of >= 16 rows (tl.dot's least).

    @triton.jit
    def _load_rows(P, rows, stride, d, T):
        # rows (n, hd) of a (T, hd) matrix with row stride `stride`; rows past T read as 0
        return tl.load(P + rows[:, None] * stride + d[None, :], mask=rows[:, None] < T, other=0.0)

    @triton.jit
    def _store_rows(P, rows, stride, d, T, x):
        tl.store(P + rows[:, None] * stride + d[None, :], x.to(P.dtype.element_ty), mask=rows[:, None] < T)

    @triton.jit
    def _fwd_step(q, m, l, acc, K, V, cols, d, kt, vt, T, qk_scale, MASK: tl.constexpr):
        # one block of keys (hd, n) and values (n, hd) folded into the running max m, sum l and output acc
        kp, vp = K + cols[None, :] * kt + d[:, None], V + cols[:, None] * vt + d[None, :]
        if MASK:
            kT, v = tl.load(kp, mask=cols[None, :] < T, other=0.0), tl.load(vp, mask=cols[:, None] < T, other=0.0)
            s = tl.where(cols[None, :] < T, tl.dot(q, kT) * qk_scale, float("-inf"))
        else:
            kT, v = tl.load(kp), tl.load(vp)
            s = tl.dot(q, kT) * qk_scale
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    @triton.jit
    def _fwd_rows(Q, K, V, O, LSE, m0, qt, kt, vt, ot, T, qk_scale, BM: tl.constexpr, BN: tl.constexpr,
                  HD: tl.constexpr, TAIL: tl.constexpr):
        rows, d = m0 + tl.arange(0, BM), tl.arange(0, HD)
        q = _load_rows(Q, rows, qt, d, T)
        m = tl.full([BM], float("-inf"), tl.float32)
        l, acc = tl.zeros([BM], tl.float32), tl.zeros([BM, HD], tl.float32)
        for n0 in range(0, T // BN * BN, BN):
            m, l, acc = _fwd_step(q, m, l, acc, K, V, n0 + tl.arange(0, BN), d, kt, vt, T, qk_scale, False)
        if T % BN != 0:
            m, l, acc = _fwd_step(q, m, l, acc, K, V, T // BN * BN + tl.arange(0, TAIL), d, kt, vt, T, qk_scale, True)
        _store_rows(O, rows, ot, d, T, acc / l[:, None])
        tl.store(LSE + rows, m + tl.math.log2(l), mask=rows < T)

    @triton.jit
    def _dq_step(q, do, lse, delta, dq, K, V, cols, d, kt, vt, T, qk_scale, MASK: tl.constexpr):
        kp, vp = K + cols[None, :] * kt + d[:, None], V + cols[None, :] * vt + d[:, None]  # both (hd, n)
        if MASK:  # keys and values past T load as 0: their terms of dq vanish
            kT, vT = tl.load(kp, mask=cols[None, :] < T, other=0.0), tl.load(vp, mask=cols[None, :] < T, other=0.0)
        else:
            kT, vT = tl.load(kp), tl.load(vp)
        p = tl.math.exp2(tl.dot(q, kT) * qk_scale - lse[:, None])
        ds = p * (tl.dot(do, vT) - delta[:, None])
        return dq + tl.dot(ds.to(kT.dtype), tl.trans(kT))

    @triton.jit
    def _dq_rows(Q, K, V, O, DO, DQ, LSE, DELTA, m0, qt, kt, vt, ot, T, qk_scale, sm_scale, BM: tl.constexpr,
                 BN: tl.constexpr, HD: tl.constexpr, TAIL: tl.constexpr):
        # dq of BM rows; also their delta = rowsum(o * do), which _dkdv_rows reads
        rows, d = m0 + tl.arange(0, BM), tl.arange(0, HD)
        q, do, o = _load_rows(Q, rows, qt, d, T), _load_rows(DO, rows, ot, d, T), _load_rows(O, rows, ot, d, T)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + rows, delta, mask=rows < T)
        lse = tl.load(LSE + rows, mask=rows < T, other=0.0)
        dq = tl.zeros([BM, HD], tl.float32)
        for n0 in range(0, T // BN * BN, BN):
            dq = _dq_step(q, do, lse, delta, dq, K, V, n0 + tl.arange(0, BN), d, kt, vt, T, qk_scale, False)
        if T % BN != 0:
            dq = _dq_step(q, do, lse, delta, dq, K, V, T // BN * BN + tl.arange(0, TAIL), d, kt, vt, T, qk_scale, True)
        _store_rows(DQ, rows, ot, d, T, dq * sm_scale)

    @triton.jit
    def _dkdv_step(k, v, dk, dv, Q, DO, LSE, DELTA, rows, d, qt, ot, T, qk_scale, MASK: tl.constexpr):
        qp, dop = Q + rows[None, :] * qt + d[:, None], DO + rows[:, None] * ot + d[None, :]  # (hd, m), (m, hd)
        if MASK:  # query rows past T: logsumexp +inf, so p = 0
            qT, do = tl.load(qp, mask=rows[None, :] < T, other=0.0), tl.load(dop, mask=rows[:, None] < T, other=0.0)
            lse = tl.load(LSE + rows, mask=rows < T, other=float("inf"))
            delta = tl.load(DELTA + rows, mask=rows < T, other=0.0)
        else:
            qT, do, lse, delta = tl.load(qp), tl.load(dop), tl.load(LSE + rows), tl.load(DELTA + rows)
        pT = tl.math.exp2(tl.dot(k, qT) * qk_scale - lse[None, :])  # (keys, rows)
        dv += tl.dot(pT.to(do.dtype), do)
        dsT = pT * (tl.dot(v, tl.trans(do)) - delta[None, :])
        return dk + tl.dot(dsT.to(qT.dtype), tl.trans(qT)), dv

    @triton.jit
    def _dkdv_rows(Q, K, V, DO, DK, DV, LSE, DELTA, n0, qt, kt, vt, ot, T, qk_scale, sm_scale, BM: tl.constexpr,
                   BN: tl.constexpr, HD: tl.constexpr, TAIL: tl.constexpr):
        # dk and dv of BN keys
        keys, d = n0 + tl.arange(0, BN), tl.arange(0, HD)
        k, v = _load_rows(K, keys, kt, d, T), _load_rows(V, keys, vt, d, T)
        dk, dv = tl.zeros([BN, HD], tl.float32), tl.zeros([BN, HD], tl.float32)
        for m0 in range(0, T // BM * BM, BM):
            dk, dv = _dkdv_step(k, v, dk, dv, Q, DO, LSE, DELTA, m0 + tl.arange(0, BM), d, qt, ot, T, qk_scale, False)
        if T % BM != 0:
            dk, dv = _dkdv_step(k, v, dk, dv, Q, DO, LSE, DELTA, T // BM * BM + tl.arange(0, TAIL), d, qt, ot, T,
                                qk_scale, True)
        _store_rows(DK, keys, ot, d, T, dk * sm_scale)
        _store_rows(DV, keys, ot, d, T, dv)

    @triton.jit
    def _attn_kernel(Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, qb, qt, qh, kb, kt, kh, vb, vt, vh, ob, ot, oh, H, T,
                     qk_scale, sm_scale, PASS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HD: tl.constexpr,
                     TAIL_M: tl.constexpr, TAIL_N: tl.constexpr):
        # PASS 0: forward; 1: dq (and delta); 2: dk, dv. O, DO, DQ, DK, DV share o's strides (ob, ot, oh);
        # program_id(0) picks the block of rows (of keys in pass 2), the last one a tail block where T needs one.
        bh = tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H
        Q, K, V = Q + b * qb + h * qh, K + b * kb + h * kh, V + b * vb + h * vh
        o = b * ob + h * oh
        O, DO, DQ, DK, DV = O + o, DO + o, DQ + o, DK + o, DV + o
        LSE, DELTA = LSE + bh.to(tl.int64) * T, DELTA + bh.to(tl.int64) * T
        if PASS == 0:
            m0 = tl.program_id(0) * BM
            if m0 + BM <= T:
                _fwd_rows(Q, K, V, O, LSE, m0, qt, kt, vt, ot, T, qk_scale, BM, BN, HD, TAIL_N)
            else:
                _fwd_rows(Q, K, V, O, LSE, m0, qt, kt, vt, ot, T, qk_scale, TAIL_M, BN, HD, TAIL_N)
        elif PASS == 1:
            m0 = tl.program_id(0) * BM
            if m0 + BM <= T:
                _dq_rows(Q, K, V, O, DO, DQ, LSE, DELTA, m0, qt, kt, vt, ot, T, qk_scale, sm_scale, BM, BN, HD, TAIL_N)
            else:
                _dq_rows(Q, K, V, O, DO, DQ, LSE, DELTA, m0, qt, kt, vt, ot, T, qk_scale, sm_scale, TAIL_M, BN, HD,
                         TAIL_N)
        else:
            n0 = tl.program_id(0) * BN
            if n0 + BN <= T:
                _dkdv_rows(Q, K, V, DO, DK, DV, LSE, DELTA, n0, qt, kt, vt, ot, T, qk_scale, sm_scale, BM, BN, HD,
                           TAIL_M)
            else:
                _dkdv_rows(Q, K, V, DO, DK, DV, LSE, DELTA, n0, qt, kt, vt, ot, T, qk_scale, sm_scale, BM, TAIL_N, HD,
                           TAIL_M)


def _tail(T, block):
    # the size of the tail block of T past whole blocks, rounded up to a power of 2 (tl.dot needs >= 16)
    return max(16, triton.next_power_of_2(T % block))


def _launch(pass_, q, k, v, o, do, dq, dk, dv, lse, delta):
    B, T, H, hd = q.shape
    BM, BN, warps, stages = ATTN_BLOCKS[("fwd", "dq", "dkdv")[pass_]]
    strides = [st for t in (q, k, v, o) for st in t.stride()[:3]]
    grid = (triton.cdiv(T, BN if pass_ == 2 else BM), B * H)
    with torch.cuda.device(q.device.index if q.is_cuda else -1):  # Triton launches on the current device
        _attn_kernel[grid](q, k, v, o, do, dq, dk, dv, lse, delta, *strides, H, T, hd ** -0.5 * LOG2E, hd ** -0.5,
                           PASS=pass_, BM=BM, BN=BN, HD=hd, TAIL_M=_tail(T, BM), TAIL_N=_tail(T, BN),
                           num_warps=warps, num_stages=stages)


@torch.library.custom_op("drifting::attention", mutates_args=())
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(hd)) v for q, k, v (B, T, H, hd) in bf16 or fp16 (on a GPU); returns the
    output (B, T, H, hd) and the logsumexp (B*H, T, base 2) kept for the backward. An opaque op to torch.compile."""
    B, T, H, hd = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # the kernels step rows by strides
    o = torch.empty(B, T, H, hd, device=q.device, dtype=q.dtype)
    lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
    _launch(0, q, k, v, o, o, o, o, o, lse, lse)
    return o, lse


@torch.library.custom_op("drifting::attention_backward", mutates_args=())
def _attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    do = do.contiguous()  # o's strides
    dq, dk, dv, delta = torch.empty_like(o), torch.empty_like(o), torch.empty_like(o), torch.empty_like(lse)
    _launch(1, q, k, v, o, do, dq, dk, dv, lse, delta)
    _launch(2, q, k, v, o, do, dq, dk, dv, lse, delta)
    return dq, dk, dv


@triton_attention.register_fake
def _(q, k, v):
    B, T, H, hd = q.shape
    return q.new_empty(B, T, H, hd), q.new_empty(B * H, T, dtype=torch.float32)


@_attention_backward.register_fake
def _(do, q, k, v, o, lse):
    return torch.empty_like(o), torch.empty_like(o), torch.empty_like(o)


def _save(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, do, dlse):
    return _attention_backward(do, *ctx.saved_tensors)


triton_attention.register_autograd(_backward, setup_context=_save)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, RMS QK-norm over each head, and RoPE."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)  # (B, T, H, hd) each
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        if (TRITON_ATTENTION and triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
                and self.head_dim in (16, 32, 64, 128)):
            out = triton_attention(q, k, v)[0]  # (B, T, H, hd)
        else:
            with sdpa_kernel(SDPA_PRIORITY, set_priority=True):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2)  # (B, H, T, hd) back to (B, T, H, hd)
        return self.proj(out.reshape(B, T, D))


class SwiGLU(nn.Module):
    """silu(x W1) * (x W3) then W2. W1 and W3 stay two matmuls, as officially: joined into one, the gradient of the
    joined output costs more than the one matmul saves (DiT-B/2 at batch 512 on an H200, forward and backward
    compiled: 213.3 ms joined against 207.8 ms; NOTES.md, Throughput)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-zero: shift/scale before, zero-started gate after each branch."""

    def __init__(self, dim, num_heads, mlp_hidden, cond_dim):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)

    def forward(self, x, c, rope):
        # The official release computes the modulation in float32, then casts it to the stream's dtype.
        with torch.autocast(x.device.type, enabled=False):
            mod = self.adaLN_modulation(F.silu(c.float()))[:, None].to(x.dtype)  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch_dim, cond_dim):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
        self.linear = nn.Linear(dim, patch_dim)

    def forward(self, x, c):
        with torch.autocast(x.device.type, enabled=False):
            shift, scale = self.adaLN_modulation(F.silu(c.float()))[:, None].to(x.dtype).chunk(2, dim=-1)  # (B, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))


# -----------------------------------------------------------------------------
# The generator


class DiT(nn.Module):
    """Generator f(noise, class, alpha, style) -> sample shaped like noise, in one pass.

    labels in [0, num_classes): one embedding row per class and no null class, as the official trains it (its
    DitGen built with the dataset's num_classes; unconditional negatives come from the queue, not a null label).
    cond_dim (the conditioning width) defaults to hidden_size, as in every official config.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, num_classes=1000, num_register_tokens=16, num_style_tokens=32, style_vocab=64,
                 cond_dim=None, remat=0, rope_bf16=False):
        super().__init__()
        if input_size % patch_size or hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"need input_size divisible by patch_size and hidden_size by num_heads into an even "
                             f"head size, got input_size={input_size}, "
                             f"patch_size={patch_size}, hidden_size={hidden_size}, num_heads={num_heads}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes, self.num_register_tokens = num_classes, num_register_tokens
        self.num_style_tokens, self.style_vocab = num_style_tokens, style_vocab
        self.cond_dim = cond_dim = cond_dim or hidden_size
        self.grid = input_size // patch_size
        self.patch_dim = patch_size * patch_size * in_channels
        # SwiGLU keeps the MLP's parameter count: 2/3 of the GELU width, rounded up to a multiple of 32.
        self.mlp_hidden = (int(2 / 3 * int(hidden_size * mlp_ratio)) + 31) // 32 * 32

        self.class_embed = nn.Embedding(num_classes, cond_dim)
        # Style token i picks row i*style_vocab + index: one table holds all 32 codebooks of 64.
        self.style_embed = nn.Embedding(num_style_tokens * style_vocab, cond_dim)
        self.alpha_embed = AlphaEmbedder(cond_dim)
        self.x_embedder = nn.Linear(self.patch_dim, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, hidden_size))  # learned, sin-cos start
        self.register_proj = nn.Linear(cond_dim, hidden_size)
        self.register_embed = nn.Parameter(torch.zeros(1, num_register_tokens, hidden_size))
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, self.mlp_hidden, cond_dim) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, self.patch_dim, cond_dim)
        # Activation checkpointing (official use_remat): the first `remat` blocks (True: all) are recomputed in the
        # backward, each trading ~1/depth of the activations' memory for one more forward of the block.
        self.remat = depth if remat is True else int(remat)
        # RoPE's cos/sin over the whole sequence, computed once: traced from scratch, torch.compile recomputes the
        # trigonometry for every element of q and k (B/2 at batch 512 on an H100: 10 of 89 ms of fused kernels).
        # rope_bf16: the official's bf16 tables (rope_tables), for its models built with attn_fp32=False
        rope = rope_tables(num_register_tokens + self.grid ** 2, hidden_size // num_heads,
                           torch.bfloat16 if rope_bf16 else torch.float32)
        self.register_buffer("rope_cos", rope[0], persistent=False)
        self.register_buffer("rope_sin", rope[1], persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        """The official initializers, all in one place."""
        # Every Linear: Xavier-uniform weight, zero bias (the release's TorchLinear default).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # The alpha MLP is a DiT timestep embedder: N(0, 0.02) weights.
        for m in self.alpha_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        # Class, style and register embeddings: N(0, 0.02).
        for w in (self.class_embed.weight, self.style_embed.weight, self.register_embed):
            nn.init.normal_(w, std=0.02)
        # Positional embedding starts as the fixed 2-D sin-cos table and is trained from there.
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.hidden_size, self.grid)).float()[None])
        # adaLN-zero: every modulation and the output projection start at zero, so f(.) = 0 at init.
        for layer in [b.adaLN_modulation for b in self.blocks] + [self.final_layer.adaLN_modulation,
                                                                 self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, x):
        """(B, C, H, W) -> (B, N, p*p*C); each patch vector is ordered (row, column, channel) as officially."""
        B, C, p, g = x.shape[0], self.in_channels, self.patch_size, self.grid
        return x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, p * p * C)

    def unpatchify(self, x):
        """(B, N, p*p*C) -> (B, C, H, W), the inverse of patchify."""
        B, C, p, g = x.shape[0], self.in_channels, self.patch_size, self.grid
        return x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)

    def forward(self, noise, labels, alpha, style_idx):
        """noise (B, C, H, W), labels (B,) long, alpha (B,) float or a scalar, style_idx (B, S) long."""
        B = noise.shape[0]
        expected = (self.in_channels, self.input_size, self.input_size)
        if tuple(noise.shape[1:]) != expected or tuple(style_idx.shape) != (B, self.num_style_tokens):
            raise ValueError(f"expected noise (B, {', '.join(map(str, expected))}) and style_idx "
                             f"(B, {self.num_style_tokens}), got {tuple(noise.shape)} and {tuple(style_idx.shape)}")
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=noise.device).expand(B)
        # token i's index picks row i * style_vocab + index (codebook i); one outside [0, style_vocab) is sent past the
        # table's end, an IndexError rather than another book's row. The embedding's backward sums repeated rows in a
        # fixed order (advanced indexing's did not on CPUs, so CPU runs did not repeat bit for bit)
        rows = style_idx + self.style_vocab * torch.arange(self.num_style_tokens, device=style_idx.device)
        rows = torch.where((style_idx >= 0) & (style_idx < self.style_vocab), rows, self.style_embed.num_embeddings)
        styles = self.style_embed(rows)  # (B, S, Dc)
        # c summed term by term in the stream's dtype (bf16 under autocast), as the official use_bf16 models do
        dev = noise.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
        c = self.class_embed(labels).to(dtype)
        for i in range(self.num_style_tokens):
            c = c + styles[:, i].to(dtype)
        c = c + 0.02 * self.alpha_embed(alpha).to(dtype)  # (B, Dc); the official 0.02, the embeddings' init std

        x = self.x_embedder(self.patchify(noise)) + self.pos_embed  # (B, N, D)
        registers = self.register_proj(c)[:, None] + self.register_embed  # (B, R, D)
        x = torch.cat([registers, x], dim=1)  # (B, R + N, D)
        x = x.to(dtype)  # under autocast a bf16 residual stream, as in the official use_bf16 models
        rope = (self.rope_cos, self.rope_sin)
        for i, block in enumerate(self.blocks):
            if i < self.remat and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, rope, use_reentrant=False)
            else:
                x = block(x, c, rope)
        x = self.final_layer(x[:, self.num_register_tokens:], c)  # (B, N, p*p*C), registers dropped
        return self.unpatchify(x)

    @torch.no_grad()
    def draw_inputs(self, seeds, device=None):
        """(noise (B, C, H, W), style_idx (B, S)) from one CPU generator per image seed, so image i is the
        same whatever the batch or rank split. For sampling and evaluation; training may draw on device."""
        seeds = torch.as_tensor(seeds).reshape(-1).tolist()
        if not seeds or not all(0 <= s < 2**32 for s in seeds):  # torch's CPU generator keeps a seed's low 32 bits
            raise ValueError(f"draw_inputs needs seeds in [0, 2**32), got {len(seeds)} seeds from "
                             f"{min(seeds, default=None)} to {max(seeds, default=None)}")
        noise, style = [], []
        for seed in seeds:
            gen = torch.Generator().manual_seed(int(seed))
            noise.append(torch.randn(self.in_channels, self.input_size, self.input_size, generator=gen))
            style.append(torch.randint(self.style_vocab, (self.num_style_tokens,), generator=gen))
        device = device or self.pos_embed.device
        return torch.stack(noise).to(device), torch.stack(style).to(device)

    def flops_per_sample(self):
        """Forward matmul FLOPs per sample (2 x multiply-accumulates), attention scores and values included.
        (The paper's "87 GFLOPs" for L/16 counts multiply-accumulates, i.e. half of this.)"""
        D, Dc, M, P = self.hidden_size, self.cond_dim, self.mlp_hidden, self.patch_dim
        N = self.grid ** 2
        T = N + self.num_register_tokens
        block = T * (3 * D * D + D * D + 3 * D * M) + 2 * T * T * D + Dc * 6 * D
        macs = (self.depth * block + N * P * D + Dc * D  # blocks, patch embed, register projection
                + self.alpha_embed.freq_dim * Dc + Dc * Dc + Dc * 2 * D + N * D * P)  # alpha MLP, final layer
        return 2 * macs


def _preset(**defaults):
    return lambda **kwargs: DiT(**{**defaults, **kwargs})


_LATENT = dict(input_size=32, in_channels=4, patch_size=2)  # 32x32x4 SD-VAE latents
_PIXEL = dict(input_size=256, in_channels=3, patch_size=16)  # 256x256 RGB
DiT_models = {
    "B/2": _preset(hidden_size=768, depth=12, num_heads=12, **_LATENT),
    "L/2": _preset(hidden_size=1024, depth=24, num_heads=16, **_LATENT),
    "B/16": _preset(hidden_size=768, depth=12, num_heads=12, **_PIXEL),
    "L/16": _preset(hidden_size=1024, depth=24, num_heads=16, **_PIXEL),
    "S/2": _preset(hidden_size=384, depth=12, num_heads=6, **_LATENT),  # quick runs
    "T/2": _preset(hidden_size=64, depth=2, num_heads=2, **{**_LATENT, "input_size": 8}),  # tests
    "T/16": _preset(hidden_size=64, depth=2, num_heads=2, **_PIXEL),  # tests of the pixel path
}

# -----------------------------------------------------------------------------
# The feature encoder: ResNet-MAE (Sec. 3.4, A.3; official models/mae_model.py)
#
# A GroupNorm ResNet ([3, 4, 6, 3] basic blocks, 3x3 stem without downsampling, widths
# [C, 2C, 4C, 8C]) trained as a masked autoencoder with a small U-Net decoder; only the encoder's
# multi-scale maps are used by the generator's loss. Every detail the paper leaves open follows the
# authors' JAX release (models/mae_model.py); module and attribute names follow its Flax tree so that
# official.mae_from_official() is a rename plus kernel transposes.
#
# Layout: our tensors are NCHW (the official code is NHWC). The encoder runs on a 32x32 grid: latents
# directly, pixels after an 8x8 patchify (256x256x3 -> 32x32x192).


def _mae_groups(channels, max_groups=32):
    # Official rule: the largest divisor of `channels` that is <= 32. The official decoder's concat
    # norm hard-codes 32 groups; for the widths it supports (multiples of 32) this rule gives 32 too.
    groups = min(max_groups, channels)
    while channels % groups:
        groups -= 1
    return groups


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm's function, computed in float32 as each channel's scale and shift from per-channel sums of x and
    x^2, its output in x's dtype: bf16 maps under autocast stay bf16, as the official use_bf16 encoders (Flax
    GroupNorm with dtype bf16) give them, and the residual stream with them. Compiled, the latent_256 encoder's
    forward and backward took 13% less time than with nn.GroupNorm (80.1 against 92.2 ms on an H200), and the bf16
    output took the encoder and drift loss of the ablation step from 172.3 to 165.4 ms (NOTES.md, Throughput)."""

    def forward(self, x):
        B, C, G = x.shape[0], x.shape[1], self.num_groups
        xf, dims = x.float(), tuple(range(2, x.dim()))
        n = x.shape[2:].numel() * (C // G)  # elements per group
        mean = xf.sum(dims).view(B, G, -1).sum(-1) / n  # (B, G)
        var = ((xf * xf).sum(dims).view(B, G, -1).sum(-1) / n - mean * mean).clamp_min(0)
        scale = torch.rsqrt(var + self.eps).repeat_interleave(C // G, 1) * self.weight  # (B, C)
        shift = self.bias - mean.repeat_interleave(C // G, 1) * scale
        shape = (B, C) + (1,) * len(dims)
        y = xf * scale.view(shape) + shift.view(shape)
        return y.to(x.dtype)


def _mae_norm(channels):
    return GroupNorm(_mae_groups(channels), channels, eps=1e-6)  # Flax GroupNorm eps is 1e-6


def _mae_conv3x3(in_ch, out_ch, stride=1):
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class MAEBasicBlock(nn.Module):
    """Two 3x3 conv+GN, ReLU between, GN'd 1x1 projection on the skip when the shape changes."""

    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.conv1 = _mae_conv3x3(in_ch, out_ch, stride)
        self.gn1 = _mae_norm(out_ch)
        self.conv2 = _mae_conv3x3(out_ch, out_ch)
        self.gn2 = _mae_norm(out_ch)
        self.proj_conv, self.proj_gn = None, None
        if stride != 1 or in_ch != out_ch:
            self.proj_conv = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
            self.proj_gn = _mae_norm(out_ch)

    def forward(self, x):
        y = self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x)))))
        if self.proj_conv is not None:
            x = self.proj_gn(self.proj_conv(x))
        return F.relu(x + y)


class MAEEncoder(nn.Module):
    """Stem + 4 stages; each stage ends with its own GroupNorm, whose output feeds the next stage."""

    def __init__(self, in_channels, width, layers):
        super().__init__()
        self.conv1 = _mae_conv3x3(in_channels, width)  # stride 1: no downsampling in the stem
        self.gn1 = _mae_norm(width)
        self.stages, self.norms = nn.ModuleList(), nn.ModuleList()
        in_ch = width
        for i, depth in enumerate(layers):
            out_ch = width * 2 ** i
            blocks = [MAEBasicBlock(in_ch, out_ch, stride=1 if i == 0 else 2)]
            blocks += [MAEBasicBlock(out_ch, out_ch) for _ in range(depth - 1)]
            self.stages.append(nn.Sequential(*blocks))
            self.norms.append(_mae_norm(out_ch))
            in_ch = out_ch

    def forward(self, x, every_k=0):
        """Returns ({conv1, layer1..layer4}, {layer{i}_blk{j}: raw output of block j if every_k divides j})."""
        feats = {"conv1": F.relu(self.gn1(self.conv1(x)))}  # (B, C, H, W)
        blocks = {}
        x = feats["conv1"]
        for i, (stage, norm) in enumerate(zip(self.stages, self.norms), start=1):
            for j, block in enumerate(stage, start=1):
                x = block(x)
                if every_k and j % every_k == 0:
                    blocks[f"layer{i}_blk{j}"] = x
            x = norm(x)
            feats[f"layer{i}"] = x  # (B, C * 2^(i-1), H / 2^(i-1), W / 2^(i-1))
        return feats, blocks


class MAEConvGNReLU(nn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = _mae_conv3x3(in_ch, out_ch)
        self.gn = _mae_norm(out_ch)

    def forward(self, x):
        return F.relu(self.gn(self.conv(x)))


class MAEUpBlock(nn.Module):
    """Bilinear resize to the skip's size, concat, GN, then two 3x3 conv+GN+ReLU."""

    def __init__(self, in_ch, skip_ch, out_ch):
        super().__init__()
        self.concat_norm_fn = _mae_norm(in_ch + skip_ch)
        self.proj = MAEConvGNReLU(in_ch + skip_ch, out_ch)
        self.refine = MAEConvGNReLU(out_ch, out_ch)

    def forward(self, x, skip):
        # Half-pixel bilinear; equals jax.image.resize(method="bilinear") when upsampling.
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.refine(self.proj(self.concat_norm_fn(torch.cat([x, skip], dim=1))))


class MAEDecoder(nn.Module):
    """U-Net decoder (MAE training only): bridge on layer4, then up to layer3, 2, 1 and the stem."""

    def __init__(self, width, out_channels):
        super().__init__()
        c = width
        self.bridge = MAEConvGNReLU(8 * c, 8 * c)
        self.up43 = MAEUpBlock(8 * c, 4 * c, 4 * c)
        self.up32 = MAEUpBlock(4 * c, 2 * c, 2 * c)
        self.up21 = MAEUpBlock(2 * c, c, c)
        self.up10 = MAEUpBlock(c, c, c)
        self.head = nn.Conv2d(c, out_channels, 1)  # the only decoder conv with a bias

    def forward(self, feats):
        x = self.bridge(feats["layer4"])
        x = self.up43(x, feats["layer3"])
        x = self.up32(x, feats["layer2"])
        x = self.up21(x, feats["layer1"])
        x = self.up10(x, feats["conv1"])
        return self.head(x)


class ResNetMAE(nn.Module):
    """Masked autoencoder on a (B, in_channels, H, W) image/latent; width is the paper's base width C,
    mask_patch the side of the hidden patches on the encoder grid (official patch_size)."""

    def __init__(self, in_channels=4, width=256, layers=(3, 4, 6, 3), input_patch_size=1,
                 num_classes=1000, mask_patch=2):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 stage depths >= 1, got {layers}")
        self.in_channels, self.width, self.layers = in_channels, width, tuple(layers)
        self.input_patch_size, self.num_classes, self.mask_patch = input_patch_size, num_classes, mask_patch
        grid_channels = in_channels * input_patch_size ** 2  # encoder input channels after patchify
        self.encoder = MAEEncoder(grid_channels, width, layers)
        self.decoder = MAEDecoder(width, grid_channels)
        self.fc = nn.Linear(8 * width, num_classes)  # classifier on the pooled layer4 map
        self.initialize_weights()

    def initialize_weights(self):
        # Flax defaults, as in the official model: every conv/dense kernel lecun_normal (truncated
        # normal within 2 std, std = sqrt(1 / fan_in) / 0.8796 so the truncated variance is 1/fan_in),
        # biases (head, fc) zero, GroupNorm scale 1 and bias 0. No zero-init of residual branches.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                std = math.sqrt(1.0 / m.weight[0].numel()) / 0.87962566103423978  # fan_in = in * kh * kw
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- input patchify (pixel encoders): 256x256x3 -> 32x32x192 ----

    def input_patchified(self, x):
        """(B, C, H, W) image -> (B, p*p*C, H/p, W/p) encoder input; channel order (ph, pw, c) as official."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        p = self.input_patch_size
        B, C, H, W = x.shape
        if H % p or W % p:
            raise ValueError(f"H, W must divide by input_patch_size {p}, got {H}x{W}")
        if p == 1:
            return x
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 3, 5, 1, 2, 4)  # (B, ph, pw, C, h, w)
        return x.reshape(B, p * p * C, H // p, W // p)

    def unpatchify(self, z):
        """Inverse of input_patchified: (B, p*p*C, h, w) -> (B, C, h*p, w*p)."""
        p, C = self.input_patch_size, self.in_channels
        if p == 1:
            return z
        B, _, h, w = z.shape
        z = z.reshape(B, p, p, C, h, w).permute(0, 3, 4, 1, 5, 2)  # (B, C, h, ph, w, pw)
        return z.reshape(B, C, h * p, w * p)

    # ---- MAE training ----

    def random_mask(self, z, mask_ratio=0.5, generator=None):
        """(B, 1, h, w) float mask, 1 = hidden, constant on mask_patch x mask_patch patches.

        Each patch is hidden independently with probability r (not an exact count, as official);
        r is per sample, uniform in [lo, hi] when mask_ratio is a (lo, hi) pair (the official
        mask_ratio_min/max), else mask_ratio itself (a float or 0-d tensor, which avoids recompiles).
        """
        lo, hi = mask_ratio if isinstance(mask_ratio, (tuple, list)) else (mask_ratio, mask_ratio)
        B, _, h, w = z.shape
        m = self.mask_patch
        if h % m or w % m:
            raise ValueError(f"encoder grid {h}x{w} must divide by mask_patch {m}")
        ratio = lo + (hi - lo) * torch.rand(B, 1, 1, generator=generator, device=z.device)  # (B, 1, 1)
        noise = torch.rand(B, h // m, w // m, generator=generator, device=z.device)
        mask = (noise < ratio).float()
        mask = mask.repeat_interleave(m, dim=1).repeat_interleave(m, dim=2)  # (B, h, w)
        return mask.unsqueeze(1)

    def _masked_forward(self, x, mask_ratio, generator):
        z = self.input_patchified(x)  # (B, C', h, w)
        mask = self.random_mask(z, mask_ratio, generator)  # (B, 1, h, w)
        feats, _ = self.encoder(z * (1.0 - mask))
        return z, self.decoder(feats), mask, feats

    def reconstruct(self, x, mask_ratio=0.5, generator=None):
        """(reconstruction, mask) in the image layout of x, for looking at what the MAE learned."""
        _, recon, mask, _ = self._masked_forward(x, mask_ratio, generator)
        p = self.input_patch_size
        return self.unpatchify(recon), mask.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)

    def forward(self, x, labels=None, mask_ratio=0.5, lambda_cls=0.0, generator=None):
        """Loss = lambda_cls * CE + (1 - lambda_cls) * masked L2, averaged over the batch.

        labels=None drops the classifier term (then lambda_cls must be 0 and fc gets no gradient:
        under DDP pass labels, or use find_unused_parameters).
        """
        z, recon, mask, feats = self._masked_forward(x, mask_ratio, generator)
        # Per-sample squared error summed over the hidden area (all channels) / hidden positions.
        err = (recon.float() - z.float()).pow(2) * mask
        recon_loss = err.sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) + 1e-8)  # (B,)
        if labels is None:
            if not (isinstance(lambda_cls, (int, float)) and lambda_cls == 0):
                raise ValueError("lambda_cls > 0 needs labels")
            cls_loss = accuracy = torch.zeros_like(recon_loss)
        else:
            logits = self.fc(feats["layer4"].mean(dim=(2, 3))).float()  # (B, num_classes)
            cls_loss = F.cross_entropy(logits, labels, reduction="none")
            accuracy = (logits.argmax(dim=-1) == labels).float()
        loss = (lambda_cls * cls_loss + (1.0 - lambda_cls) * recon_loss).mean()
        info = {"recon_loss": recon_loss.mean(), "cls_loss": cls_loss.mean(),
                "accuracy": accuracy.mean(), "mask_ratio": mask.mean()}
        return loss, {k: v.detach() for k, v in info.items()}

    # ---- features for the drifting loss ----

    def activations(self, x):
        """Maps the official get_activations iterates, in its order, each (B, C, H, W):
        conv1, layer1..layer4 (each after its stage GroupNorm), then the raw output of every 2nd
        block of each stage, layer{i}_blk{j} (j = 2, 4, ...). layer{i} is the normed last block, so
        it differs from layer{i}_blk{last}. No masking; gradients flow to x.
        """
        feats, blocks = self.encoder(self.input_patchified(x), every_k=2)  # every_k_block 2 in all official configs
        return {**feats, **blocks}

    def flops_per_sample(self, image_size=None, with_decoder=False):
        """Forward FLOPs (2 * MACs of convs and linears) per image of side image_size (default: the
        32x32 grid). Encoder only (what activations() costs) unless with_decoder (MAE training)."""
        p = self.input_patch_size
        size = (image_size or 32 * p) // p
        sizes = [size]  # grid side of the stem and of stages 1..4
        for _ in range(3):
            sizes.append((sizes[-1] - 1) // 2 + 1)  # 3x3 stride 2 padding 1 (and 1x1 stride 2)

        def conv(c, side):
            return 2 * c.in_channels * c.out_channels * c.kernel_size[0] * c.kernel_size[1] * side * side

        flops = conv(self.encoder.conv1, sizes[0])
        for stage, side in zip(self.encoder.stages, sizes):
            for b in stage:
                flops += conv(b.conv1, side) + conv(b.conv2, side)
                flops += conv(b.proj_conv, side) if b.proj_conv is not None else 0
        if with_decoder:
            d = self.decoder
            flops += conv(d.bridge.conv, sizes[3])
            for up, side in ((d.up43, sizes[2]), (d.up32, sizes[1]), (d.up21, sizes[0]), (d.up10, sizes[0])):
                flops += conv(up.proj.conv, side) + conv(up.refine.conv, side)
            flops += conv(d.head, sizes[0]) + 2 * self.fc.in_features * self.fc.out_features
        return flops


# Presets: the paper's encoders (official configs/mae/*.yaml) plus small ones for tests and quick runs.
def MAE_latent_256(**kw): return ResNetMAE(**{"in_channels": 4, "width": 256, **kw})
def MAE_latent_640(**kw): return ResNetMAE(**{"in_channels": 4, "width": 640, **kw})
def MAE_pixel_256(**kw): return ResNetMAE(**{"in_channels": 3, "width": 256, "input_patch_size": 8, **kw})
def MAE_pixel_640(**kw): return ResNetMAE(**{"in_channels": 3, "width": 640, "input_patch_size": 8, **kw})
def MAE_cifar(**kw): return ResNetMAE(**{"in_channels": 3, "width": 128, "num_classes": 10, **kw})
def MAE_fmnist(**kw): return ResNetMAE(**{"in_channels": 1, "width": 64, "num_classes": 10, **kw})
def MAE_tiny(**kw): return ResNetMAE(**{"in_channels": 4, "width": 32, "layers": (2, 2, 2, 2), "num_classes": 10, **kw})


MAE_models = {
    "latent_256": MAE_latent_256, "latent_640": MAE_latent_640,
    "pixel_256": MAE_pixel_256, "pixel_640": MAE_pixel_640,
    "cifar": MAE_cifar, "fmnist": MAE_fmnist, "tiny": MAE_tiny,
}
