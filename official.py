"""
The authors' released weights (Hugging Face Goodeat/drifting, JAX/Flax) loaded into our modules.

An artifact is a folder with metadata.json (the model's config) and ema_params.msgpack (the Flax parameter tree
written by flax.serialization). read_msgpack decodes that file without flax or msgpack; dit_from_official and
mae_from_official build model.DiT / model.ResNetMAE from the metadata and map every parameter, failing on any
missing, unmapped or misshapen one; load_official does both for a folder or a name downloaded once.

    model = load_official("latent_L_sota")      # the paper's FID 1.54 generator, downloaded into ~/.cache/drifting
"""
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from data import CACHE_DIR, download_file
from model import DiT, ResNetMAE


HF_REPO = "Goodeat/drifting"
_NUMBERS = {0xca: ">f", 0xcb: ">d", 0xcc: ">B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q",
            0xd0: ">b", 0xd1: ">h", 0xd2: ">i", 0xd3: ">q"}
_CONSTANTS = {0xc0: None, 0xc2: False, 0xc3: True}
_HEADERS = {0xc4: ("bin", ">B"), 0xc5: ("bin", ">H"), 0xc6: ("bin", ">I"), 0xc7: ("ext", ">B"),
            0xc8: ("ext", ">H"), 0xc9: ("ext", ">I"), 0xd9: ("str", ">B"), 0xda: ("str", ">H"),
            0xdb: ("str", ">I"), 0xdc: ("array", ">H"), 0xdd: ("array", ">I"), 0xde: ("map", ">H"),
            0xdf: ("map", ">I")}  # header byte -> (kind, format of the length that follows)


def _unpack(buf):
    """Decode one msgpack object from a memoryview. flax stores arrays as ext type 1 (scalars as 3), whose
    payload is itself msgpack: (shape, dtype name, raw C-order bytes)."""
    pos = 0

    def take(n):
        nonlocal pos
        pos += n
        return buf[pos - n:pos]

    def number(fmt):
        return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

    def obj():
        b = take(1)[0]
        if b <= 0x7f or b >= 0xe0:  # positive / negative fixint
            return b if b <= 0x7f else b - 0x100
        if b in _NUMBERS:
            return number(_NUMBERS[b])
        if b in _CONSTANTS:
            return _CONSTANTS[b]
        if b <= 0xbf:  # fixmap, fixarray, fixstr
            kind, n = ("map", "array", "str", "str")[(b >> 4) - 8], b & (0x1f if b >= 0xa0 else 0x0f)
        elif b in _HEADERS:
            kind, n = _HEADERS[b][0], number(_HEADERS[b][1])
        elif 0xd4 <= b <= 0xd8:  # fixext 1, 2, 4, 8, 16
            kind, n = "ext", 1 << (b - 0xd4)
        else:
            raise ValueError(f"unsupported msgpack byte 0x{b:02x} at offset {pos - 1}")
        if kind == "map":
            return {obj(): obj() for _ in range(n)}
        if kind == "array":
            return [obj() for _ in range(n)]
        if kind == "str":
            return bytes(take(n)).decode("utf-8")
        if kind == "bin":
            return take(n)
        code = number(">b")
        if code not in (1, 3):  # 1: ndarray, 3: numpy scalar
            raise ValueError(f"unsupported flax msgpack ext type {code}")
        shape, dtype, data = _unpack(take(n))
        if dtype == "bfloat16":  # no numpy dtype: widen the 16 stored bits to float32
            return (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return np.frombuffer(data, np.dtype(dtype)).reshape(shape)

    return obj()


def _unchunk(tree):
    """flax splits arrays over 1 GiB into {'__msgpack_chunked_array__', 'shape', 'chunks'}; join them back."""
    if not isinstance(tree, dict):
        return tree
    if tree.get("__msgpack_chunked_array__"):
        shape = [tree["shape"][str(i)] for i in range(len(tree["shape"]))]
        return np.concatenate([tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]).reshape(shape)
    return {k: _unchunk(v) for k, v in tree.items()}


def read_msgpack(path):
    """flax.serialization.msgpack_restore without flax: nested dict of numpy arrays (views of one buffer)."""
    buf = bytearray(os.path.getsize(path))
    with open(path, "rb") as f:
        f.readinto(buf)
    return _unchunk(_unpack(memoryview(buf)))


def flatten(tree, prefix=""):
    """Nested dict -> {'a/b/c': leaf}, the Flax module path joined with '/'."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, name + "/") if isinstance(value, dict) else {name: value})
    return out


def _download(name):
    """Fetch models/{gen|mae}/jax/{name}/ from the Hugging Face repo into CACHE_DIR (MAE names start 'mae_')."""
    folder = f"models/{'mae' if name.startswith('mae_') else 'gen'}/jax/{name}"
    local = Path(CACHE_DIR) / folder
    for file in ("metadata.json", "ema_params.msgpack"):
        download_file(f"https://huggingface.co/{HF_REPO}/resolve/main/{folder}/{file}", str(local / file),
                      f"Offline? Copy the folder {folder} of huggingface.co/{HF_REPO} here by hand and pass its path.")
    return local


def _official_names(model):
    """(torch name, official Flax keys, 'kernel' or 'concat') for every DiT parameter. Dense kernels are
    [in, out], transposed to torch's [out, in]; the rest concatenate on axis 0 (the 32 style codebooks)."""
    def dense(ours, theirs):
        return [(f"{ours}.weight", [f"{theirs}/Dense_0/kernel"], "kernel"),
                (f"{ours}.bias", [f"{theirs}/Dense_0/bias"], "concat")]

    L = "LightningDiT_0/"
    names = [("class_embed.weight", ["Embed_0/embedding"], "concat"),
             ("style_embed.weight", [f"noise_embeds_{i}/embedding" for i in range(model.num_style_tokens)], "concat"),
             ("alpha_embed.norm.weight", ["RMSNorm_0/weight"], "concat"),
             ("pos_embed", [L + "pos_embed"], "concat"), ("register_embed", [L + "cls_embed"], "concat"),
             ("final_layer.norm.weight", [L + "FinalLayer_0/RMSNorm_0/weight"], "concat"),
             *dense("alpha_embed.mlp.0", "TimestepEmbedder_0/TorchLinear_0"),
             *dense("alpha_embed.mlp.2", "TimestepEmbedder_0/TorchLinear_1"),
             *dense("x_embedder", L + "TorchLinear_0"), *dense("register_proj", L + "TorchLinear_1"),
             *dense("final_layer.adaLN_modulation", L + "FinalLayer_0/TorchLinear_0"),
             *dense("final_layer.linear", L + "FinalLayer_0/TorchLinear_1")]
    for i in range(model.depth):
        ours, theirs = f"blocks.{i}.", f"{L}blocks_{i}/"
        names += [(ours + "norm1.weight", [theirs + "RMSNorm_0/weight"], "concat"),
                  (ours + "norm2.weight", [theirs + "RMSNorm_1/weight"], "concat"),
                  (ours + "attn.q_norm.weight", [theirs + "Attention_0/q_norm/weight"], "concat"),
                  (ours + "attn.k_norm.weight", [theirs + "Attention_0/k_norm/weight"], "concat"),
                  *dense(ours + "attn.qkv", theirs + "Attention_0/TorchLinear_0"),
                  *dense(ours + "attn.proj", theirs + "Attention_0/TorchLinear_1"),
                  *dense(ours + "mlp.w1", theirs + "SwiGLUFFN_0/TorchLinear_0"),  # gate
                  *dense(ours + "mlp.w3", theirs + "SwiGLUFFN_0/TorchLinear_1"),  # up
                  *dense(ours + "mlp.w2", theirs + "SwiGLUFFN_0/TorchLinear_2"),
                  *dense(ours + "adaLN_modulation", theirs + "TorchLinear_0")]
    return names


def dit_from_official(metadata, params):
    """DiT built from an official generator's metadata.json, with params {'a/b/c': array} mapped in."""
    cfg = metadata.get("model_config") or {}
    required = ["input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "cond_dim",
                "n_cls_tokens", "noise_classes", "noise_coords"]
    variant = [k for k in ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm") if not cfg.get(k)]
    same_channels = cfg.get("out_channels", cfg.get("in_channels")) == cfg.get("in_channels")
    if any(k not in cfg for k in required) or variant or not same_channels:
        raise ValueError(f"not a generator this DiT implements: model_config needs {required}, QK-norm, SwiGLU, "
                         f"RoPE, RMSNorm and out_channels == in_channels; got {cfg}")
    model = DiT(input_size=cfg["input_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
                hidden_size=cfg["hidden_size"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                mlp_ratio=cfg.get("mlp_ratio", 4.0), num_classes=cfg.get("num_classes", 1001),
                num_register_tokens=cfg["n_cls_tokens"], cond_dim=cfg["cond_dim"],
                num_style_tokens=cfg["noise_coords"] if cfg["noise_classes"] else 0,
                style_vocab=max(cfg["noise_classes"], 1),  # noise_classes 0: the no-style ablation
                rope_bf16=cfg.get("use_bf16", False) and not cfg.get("attn_fp32", True))  # its RoPE in bf16
    names = _official_names(model)
    wanted = {key for _, keys, _ in names for key in keys}
    missing, unexpected = sorted(wanted - params.keys()), sorted(params.keys() - wanted)
    state = {}
    if not missing and not unexpected:
        for ours, keys, how in names:
            # the no-style ablation has zero codebooks: an empty (0, cond_dim) table
            arrays = [params[k] for k in keys] or [np.zeros((0, model.cond_dim), np.float32)]
            value = np.concatenate(arrays)
            state[ours] = torch.from_numpy(np.ascontiguousarray(value.T if how == "kernel" else value))
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint does not match the generator its metadata describes: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                         f"{len(wrong)} of wrong shape (e.g. {wrong[:3]})")
    model.load_state_dict(state)
    return model


def _mae_flax_path(module_name):
    """Torch module name -> official Flax path: stages.i.j -> stages_i/layers_j, norms.i -> layer{i+1}_norm."""
    parts = module_name.split(".")
    if "stages" in parts:
        k = parts.index("stages")
        parts[k:k + 3] = [f"stages_{parts[k + 1]}", f"layers_{parts[k + 2]}"]
    if "norms" in parts:
        k = parts.index("norms")
        parts[k:k + 2] = [f"layer{int(parts[k + 1]) + 1}_norm"]
    return "/".join(parts)


def mae_from_official(metadata, params):
    """ResNetMAE from an official MAE artifact: metadata.json dict and the nested param dict of numpy
    arrays (ema_params.msgpack, with or without a top-level 'params'). Every tensor must map."""
    config = dict(metadata.get("model_config", {}) or {})
    unknown = set(config) - {"base_channels", "layers", "in_channels", "input_patch_size", "patch_size",
                             "num_classes", "dropout_prob", "use_bf16"}
    if unknown:
        raise ValueError(f"unknown MAE model_config keys: {sorted(unknown)}")
    params = params.get("params", params)
    flat = flatten(params)
    # Defaults are those of the official MAEResNetJAX, for keys a metadata.json leaves out. The
    # released metadata omits num_classes, so read it off the fc kernel. dropout_prob (0 in every
    # config) and use_bf16 do not change the weights: we run in eval and use autocast instead.
    fc_kernel = flat.get("fc/kernel")
    num_classes = fc_kernel.shape[1] if fc_kernel is not None else config.get("num_classes", 1000)
    with torch.device("meta"):  # skip the random init of up to 2.7B weights; all get replaced
        model = ResNetMAE(in_channels=config.get("in_channels", 3), width=config.get("base_channels", 64),
                          layers=tuple(config.get("layers", (2, 2, 2, 2))),
                          input_patch_size=config.get("input_patch_size", 1),
                          num_classes=int(num_classes), mask_patch=config.get("patch_size", 4))
    state, missing, bad_shape = {}, [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            leaves = {"weight": ("kernel", lambda a: a.transpose(3, 2, 0, 1)), "bias": ("bias", None)}  # HWIO -> OIHW
        elif isinstance(module, nn.Linear):
            leaves = {"weight": ("kernel", lambda a: a.T), "bias": ("bias", None)}  # (in, out) -> (out, in)
        elif isinstance(module, nn.GroupNorm):
            leaves = {"weight": ("scale", None), "bias": ("bias", None)}
        else:
            continue
        for torch_leaf, (flax_leaf, convert) in leaves.items():
            if getattr(module, torch_leaf, None) is None:
                continue
            key = f"{_mae_flax_path(name)}/{flax_leaf}"
            if key not in flat:
                missing.append(key)
                continue
            array = np.asarray(flat.pop(key), dtype=np.float32)
            array = convert(array) if convert else array
            target = getattr(module, torch_leaf)
            if tuple(array.shape) != tuple(target.shape):
                bad_shape.append(f"{key}: {array.shape} vs {tuple(target.shape)}")
            state[f"{name}.{torch_leaf}"] = torch.from_numpy(np.array(array, order="C"))  # own, writable copy
    if missing or flat or bad_shape:
        raise ValueError(f"official MAE params do not match the model: missing {missing}, "
                         f"unmapped {sorted(flat)}, wrong shapes {bad_shape}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_official(path_or_name):
    """Official artifact folder (or a name such as 'latent_L_sota', 'hf://mae_latent_640', downloaded once into
    ~/.cache/drifting) -> DiT or ResNetMAE in eval mode, every parameter mapped."""
    path = Path(path_or_name)
    if not path.exists():
        path = _download(str(path_or_name).removeprefix("hf://"))
    if (path / "params_ema").is_dir():  # a training run folder: the artifact sits in params_ema/
        path = path / "params_ema"
    if not (path / "metadata.json").is_file() or not (path / "ema_params.msgpack").is_file():
        raise ValueError(f"expected an official artifact folder with metadata.json and ema_params.msgpack, got {path}")
    try:
        metadata = json.loads((path / "metadata.json").read_text())
        tree = read_msgpack(path / "ema_params.msgpack")
    except Exception as err:  # cut short, or not JSON / msgpack
        raise ValueError(f"{path}: metadata.json or ema_params.msgpack unreadable ({type(err).__name__}: "
                         f"{err})") from None
    if not isinstance(metadata, dict) or not isinstance(tree, dict):
        raise ValueError(f"{path}: metadata.json and ema_params.msgpack must each hold a mapping")
    tree = tree.get("params", tree)  # EMA trees are saved with or without the 'params' level
    kind = metadata.get("kind")
    if kind == "gen":
        return dit_from_official(metadata, flatten(tree)).eval()
    if kind == "mae":
        return mae_from_official(metadata, tree).eval()
    raise ValueError(f"metadata.json kind must be 'gen' or 'mae', got {kind!r} in {path}")
