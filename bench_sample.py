"""
Sampling throughput on one GPU (random weights: speed does not depend on them).

    python bench_sample.py                 # B/2 + SD-VAE decode and pixel L/16, bf16 autocast
    python bench_sample.py --compile       # the same with torch.compile (as sample.py --compile)

Prints images/s for the generator alone, the VAE decoder alone and sample.generate end to end (noise
drawn per image seed on the CPU, forward, decode, uint8, copy to the host), peak memory, the PNG
write rate of sample.py's thread pool, and the projected time for 50K B/2 samples with decode.
"""

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from model import DiT_models
from sample import generate, save_png
from vae import AutoencoderKL


def timed(fn, iters):
    """Seconds per call after one warm-up call (which also triggers compilation)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def png_rate(images, threads=8):
    """Images/s that sample.py's PNG thread pool sustains on this host."""
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(lambda k: save_png(images[k], os.path.join(folder, f"{k}.png")), range(len(images))))
        return len(images) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description="sampling throughput table")
    parser.add_argument("--batch_sizes", default="64,128,256", help="comma-separated per-GPU batch sizes")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--compile", action="store_true", help="torch.compile generator and decoder")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no GPU: this benchmark times GPUs")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast, compile {args.compile}")

    vae = AutoencoderKL().to(device).eval().requires_grad_(False)
    if args.compile:
        vae.decoder.forward = torch.compile(vae.decoder.forward)
    setups = [("B/2 + decode", DiT_models["B/2"](), vae), ("L/16 pixel", DiT_models["L/16"](), None)]
    print(f"{'setup':<14}{'batch':>6}{'gen img/s':>11}{'decode img/s':>14}{'end-to-end img/s':>18}{'peak GB':>9}")
    best = {}
    for name, model, decoder in setups:
        model = model.to(device).eval().requires_grad_(False)
        if args.compile:
            model.forward = torch.compile(model.forward)
        for batch in map(int, args.batch_sizes.split(",")):
            torch.cuda.reset_peak_memory_stats()
            noise, style = model.draw_inputs(range(batch), device)
            labels, alpha = torch.arange(batch, device=device) % 1000, torch.ones(batch, device=device)
            try:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    gen = batch / timed(lambda: model(noise, labels, alpha, style), args.iters)
                    dec = batch / timed(lambda: decoder.decode(noise), args.iters) if decoder else float("nan")
                total = batch / timed(lambda: generate(model, decoder, list(range(batch)), list(range(1000)),
                                                       1.0, 0, True), args.iters)
            except torch.OutOfMemoryError:
                print(f"{name:<14}{batch:>6}  out of memory")
                torch.cuda.empty_cache()
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"{name:<14}{batch:>6}{gen:>11.1f}{dec:>14.1f}{total:>18.1f}{peak:>9.1f}")
            best[name] = max(best.get(name, 0.0), total)
        del model

    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 256, 3), dtype=np.uint8)
    pngs = png_rate(noise)  # incompressible images: a lower bound for real samples
    print(f"PNG writes (8 threads, compress_level 1, random pixels): {pngs:.0f} img/s on this host")
    if "B/2 + decode" in best:
        rate = min(best["B/2 + decode"], pngs)
        print(f"projected 50K B/2 samples with decode: {50000 / rate / 60:.1f} min on 1 GPU, "
              f"{50000 / rate / 60 / 8:.1f} min on 8 (at min(end-to-end, PNG) = {rate:.0f} img/s per GPU; "
              "packing the npz adds one read of the PNGs)")


if __name__ == "__main__":
    main()
