"""CPU tests of the ResNet-MAE feature encoder (model.py). Big presets run on the meta device."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import GroupNorm, MAE_models

torch.set_num_threads(1)

TINY_MAPS = ["conv1", "layer1", "layer2", "layer3", "layer4",
             "layer1_blk2", "layer2_blk2", "layer3_blk2", "layer4_blk2"]
FULL_MAPS = ["conv1", "layer1", "layer2", "layer3", "layer4", "layer1_blk2", "layer2_blk2", "layer2_blk4",
             "layer3_blk2", "layer3_blk4", "layer3_blk6", "layer4_blk2"]


def tiny(**kw):
    torch.manual_seed(0)
    return MAE_models["tiny"](**kw)


def test_tiny_activation_shapes():
    # tiny (width 32, 2 blocks per stage) on 32x32: stage i has 32 * 2^(i-1) channels at 32 / 2^(i-1)
    maps = tiny().activations(torch.randn(2, 4, 32, 32))
    assert list(maps) == TINY_MAPS
    for name, f in maps.items():
        i = 1 if name == "conv1" else int(name[5])
        assert f.shape == (2, 32 * 2 ** (i - 1), 32 // 2 ** (i - 1), 32 // 2 ** (i - 1)), name


@pytest.mark.parametrize("preset,shape,width", [("latent_256", (2, 4, 32, 32), 256),
                                                 ("pixel_640", (2, 3, 256, 256), 640)])
def test_full_preset_maps_are_the_official_twelve(preset, shape, width):
    # [3,4,6,3]: 5 stage maps + every 2nd block (1 + 2 + 3 + 1), all distinct; layer4 is 8C x 4x4
    with torch.device("meta"):
        maps = MAE_models[preset]().activations(torch.empty(shape))
    assert list(maps) == FULL_MAPS
    assert maps["layer4"].shape == (2, 8 * width, 4, 4)


def test_fmnist_preset_runs_on_28x28():
    # 28 -> 14 -> 7 -> 4: odd sizes go through stride 2 and the decoder's resize
    model = MAE_models["fmnist"]()
    maps = model.activations(torch.randn(1, 1, 28, 28))
    assert maps["layer4"].shape == (1, 512, 4, 4)
    assert torch.isfinite(model(torch.randn(1, 1, 28, 28))[0])


@pytest.mark.parametrize("preset,count", [("latent_256", 340_216_832), ("latent_640", 2_126_036_480),
                                          ("pixel_640", 2_127_119_360)])
def test_encoder_parameter_count_matches_official(preset, count):
    # paper/official counts are the encoder alone (decoder and fc excluded); pixel adds a 192-ch stem
    with torch.device("meta"):
        model = MAE_models[preset]()
    assert sum(p.numel() for p in model.encoder.parameters()) == count


def test_mask_ratio_is_requested_on_average():
    model = tiny()
    z = torch.zeros(256, 4, 32, 32)
    mask = model.random_mask(z, 0.5, torch.Generator().manual_seed(0))
    assert abs(mask.mean().item() - 0.5) < 0.01


def test_mask_ratio_range_is_per_sample():
    # (lo, hi) draws one ratio per sample: per-sample hidden shares spread over [0.2, 0.8]
    model = tiny()
    mask = model.random_mask(torch.zeros(512, 4, 32, 32), (0.2, 0.8), torch.Generator().manual_seed(0))
    share = mask.mean(dim=(1, 2, 3))
    assert share.min() < 0.3 and share.max() > 0.7 and abs(share.mean().item() - 0.5) < 0.02


def test_mask_is_made_of_2x2_patches():
    mask = tiny().random_mask(torch.zeros(8, 4, 32, 32), 0.5, torch.Generator().manual_seed(1))
    coarse = mask[:, :, ::2, ::2]
    assert torch.equal(mask, coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert set(mask.unique().tolist()) == {0.0, 1.0}


def test_recon_loss_gradient_only_on_hidden_patches():
    # the loss does not look at visible positions: d loss / d reconstruction is zero there
    model = tiny()
    outputs = []

    def keep_grad(module, inputs, out):
        out.retain_grad()
        outputs.append(out)

    model.decoder.register_forward_hook(keep_grad)
    x = torch.randn(2, 4, 32, 32)
    loss, _ = model(x, mask_ratio=0.5, generator=torch.Generator().manual_seed(3))
    loss.backward()
    mask = model.random_mask(x, 0.5, torch.Generator().manual_seed(3)).expand_as(x)  # same draws
    grad = outputs[0].grad
    assert grad[mask == 0].abs().max() == 0 and grad[mask == 1].abs().min() > 0


def test_recon_loss_is_per_hidden_position_sum_over_channels():
    # zero reconstruction of a constant input c: error c^2 per channel, summed over C, divided by
    # the hidden area -> C * c^2 whatever the ratio (official normalisation); no hidden patch -> 0
    model = tiny()
    torch.nn.init.zeros_(model.decoder.head.weight)
    torch.nn.init.zeros_(model.decoder.head.bias)
    x = torch.full((2, 4, 32, 32), 0.5)
    for ratio in (0.25, 0.75):
        assert torch.allclose(model(x, mask_ratio=ratio)[1]["recon_loss"], torch.tensor(4 * 0.25))
    assert model(x, mask_ratio=0.0)[1]["recon_loss"] == 0


def test_cls_loss_of_a_zero_head_is_log_num_classes():
    # zero fc gives uniform logits: CE = log(K); lambda_cls = 1 keeps only that term
    model = tiny()
    torch.nn.init.zeros_(model.fc.weight)
    loss, info = model(torch.randn(2, 4, 32, 32), torch.tensor([3, 7]), lambda_cls=1.0)
    assert torch.allclose(loss, torch.tensor(math.log(10))) and torch.allclose(info["cls_loss"], loss)


def test_info_holds_detached_scalars():
    _, info = tiny()(torch.randn(2, 4, 32, 32), torch.tensor([0, 1]), lambda_cls=0.1)
    assert set(info) == {"recon_loss", "cls_loss", "accuracy", "mask_ratio"}
    assert all(v.ndim == 0 and not v.requires_grad for v in info.values())


def test_patchify_round_trip_is_exact():
    model = tiny(in_channels=3, input_patch_size=8)
    x = torch.randn(2, 3, 256, 256)
    z = model.input_patchified(x)
    assert z.shape == (2, 192, 32, 32) and torch.equal(model.unpatchify(z), x)


def test_patchify_channel_order_is_row_col_channel():
    # official rearrange 'b (h1 h2) (w1 w2) c -> b h1 w1 (h2 w2 c)': channel = (ph * p + pw) * C + c
    model = tiny(in_channels=3, input_patch_size=4)
    x = torch.randn(1, 3, 16, 16)
    z = model.input_patchified(x)
    assert z[0, (2 * 4 + 1) * 3 + 2, 3, 1] == x[0, 2, 3 * 4 + 2, 1 * 4 + 1]


def test_reconstruct_returns_image_layout():
    # pixel model: reconstruction unpatchified to (B, 3, H, W); each 2x2 grid patch hides 2p x 2p pixels
    model = tiny(in_channels=3, input_patch_size=4)
    recon, mask = model.reconstruct(torch.randn(2, 3, 64, 64), 0.5, torch.Generator().manual_seed(0))
    assert recon.shape == (2, 3, 64, 64) and mask.shape == (2, 1, 64, 64)
    assert torch.equal(mask, mask[:, :, ::8, ::8].repeat_interleave(8, dim=2).repeat_interleave(8, dim=3))


def test_gradients_flow_to_input_through_frozen_encoder():
    model = tiny().requires_grad_(False)
    x = torch.randn(2, 4, 32, 32, requires_grad=True)
    sum(f.square().mean() for f in model.activations(x).values()).backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in model.parameters())


def test_bf16_autocast_and_channels_last_match_float32():
    model = tiny()
    x = torch.randn(2, 4, 32, 32)
    ref = model.activations(x)["layer4"]
    cl = model.to(memory_format=torch.channels_last).activations(x.to(memory_format=torch.channels_last))
    assert torch.allclose(cl["layer4"], ref, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = model.activations(x)["layer4"]
    assert (bf.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_group_norm_matches_torch_values_gradients_and_dtypes():
    # model.GroupNorm (per-channel sums, a scale and a shift) computes nn.GroupNorm's function; bf16 in, bf16 out
    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(8, 32, eps=1e-6)
    torch.nn.init.normal_(ref.weight), torch.nn.init.normal_(ref.bias)
    ours = GroupNorm(8, 32, eps=1e-6)
    ours.load_state_dict(ref.state_dict())
    x = (torch.randn(3, 32, 5, 7) * 3 + 1).to(memory_format=torch.channels_last)
    g = torch.randn(3, 32, 5, 7)
    grads = []
    for norm in (ref, ours):
        xi = x.clone().requires_grad_(True)
        out = norm(xi)
        (out * g).sum().backward()
        grads.append((out.detach(), xi.grad))
    assert torch.allclose(grads[1][0], grads[0][0], atol=1e-5) and torch.allclose(grads[1][1], grads[0][1], atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), ref(x.bfloat16().float()), rtol=4e-3, atol=1e-5)


@pytest.mark.parametrize("size,decoder", [(32, False), (32, True), (28, True)])
def test_flops_per_sample_matches_flop_counter(size, decoder):
    model = tiny(in_channels=1)
    x, labels = torch.randn(1, 1, size, size), torch.tensor([0])
    with FlopCounterMode(display=False) as counter:
        model(x, labels) if decoder else model.activations(x)
    assert model.flops_per_sample(size, with_decoder=decoder) == counter.get_total_flops()


def test_init_is_lecun_normal():
    # Flax default kernel init: variance 1 / fan_in (fan_in = 3 * 3 * 256 for a layer4 conv)
    w = tiny().encoder.stages[3][1].conv2.weight
    assert abs(w.std().item() * math.sqrt(w[0].numel()) - 1.0) < 0.02


def test_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="expected x of shape"):
        tiny().activations(torch.randn(2, 3, 32, 32))
