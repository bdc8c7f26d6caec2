"""
The data of train.py, as the paper's sample queues consume it (paper A.8-A.9).

  Data         a labelled set in one array: Fashion-MNIST (official IDX files), CIFAR-10 (python batches),
               ImageNet latents or pixels (the caches of prepare_imagenet.py); fetch(item ids) -> model inputs.
  Stream       the order real samples arrive in: seeded epochs of (index, flip), a pure function of position.
  SampleQueue  per-class FIFO of item ids, pushed with the newest reals and drawn without replacement.

Every dataset is an array of images or latents plus labels; item id = index * 2 + horizontal flip.
"""
import glob
import gzip
import math
import os
import pickle
import urllib.error
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# where download_file's callers cache weights (Inception aside, which goes where pytorch-fid puts it)
CACHE_DIR = os.path.expanduser(os.environ.get("DRIFTING_CACHE", "~/.cache/drifting"))


def read_idx(path):
    """An IDX ubyte array (the MNIST file format), gzipped."""
    bad = f"{path}: not a whole gzipped IDX ubyte file (expected the official Fashion-MNIST .gz files)"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # not gzip, or cut short
        raise ValueError(bad) from err
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])] if len(raw) >= 4 else []
    if raw[:3] != b"\x00\x00\x08" or len(raw) != 4 + 4 * len(dims) + math.prod(dims):
        raise ValueError(bad)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def rows_done(progress_glob, n):
    """(n,) bool: the rows of a cache that prepare_imagenet.py's progress files ("lo hi" lines) list as written."""
    done = np.zeros(n, dtype=bool)
    for path in glob.glob(progress_glob):
        with open(path) as f:
            for line in f:
                lo, hi = map(int, line.split())
                done[lo:hi] = True
    return done


def fmnist_files(root, split):
    prefix = "train" if split == "train" else "t10k"
    return [os.path.join(root, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]


def download_file(url, path, offline_hint):
    """Fetch url into path unless it is there; returns path. The repo's one downloader (data, Inception, SD-VAE,
    official and ConvNeXt-V2 weights). Atomic and safe under torchrun: each process writes its own temp file and
    renames it into place. A failure raises RuntimeError naming url and offline_hint (how to do it by hand),
    except HTTP 404, which propagates as urllib.error.HTTPError for callers that try several names."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        part = f"{path}.part{os.getpid()}"
        try:
            urllib.request.urlretrieve(url, part)
        except OSError as err:
            if os.path.exists(part):
                os.remove(part)
            if isinstance(err, urllib.error.HTTPError) and err.code == 404:
                raise
            raise RuntimeError(f"cannot download {url} ({err}). {offline_hint}") from None  # the message says all
        os.replace(part, path)
    return path


def init_distributed(device=None):
    """(rank, world size, device) of this process: under torchrun (RANK set) one rank of an NCCL group on its
    LOCAL_RANK's GPU, or on `device` when given (gloo on CPUs), else one plain process. device_id binds NCCL to the
    rank's GPU (else each barrier guesses it, with a warning)."""
    default = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device or default)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def download_fmnist(root):
    """Fetch the official files that are missing from root (Zalando's Fashion-MNIST mirror)."""
    for path in fmnist_files(root, "train") + fmnist_files(root, "test"):
        download_file(FMNIST_URL + os.path.basename(path), path,
                      f"Copy the four official *-ubyte.gz files to {root}, or on Debian `apt-get install "
                      "dataset-fashion-mnist` and pass --data /usr/share/datasets/fashion-mnist")


class Data:
    """A labelled set in one array: small image sets as a uint8 (N, C, 32, 32) tensor on the device (no loader),
    ImageNet caches as memory-mapped numpy arrays read per batch. fetch(ids) -> float model inputs on `device`."""

    def __init__(self, name, root, split, device):
        self.name, self.device, self.flip = name, device, name != "fmnist"  # gray clothes keep their side
        if name == "fmnist":
            images, labels = (read_idx(f) for f in fmnist_files(root, split))
            if images.ndim != 3 or images.shape[1:] != (28, 28) or len(labels) != len(images):
                raise ValueError(f"{root}: expected 28x28 Fashion-MNIST images with one label each")
            images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]  # 28 -> 32 with the black background
        elif name == "cifar10":
            nested = os.path.join(root, "cifar-10-batches-py")  # the folder the official tarball unpacks to
            folder = nested if os.path.isdir(nested) else root
            files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
            if not all(os.path.exists(os.path.join(folder, f)) for f in files):
                raise ValueError(f"{root}: expected the CIFAR-10 python batches (data_batch_1..5, test_batch)")
            batches = []
            for f in files:
                with open(os.path.join(folder, f), "rb") as fh:
                    try:
                        batch = pickle.load(fh, encoding="bytes")
                    except Exception:  # cut short, or not a pickle
                        batch = None
                if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
                    raise ValueError(f"{fh.name}: not a CIFAR-10 python batch (CIFAR-100's hold other keys)")
                batches.append(batch)
            images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
            labels = np.concatenate([b[b"labels"] for b in batches])
        else:
            kind = "pixels" if name == "imagenet_pixels" else "latents"
            path, label_path = (os.path.join(root, f"{split}_{k}.npy") for k in (kind, "labels"))
            if not (os.path.exists(path) and os.path.exists(label_path)):
                raise ValueError(f"{root}: expected {os.path.basename(path)} and {split}_labels.npy "
                                 f"written by prepare_imagenet.py{' --pixels' if kind == 'pixels' else ''} "
                                 f"(--dataset {name}; Fashion-MNIST or CIFAR-10: --dataset fmnist or cifar10)")
            images, labels = np.load(path, mmap_mode="r"), np.load(label_path)
            progress = path[:-len(".npy")] + ".done*"  # none: a cache made otherwise, taken as whole
            if glob.glob(progress) and not rows_done(progress, len(images)).all():
                raise ValueError(f"{path}: prepare_imagenet.py has not finished writing it; run it again (it resumes)")
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.num_classes = int(self.labels.max()) + 1
        if name in ("fmnist", "cifar10"):
            self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # (N, C, 32, 32) uint8
            self.labels = self.labels.to(device)
            self.shape = tuple(self.images.shape[1:])
        else:
            self.images = images  # memmap: (N, 2 flips, 4, 32, 32) float16 latents or (N, 256, 256, 3) uint8
            self.shape = images.shape[2:] if name == "imagenet" else (3, *images.shape[1:3])
        if len(self.labels) != len(images):
            raise ValueError(f"{root}: {len(images)} images but {len(self.labels)} labels")

    def __len__(self):
        return len(self.labels)

    def fetch(self, ids):
        """(B,) item ids on self.labels.device -> (B, C, H, W) float on self.device."""
        index, flip = ids // 2, (ids % 2).bool()
        if self.name == "imagenet":  # the cached latent, of the flipped image when flip
            latents = self.images[index.cpu().numpy(), flip.long().cpu().numpy()]  # (B, 4, 32, 32)
            return torch.from_numpy(latents).to(self.device).float()
        if self.name == "imagenet_pixels":
            x = torch.from_numpy(self.images[index.cpu().numpy()]).to(self.device).permute(0, 3, 1, 2)
            flip = flip.to(self.device)
        else:
            x = self.images[index]
        x = x.float() / 127.5 - 1.0
        return torch.where(flip[:, None, None, None], x.flip(-1), x) if self.flip else x

    def uint8_images(self):
        """(N, H, W, C) uint8 of a small image set (fmnist, cifar10), for FID reference statistics."""
        return self.images.permute(0, 2, 3, 1).cpu().numpy()


class Stream:
    """The order real samples arrive in: endless epochs, each a seeded permutation with a random flip per item,
    the same on every rank. Position -> item id is a pure function, so a checkpoint stores only a position."""

    def __init__(self, n, seed, flip):
        self.n, self.seed, self.flip, self.cached = n, seed, flip, (None, None)

    def epoch(self, e):
        if self.cached[0] != e:
            g = torch.Generator().manual_seed(2**61 + self.seed * 1_000_003 + e)  # apart from train.py's seeds
            order = torch.randperm(self.n, generator=g) * 2
            self.cached = (e, order + torch.randint(2, (self.n,), generator=g) if self.flip else order)
        return self.cached[1]

    def take(self, position, count):
        """Item ids at stream positions [position, position + count), as a CPU long tensor."""
        parts = []
        while count > 0:
            e, offset = divmod(position, self.n)
            k = min(count, self.n - offset)
            parts.append(self.epoch(e)[offset:offset + k])
            position, count = position + k, count - k
        return torch.cat(parts)


class SampleQueue:
    """Per-class FIFO of item ids (paper A.8-A.9; official memory_bank.py): push appends, evicting the oldest, and
    draw samples without replacement. Ids rather than tensors keep it tiny: images are fetched at draw time. Each
    id may carry `extra` floats that travel with it (the crop box it was pushed with). One extra trash column
    absorbs the writes of items that a single push both adds and evicts, so pushes never sync with the host."""

    def __init__(self, num_classes, size, device, extra=0):
        self.size = size
        self.ids = torch.zeros(num_classes, size + 1, dtype=torch.long, device=device)
        self.extra = torch.zeros(num_classes, size + 1, extra, device=device)
        self.head = torch.zeros(num_classes, dtype=torch.long, device=device)   # next slot to write
        self.count = torch.zeros(num_classes, dtype=torch.long, device=device)  # valid entries

    def push(self, ids, labels, extra=None):
        """ids (B,) of classes labels (B,), each with extra[i] (B, E) when the queue keeps E > 0 floats an id."""
        labels, order = labels.sort(stable=True)  # group by class, keeping arrival order within a class
        ids = ids[order]
        per_class = torch.bincount(labels, minlength=len(self.count))
        first = per_class.cumsum(0) - per_class
        rank_in_class = torch.arange(len(ids), device=ids.device) - first[labels]
        survives = rank_in_class >= per_class[labels] - self.size  # only a class's newest `size` items stay
        slot = torch.where(survives, (self.head[labels] + rank_in_class) % self.size, self.size)
        self.ids[labels, slot] = ids
        if extra is not None:
            self.extra[labels, slot] = extra[order]
        self.head = (self.head + per_class) % self.size
        self.count = (self.count + per_class).clamp(max=self.size)

    def draw(self, labels, n, generator):
        """ids (len(labels), n) and their extra (len(labels), n, E); each row without replacement from its class's
        queue (needs count >= n)."""
        keys = torch.rand(len(labels), self.size, generator=generator, device=self.ids.device)
        valid = torch.arange(self.size, device=keys.device) < self.count[labels, None]
        slots = keys.masked_fill(~valid, 2.0).argsort(dim=1)[:, :n]  # random valid slots first
        return self.ids[labels[:, None], slots], self.extra[labels[:, None], slots]

    def state_dict(self):
        return {"ids": self.ids, "extra": self.extra, "head": self.head, "count": self.count}

    def load_state_dict(self, state):
        (c, n), (c2, n2) = state["ids"].shape, self.ids.shape
        if (c, n) != (c2, n2) or state["extra"].shape[-1] != self.extra.shape[-1]:
            raise ValueError(f"a saved queue of {c} classes x {n - 1} ids ({state['extra'].shape[-1]} extra floats "
                             f"each) cannot load into one of {c2} x {n2 - 1} ({self.extra.shape[-1]}): resume with "
                             "the run's data, --queue_size and --global_queue_size")
        self.ids, self.extra, self.head, self.count = (state[k].to(self.ids.device)
                                                       for k in ("ids", "extra", "head", "count"))


def crop_boxes(B, min_area, generator=None, device=None, attempts=10):
    """(w, h, cx, cy) (B,) each, in fractions of a square image's side: torchvision's RandomResizedCrop draws
    (area uniform in [min_area, 1], ratio log-uniform in [3/4, 4/3]), the first of 10 that fits, else the whole
    image (its fallback on a square image); cx, cy place the crop uniformly inside the image."""
    u = torch.rand(attempts + 1, 2, B, generator=generator, device=device)
    area = min_area + (1 - min_area) * u[:-1, 0]
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u[:-1, 1])
    w, h = (area * ratio).sqrt(), (area / ratio).sqrt()  # (attempts, B)
    fits = (w <= 1) & (h <= 1)
    first, some = fits.int().argmax(dim=0, keepdim=True), fits.any(0)  # the first draw that fits, if any does
    w, h = (torch.where(some, t.gather(0, first)[0], 1.0) for t in (w, h))
    return w, h, (1 - w) * u[-1, 0] + w / 2, (1 - h) * u[-1, 1] + h / 2


def random_resized_crop(x, min_area, generator=None):
    """torchvision's RandomResizedCrop(scale=(min_area, 1), ratio=(3/4, 4/3), bicubic) on a batch of square images
    in [-1, 1]: resized_crop with crop_boxes."""
    return resized_crop(x, *crop_boxes(x.shape[0], min_area, generator, x.device))


def resized_crop(x, w, h, cx, cy):
    """Crops (w, h, cx, cy as crop_boxes gives them) of square images x in [-1, 1], resampled to the input's size as
    one bicubic grid_sample, then rounded to the 256 uint8 levels as PIL's output is (torch's bicubic kernel has
    a = -0.75, PIL's -0.5)."""
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = w, h
    theta[:, 0, 2], theta[:, 1, 2] = 2 * cx - 1, 2 * cy - 1  # crop centre in [-1, 1] coordinates
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return ((y + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
