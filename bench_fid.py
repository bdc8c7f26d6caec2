"""
Benchmark of fid.py on one GPU; prints a table.

1. Inception throughput on random 256x256 uint8 images made on the GPU (so it measures the network,
   the TF1 resize and the float64 statistics, not the disk): a short sweep over batch sizes, then
   50,000 images at the best one, in full fp32 as fid.py runs; one TF32 row shows what fp32 costs
   and how far TF32 would move the features.
2. With --fmnist DIR (the official IDX .gz files): FID of a random 10k subset of the Fashion-MNIST
   train set against the 10k test set. The 28x28 gray images are used as they are (no padding):
   repeated to 3 channels, TF1-legacy bilinear resize 28 -> 299, (x - 128) / 128.

    python bench_fid.py --weights default_1.pt --fmnist /usr/share/datasets/fashion-mnist
"""
import argparse
import shlex
import sys
import time

import numpy as np
import torch

import fid
from data import fmnist_files, read_idx

parser = argparse.ArgumentParser()
parser.add_argument("--weights", default=None, help="pytorch-fid .pth or NVIDIA-layout TorchScript")
parser.add_argument("--num-images", type=int, default=50_000, help="images in the timed run")
parser.add_argument("--batch-sizes", default="100,250,500", help="batch sizes of the sweep")
parser.add_argument("--fmnist", default=None, help="folder with the Fashion-MNIST IDX .gz files")
parser.add_argument("--fmnist-images", type=int, default=10_000, help="images per Fashion-MNIST side")
parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
parser.add_argument("--device", default="cuda", help="cpu only for a quick smoke test")
args = parser.parse_args()

device = torch.device(args.device)
torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest conv algorithms
model = fid.load_inception(args.weights).to(device)
rows = []  # (what, batch size, images, seconds)
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
print(f"device: {name}, torch {torch.__version__}")


def synchronize():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(enabled):
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9 precision API
        value = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = value
    else:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled


def random_batches(batch_size, num_images, seed=0):
    generator = torch.Generator(device).manual_seed(seed)
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        yield torch.randint(0, 256, (n, 256, 256, 3), dtype=torch.uint8, device=device, generator=generator), None


def timed_run(net, batch_size, num_images):
    """Seconds for fid.accumulate (fp32 features + float64 sums) over num_images random images."""
    fid.accumulate(random_batches(batch_size, 2 * batch_size), net, device, progress=False)  # warm-up
    synchronize()
    t0 = time.perf_counter()
    fid.accumulate(random_batches(batch_size, num_images), net, device, progress=False)
    synchronize()
    return time.perf_counter() - t0


# 1. throughput: sweep, then the full run at the best batch size
sweep = {}
for batch_size in map(int, args.batch_sizes.split(",")):
    sweep[batch_size] = timed_run(model, batch_size, 10 * batch_size)
    rows.append(("sweep, fp32", batch_size, 10 * batch_size, sweep[batch_size]))
best = min(sweep, key=lambda b: sweep[b] / b)
rows.append(("features of random 256x256, fp32", best, args.num_images, timed_run(model, best, args.num_images)))
if args.compile:
    compiled = torch.compile(model)
    rows.append(("same, torch.compile", best, args.num_images, timed_run(compiled, best, args.num_images)))


@torch.no_grad()
def time_network(x, tf32):
    """(seconds for 10 forward passes, features) in fp32 or TF32; network only, no statistics."""
    set_tf32(tf32)
    model(x)
    synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        features = model(x)
    synchronize()
    set_tf32(False)
    return time.perf_counter() - t0, features


# TF32, for comparison only: fid.py never runs the network this way
x = fid.images_to_float(next(random_batches(best, best, seed=1))[0], device)
seconds_fp32, features_fp32 = time_network(x, tf32=False)
seconds_tf32, features_tf32 = time_network(x, tf32=True)
rows.append(("network only, fp32", best, 10 * best, seconds_fp32))
rows.append(("network only, TF32 (not used)", best, 10 * best, seconds_tf32))
tf32_error = ((features_tf32 - features_fp32).norm() / features_fp32.norm()).item()

print(f"\n| {'what':<36} | {'batch':>5} | {'images':>7} | {'seconds':>8} | {'img/s':>7} |")
print(f"|{'-' * 38}|{'-' * 7}|{'-' * 9}|{'-' * 10}|{'-' * 9}|")
for what, batch_size, n, seconds in rows:
    print(f"| {what:<36} | {batch_size:>5} | {n:>7} | {seconds:>8.2f} | {n / seconds:>7.0f} |")
print(f"\nTF32 vs fp32 pool3 features, relative L2 error: {tf32_error:.2e}")


# 2. Fashion-MNIST train (random 10k) vs test (10k), read by train.py's IDX reader
if args.fmnist:
    train_images, test = (read_idx(fmnist_files(args.fmnist, split)[0]) for split in ("train", "test"))
    subset = train_images[np.sort(np.random.default_rng(0).choice(len(train_images), args.fmnist_images,
                                                                  replace=False))]
    test = test[:args.fmnist_images]
    t0 = time.perf_counter()
    mu_train, sigma_train = fid.compute_statistics(subset, model, best, device, progress=False)
    mu_test, sigma_test = fid.compute_statistics(test, model, best, device, progress=False)
    value = fid.frechet_distance(mu_train, sigma_train, mu_test, sigma_test)
    print(f"\nFashion-MNIST FID, train random {len(subset)} (numpy default_rng(0)) vs test {len(test)}: {value:.4f} "
          f"({time.perf_counter() - t0:.1f} s)")
    print("protocol: 28x28 gray as is -> 3 channels -> TF1-legacy bilinear 28 -> 299 -> (x-128)/128, fp32")
print(f"command: python {' '.join(map(shlex.quote, sys.argv))}")
