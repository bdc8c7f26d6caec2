"""
SD-VAE (the kl-f8 AutoencoderKL of stabilityai/sd-vae-ft-ema and sd-vae-ft-mse) in plain PyTorch.

Latent models generate 32x32x4 latents that this decoder turns into 256x256 images; the encoder
builds the training cache (prepare_imagenet.py). Module names follow diffusers' AutoencoderKL so a
diffusers checkpoint loads key for key. The official release decodes with sd-vae-ft-mse (a Flax
port of it); ft-ema and ft-mse share the encoder and differ only in the fine-tuned decoder.
encode/decode work in the unscaled latent space: callers multiply by SCALE after encoding and
divide by it before decoding.
"""

import json
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import CACHE_DIR, download_file

SCALE = 0.18215  # latent scaling factor of the SD-VAE (diffusers' class default)
URLS = {name: f"https://huggingface.co/stabilityai/sd-vae-ft-{name}/resolve/main/diffusion_pytorch_model.safetensors"
        for name in ("ema", "mse")}


def group_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv twice; a 1x1 conv on the skip only when the width changes. No time embedding."""

    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch, groups), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_ch, groups), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """One head over all H*W positions (head dim = channels), residual."""

    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = group_norm(ch, groups)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # diffusers keeps a dropout at index 1

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        # diffusers upcasts this softmax; autocast would otherwise run SDPA in bf16
        with torch.autocast(x.device.type, enabled=False):
            h = F.scaled_dot_product_attention(q[:, None].float(), k[:, None].float(), v[:, None].float())
        h = self.to_out[0](h[:, 0].to(q.dtype))  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Resample(nn.Module):
    """Down: pad right/bottom by one, 3x3 conv stride 2. Up: nearest x2, 3x3 conv."""

    def __init__(self, ch, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(ch, ch, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class Stage(nn.Module):
    """A diffusers Down/UpDecoderBlock2D: resnets, then an optional down- or upsampler."""

    def __init__(self, in_ch, out_ch, n_resnets, groups, down=False, up=False):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups)
                                     for i in range(n_resnets))
        # empty ModuleLists add no state-dict keys, so one class covers both block kinds
        self.downsamplers = nn.ModuleList([Resample(out_ch, down=True)] if down else [])
        self.upsamplers = nn.ModuleList([Resample(out_ch, down=False)] if up else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers, *self.upsamplers]:
            x = layer(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([Attention(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, in_ch, z_ch, chs, n_layers, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Stage(chs[max(i - 1, 0)], chs[i], n_layers, groups, down=i < len(chs) - 1) for i in range(len(chs)))
        self.mid_block = MidBlock(chs[-1], groups)
        self.conv_norm_out, self.conv_out = group_norm(chs[-1], groups), nn.Conv2d(chs[-1], 2 * z_ch, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, z_ch, out_ch, chs, n_layers, groups):
        super().__init__()
        rev = chs[::-1]
        self.conv_in = nn.Conv2d(z_ch, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups)
        self.up_blocks = nn.ModuleList(
            Stage(rev[max(i - 1, 0)], rev[i], n_layers + 1, groups, up=i < len(chs) - 1) for i in range(len(chs)))
        self.conv_norm_out, self.conv_out = group_norm(rev[-1], groups), nn.Conv2d(rev[-1], out_ch, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # no clamp: callers clamp when quantizing


class AutoencoderKL(nn.Module):
    """Defaults are the SD-VAE: 83,653,863 parameters, 256x256x3 <-> 32x32x4."""

    def __init__(self, in_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, norm_num_groups=32):
        super().__init__()
        chs, z, g = list(block_out_channels), latent_channels, norm_num_groups
        self.encoder = Encoder(in_channels, z, chs, layers_per_block, g)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.decoder = Decoder(z, in_channels, chs, layers_per_block, g)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.downsample = 2 ** (len(chs) - 1)  # image side / latent side: 8 for the SD-VAE

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, 4, H/8, W/8), unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """z (B, 4, h, w) unscaled latent -> image (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


@torch.no_grad()
def encode_latents(vae, x, eps=None, chunk=64):
    """Images x (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8) times SCALE, one sample of each posterior:
    mean + std * eps, eps standard normal of the latents' shape (drawn here unless given); `chunk` images at a time
    (bounded memory)."""
    out = []
    for i in range(0, len(x), chunk):
        mean, logvar = vae.encode(x[i:i + chunk].float())
        noise = torch.randn_like(mean) if eps is None else eps[i:i + chunk].to(mean)
        out.append((mean + (0.5 * logvar).exp() * noise) * SCALE)
    return torch.cat(out)


# ----------------------------------------------------------------------------- loading
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32}


def read_safetensors(path):
    """name -> tensor. Format: u64 little-endian header size N, N bytes of JSON
    {name: {dtype, shape, data_offsets [begin, end)}}, then the raw little-endian row-major data."""
    with open(path, "rb") as f:
        buf = bytearray(f.read())  # writable, so torch.frombuffer shares it without a warning
    n = int.from_bytes(buf[:8], "little")
    header = json.loads(buf[8:8 + n])
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: {name} is {info['dtype']}, expected one of {list(SAFETENSORS_DTYPES)}")
        dtype, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + begin) if count else torch.empty(0)
        tensors[name] = flat.reshape(info["shape"]).to(dtype)
    return tensors


def read_state_dict(path):
    """State dict of a .safetensors file, or of a torch-saved .bin / .pt file."""
    if str(path).endswith(".safetensors"):
        return read_safetensors(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def download(name):
    """Cached path of the ft-`name` safetensors file, downloading it once when online."""
    return download_file(URLS[name], os.path.join(CACHE_DIR, f"sd-vae-ft-{name}.safetensors"),
                         "Fetch it by hand and pass its path.")


def load_vae(path="mse"):
    """AutoencoderKL in eval mode, frozen, on the CPU in float32.

    path: 'ema' or 'mse' (downloaded once into CACHE_DIR), a diffusers folder (config.json plus
    diffusion_pytorch_model.safetensors or .bin), or a .safetensors / .bin state-dict file.
    Old files name the attention query/key/value/proj_attn; they are renamed to to_q/to_k/to_v/to_out.0.
    """
    config = {}
    if path in URLS:
        path = download(path)
    elif os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                config = json.load(f)
        files = [os.path.join(path, f"diffusion_pytorch_model.{ext}") for ext in ("safetensors", "bin")]
        path = next((f for f in files if os.path.exists(f)), files[0])
    if not os.path.exists(path) or not path.endswith((".safetensors", ".bin")):
        raise ValueError(f"expected 'ema', 'mse', a diffusers folder or a .safetensors/.bin file, got {path!r}")
    state = read_state_dict(path)
    renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    state = {re.sub(r"attentions\.0\.(query|key|value|proj_attn)\.", lambda m: f"attentions.0.{renames[m[1]]}.", k): v
             for k, v in state.items()}
    keys = ("in_channels", "latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups")
    vae = AutoencoderKL(**{k: config[k] for k in keys if k in config})
    own = vae.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: expected an AutoencoderKL state dict of config {config or 'SD-VAE'}; "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False)
