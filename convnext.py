"""ConvNeXt-V2 feature encoder for pixel-space drifting (Table 8, pixel columns).

The pixel models drift on the features of two frozen encoders: the pixel ResNet-MAE and an
ImageNet-pretrained ConvNeXt-V2 (Table 9: MAE alone 9.35 FID, + ConvNeXt-V2 3.70). The paper only
names the network; the official release fixes the rest, and this file follows it:
- checkpoint: ConvNeXt-V2-Base, FCMAE pre-trained, ImageNet-22K then ImageNet-1K fine-tuned at 224
  (Hugging Face `facebook/convnextv2-base-22k-224`, a ConvNextV2ForImageClassification);
- input: generator pixels in [-1, 1] -> [0, 1] (not clipped) -> ImageNet mean/std -> bilinear,
  antialiased resize to 224 x 224 (jax.image.resize, which antialiases when downsampling);
- features: every stage output, LayerNorm-ed per location over channels (no affine, std + 1e-3),
  turned into vector sets by `feature_sets` below. These sets differ from the MAE's (see there),
  so the caller uses them as they are, NOT through drift.feature_sets.

References: Woo et al. 2023, "ConvNeXt V2" (arXiv 2301.00808); Liu et al. 2022, "A ConvNet for the
2020s" (arXiv 2201.03545).
"""

import os
import urllib.error

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import CACHE_DIR, download_file
from drift import safe_std
from vae import read_state_dict

_CNX_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_CNX_IMAGENET_STD = (0.229, 0.224, 0.225)


class _CnxLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (stem and downsampling layers)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _CnxGRN(nn.Module):
    """Global Response Normalization on (B, H, W, C): scale each channel by its spatial L2 norm
    relative to the mean over channels. gamma = beta = 0 makes it the identity."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        # The norm sums up to 56*56 squares: take it in float32. The eps inside the sqrt (as the
        # official JAX, unlike torch's vector_norm) keeps its gradient finite at zero.
        gx = torch.sqrt(x.float().square().sum(dim=(1, 2), keepdim=True) + 1e-6)  # (B, 1, 1, C)
        nx = (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)
        return x + self.gamma.to(x.dtype) * (x * nx) + self.beta.to(x.dtype)


class _CnxBlock(nn.Module):
    """dwconv 7x7 -> LN -> Linear 4C -> GELU -> GRN -> Linear C, plus the residual."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.grn = _CnxGRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):  # (B, C, H, W), channels_last in memory so the permutes are free
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.grn(F.gelu(self.pwconv1(self.norm(y))))  # (B, H, W, 4C), exact (erf) GELU
        return x + self.pwconv2(y).permute(0, 3, 1, 2)  # (B, C, H, W)


def _cnx_channel_normalize(y):
    """Per-location standardization over channels, as the official get_activations (float32)."""
    y = y.float()
    mean = y.mean(dim=1, keepdim=True)
    std = y.std(dim=1, keepdim=True, correction=0)
    return (y - mean) / (std + 1e-3)


class ConvNeXtV2(nn.Module):
    """ConvNeXt-V2 backbone (no classifier head) that exports drift features.

    Parameter names follow the authors' PyTorch release (downsample_layers, stages, norm); the
    Hugging Face checkpoint is mapped onto them by `convnext_state_dict_from_hf`.
    resolution: side the input is resized to (224, as official); None keeps the input size.
    """

    def __init__(self, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), resolution=224):
        super().__init__()
        self.depths, self.dims, self.resolution = tuple(depths), tuple(dims), resolution
        stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), _CnxLayerNorm2d(dims[0], eps=1e-6))
        downsamples = [nn.Sequential(_CnxLayerNorm2d(dims[i - 1], eps=1e-6),
                                     nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2)) for i in range(1, 4)]
        self.downsample_layers = nn.ModuleList([stem] + downsamples)
        self.stages = nn.ModuleList([nn.Sequential(*[_CnxBlock(dims[i]) for _ in range(depths[i])]) for i in range(4)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)  # the head's pre-classifier LayerNorm
        self.register_buffer("pixel_mean", torch.tensor(_CNX_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_CNX_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x):
        """Generator pixels (B, 3 or 1, H, W) in [-1, 1] -> the network's input (B, 3, R, R)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"ConvNeXtV2 expects images (B, 3, H, W) or (B, 1, H, W) in [-1, 1], got {tuple(x.shape)}")
        x = x.expand(-1, 3, -1, -1)  # gray images are repeated to RGB
        # No clipping: the official maps generated pixels with its un-clipped postprocess.
        x = ((x.float() + 1) / 2 - self.pixel_mean) / self.pixel_std
        r = self.resolution
        if r is not None and tuple(x.shape[-2:]) != (r, r):
            # Antialiased bilinear (triangle filter widened by the downscale factor, half-pixel
            # centers) is what jax.image.resize(method="bilinear") does.
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return x.contiguous(memory_format=torch.channels_last)

    def forward_stages(self, x):
        """Preprocessed input (B, 3, R, R) -> the 4 stage outputs [(B, C_i, R/4/2^i, R/4/2^i)]."""
        maps = []
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
            maps.append(x)
        return maps

    def activations(self, x):
        """Images in [-1, 1] -> dict name -> map (B, C, H, W), the maps the official sets come from:
        'convnext_stage_{i}' (i = 0..3, channel-normalized per location) and 'convnext_pooled'
        (B, C, 1, 1): the final LayerNorm of the last stage's spatial mean (un-normalized)."""
        maps = self.forward_stages(self.preprocess(x))
        out = {f"convnext_stage_{i}": _cnx_channel_normalize(m) for i, m in enumerate(maps)}
        out["convnext_pooled"] = self.norm(maps[-1].float().mean(dim=(2, 3)))[:, :, None, None]
        return out

    def feature_sets(self, x):
        """Images in [-1, 1] -> dict name -> vector set (B, L, C), exactly the official sets.

        Unlike the MAE's sets (drift.feature_sets): no 2x2/4x4 patch statistics, no 'norm_x',
        stage 0 (56x56) gives only its mean and std, and two global sets are added. The
        official names are spelled 'convenxt_stage_*', 'global_mean', 'global_std'.
        """
        acts = self.activations(x)
        sets = {}
        for i in range(4):
            name = f"convnext_stage_{i}"
            v = acts[name].flatten(2).transpose(1, 2)  # (B, H*W, C)
            if i > 0:
                sets[name] = v
            sets[f"{name}_mean"] = v.mean(dim=1, keepdim=True)  # (B, 1, C)
            sets[f"{name}_std"] = safe_std(v.float(), dim=1)[:, None]  # (B, 1, C), in float32
        sets["convnext_global_mean"] = acts["convnext_pooled"].flatten(1)[:, None, :]  # (B, 1, C)
        # The official's global_std equals stage_3_std; it is kept so each gets its own loss, as there.
        sets["convnext_global_std"] = sets["convnext_stage_3_std"]
        return sets

    def flops_per_sample(self, input_size=256):
        """Forward FLOPs (2 * multiply-adds of the convs and linears) for one image of side
        input_size; the network runs at `resolution` when set. Base at 224: 30.7 GFLOPs."""
        side = self.resolution or input_size
        d = self.dims
        h = side // 4
        macs = h * h * d[0] * 3 * 16  # 4x4 stem
        for i in range(4):
            if i > 0:
                h //= 2
                macs += h * h * d[i] * d[i - 1] * 4  # 2x2 downsampling conv
            macs += self.depths[i] * h * h * (49 * d[i] + 8 * d[i] * d[i])  # dwconv + 2 linears
        return 2 * macs


def ConvNeXtV2_B(**kwargs):
    return ConvNeXtV2(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), **kwargs)


def ConvNeXtV2_T(**kwargs):
    return ConvNeXtV2(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), **kwargs)


# The official release uses 'base'; 'tiny' is its other (unused) option.
ConvNeXt_models = {"base": ConvNeXtV2_B, "tiny": ConvNeXtV2_T}
_CNX_HF_NAMES = {"base": "facebook/convnextv2-base-22k-224", "tiny": "facebook/convnextv2-tiny-22k-224"}


def convnext_state_dict_from_hf(hf_state):
    """Hugging Face ConvNextV2ForImageClassification state dict -> ours. The 1000-class
    classifier is dropped (features never use it); any other key we cannot place is an error."""
    out, unknown = {}, []
    for key, value in hf_state.items():
        parts = key.split(".")
        if parts[0] == "classifier":
            continue
        if key.startswith("convnextv2.embeddings.patch_embeddings."):
            new = "downsample_layers.0.0." + parts[-1]
        elif key.startswith("convnextv2.embeddings.layernorm."):
            new = "downsample_layers.0.1." + parts[-1]
        elif key.startswith("convnextv2.layernorm."):
            new = "norm." + parts[-1]
        elif key.startswith("convnextv2.encoder.stages.") and parts[4] == "downsampling_layer":
            new = f"downsample_layers.{parts[3]}.{parts[5]}.{parts[6]}"
        elif key.startswith("convnextv2.encoder.stages.") and parts[4] == "layers":
            # ...stages.{i}.layers.{j}.{module}.{param}
            module = {"layernorm": "norm"}.get(parts[6], parts[6])
            param = {"grn.weight": "gamma", "grn.bias": "beta"}.get(f"{parts[6]}.{parts[7]}", parts[7])
            new = f"stages.{parts[3]}.{parts[5]}.{module}.{param}"
            if module == "grn":
                value = value.reshape(-1)  # HF stores GRN gamma/beta as (1, 1, 1, C)
        else:
            unknown.append(key)
            continue
        out[new] = value
    if unknown:
        raise ValueError(f"unexpected keys in the ConvNeXt-V2 checkpoint: {unknown[:5]} ({len(unknown)} in all)")
    return out


def _cnx_download(repo, cache_dir):
    """Fetch the checkpoint of a Hugging Face repo into cache_dir (safetensors if the repo has it,
    else pytorch_model.bin, which is what facebook/convnextv2-* ship); returns the local path."""
    names = ("model.safetensors", "pytorch_model.bin")
    paths = [os.path.join(cache_dir, repo.replace("/", "--") + "--" + n) for n in names]
    for path in paths:
        if os.path.exists(path):
            return path
    for name, path in zip(names, paths):
        try:
            return download_file(f"https://huggingface.co/{repo}/resolve/main/{name}", path,
                                 f"Offline? Copy the checkpoint to {path} or pass its path to "
                                 "load_convnext_v2(path=...).")
        except urllib.error.HTTPError:  # 404: try the next name
            continue
    raise RuntimeError(f"{repo} has neither {names[0]} nor {names[1]}")


def load_convnext_v2(name="base", path=None, cache_dir=None, resolution=224):
    """The pretrained ConvNeXt-V2 feature encoder, frozen and in eval mode.

    path: a local .safetensors / .bin / .pt file in the Hugging Face layout; without it the
    official checkpoint is downloaded once into cache_dir (default: data.CACHE_DIR, $DRIFTING_CACHE or
    ~/.cache/drifting).
    """
    if name not in ConvNeXt_models:
        raise ValueError(f"unknown ConvNeXt-V2 size {name!r}; expected one of {sorted(ConvNeXt_models)}")
    if path is None:
        path = _cnx_download(_CNX_HF_NAMES[name], cache_dir or CACHE_DIR)
    model = ConvNeXt_models[name](resolution=resolution)
    model.load_state_dict(convnext_state_dict_from_hf(read_state_dict(path)), strict=True)
    return model.eval().requires_grad_(False)
