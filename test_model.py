"""Tests for the generator in model.py (CPU, tiny shapes; big presets only on the meta device)."""
import pytest
import torch

import model as M
from model import DiT_models

torch.set_num_threads(1)
TINY = dict(input_size=8, in_channels=4, num_classes=10)  # T/2 on an 8x8x4 latent: 16 patch tokens


def tiny(seed=0, **kwargs):
    """T/2 with every parameter randomized, so outputs are not the zeros of adaLN-zero."""
    torch.manual_seed(seed)
    model = DiT_models["T/2"](**{**TINY, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def run(model, seeds, labels, alpha=1.5):
    noise, style = model.draw_inputs(seeds)
    with torch.no_grad():
        return model(noise, torch.tensor(labels), torch.full((len(seeds),), alpha), style)


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("name,count", [("B/2", 132_708_880), ("L/2", 462_909_456),
                                        ("B/16", 133_864_704), ("L/16", 464_450_304)])
def test_parameter_count_matches_official(name, count):
    # the official DitGen as its train.py builds it (1000 class rows) has exactly these many parameters
    with torch.device("meta"):
        model = DiT_models[name]()
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("name,channels,size,patch", [("B/2", 4, 32, 2), ("L/2", 4, 32, 2), ("B/16", 3, 256, 16),
                                                      ("L/16", 3, 256, 16), ("S/2", 4, 32, 2)])
def test_imagenet_presets_see_256_patch_tokens(name, channels, size, patch):
    # every ImageNet preset turns its input into 16x16 = 256 tokens and predicts p*p*C values per token
    with torch.device("meta"):
        model = DiT_models[name]()
    assert (model.in_channels, model.input_size, model.patch_size) == (channels, size, patch)
    assert model.pos_embed.shape == (1, 256, model.hidden_size)
    assert model.final_layer.linear.out_features == patch * patch * channels


def test_flops_match_paper_for_L16():
    # the paper's 87 GFLOPs for L/16 count multiply-accumulates: half of flops_per_sample
    with torch.device("meta"):
        model = DiT_models["L/16"]()
    assert model.flops_per_sample() / 2 == pytest.approx(87e9, rel=0.01)


@pytest.mark.parametrize("kwargs", [TINY, dict(input_size=32, in_channels=1, num_classes=10),
                                    dict(input_size=32, in_channels=3, patch_size=16, num_classes=10)])
def test_output_shape_equals_noise_shape(kwargs):
    # latent, Fashion-MNIST and pixel (patch 16) layouts all come back in the input's shape
    model = tiny(**kwargs)
    noise, style = model.draw_inputs([0, 1])
    out = model(noise, torch.tensor([3, 9]), torch.tensor([1.0, 2.0]), style)
    assert out.shape == noise.shape


def test_bad_noise_shape_raises():
    # one clear error naming the expected shape
    model = tiny()
    with pytest.raises(ValueError, match="expected noise"):
        model(torch.zeros(1, 4, 16, 16), torch.zeros(1, dtype=torch.long), 1.0, torch.zeros(1, 32, dtype=torch.long))


# ---------------------------------------------------------------- init


def test_output_is_zero_at_init():
    # adaLN-zero: the final projection starts at zero, so the untrained generator outputs exactly 0
    torch.manual_seed(0)
    model = DiT_models["T/2"](**TINY)
    noise, style = model.draw_inputs([0, 1, 2])
    assert model(noise, torch.tensor([0, 1, 2]), 2.0, style).abs().max() == 0


def test_blocks_are_identity_at_init():
    # adaLN-zero: zero gates make every block pass its input through unchanged
    torch.manual_seed(0)
    model = DiT_models["T/2"](**TINY)
    x, c = torch.randn(2, 32, model.hidden_size), torch.randn(2, model.cond_dim)
    rope = M.rope_tables(32, model.hidden_size // model.num_heads)
    assert torch.equal(model.blocks[0](x, c, rope), x)


def test_pos_embed_starts_as_sincos():
    # token (row 1, col 0): column half is sin(0)|cos(0), row half is sin(1*omega)|cos(1*omega)
    model = DiT_models["T/2"](**TINY)
    g, quarter = model.grid, model.hidden_size // 4
    row = model.pos_embed[0, g].detach()
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    expected = torch.cat([torch.zeros(quarter), torch.ones(quarter), omega.sin(), omega.cos()]).float()
    assert torch.allclose(row, expected, atol=1e-6)


# ---------------------------------------------------------------- determinism


def test_same_seeds_same_output():
    # draw_inputs twice with the same seeds gives the same sample
    model = tiny()
    assert torch.equal(run(model, [5, 6, 7], [1, 2, 3]), run(model, [5, 6, 7], [1, 2, 3]))


def test_draw_inputs_is_batch_split_invariant():
    # image i depends only on its seed, not on how the batch is split
    model = tiny()
    noise, style = model.draw_inputs(torch.arange(6))
    noise_a, style_a = model.draw_inputs([0, 1, 2])
    noise_b, style_b = model.draw_inputs([3, 4, 5])
    assert torch.equal(noise, torch.cat([noise_a, noise_b])) and torch.equal(style, torch.cat([style_a, style_b]))


def test_style_indices_change_the_sample():
    # the discrete style indices are part of the noise: other indices, other sample
    model = tiny()
    noise, style = model.draw_inputs([0])
    labels = torch.tensor([1])
    with torch.no_grad():
        a = model(noise, labels, 1.0, style)
        b = model(noise, labels, 1.0, (style + 1) % model.style_vocab)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("bad", [64, -1])
def test_style_index_past_its_codebook_raises(bad):
    # token 1's index 64 (or -1) is outside its 64-row codebook (one table holds all 32): an error, not a row of
    # token 2's (or 0's) codebook
    model = tiny()
    noise, style = model.draw_inputs([0])
    style[0, 1] = bad
    with pytest.raises(IndexError):
        model(noise, torch.tensor([1]), 1.0, style)


def test_gradients_repeat_bit_for_bit_on_two_threads():
    # 512 samples pick each style row ~8 times: the sums of the rows' gradients must not depend on thread timing
    model = tiny()
    noise, style = model.draw_inputs(list(range(512)))
    labels = torch.arange(512) % 10
    grads, threads = [], torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(4):
            model.zero_grad()
            model(noise, labels, 1.5, style).square().mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for g in grads[1:] for a, b in zip(grads[0], g))


def test_remat_gives_the_same_gradients():
    # recomputing all or some blocks in the backward (train.py --remat) changes memory, not the math
    torch.manual_seed(0)
    model = DiT_models["T/2"]()
    for p in model.parameters():  # off the adaLN-zero init, so that every block takes part
        p.data.normal_(0, 0.05)
    noise, style = model.draw_inputs(range(2))
    grads = []
    for remat in (0, 1, model.depth):
        model.remat = remat
        model.zero_grad()
        model(noise, torch.tensor([1, 2]), 1.5, style).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for ref, *others in zip(*grads):
        for g in others:
            torch.testing.assert_close(g, ref)


def test_bf16_autocast_close_to_float32():
    # mixed precision changes the sample only at bf16 rounding level
    model = tiny()
    noise, style = model.draw_inputs([0, 1])
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(noise, labels, 1.0, style)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(noise, labels, 1.0, style)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


# ---------------------------------------------------------------- the Triton attention

ATTENTION_CHECK = """
import torch, model
torch.manual_seed(0)
for T, hd, dtype, tol in [(40, 16, torch.float32, 1e-5), (272, 16, torch.float16, 2e-3), (32, 32, torch.float16, 2e-3),
                          (17, 16, torch.float16, 2e-3)]:
    qkv = torch.randn(2, T, 3, 3, hd, dtype=dtype, requires_grad=True)  # (B, T, 3, H, hd): q, k, v strided views
    out = model.triton_attention(*qkv.unbind(2))[0]
    grad = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, grad)
    ref_qkv = qkv.detach().double().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in ref_qkv.unbind(2))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    (ref_g,) = torch.autograd.grad(ref, ref_qkv, grad.double())
    for a, b in [(out, ref)] + [(g[:, :, i], ref_g[:, :, i]) for i in range(3)]:
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < tol, (T, hd, dtype, err)
print("ok")
"""


def test_triton_attention_equals_sdpa(triton_interpreter):
    # The Triton attention the generator runs on GPUs (forward, and the gradients of q, k and v) equals float64
    # attention: whole blocks and tail blocks of keys and rows (T = 272, 256 patches and 16 registers; 17; 40), a
    # head size of 16 and 32, in float32 and in float16 (the interpreter has no bf16), by Triton's CPU interpreter
    out = triton_interpreter(ATTENTION_CHECK)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
