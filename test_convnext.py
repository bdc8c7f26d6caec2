"""Tests of the ConvNeXt-V2 feature encoder (convnext.py), CPU, tiny shapes.

The reference is Hugging Face transformers' ConvNextV2 (a test-only dependency).
"""

import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils.flop_counter import FlopCounterMode

import convnext
from convnext import ConvNeXtV2, ConvNeXtV2_B, convnext_state_dict_from_hf, load_convnext_v2
from vae import read_state_dict

DEPTHS, DIMS = (2, 1, 2, 1), (8, 16, 24, 32)


def tiny_hf_model(seed=0):
    """A random transformers ConvNextV2 with every parameter (GRN included) drawn away from its init."""
    torch.manual_seed(seed)
    # layer_norm_eps: HF's final LayerNorm defaults to 1e-12, the official JAX one uses 1e-6.
    config = transformers.ConvNextV2Config(depths=list(DEPTHS), hidden_sizes=list(DIMS), num_labels=5,
                                           layer_norm_eps=1e-6)
    hf = transformers.ConvNextV2ForImageClassification(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    return hf


def tiny_ours(hf, resolution=None):
    model = ConvNeXtV2(DEPTHS, DIMS, resolution=resolution)
    model.load_state_dict(convnext_state_dict_from_hf(hf.state_dict()), strict=True)
    return model.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_matches_transformers_stage_outputs():
    # Every stage output equals transformers' ConvNextV2 on the same random weights (1e-4 relative).
    hf = tiny_hf_model()
    ours = tiny_ours(hf)
    x = ours.preprocess(torch.rand(2, 3, 64, 64) * 2 - 1)
    with torch.no_grad():
        ref = hf.convnextv2(x, output_hidden_states=True)
        maps = ours.forward_stages(x)
    for i in range(4):
        assert rel_err(maps[i], ref.hidden_states[i + 1]) < 1e-4, i


def test_matches_transformers_pooled_output():
    # The global_mean set is transformers' pooler output (final LayerNorm of the mean).
    hf = tiny_hf_model()
    ours = tiny_ours(hf)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        pooled = hf.convnextv2(ours.preprocess(x)).pooler_output
        sets = ours.feature_sets(x)
    assert rel_err(sets["convnext_global_mean"][:, 0], pooled) < 1e-4


def test_key_mapping_is_complete_for_base():
    # The real checkpoint's layout (base, on the meta device): every key but the classifier maps
    # onto one of our parameters with the same shape, and none of ours is left out.
    config = transformers.ConvNextV2Config(depths=[3, 3, 27, 3], hidden_sizes=[128, 256, 512, 1024])
    with torch.device("meta"):
        hf = transformers.ConvNextV2ForImageClassification(config)
        ours = ConvNeXtV2_B()
    hf_state = hf.state_dict()
    mapped = convnext_state_dict_from_hf(hf_state)
    own = ours.state_dict()
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    assert len(hf_state) - len(mapped) == 2  # classifier.weight, classifier.bias


def test_unknown_checkpoint_key_is_an_error():
    # A key the mapping cannot place raises instead of being dropped silently.
    with pytest.raises(ValueError, match="unexpected keys"):
        convnext_state_dict_from_hf({"convnextv2.pooler.weight": torch.zeros(1)})


def test_loads_safetensors_and_bin_files(tmp_path):
    # Both checkpoint formats load into the same weights (own safetensors reader, torch.load).
    from safetensors.torch import save_file
    hf = tiny_hf_model()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"))
    torch.save(state, tmp_path / "pytorch_model.bin")
    expected = tiny_ours(hf).state_dict()
    for name in ("m.safetensors", "pytorch_model.bin"):
        model = ConvNeXtV2(DEPTHS, DIMS)
        model.load_state_dict(convnext_state_dict_from_hf(read_state_dict(str(tmp_path / name))))
        assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected), name


def test_offline_download_gives_clear_error(tmp_path, monkeypatch):
    # Without network, loading names the file to place by hand.
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    with pytest.raises(RuntimeError, match="Offline"):
        load_convnext_v2("base", cache_dir=str(tmp_path))


def test_convnext_download_falls_back_to_bin_on_404(tmp_path, monkeypatch):
    # the facebook/convnextv2-* repos have no model.safetensors: a 404 moves on to pytorch_model.bin
    def hub(url, path):
        if url.endswith("model.safetensors"):
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        open(path, "wb").write(b"weights")
    monkeypatch.setattr(urllib.request, "urlretrieve", hub)
    path = convnext._cnx_download("facebook/convnextv2-base-22k-224", str(tmp_path))
    assert path.endswith("pytorch_model.bin") and os.listdir(tmp_path) == [os.path.basename(path)]


def test_gradients_reach_the_input():
    # The drift loss backpropagates through the frozen encoder into the generator's pixels.
    ours = tiny_ours(tiny_hf_model(), resolution=48).requires_grad_(False)
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    sum(v.square().mean() for v in ours.feature_sets(x).values()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bf16_autocast_stays_close_to_fp32():
    # Under bf16 autocast the global feature is within a few percent of float32.
    ours = tiny_ours(tiny_hf_model())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ref = ours.feature_sets(x)["convnext_global_mean"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours.feature_sets(x)["convnext_global_mean"]
    assert low.dtype == torch.float32 and rel_err(low, ref) < 0.05


def test_real_config_feature_sets_on_meta():
    # Base at 256 px (resized to 224): the official sets and their shapes, no stage-0 locations.
    with torch.device("meta"):
        sets = ConvNeXtV2_B().feature_sets(torch.zeros(2, 3, 256, 256))
    expected = {"convnext_stage_1": (2, 784, 256), "convnext_stage_2": (2, 196, 512), "convnext_stage_3": (2, 49, 1024),
                "convnext_global_mean": (2, 1, 1024), "convnext_global_std": (2, 1, 1024)}
    for i, c in enumerate((128, 256, 512, 1024)):
        expected[f"convnext_stage_{i}_mean"] = expected[f"convnext_stage_{i}_std"] = (2, 1, c)
    assert {k: tuple(v.shape) for k, v in sets.items()} == expected


def test_stage_maps_are_standardized_per_location():
    # Each exported map has zero mean and (almost) unit std over channels at every location.
    ours = tiny_ours(tiny_hf_model())
    with torch.no_grad():
        m = ours.activations(torch.rand(2, 3, 64, 64) * 2 - 1)["convnext_stage_2"]
    assert m.mean(dim=1).abs().max() < 1e-5
    assert (m.std(dim=1, correction=0) - 1).abs().max() < 1e-2


def test_preprocess_maps_minus_one_to_imagenet_black():
    # Pixel -1 is black: after [0,1] mapping it becomes -mean/std per channel.
    x = ConvNeXtV2(DEPTHS, DIMS, resolution=None).preprocess(-torch.ones(1, 3, 8, 8))
    expected = -torch.tensor(convnext._CNX_IMAGENET_MEAN) / torch.tensor(convnext._CNX_IMAGENET_STD)
    assert torch.allclose(x[0, :, 0, 0], expected)


def jax_bilinear_resize_1d_weights(n_in, n_out):
    """jax.image.resize(method='bilinear') weights (antialias on): a triangle kernel widened by
    the downscale factor around half-pixel-centered sample points, normalized per output."""
    scale = n_out / n_in
    sample = (np.arange(n_out) + 0.5) / scale - 0.5
    dist = np.abs(sample[None, :] - np.arange(n_in)[:, None]) / max(1 / scale, 1.0)
    w = np.maximum(0.0, 1.0 - dist)
    return w / w.sum(axis=0, keepdims=True)  # (n_in, n_out)


def test_resize_matches_jax_antialiased_bilinear():
    # 256 -> 224 equals the official's jax.image.resize, written out in numpy.
    img = torch.rand(1, 1, 256, 256, dtype=torch.float64)
    w = jax_bilinear_resize_1d_weights(256, 224)
    ref = w.T @ img[0, 0].numpy() @ w
    ours = F.interpolate(img, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    assert np.abs(ours[0, 0].numpy() - ref).max() < 1e-6


def test_flops_match_flop_counter():
    # The closed-form FLOP count equals torch's FlopCounterMode on the tiny model.
    ours = ConvNeXtV2(DEPTHS, DIMS, resolution=None)
    x = ours.preprocess(torch.zeros(1, 3, 64, 64))
    with FlopCounterMode(display=False) as counter:
        ours.forward_stages(x)
    assert counter.get_total_flops() == ours.flops_per_sample(64)


def test_base_matches_published_size():
    # ConvNeXt-V2-B: 88.7M parameters with its 1000-class head, 15.4 GMACs at 224.
    model = ConvNeXtV2_B()
    n = sum(p.numel() for p in model.parameters()) + 1024 * 1000 + 1000
    assert abs(n / 1e6 - 88.7) < 0.05
    assert abs(model.flops_per_sample(256) / 2 / 1e9 - 15.4) < 0.1
