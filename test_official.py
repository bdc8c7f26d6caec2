"""Tests for official.py: the msgpack reader and the generator and MAE loaders, on artifacts laid out as the
official ones (the released files are not reachable here), and the loaded generator against the official JAX
forward."""
import json
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import official
import sample
import train
from drift import feature_sets
from model import rope_tables
from official import load_official, mae_from_official, read_msgpack
from test_model import run

torch.set_num_threads(1)


class Raw(bytes):
    """Already-encoded msgpack, written as is."""


def ext_array(shape, dtype_name, raw, code=1):
    """flax's array encoding: msgpack ext `code` (1 array, 3 scalar) holding packed (shape, dtype name, bytes)."""
    payload = pack([list(shape), dtype_name, raw])
    n = len(payload)
    fixext = {1: 0xd4, 2: 0xd5, 4: 0xd6, 8: 0xd7, 16: 0xd8}
    head = bytes([fixext[n]]) if n in fixext else sized(n, None, 0, [(0xc7, ">B"), (0xc8, ">H"), (0xc9, ">I")])
    return Raw(head + struct.pack(">b", code) + payload)


def sized(n, small, fixmask, formats):
    """msgpack header for a length n: the fix form below `small`, else the first format wide enough."""
    if small is not None and n < small:
        return bytes([fixmask | n])
    for code, fmt in formats:
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([code]) + struct.pack(fmt, n)


def pack(obj):
    """Minimal msgpack writer for what flax.serialization.msgpack_serialize emits."""
    if isinstance(obj, Raw):
        return bytes(obj)
    if isinstance(obj, (np.ndarray, np.generic)):
        arr = np.asarray(obj)
        return bytes(ext_array(arr.shape, arr.dtype.name, arr.tobytes(), 3 if isinstance(obj, np.generic) else 1))
    if isinstance(obj, dict):
        items = b"".join(pack(k) + pack(v) for k, v in obj.items())
        return sized(len(obj), 16, 0x80, [(0xde, ">H"), (0xdf, ">I")]) + items
    if isinstance(obj, list):
        return sized(len(obj), 16, 0x90, [(0xdc, ">H"), (0xdd, ">I")]) + b"".join(pack(v) for v in obj)
    if isinstance(obj, str):
        data = obj.encode()
        return sized(len(data), 32, 0xa0, [(0xd9, ">B"), (0xda, ">H"), (0xdb, ">I")]) + data
    if isinstance(obj, bytes):
        return sized(len(obj), None, 0, [(0xc4, ">B"), (0xc5, ">H"), (0xc6, ">I")]) + obj
    if obj is True or obj is False:
        return b"\xc3" if obj else b"\xc2"
    if isinstance(obj, int):
        return bytes([obj]) if 0 <= obj < 128 else b"\xd3" + struct.pack(">q", obj)
    return b"\xcb" + struct.pack(">d", obj)


def test_msgpack_reader_round_trip(tmp_path):
    # every array kind flax writes comes back bit-exact: plain, large (ext32), scalar, bfloat16, chunked
    rng = np.random.default_rng(0)
    kernel, big = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal((70, 300)).astype(np.float32)
    chunked = np.arange(6, dtype=np.float32).reshape(2, 3)
    tree = {"a": {"kernel": kernel, "big": big, "idx": np.arange(4, dtype=np.int32), "step": np.int64(7)},
            "bf16": ext_array([2], "bfloat16", np.array([0x3FC0, 0xC000], np.uint16).tobytes()),  # 1.5, -2.0
            "c": {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 3},
                  "chunks": {"0": chunked.reshape(-1)[:4], "1": chunked.reshape(-1)[4:]}}}
    (tmp_path / "p.msgpack").write_bytes(pack(tree))
    out = read_msgpack(tmp_path / "p.msgpack")
    assert np.array_equal(out["a"]["kernel"], kernel) and np.array_equal(out["a"]["big"], big)
    assert np.array_equal(out["a"]["idx"], np.arange(4)) and out["a"]["step"] == 7
    assert np.array_equal(out["bf16"], np.array([1.5, -2.0], np.float32)) and np.array_equal(out["c"], chunked)


def official_tree(cfg, rng):
    """Random params with the official Flax module tree of DitGen (models/generator.py): setup() names at the
    top, auto-names (TorchLinear_0, RMSNorm_1, ...) in creation order inside compact modules."""
    D, Dc, p, C = cfg["hidden_size"], cfg["cond_dim"], cfg["patch_size"], cfg["in_channels"]
    hd, N = D // cfg["num_heads"], (cfg["input_size"] // p) ** 2
    M = (int(2 / 3 * int(D * cfg["mlp_ratio"])) + 31) // 32 * 32
    r = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)
    dense = lambda i, o: {"Dense_0": {"kernel": r(i, o), "bias": r(o)}}
    styles = cfg["noise_coords"] if cfg["noise_classes"] else 0  # noise_classes 0: no style codebooks
    tree = {"Embed_0": {"embedding": r(cfg["num_classes"], Dc)},
            **{f"noise_embeds_{i}": {"embedding": r(cfg["noise_classes"], Dc)} for i in range(styles)},
            "TimestepEmbedder_0": {"TorchLinear_0": dense(256, Dc), "TorchLinear_1": dense(Dc, Dc)},
            "RMSNorm_0": {"weight": r(Dc)}}
    dit = {"TorchLinear_0": dense(p * p * C, D), "pos_embed": r(1, N, D), "TorchLinear_1": dense(Dc, D),
           "cls_embed": r(1, cfg["n_cls_tokens"], D),
           "FinalLayer_0": {"RMSNorm_0": {"weight": r(D)}, "TorchLinear_0": dense(Dc, 2 * D),
                            "TorchLinear_1": dense(D, p * p * C)}}
    for i in range(cfg["depth"]):
        dit[f"blocks_{i}"] = {
            "RMSNorm_0": {"weight": r(D)}, "RMSNorm_1": {"weight": r(D)},
            "Attention_0": {"TorchLinear_0": dense(D, 3 * D), "q_norm": {"weight": r(hd)},
                            "k_norm": {"weight": r(hd)}, "TorchLinear_1": dense(D, D)},
            "SwiGLUFFN_0": {"TorchLinear_0": dense(D, M), "TorchLinear_1": dense(D, M), "TorchLinear_2": dense(M, D)},
            "TorchLinear_0": dense(Dc, 6 * D)}
    tree["LightningDiT_0"] = dit
    return tree


OFFICIAL_CFG = dict(cond_dim=48, num_classes=11, noise_classes=64, noise_coords=32, input_size=8, in_channels=4,
                    n_cls_tokens=16, patch_size=2, hidden_size=64, depth=2, num_heads=2, mlp_ratio=4.0,
                    out_channels=4, use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True,
                    use_bf16=True, attn_fp32=False, use_remat=False)


def write_artifact(folder, tree, cfg=OFFICIAL_CFG, kind="gen"):
    folder.mkdir(exist_ok=True)
    (folder / "metadata.json").write_text(json.dumps({"format": "flax.msgpack", "kind": kind, "backend": "jax",
                                                      "model_config": cfg}))
    (folder / "ema_params.msgpack").write_bytes(pack(tree))
    return folder


def test_loader_maps_every_official_parameter(tmp_path):
    # every official array lands in its torch parameter: kernels transposed, the 32 codebooks joined
    tree = official_tree(OFFICIAL_CFG, np.random.default_rng(0))
    model = load_official(write_artifact(tmp_path / "gen", tree))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    block, ffn = tree["LightningDiT_0"]["blocks_1"], tree["LightningDiT_0"]["blocks_1"]["SwiGLUFFN_0"]
    assert model.cond_dim == 48 and model.num_classes == 11  # one row per class: no null row
    assert np.array_equal(sd["blocks.1.attn.qkv.weight"], block["Attention_0"]["TorchLinear_0"]["Dense_0"]["kernel"].T)
    assert np.array_equal(sd["blocks.1.mlp.w1.weight"], ffn["TorchLinear_0"]["Dense_0"]["kernel"].T)
    assert np.array_equal(sd["blocks.1.mlp.w3.bias"], ffn["TorchLinear_1"]["Dense_0"]["bias"])
    assert np.array_equal(sd["style_embed.weight"][64 * 5:64 * 6], tree["noise_embeds_5"]["embedding"])
    assert np.array_equal(sd["register_embed"], tree["LightningDiT_0"]["cls_embed"])
    alpha_kernel = tree["TimestepEmbedder_0"]["TorchLinear_1"]["Dense_0"]["kernel"]
    assert np.array_equal(sd["alpha_embed.mlp.2.weight"], alpha_kernel.T)


def test_loader_sums_match_official_total(tmp_path):
    # nothing unmapped or invented: torch and official parameter totals agree
    tree = official_tree(OFFICIAL_CFG, np.random.default_rng(0))
    model = load_official(write_artifact(tmp_path / "gen", {"params": tree}))  # with the 'params' level
    total = sum(v.size for v in official.flatten(tree).values())
    assert sum(p.numel() for p in model.parameters()) == total


def test_loader_rejects_extra_or_missing_key(tmp_path):
    # an extra official key or a missing one is one clear error, not a silent partial load
    tree = official_tree(OFFICIAL_CFG, np.random.default_rng(0))
    tree["LightningDiT_0"]["blocks_1"]["extra"] = {"weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="does not match"):
        load_official(write_artifact(tmp_path / "a", tree))
    tree = official_tree(OFFICIAL_CFG, np.random.default_rng(0))
    del tree["noise_embeds_31"]
    with pytest.raises(ValueError, match="does not match"):
        load_official(write_artifact(tmp_path / "b", tree))


def test_loader_rejects_checkpoint_of_other_size(tmp_path):
    # params of a wider model under this metadata: one error listing the shape mismatches
    tree = official_tree({**OFFICIAL_CFG, "hidden_size": 96, "num_heads": 3}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="wrong shape"):
        load_official(write_artifact(tmp_path / "gen", tree))


def test_loader_rejects_unknown_artifact_kind(tmp_path):
    # a folder whose metadata is neither a generator nor an MAE
    tree = official_tree(OFFICIAL_CFG, np.random.default_rng(0))
    with pytest.raises(ValueError, match="kind"):
        load_official(write_artifact(tmp_path / "x", tree, kind="convnext"))


def test_loader_rejects_unreadable_artifact_files(tmp_path):
    # a cut msgpack, a metadata.json that is not JSON, or one that is not a mapping: one message naming the folder
    tree = official_tree(OFFICIAL_CFG, np.random.default_rng(0))
    spoils = {"cut": ("ema_params.msgpack", lambda b: b[:100]), "json": ("metadata.json", lambda b: b"{kind: gen"),
              "list": ("metadata.json", lambda b: b"[1, 2]")}
    for name, (file, spoil) in spoils.items():
        folder = write_artifact(tmp_path / name, tree)
        (folder / file).write_bytes(spoil((folder / file).read_bytes()))
        with pytest.raises(ValueError, match=f"{name}: metadata.json .*(unreadable|mapping)"):
            load_official(folder)


def test_loader_by_name_offline_is_clear(tmp_path, monkeypatch):
    # a name that needs the network fails with a message saying how to get the files by hand
    def offline(url, path):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(official, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(RuntimeError, match="models/gen/jax/latent_L_sota"):
        load_official("hf://latent_L_sota")


def test_loaded_generator_runs(tmp_path):
    # the loaded generator maps noise to a finite sample of the noise's shape
    cfg = {**OFFICIAL_CFG, "cond_dim": 64}
    model = load_official(write_artifact(tmp_path / "gen", official_tree(cfg, np.random.default_rng(0)), cfg))
    out = run(model, [0, 1], [0, 10])
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_loaded_generator_without_style_tokens_runs(tmp_path):
    # noise_classes 0 (no style codebooks): the loader builds S = 0 and the forward runs on style_idx (B, 0)
    cfg = {**OFFICIAL_CFG, "noise_classes": 0}
    model = load_official(write_artifact(tmp_path / "gen", official_tree(cfg, np.random.default_rng(0)), cfg))
    noise, style = model.draw_inputs([0, 1])
    assert style.shape == (2, 0)
    out = model(noise, torch.tensor([0, 10]), torch.tensor([1.0, 2.0]), style)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def golden_inputs(cfg):
    """Fixed inputs for the comparison with the official JAX forward (two images, one of the last class)."""
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((2, cfg["in_channels"], cfg["input_size"], cfg["input_size"])).astype(np.float32)
    return noise, np.array([3, 10]), np.array([1.0, 2.5], np.float32), rng.integers(0, 64, (2, 32))


# Every 1/16th output value of the official Flax DitGen (generator.py, float32) on official_tree(cfg, rng(0))
# and golden_inputs(cfg), computed once with jax 0.10.2 / flax 0.12.8 outside this repo.
OFFICIAL_OUTPUTS = {
    "p2": [-2.673698, -2.66533, -5.380494, -5.349195, -6.795949, -6.842691, 5.934347, 5.892353, 2.147476, 2.114422,
           -3.804301, -3.827888, -7.908924, -7.905278, 4.791361, 4.796293],
    "p16": [-0.116276, 3.7556, -0.326595, 3.287192, -1.055132, -2.946716, -8.841144, -0.765864, -12.327322,
            -3.522929, -2.908803, -4.145102, -8.711756, -1.512694, -0.154197, -4.353038],
}


@pytest.mark.parametrize("name,extra", [("p2", {}), ("p16", dict(input_size=32, in_channels=3, out_channels=3,
                                                                  patch_size=16))])
def test_matches_official_jax_forward(tmp_path, name, extra):
    # same params and inputs as the official JAX generator give the same sample (float32)
    cfg = {**OFFICIAL_CFG, "use_bf16": False, **extra}  # as the float32 JAX run
    model = load_official(write_artifact(tmp_path / name, official_tree(cfg, np.random.default_rng(0)), cfg))
    noise, labels, alpha, style = (torch.from_numpy(a) for a in golden_inputs(cfg))
    with torch.no_grad():
        out = model(noise, labels, alpha, style).reshape(-1)
    expected = torch.tensor(OFFICIAL_OUTPUTS[name])
    assert torch.allclose(out[::len(out) // 16][:16], expected, rtol=1e-4, atol=1e-5)


# The same 1/16th values of the official's use_bf16 forward (OFFICIAL_CFG: bf16 stream and conditioning, bf16
# RoPE tables), computed once with jax 0.10.2 / flax 0.12.8 outside this repo.
OFFICIAL_OUTPUTS_BF16 = {
    "p2": [-2.640625, -2.65625, -5.40625, -5.34375, -6.71875, -6.78125, 6.0, 5.90625, 2.125, 2.09375, -3.859375,
           -3.890625, -8.0, -8.0, 4.84375, 4.84375],
    "p16": [-0.066406, 3.765625, -0.3125, 3.296875, -0.984375, -2.921875, -8.9375, -0.761719, -12.4375, -3.515625,
            -2.96875, -4.125, -8.6875, -1.570312, -0.162109, -4.4375],
}


@pytest.mark.parametrize("name,extra", [("p2", {}), ("p16", dict(input_size=32, in_channels=3, out_channels=3,
                                                                  patch_size=16))])
def test_bf16_autocast_follows_official_bf16_forward(tmp_path, name, extra):
    # under bf16 autocast our sample is within 0.6% of the official bf16 one (3e-3 to 4e-3 measured; 1.0e-2 before
    # the conditioning vector was summed in bf16 as there, while the official's bf16 and float32 differ by ~1e-2)
    cfg = {**OFFICIAL_CFG, **extra}
    model = load_official(write_artifact(tmp_path / name, official_tree(cfg, np.random.default_rng(0)), cfg))
    noise, labels, alpha, style = (torch.from_numpy(a) for a in golden_inputs(cfg))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(noise, labels, alpha, style).float().reshape(-1)
    got, expected = out[::len(out) // 16][:16], torch.tensor(OFFICIAL_OUTPUTS_BF16[name])
    assert (got - expected).norm() / expected.norm() < 6e-3


# (token, channel): (cos, sin) of the official apply_rope's tables in bf16 (272 tokens, head size 64), computed
# once with jax 0.10.2 outside this repo
JAX_BF16_ROPE = {(257, 5): (-0.48828125, -0.87109375), (271, 1): (-0.98046875, 0.20214844),
                 (100, 0): (0.86328125, -0.5078125), (261, 3): (-0.8984375, 0.43945312)}


def test_bf16_rope_tables_of_attn_fp32_false_models(tmp_path):
    # the official builds RoPE's tables in bf16 for its use_bf16 models with attn_fp32=False (the released latent
    # B/2 and L/2): ours equal JAX's, tokens 256 and 257 share a position, and the loader picks them from metadata
    cos, sin = (t[:, 0] for t in rope_tables(272, 64, torch.bfloat16))
    assert torch.equal(cos[257], cos[256]) and not torch.equal(cos[256], cos[255])
    assert all(abs(cos[i, j] - c) < 1e-7 and abs(sin[i, j] - s) < 1e-7 for (i, j), (c, s) in JAX_BF16_ROPE.items())
    for attn_fp32, dtype in ((False, torch.bfloat16), (True, torch.float32)):
        cfg = {**OFFICIAL_CFG, "attn_fp32": attn_fp32}
        tree = official_tree(cfg, np.random.default_rng(0))
        dit = load_official(write_artifact(tmp_path / str(attn_fp32), tree, cfg))
        assert torch.equal(dit.rope_cos, rope_tables(32, 32, dtype)[0])


def test_official_pixel_generator_samples_through_sample_py(tmp_path):
    # an official patch-16 pixel artifact samples through sample.py's command line with no VAE: RGB uint8 images
    cfg = {**OFFICIAL_CFG, "input_size": 32, "in_channels": 3, "out_channels": 3, "patch_size": 16}
    folder = write_artifact(tmp_path / "pixel", official_tree(cfg, np.random.default_rng(0)), cfg)
    sample.main(["--ckpt", str(folder), "--vae", str(tmp_path / "no_vae_here"), "--out", str(tmp_path / "s"),
                 "--grid", "", "--num_samples", "3", "--batch_size", "2"])
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0


def official_mae_tree(in_channels, width, layers, patch, num_classes, seed=0):
    """Nested param dict with the names and shapes of the official Flax MAEResNetJAX."""
    rng = np.random.default_rng(seed)

    def conv(k, cin, cout, bias=False):
        p = {"kernel": rng.standard_normal((k, k, cin, cout)).astype(np.float32)}
        return {**p, "bias": rng.standard_normal(cout).astype(np.float32)} if bias else p

    def gn(c):
        return {"scale": rng.standard_normal(c).astype(np.float32), "bias": rng.standard_normal(c).astype(np.float32)}

    grid = in_channels * patch * patch
    encoder, cin = {"conv1": conv(3, grid, width), "gn1": gn(width)}, width
    for s, depth in enumerate(layers):
        cout, stage = width * 2 ** s, {}
        for j in range(depth):
            block = {"conv1": conv(3, cin if j == 0 else cout, cout), "gn1": gn(cout),
                     "conv2": conv(3, cout, cout), "gn2": gn(cout)}
            if j == 0 and s > 0:  # projection exists only where the shape changes
                block.update(proj_conv=conv(1, cin, cout), proj_gn=gn(cout))
            stage[f"layers_{j}"] = block
        encoder[f"stages_{s}"], encoder[f"layer{s + 1}_norm"], cin = stage, gn(cout), cout

    def up(cin, cout):
        return {"concat_norm_fn": gn(cin), "proj": {"conv": conv(3, cin, cout), "gn": gn(cout)},
                "refine": {"conv": conv(3, cout, cout), "gn": gn(cout)}}

    c = width
    decoder = {"bridge": {"conv": conv(3, 8 * c, 8 * c), "gn": gn(8 * c)}, "up43": up(12 * c, 4 * c),
               "up32": up(6 * c, 2 * c), "up21": up(3 * c, c), "up10": up(2 * c, c),
               "head": conv(1, c, grid, bias=True)}
    fc = {"kernel": rng.standard_normal((8 * c, num_classes)).astype(np.float32),
          "bias": rng.standard_normal(num_classes).astype(np.float32)}
    return {"params": {"encoder": encoder, "decoder": decoder, "fc": fc}}


MAE_META = {"model_config": {"base_channels": 32, "layers": [1, 2, 1, 2], "in_channels": 3, "input_patch_size": 2,
                         "patch_size": 2, "dropout_prob": 0.0, "use_bf16": True}}


def test_mae_from_official_maps_every_tensor():
    # every model tensor gets an official array; kernels land transposed (HWIO -> OIHW, (in,out) -> (out,in))
    tree = official_mae_tree(3, 32, (1, 2, 1, 2), 2, 7)
    model = mae_from_official(MAE_META, tree)
    p = tree["params"]
    assert model.fc.out_features == 7 and model.mask_patch == 2 and model.layers == (1, 2, 1, 2)
    conv1 = p["encoder"]["conv1"]["kernel"]
    assert torch.equal(model.encoder.conv1.weight[5, 11, 2, 0], torch.tensor(conv1[2, 0, 11, 5]))
    proj = p["encoder"]["stages_1"]["layers_0"]["proj_conv"]["kernel"]
    assert torch.equal(model.encoder.stages[1][0].proj_conv.weight[:, :, 0, 0], torch.tensor(proj[0, 0].T))
    assert torch.equal(model.fc.weight, torch.tensor(p["fc"]["kernel"].T))
    assert torch.equal(model.encoder.norms[3].weight, torch.tensor(p["encoder"]["layer4_norm"]["scale"]))
    assert len(official.flatten(tree)) == len(model.state_dict())


# Entries (flat index: value) and the largest magnitude of 6 of the 50 feature sets that the official MAEResNetJAX's
# get_activations returns (float32, matmuls at "highest") for official_mae_tree(3, 32, (1, 2, 1, 2), 2, 7) with
# kernels divided by sqrt(fan-in) and the input of test_mae_features_match_official_jax, computed once with jax
# 0.10.2 outside this repo
OFFICIAL_MAE_FEATURES = {
    "norm_x": ({0: 1.032985, 11: 0.9848966, 23: 0.983923}, 1.032985),
    "conv1": ({0: 0.3300933, 32767: 0.0, 65535: 0.1134486}, 6.830587),
    "layer1_mean_2": ({0: -0.1733249, 8191: 0.467084, 16383: 0.1865541}, 7.152744),
    "layer2_blk2_std": ({0: 0.2880183, 63: 1.474017, 127: 1.485837}, 2.294425),
    "layer3_std_4": ({0: 0.0220653, 511: 0.02181442, 1023: 0.001}, 4.8703),
    "layer4": ({0: 0.9269336, 4095: 0.7012737, 8191: 0.7168779}, 7.369352),
}


def test_mae_features_match_official_jax():
    # an official pixel MAE (2x2 input patchify) mapped in: drift.feature_sets of our maps gives as many sets as the
    # official get_activations (50) and its values on 6 of them
    def fan_in_scaled(t):
        return {k: fan_in_scaled(v) if isinstance(v, dict) else v / np.sqrt(np.prod(v.shape[:-1])) if k == "kernel"
                else v for k, v in t.items()}
    mae = mae_from_official(MAE_META, fan_in_scaled(official_mae_tree(3, 32, (1, 2, 1, 2), 2, 7))).eval()
    x = np.random.default_rng(3).standard_normal((2, 64, 64, 3)).astype(np.float32)
    x = torch.from_numpy(x).permute(0, 3, 1, 2)  # NHWC as the official takes it -> NCHW
    with torch.no_grad():
        sets = feature_sets(mae.activations(x), mae.input_patchified(x))
    assert len(sets) == 50
    for name, (entries, largest) in OFFICIAL_MAE_FEATURES.items():
        got = sets[name].flatten()
        assert abs(got.abs().max().item() / largest - 1) < 1e-5
        assert all(abs(got[i].item() - v) < 1e-5 * largest for i, v in entries.items()), name


def test_mae_from_official_rejects_missing_and_unmapped_keys():
    tree = official_mae_tree(3, 32, (1, 2, 1, 2), 2, 7)
    del tree["params"]["decoder"]["up21"]["refine"]["gn"]["scale"]
    tree["params"]["encoder"]["extra"] = {"kernel": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"decoder/up21/refine/gn/scale.*encoder/extra/kernel"):
        mae_from_official(MAE_META, tree)


def test_official_mae_folder_is_a_train_encoder(tmp_path):
    # an official MAE artifact on disk (msgpack, kind 'mae') is a frozen --encoder of train.py, checked for channels
    mae_tree = official_mae_tree(3, 32, (1, 2, 1, 2), 2, 7)
    folder = write_artifact(tmp_path / "mae", mae_tree, MAE_META["model_config"], kind="mae")
    encoder = train.load_encoder(str(folder), in_channels=3, input_size=64)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    assert torch.equal(encoder.fc.bias, torch.from_numpy(mae_tree["params"]["fc"]["bias"]))
    for channels, size in ((4, 64), (3, 32)):
        with pytest.raises(ValueError, match=f"{channels}-channel inputs {size} a side"):
            train.load_encoder(str(folder), in_channels=channels, input_size=size)
