"""Tests of drift.py: closed-form facts of the field, the loss against a float64 re-implementation of the
official formula and against the official JAX code's values, the feature sets, the CFG helpers and the 2D toy.
CPU, seconds."""
import itertools
import math
import threading

import numpy as np
import pytest
import torch

import drift
from drift import (cfg_weight, compute_V, drift_loss, feature_drift_loss, feature_sets, sample_alpha,
                   train_toy, TOY_MODES, TOY_STARTS)

torch.set_num_threads(1)  # tiny ops; one thread is fastest on a shared CPU


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference_drift_loss(gen, pos, neg, w_gen, w_pos, w_neg, temperatures, a=1.0, b=1.0, softmax="both"):
    """The official drift_loss written out in float64 numpy: explicit differences, loop over temperatures."""
    gen, pos, neg, w_gen, w_pos, w_neg = (np.asarray(t, dtype=np.float64)
                                          for t in (gen, pos, neg, w_gen, w_pos, w_neg))
    G, Ng, D = gen.shape
    Nn = neg.shape[1]
    targets = np.concatenate([gen, neg, pos], axis=1)
    tw = np.concatenate([w_gen, w_neg, w_pos], axis=1)
    dist = np.sqrt(np.maximum(((gen[:, :, None, :] - targets[:, None, :, :]) ** 2).sum(-1), 1e-8))
    scale = (dist * tw[:, None, :]).mean() / tw.mean()
    scale_in = max(scale / math.sqrt(D), 1e-3)
    gen_s, targets_s = gen / scale_in, targets / scale_in
    dist_n = dist / max(scale, 1e-3)
    dist_n[:, np.arange(Ng), np.arange(Ng)] += 100.0
    total, drift_ms = np.zeros_like(gen_s), {}
    for T in temperatures:
        logits = -dist_n / T
        row = np.exp(logits - logits.max(-1, keepdims=True))
        row /= row.sum(-1, keepdims=True)
        col = np.exp(logits - logits.max(-2, keepdims=True))
        col /= col.sum(-2, keepdims=True)
        A = (np.sqrt(np.maximum(row * col, 1e-6)) if softmax == "both" else row) * tw[:, None, :]
        A_neg, A_pos = A[..., :Ng + Nn], A[..., Ng + Nn:]
        sum_neg, sum_pos = A_neg.sum(-1, keepdims=True), A_pos.sum(-1, keepdims=True)
        coeff = np.concatenate([-b * A_neg * sum_pos, a * A_pos * sum_neg], axis=-1)
        force = np.einsum("biy,byx->bix", coeff, targets_s) - coeff.sum(-1)[..., None] * gen_s
        drift_ms[T] = (force ** 2).mean()
        total += force / math.sqrt(max(drift_ms[T], 1e-8))
    goal = gen_s + total
    return ((gen_s - goal) ** 2).mean(axis=(1, 2)), goal, scale_in, scale, drift_ms


def loss_inputs(G=3, Ng=5, Np=4, Nn=3, D=6):
    gen, pos, neg = randn(G, Ng, D, seed=1), randn(G, Np, D, seed=2) + 0.5, randn(G, Nn, D, seed=3) * 2
    g = torch.Generator().manual_seed(4)
    w_gen, w_pos = 0.5 + torch.rand(G, Ng, generator=g), 0.5 + torch.rand(G, Np, generator=g)
    w_neg = torch.rand(G, Nn, generator=g)
    return gen, pos, neg, w_gen, w_pos, w_neg


def test_V_shape():
    # V has the shape of x, unbatched and batched
    assert compute_V(randn(7, 3), randn(5, 3), randn(7, 3), 0.1).shape == (7, 3)
    assert compute_V(randn(2, 7, 3), randn(2, 5, 3), randn(2, 7, 3), 0.1).shape == (2, 7, 3)


def test_V_antisymmetric():
    # swapping p and q flips the sign of V (disjoint sets, no self mask)
    x, p, q = randn(20, 3, seed=1), randn(30, 3, seed=2) + 1, randn(25, 3, seed=3)
    V_pq = compute_V(x, p, q, 0.5, mask_self=False)
    V_qp = compute_V(x, q, p, 0.5, mask_self=False)
    torch.testing.assert_close(V_pq, -V_qp)


def test_V_zero_for_identical_distributions():
    # p = q gives a drift far smaller than a shifted p does (zero up to sampling noise)
    x, p = randn(2000, 2, seed=1), randn(2000, 2, seed=2)
    same = compute_V(x, p, x, 0.5).norm(dim=-1).mean()
    shifted = compute_V(x, p + 1.0, x, 0.5).norm(dim=-1).mean()
    assert same < 0.05 * shifted


def test_V_batched_equals_loop():
    # the batched field equals the field of each group computed alone
    x, p, q = randn(4, 9, 3, seed=1), randn(4, 6, 3, seed=2), randn(4, 9, 3, seed=3)
    V = compute_V(x, p, q, 0.2)
    torch.testing.assert_close(V, torch.stack([compute_V(x[g], p[g], q[g], 0.2) for g in range(4)]))


def test_V_self_pair_masked():
    # with mask_self, a sample's own negative entry has no influence on its drift
    x, p = randn(8, 2, seed=1), randn(10, 2, seed=2)
    y_neg = x.clone()
    y_neg[3] += 5.0
    torch.testing.assert_close(compute_V(x, p, y_neg, 0.3)[3], compute_V(x, p, x, 0.3)[3])
    unmasked = lambda y: compute_V(x, p, y, 0.3, mask_self=False)[3]  # noqa: E731
    assert not torch.allclose(unmasked(y_neg), unmasked(x))  # the perturbation matters without the mask


@pytest.mark.parametrize("cfg_only", [False, True])
def test_drift_loss_matches_official_formula(cfg_only):
    # loss, scale and per-temperature drift equal a float64 re-implementation of the official drift_loss, with
    # weights on every sample or, as feature_drift_loss passes them, on the extra negatives only
    gen, pos, neg, w_gen, w_pos, w_neg = loss_inputs()
    if cfg_only:
        w_gen, w_pos = torch.ones_like(w_gen), torch.ones_like(w_pos)
    loss, info = drift_loss(gen, pos, neg, *((None, None) if cfg_only else (w_gen, w_pos)), w_neg)
    ref_loss, _, _, ref_scale, ref_ms = reference_drift_loss(gen, pos, neg, w_gen, w_pos, w_neg, (0.02, 0.05, 0.2))
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-4)
    np.testing.assert_allclose(info["scale"].item(), ref_scale, rtol=1e-5)
    for T in (0.02, 0.05, 0.2):
        np.testing.assert_allclose(info[f"drift_{T:g}"].item(), ref_ms[T], rtol=1e-4)


def test_drift_loss_matches_official_formula_at_feature_width():
    # at a real group size (64 gen, 64 pos, 16 neg, 256 dims) the float32 loss and drift stay within 1e-5 of float64
    gen, pos, neg, w_gen, w_pos, w_neg = loss_inputs(G=4, Ng=64, Np=64, Nn=16, D=256)
    loss, info = drift_loss(gen, pos, neg, w_gen, w_pos, w_neg)
    ref_loss, _, _, _, ref_ms = reference_drift_loss(gen, pos, neg, w_gen, w_pos, w_neg, (0.02, 0.05, 0.2))
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-5)
    for T in (0.02, 0.05, 0.2):
        np.testing.assert_allclose(info[f"drift_{T:g}"].item(), ref_ms[T], rtol=1e-5)


@pytest.mark.parametrize("c", [0.5, 1000.0])
def test_loss_invariant_to_feature_scale(c):
    # scaling gen, pos and neg by one constant leaves the loss unchanged (distance and coordinate normalization),
    # while distances stay far above the official's absolute floor (the 1e-8 clamp of squared distances)
    gen, pos, neg, w_gen, w_pos, w_neg = loss_inputs()
    loss, _ = drift_loss(gen, pos, neg, w_gen, w_pos, w_neg)
    scaled, _ = drift_loss(c * gen, c * pos, c * neg, w_gen, w_pos, w_neg)
    torch.testing.assert_close(scaled, loss, rtol=1e-5, atol=0)


def test_loss_invariant_to_feature_offset():
    # adding one vector to gen, pos and neg leaves the loss unchanged: the field is translation invariant, and the
    # targets are centred before the distance matmul, so an offset 100x the spread costs no float32 precision
    gen, pos, neg, w_gen, w_pos, w_neg = loss_inputs()
    offset = 100.0 * randn(1, 1, gen.shape[2], seed=5)
    loss, _ = drift_loss(gen, pos, neg, w_gen, w_pos, w_neg)
    moved, _ = drift_loss(gen + offset, pos + offset, neg + offset, w_gen, w_pos, w_neg)
    torch.testing.assert_close(moved, loss, rtol=1e-4, atol=0)


@pytest.mark.parametrize("a, b, softmax", [(2.0, 1.0, "both"), (1.0, 1.5, "both"), (1.0, 1.0, "y")])
def test_drift_loss_ablations_match_formula(a, b, softmax):
    # Table 1 / 11 ablations: a V+ - b V- and the y-only softmax, against the float64 formula
    gen, pos, neg, w_gen, w_pos, w_neg = loss_inputs()
    loss, _ = drift_loss(gen, pos, neg, w_gen, w_pos, w_neg, attraction=a, repulsion=b, softmax=softmax)
    ref_loss = reference_drift_loss(gen, pos, neg, w_gen, w_pos, w_neg, (0.02, 0.05, 0.2), a, b, softmax)[0]
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-4)


# The official drift_loss.py with train.py's feature_loss around it (JAX, float32, matmuls at "highest"), run once
# outside this repo (jax 0.10.2) on official_feature_inputs(): the total loss, and per feature set 4 entries of its
# gradient (flat index: value) and the gradient's largest magnitude
OFFICIAL_FEATURE_LOSS = 39.565853118896484
OFFICIAL_FEATURE_GRADS = {
    "global": ({0: 3.494833e-4, 383: -1.739417e-4, 767: 1.126798e-3, 1151: 2.565039e-3}, 9.457714e-3),
    "norm_x": ({0: -3.870813e-3, 31: -1.553147e-3, 63: -5.800566e-3, 95: -9.874161e-3}, 5.501255e-2),
    "conv1": ({0: -5.139049e-5, 1023: 1.984741e-5, 2047: -9.834383e-5, 3071: 1.041358e-4}, 6.160973e-3),
    "conv1_mean": ({0: 9.231542e-4, 63: -1.837283e-3, 127: 9.676018e-4, 191: -7.597069e-3}, 3.980064e-2),
    "layer2_std_2": ({0: 3.111552e-5, 511: 6.254522e-5, 1023: -4.558605e-4, 1535: 1.958745e-4}, 7.389413e-3),
    "x_mean_4": ({0: 9.152529e-5, 127: -2.10174e-3, 255: -2.976398e-3, 383: 9.64052e-3}, 1.885435e-2),
}


def official_feature_inputs(Nc=3, Ng=8, Np=6, Nu=4):
    # 6 feature sets of 1-16 locations and widths 4-48, far from the origin, as (B, L, C) per set
    rng = np.random.default_rng(0)
    sizes = {"global": (1, 48), "norm_x": (1, 4), "conv1": (16, 8), "conv1_mean": (1, 8), "layer2_std_2": (4, 16),
             "x_mean_4": (1, 16)}
    gen = {k: (rng.normal(size=(Nc * Ng, L, C)) * 3 + 5).astype(np.float32) for k, (L, C) in sizes.items()}
    real = {k: (rng.normal(size=(Nc * (Np + Nu), L, C)) * 3 + 5.5).astype(np.float32) for k, (L, C) in sizes.items()}
    return gen, real


def test_feature_drift_loss_matches_official_jax():
    # classes with CFG scales 1, 1.7, 3.2 drawing 8 generated, 6 positive and 4 unconditional samples, as train.py
    # feeds them: the loss and its gradient equal the official code's
    Nc, Ng, Np, Nu = 3, 8, 6, 4
    gen, real = official_feature_inputs(Nc, Ng, Np, Nu)
    gen = {k: torch.from_numpy(v).requires_grad_() for k, v in gen.items()}
    real = {k: torch.from_numpy(v).unflatten(0, (Nc, -1)) for k, v in real.items()}
    w = cfg_weight(torch.tensor([1.0, 1.7, 3.2]), Ng, Nu)[:, None].expand(Nc, Nu)
    loss, _ = feature_drift_loss({k: v.unflatten(0, (Nc, -1)) for k, v in gen.items()},
                                 {k: v[:, :Np] for k, v in real.items()}, {k: v[:, Np:] for k, v in real.items()}, w)
    loss.backward()
    assert abs(loss.item() / OFFICIAL_FEATURE_LOSS - 1) < 1e-5
    for name, (entries, largest) in OFFICIAL_FEATURE_GRADS.items():
        grad = gen[name].grad.flatten()
        assert abs(grad.abs().max().item() / largest - 1) < 1e-4
        assert all(abs(grad[i].item() - v) < 1e-4 * largest for i, v in entries.items()), name


def test_drift_loss_without_negatives_matches_official_formula():
    # neg=None and default weights equal the official with no extra negatives and unit weights
    gen, pos = randn(2, 6, 4, seed=1), randn(2, 3, 4, seed=2)
    loss, _ = drift_loss(gen, pos)
    ones = lambda n: np.ones((2, n))  # noqa: E731
    ref_loss = reference_drift_loss(gen, pos, np.zeros((2, 0, 4)), ones(6), ones(3), ones(0), (0.02, 0.05, 0.2))[0]
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-4)


def test_loss_equals_normalized_drift_norm():
    # with one temperature the normalized drift has unit mean square, and the loss is its squared norm
    gen, pos, neg, w_gen, w_pos, w_neg = loss_inputs()
    loss, _ = drift_loss(gen, pos, neg, w_gen, w_pos, w_neg, temperatures=(0.05,))
    assert abs(loss.mean().item() - 1.0) < 1e-5


def test_gradient_only_through_prediction():
    # d loss / d gen = 2 (gen~ - goal~) / (scale_in Ng D): the goal is a constant
    gen, pos, neg, w_gen, w_pos, w_neg = loss_inputs()
    gen.requires_grad_(True)
    loss, _ = drift_loss(gen, pos, neg, w_gen, w_pos, w_neg)
    loss.sum().backward()
    _, goal, scale_in, _, _ = reference_drift_loss(gen.detach(), pos, neg, w_gen, w_pos, w_neg, (0.02, 0.05, 0.2))
    G, Ng, D = gen.shape
    expected = 2 * (gen.detach().double().numpy() / scale_in - goal) / (scale_in * Ng * D)
    np.testing.assert_allclose(gen.grad.numpy(), expected, rtol=1e-3, atol=1e-7)


def test_drift_loss_self_distance_exact():
    # a sample's distance to itself enters the distance scale as the official's clamp, sqrt(1e-8), as in exact
    # arithmetic: not as the square root of the matmul distance's rounding error (~1e-3 of a distance at D = 256)
    for seed in range(5):
        gen, pos = randn(4, 2, 256, seed=seed), randn(4, 1, 256, seed=seed + 10)
        ones = torch.ones(4, 2), torch.ones(4, 1), torch.ones(4, 0)
        ref_scale = reference_drift_loss(gen, pos, gen[:, :0], *ones, (0.05,))[3]
        assert abs(drift_loss(gen, pos)[1]["scale"].item() / ref_scale - 1) < 1e-6


def test_drift_loss_float32_under_bf16_autocast():
    # under bf16 autocast the loss is computed in float32 from the (bf16) inputs
    gen, pos, neg, *_ = loss_inputs()
    gen, pos, neg = gen.bfloat16(), pos.bfloat16(), neg.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = drift_loss(gen, pos, neg)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, drift_loss(gen.float(), pos.float(), neg.float())[0])


def make_fake_allreduce(world):
    """reduce callables for `world` threads acting as ranks: each call averages the ranks' tensors."""
    barrier, slots = threading.Barrier(world), {}

    def for_rank(rank):
        calls = itertools.count()

        def reduce(t):
            k = next(calls)
            slots[k, rank] = t.clone()
            barrier.wait()
            out = sum(slots[k, r] for r in range(world)) / world
            barrier.wait()
            return out
        return reduce
    return for_rank


def test_reduce_two_ranks_equal_full_batch():
    # two ranks with a mean all-reduce give exactly the loss of the full batch on one process
    gen, pos, neg, w_gen, w_pos, w_neg = loss_inputs(G=4)
    pos[2:] += 3.0  # make the halves' statistics differ, so the split without reduce would not match
    full, full_info = drift_loss(gen, pos, neg, w_gen, w_pos, w_neg)
    for_rank, results = make_fake_allreduce(2), {}

    def run(rank):
        half = slice(2 * rank, 2 * rank + 2)
        results[rank] = drift_loss(gen[half], pos[half], neg[half], w_gen[half], w_pos[half], w_neg[half],
                                   reduce=for_rank(rank))
    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    split = torch.cat([results[0][0], results[1][0]])
    no_reduce = torch.cat([drift_loss(gen[h], pos[h], neg[h], w_gen[h], w_pos[h], w_neg[h])[0]
                           for h in (slice(0, 2), slice(2, 4))])
    assert not torch.allclose(no_reduce, full, rtol=1e-3)
    torch.testing.assert_close(split, full)
    torch.testing.assert_close(results[1][1]["scale"], full_info["scale"])


def test_feature_sets_shapes():
    # every map gives locations, global and patch statistics; patch sizes only where H, W divide
    maps = {"a": randn(2, 5, 8, 8), "b": randn(2, 3, 6, 6)}
    sets = feature_sets(maps, x=randn(2, 4, 8, 8), raw=randn(2, 4, 8, 8))
    shapes = {k: tuple(v.shape) for k, v in sets.items()}
    assert shapes == {
        "global": (2, 1, 256), "norm_x": (2, 1, 4),
        "a": (2, 64, 5), "a_mean": (2, 1, 5), "a_std": (2, 1, 5),
        "a_mean_2": (2, 16, 5), "a_std_2": (2, 16, 5), "a_mean_4": (2, 4, 5), "a_std_4": (2, 4, 5),
        "b": (2, 36, 3), "b_mean": (2, 1, 3), "b_std": (2, 1, 3), "b_mean_2": (2, 9, 3), "b_std_2": (2, 9, 3),
    }


def test_feature_sets_values():
    # 2x2 patch means/stds, locations and norm_x of a known 4x4 map
    fmap = torch.arange(16.0).view(1, 1, 4, 4)
    sets = feature_sets({"f": fmap}, x=torch.full((1, 2, 4, 4), 2.0))
    torch.testing.assert_close(sets["f_mean_2"][0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))
    torch.testing.assert_close(sets["f_std_2"][0, :, 0], torch.full((4,), math.sqrt(4.25 + 1e-6)))
    torch.testing.assert_close(sets["f"][0, :, 0], torch.arange(16.0))
    torch.testing.assert_close(sets["f_mean_4"], sets["f_mean"])
    torch.testing.assert_close(sets["norm_x"], torch.full((1, 1, 2), math.sqrt(4.0 + 1e-6)))


def feature_inputs(Nc=2, Ng=4, Np=3, Nn=2):
    shapes = {"loc": (4, 5), "mean": (1, 3)}  # name -> (L, C)
    gen = {k: randn(Nc, Ng, L, C, seed=i) for i, (k, (L, C)) in enumerate(shapes.items())}
    pos = {k: randn(Nc, Np, L, C, seed=10 + i) for i, (k, (L, C)) in enumerate(shapes.items())}
    neg = {k: randn(Nc, Nn, L, C, seed=20 + i) for i, (k, (L, C)) in enumerate(shapes.items())}
    return gen, pos, neg, torch.tensor([[0.0, 0.0], [1.5, 1.5]])


def sum_of_group_losses(gen, pos, neg, w_neg, **ablation):
    # feature_drift_loss written as a loop: every (class, location) stacked as a group of drift_loss
    total = 0.0
    for k, g in gen.items():
        Nc, _, L, _ = g.shape
        groups = lambda t: torch.stack([t[c, :, l] for c in range(Nc) for l in range(L)])  # noqa: E731
        w = torch.stack([w_neg[c] for c in range(Nc) for _ in range(L)])
        total = total + drift_loss(groups(g), groups(pos[k]), groups(neg[k]), w_neg=w, **ablation)[0].mean()
    return total


def test_feature_drift_loss_equals_sum_of_drift_losses():
    # the feature loss is the sum over names of drift_loss with every (class, location) its own group, and so is
    # its gradient (written by the batched call straight into each set's layout)
    gen, pos, neg, w_neg = feature_inputs()
    gen = {k: v.requires_grad_() for k, v in gen.items()}
    total, _ = feature_drift_loss(gen, pos, neg, w_neg)
    loop = sum_of_group_losses(gen, pos, neg, w_neg)
    torch.testing.assert_close(total, loop)
    torch.testing.assert_close(torch.autograd.grad(total, list(gen.values())),
                               torch.autograd.grad(loop, list(gen.values())))


def test_feature_drift_loss_attached_to_inputs_gives_the_same_loss_and_gradient():
    # inputs=x pulls the sets' gradient back to the samples x at once: the loss, and x's gradient for any upstream
    # factor, are those of the loss attached to the sets
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    sets = lambda x: {k: v.unflatten(0, (2, -1)) for k, v in feature_sets({"c": conv(x)}, raw=x).items()}  # noqa
    x = torch.randn(8, 3, 8, 8, requires_grad=True)
    pos = {k: v.detach() for k, v in sets(torch.randn(10, 3, 8, 8)).items()}
    (a, _), (b, _) = feature_drift_loss(sets(x), pos), feature_drift_loss(sets(x), pos, inputs=x)
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(torch.autograd.grad(3 * b, x)[0], torch.autograd.grad(3 * a, x)[0])


def test_feature_drift_loss_passes_ablations():
    # attraction, repulsion and softmax reach drift_loss: same value as the loop with them, not the default's
    gen, pos, neg, w_neg = feature_inputs()
    ablation = {"attraction": 1.5, "repulsion": 1.0, "softmax": "y"}
    total, _ = feature_drift_loss(gen, pos, neg, w_neg, **ablation)
    torch.testing.assert_close(total, sum_of_group_losses(gen, pos, neg, w_neg, **ablation))
    assert not torch.allclose(total, feature_drift_loss(gen, pos, neg, w_neg)[0], rtol=1e-3)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_feature_drift_loss_takes_feature_sets_views(memory_format):
    # the strided (Nc, N, L, C) views that feature_sets makes of conv maps give the loss of contiguous copies
    # (and the same gradient to the maps)
    maps = {"a": randn(12, 5, 4, 4).to(memory_format=memory_format).requires_grad_()}
    sets = {k: v.unflatten(0, (2, 6)) for k, v in feature_sets(maps).items()}  # 2 classes of 6 samples
    gen, pos = {k: v[:, :4] for k, v in sets.items()}, {k: v[:, 4:].detach() for k, v in sets.items()}
    contiguous = lambda d: {k: v.contiguous() for k, v in d.items()}  # noqa: E731
    views, copies = feature_drift_loss(gen, pos)[0], feature_drift_loss(contiguous(gen), contiguous(pos))[0]
    torch.testing.assert_close(views, copies)
    torch.testing.assert_close(torch.autograd.grad(views, maps["a"], retain_graph=True),  # shared feature_sets graph
                               torch.autograd.grad(copies, maps["a"]))


def test_bf16_maps_drift_without_float32_copies():
    # bf16 maps (autocast) keep their per-location sets in bf16, views of the maps; the loss is that of the float32
    # upcast maps (computed in float32 from the same values) and the maps' gradient that one's, rounded to bf16
    maps = randn(12, 5, 4, 4)
    grads, losses = [], []
    for dtype in (torch.bfloat16, torch.float32):
        m = maps.bfloat16().to(dtype).requires_grad_()
        sets = {k: v.unflatten(0, (2, 6)) for k, v in feature_sets({"a": m}).items()}
        assert sets["a"].dtype == dtype and sets["a_mean"].dtype == torch.float32
        gen, pos = {k: v[:, :4] for k, v in sets.items()}, {k: v[:, 4:].detach() for k, v in sets.items()}
        loss = feature_drift_loss(gen, pos)[0]
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, m)[0])
    assert grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0].float(), grads[1], rtol=2 ** -6, atol=1e-3 * grads[1].abs().max().item())


def equal_width_inputs(Nc=2, Ng=4, Np=3, Nn=2):
    # three names, two of width 5 at different scales (so a shared normalization would change their losses)
    shapes, spread = {"loc": (4, 5), "mean": (1, 5), "other": (2, 3)}, {"loc": 1.0, "mean": 10.0, "other": 1.0}
    sets = [{k: spread[k] * randn(Nc, N, L, C, seed=10 * j + i) for i, (k, (L, C)) in enumerate(shapes.items())}
            for j, N in enumerate((Ng, Np, Nn))]
    return (*sets, torch.tensor([[0.0, 0.0], [1.5, 1.5]]))


def test_feature_drift_loss_batches_equal_widths():
    # names of one width share one computation: reduce is called twice (scale, force) per width, not per name
    gen, pos, neg, w_neg = equal_width_inputs()
    calls = []
    feature_drift_loss(gen, pos, neg, w_neg, reduce=lambda t: calls.append(t.shape) or t)
    assert len(calls) == 4


def test_feature_drift_loss_batched_equals_each_name_alone():
    # batched names keep their own statistics: loss, gradient and every info entry equal those of each name alone
    gen, pos, neg, w_neg = equal_width_inputs()
    gen = {k: v.requires_grad_() for k, v in gen.items()}
    total, info = feature_drift_loss(gen, pos, neg, w_neg)
    alone = [feature_drift_loss({k: gen[k]}, {k: pos[k]}, {k: neg[k]}, w_neg) for k in gen]
    torch.testing.assert_close(total, sum(t for t, _ in alone))
    torch.testing.assert_close(info, {k: v for _, i in alone for k, v in i.items()})
    torch.testing.assert_close(torch.autograd.grad(total, list(gen.values())),
                               [torch.autograd.grad(t, g)[0] for (t, _), g in zip(alone, gen.values())])


def test_compiled_drift_step_equals_eager(monkeypatch):
    # train.py's GPU path (drift.compile_drift): the same loss and gradient as eager, here through inductor's CPU
    gen, pos, neg, w_neg = equal_width_inputs()
    gen = {k: v.requires_grad_() for k, v in gen.items()}

    def loss_and_grads():
        total, _ = feature_drift_loss(gen, pos, neg, w_neg)
        return total, torch.autograd.grad(total, list(gen.values()))
    eager = loss_and_grads()
    monkeypatch.setattr(drift, "_frozen_fn", drift._frozen_fn)  # restored after the test
    drift.compile_drift()
    torch.testing.assert_close(loss_and_grads(), eager, rtol=1e-5, atol=1e-6)


def test_bf16_matmuls_stay_close_to_float32(monkeypatch):
    # GPUs store the targets in bf16, so that the distance and force matmuls take bf16 inputs (summed in float32),
    # and the forces in bf16 (drift._matmul_dtype): at width 64 the loss and gradient stay within a few 1e-3 of
    # float32, here on the CPU (rounding a point moves its distances by ~2^-9 / sqrt(width) relative)
    gen, pos, neg = [{k: randn(2, N, L, 64, seed=10 * j + i) + i for i, (k, L) in enumerate({"a": 4, "b": 1}.items())}
                     for j, N in enumerate((16, 12, 4))]
    gen = {k: v.requires_grad_() for k, v in gen.items()}
    w_neg = torch.tensor([[0.0] * 4, [1.5] * 4])

    def loss_and_grad():
        total, _ = feature_drift_loss(gen, pos, neg, w_neg)
        return total, torch.cat([g.flatten() for g in torch.autograd.grad(total, list(gen.values()))])
    loss, grad = loss_and_grad()
    monkeypatch.setattr(drift, "_matmul_dtype", lambda device: torch.bfloat16)
    loss_low, grad_low = loss_and_grad()
    err = ((grad_low - grad).norm() / grad.norm()).item()
    assert abs(loss_low.item() / loss.item() - 1) < 1e-3 and 1e-5 < err < 1e-2, (loss_low, loss, err)


TRITON_CHECK = """
import torch, drift
torch.manual_seed(0)
for G, Ng, Nn, Np, a, b, temps in [(3, 8, 2, 6, 1.0, 1.0, (0.02, 0.05, 0.2)), (2, 5, 3, 7, 1.5, 1.0, (0.05,)),
                                   (2, 6, 0, 5, 1.0, 1.0, (0.02, 0.2)), (2, 16, 4, 16, 1.0, 1.0, (0.02, 0.05, 0.2))]:
    Nt = Ng + Nn + Np
    dist = torch.rand(G, Ng, Nt) * 3 + torch.eye(Ng, Nt) * 1e-4
    scale, w = torch.rand(G) + 0.5, torch.rand(G, Nt) * 3
    C = drift._coefficients_triton(dist, scale, w, Ng, Nn, temps, a, b)
    ref = drift._coefficients(dist, scale, w, Ng, Nn, temps, a, b, "both")
    torch.testing.assert_close(C, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    low = drift._coefficients_triton(dist, scale, w, Ng, Nn, temps, a, b, torch.bfloat16)  # as on GPUs
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=2 ** -7, atol=1e-6 * ref.abs().max().item())  # bf16 ulp
print("ok")
"""


def test_triton_coefficients_equal_torch(triton_interpreter):
    # The Triton kernel that computes the coefficients on GPUs equals the torch code that runs elsewhere (blocks
    # padded to powers of 2, no unconditional negatives, a != b), run by Triton's CPU interpreter
    out = triton_interpreter(TRITON_CHECK)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def two_rank_inputs():
    """4 classes whose halves' statistics differ, their full-batch loss and info, and half(d, rank): a rank's 2
    classes of each set (w_neg of the inputs already has 2 rows)."""
    gen, pos, neg, w_neg = equal_width_inputs(Nc=4)
    pos["loc"][2:] += 3.0
    full, full_info = feature_drift_loss(gen, pos, neg, w_neg.repeat(2, 1))
    half = lambda d, rank: {k: v[2 * rank:2 * rank + 2] for k, v in d.items()}  # noqa: E731
    return gen, pos, neg, w_neg, full, full_info, half


def test_feature_drift_loss_reduce_two_ranks_equal_full_batch():
    # classes split over two ranks with a mean all-reduce give the full batch's loss, each name's scale its own
    gen, pos, neg, w_neg, full, full_info, half = two_rank_inputs()
    for_rank, results = make_fake_allreduce(2), {}

    def run(rank):
        results[rank] = feature_drift_loss(half(gen, rank), half(pos, rank), half(neg, rank), w_neg,
                                           reduce=for_rank(rank))
    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    torch.testing.assert_close((results[0][0] + results[1][0]) / 2, full)
    torch.testing.assert_close({k: v for k, v in results[0][1].items() if not k.startswith("loss/")},
                               {k: v for k, v in full_info.items() if not k.startswith("loss/")})


def _compiled_half_batch(argv):
    # one rank of test_compiled_drift_over_two_gloo_ranks: its half of the classes, compiled, reduced as train.py
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen, pos, neg, w_neg, full, _, half = two_rank_inputs()
    drift.compile_drift()
    mean = lambda t: funcol.all_reduce(t, "sum", dist.group.WORLD) / 2  # noqa: E731
    loss, _ = feature_drift_loss(half(gen, rank), half(pos, rank), half(neg, rank), w_neg, reduce=mean)
    torch.testing.assert_close(mean(loss), full, rtol=1e-5, atol=0)
    dist.destroy_process_group()


def test_compiled_drift_over_two_gloo_ranks(two_ranks):
    # train.py's torchrun path on GPUs: the compiled step with the cross-rank reduce traced in gives the full batch
    two_ranks(_compiled_half_batch, [])


def test_cfg_weight_closed_form():
    # alpha = ((n_gen - 1) + n_unc w) / (n_gen - 1), so alpha = 1 gives w = 0
    alpha = torch.tensor([1.0, 1.5, 4.0])
    w = cfg_weight(alpha, n_gen=64, n_unc=16)
    assert w[0] == 0
    torch.testing.assert_close((63 + 16 * w) / 63, alpha)


def test_sample_alpha_range_and_p_one():
    # draws lie in [1, 4] and a share p_one is exactly 1
    alpha = sample_alpha(100_000, power=3.0, p_one=0.5, generator=torch.Generator().manual_seed(0))
    assert alpha.min() >= 1.0 and alpha.max() <= 4.0
    assert abs((alpha == 1.0).float().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("power, mean", [(3.0, 1.6), (5.0, (1 - 4.0 ** -3) / 3 / ((1 - 4.0 ** -4) / 4)),
                                         (1.0, 3.0 / math.log(4.0))])
def test_sample_alpha_density(power, mean):
    # the empirical mean matches that of density ~ alpha^-power on [1, 4] (power 1: log-uniform)
    alpha = sample_alpha(100_000, power=power, generator=torch.Generator().manual_seed(0))
    assert abs(alpha.mean().item() - mean) < 0.01


@pytest.fixture(scope="module")
def collapsed_toy():
    # one toy run from the collapsed start (q on the right mode), shared by the two toy tests; ~3 s
    shots, curve = train_toy(TOY_STARTS["collapsed"], steps=400, batch=512, snapshots=(0, 400))
    left = {s: (torch.cdist(x, torch.tensor(TOY_MODES)).argmin(1) == 0).float().mean().item() for s, x in shots.items()}
    return left, torch.tensor(curve)


def test_toy_collapsed_start_covers_both_modes(collapsed_toy):
    # q started on one mode spreads to cover both modes of p (no mode collapse): each holds 35-65% of the samples
    left, _ = collapsed_toy
    assert left[0] < 0.05 and 0.35 < left[400] < 0.65


def test_toy_drift_norm_falls_tenfold_from_peak(collapsed_toy):
    # ||V||^2 (10-step moving average) falls at least 10x from its peak to the mean of the last 30 steps.
    # Measured from the peak, NOT from the start, where it does not hold: a q collapsed onto one mode matches p's
    # shape there, so its field starts near the minibatch noise floor (at T = 0.05 the kernel barely reaches the
    # other mode). ||V||^2 rises while the first steps spread q across the gap, then falls as q settles on both
    # modes. The authors' demo notebook logs the same rise then fall (swiss roll, from its collapsed MLP init:
    # 7.5e-6 at step 1, 2.9e-4 at step 500, 1.6e-5 at step 2000).
    _, curve = collapsed_toy
    assert curve.unfold(0, 10, 1).mean(1).max() > 10 * curve[-30:].mean()


def feature(*shape):
    return {"f": randn(*shape)}


@pytest.mark.parametrize("call", [
    lambda: drift_loss(randn(2, 4, 3), randn(2, 5, 4)),  # D of pos differs from gen's
    lambda: drift_loss(randn(2, 4, 3), randn(2, 5, 3), randn(2, 2, 4)),  # D of neg differs
    lambda: drift_loss(randn(2, 4, 3), randn(3, 4, 3)),  # group counts differ
    lambda: drift_loss(randn(2, 4, 3), randn(2, 0, 3)),  # no positives
    lambda: drift_loss(randn(4, 3), randn(2, 5, 3)),  # 2-D gen where (G, Ng, D) is needed
    lambda: drift_loss(randn(2, 4, 3), randn(5, 3)),  # 2-D pos
    lambda: drift_loss(randn(2, 4, 3), randn(2, 5, 3), randn(2, 2, 3), w_neg=torch.ones(2, 3)),  # w_neg != (G, Nn)
    lambda: drift_loss(randn(2, 4, 3), randn(2, 5, 3), w_gen=torch.ones(4)),  # 1-D w_gen
    lambda: drift_loss(randn(2, 4, 3), randn(2, 5, 3), w_neg=torch.ones(2, 2)),  # w_neg without neg
    lambda: feature_drift_loss(feature(2, 4, 3), feature(2, 5, 3)),  # 3-D features where (Nc, N, L, C) is needed
    lambda: feature_drift_loss(feature(2, 4, 6, 3), feature(2, 5, 6, 4)),  # feature C differs
    lambda: feature_drift_loss(feature(2, 4, 6, 3), feature(2, 0, 6, 3)),  # no positives
    lambda: feature_drift_loss(feature(2, 4, 6, 3), feature(2, 5, 6, 3), feature(2, 2, 6, 3), torch.ones(2, 6)),
    lambda: compute_V(randn(4, 3), randn(2, 5, 3), randn(4, 3), 0.1),  # ranks differ
])
def test_bad_shapes_raise(call):
    # bad input is rejected with a ValueError that says what was expected
    with pytest.raises(ValueError, match="expected"):
        call()
