"""
Sample from a Drifting generator: one network evaluation per image, then the SD-VAE decoder for
latent models.

    python sample.py --ckpt runs/b2/ckpt.pt --alpha 1.1                         # -> grid.png
    torchrun --nproc_per_node 8 sample.py --ckpt latent_L_sota --num_samples 50000 --out samples/l2
      -> samples/l2/000000.png ... and samples/l2.npz (arr_0 uint8 [N, H, W, 3]), which fid.py reads

--ckpt is our checkpoint (train.py's dict; its first EMA unless --ema DECAY or --raw) or an official
artifact folder or name (official.load_official). Image i has class i % num_classes (or the i-th of --classes,
cycled) and draws its noise from seed (i + seed * 0x9E3779B9) mod 2**32 (torch's CPU generator keeps 32
bits; the golden-ratio stride puts the images of any two seeds below 100 over 21 million seeds apart), so it is
the same image whatever the number of GPUs or the batch size. Latent models (4 channels) are decoded as
vae.decode(z / SCALE). Gray (1-channel) images are saved as gray PNGs and repeated to 3 channels in the npz, the
layout every FID tool reads.
"""

import argparse
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from data import init_distributed
from model import DiT_models
from official import load_official
from vae import SCALE, load_vae


def build_generator(args):
    """DiT from a checkpoint's vars(args): the preset `model` ('B/2', ...), overridden by `input_size`,
    `in_channels` and `num_classes` where the run saved them."""
    if args.get("model") not in DiT_models:
        raise ValueError(f"checkpoint args['model'] must be one of {list(DiT_models)}, got {args.get('model')!r}")
    overrides = {k: args[k] for k in ("input_size", "in_channels", "num_classes") if args.get(k) is not None}
    return DiT_models[args["model"]](**overrides)


def load_checkpoint(path):
    """A train.py checkpoint dict (CPU tensors), or one clear error for a missing or foreign file."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a train.py checkpoint ({type(err).__name__})") from err
    if not isinstance(ckpt, dict) or not {"model", "ema", "args", "step"} <= ckpt.keys():
        raise ValueError(f"{path} is not a train.py checkpoint (expected keys model, ema, step, args)")
    return ckpt


def load_generator(path, ema_decay=None, raw=False):
    """Generator in eval mode from our checkpoint file (the EMA of decay ema_decay, by default the run's
    first, or the raw weights) or from an official artifact folder or name (EMA only)."""
    if not os.path.isfile(path) and not path.endswith(".pt"):  # an official artifact folder or name
        if raw or ema_decay is not None:
            raise ValueError(f"official artifacts hold one EMA only; --raw/--ema need a checkpoint file, got {path}")
        return load_official(path)
    ckpt = load_checkpoint(path)  # a missing .pt is one message here, not a download attempt
    if ckpt["args"].get("stage") != "gen":
        raise ValueError(f"{path} is a --stage {ckpt['args'].get('stage')} checkpoint; sampling needs a generator's "
                         "(--stage gen)")
    model = build_generator(ckpt["args"])
    emas = ckpt["ema"]  # {decay: state_dict}, train.py keeps several decays at once
    decay = ckpt["args"]["ema_decays"][0] if ema_decay is None else ema_decay
    if not raw and decay not in emas:
        raise ValueError(f"{path} has EMA decays {sorted(emas)}, asked for {decay}")
    model.load_state_dict(ckpt["model"] if raw else emas[decay])
    return model.eval()


@torch.no_grad()
def generate(model, vae, indices, classes, alpha, seed, bf16):
    """uint8 images (B, H, W, C) for global indices: one forward pass, then decode for latent models."""
    device = model.pos_embed.device
    noise, style_idx = model.draw_inputs([(i + seed * 0x9E3779B9) % 2**32 for i in indices], device)  # (B, C, h, w)
    labels = torch.tensor([classes[i % len(classes)] for i in indices], device=device)
    alphas = torch.full((len(indices),), alpha, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        x = model(noise, labels, alphas, style_idx)
        if vae is not None:
            x = vae.decode(x / SCALE)  # (B, 3, 8h, 8w)
    # DiT's rounding: shift by 128 (not 127.5), clamp, truncate
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(image, path):
    # PNG is lossless at any level; level 1 is ~10x faster than the default, which keeps up with the GPU
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path, compress_level=1)


def make_grid(images, pad=2):
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image, row-major, black padding."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):(r + 1) * (h + pad), pad + k * (w + pad):(k + 1) * (w + pad)] = image
    return grid


def main(argv=None):
    parser = argparse.ArgumentParser(description="Drifting generator sampling (1 NFE)")
    parser.add_argument("--ckpt", required=True, help="our checkpoint .pt, or an official artifact folder/name")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--ema", type=float, default=None, help="EMA decay to sample (default: the run's first)")
    weights.add_argument("--raw", action="store_true", help="the raw (non-EMA) weights instead")
    parser.add_argument("--alpha", type=float, default=1.0, help="CFG scale fed to the generator (1 = no guidance)")
    parser.add_argument("--classes", default="", help="comma-separated class ids to cycle (default: all classes)")
    parser.add_argument("--seed", type=int, default=0,
                        help="image i draws its noise from seed (i + seed * 0x9E3779B9) mod 2**32")
    parser.add_argument("--num_samples", type=int, default=0, help="write this many PNGs to --out and pack an npz")
    parser.add_argument("--out", default="samples", help="PNG folder; the npz is written as {out}.npz")
    parser.add_argument("--grid", default="grid.png", help="PNG grid of the first --grid_size images ('' = none)")
    parser.add_argument("--grid_size", type=int, default=64, help="images in the grid")
    parser.add_argument("--batch_size", type=int, default=125, help="images per GPU per forward pass")
    parser.add_argument("--vae", default="mse", help="load_vae argument for latent models (official: mse)")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast (the default on GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the generator and the VAE decoder")
    args = parser.parse_args(argv)
    if not args.num_samples and not args.grid:
        raise ValueError("nothing to do: pass --num_samples N and/or --grid PATH")
    if not math.isfinite(args.alpha) or min(args.num_samples, args.grid_size - 1, args.batch_size - 1) < 0:
        raise ValueError("--alpha must be finite, --num_samples not negative, --grid_size and --batch_size positive")

    rank, world, device = init_distributed()  # one process, or one rank under torchrun
    distributed = dist.is_initialized()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bf16 = device.type == "cuda" and not args.fp32

    model = load_generator(args.ckpt, args.ema, args.raw).to(device)
    vae = load_vae(args.vae).to(device) if model.in_channels == 4 else None  # 4 channels = SD-VAE latent
    classes = [int(c) for c in args.classes.split(",")] if args.classes else list(range(model.num_classes))
    if not all(0 <= c < model.num_classes for c in classes):
        raise ValueError(f"--classes must lie in [0, {model.num_classes}), got {classes}")
    if args.compile:
        model.forward = torch.compile(model.forward)
        if vae is not None:
            vae.decoder.forward = torch.compile(vae.decoder.forward)
    sample = lambda indices: generate(model, vae, indices, classes, args.alpha, args.seed, bf16)

    if args.grid and rank == 0:
        grid = make_grid(np.concatenate([sample(range(i, min(i + args.batch_size, args.grid_size)))
                                         for i in range(0, args.grid_size, args.batch_size)]))
        save_png(grid, args.grid)
        print(f"wrote {args.grid}")

    if args.num_samples:
        os.makedirs(args.out, exist_ok=True)
        png = lambda i: os.path.join(args.out, f"{i:06d}.png")
        mine = list(range(rank, args.num_samples, world))  # strided split: ranks never share an index
        with ThreadPoolExecutor(8) as pool:  # PNG coding releases the GIL: overlap it with the GPU
            saves = []
            for start in tqdm(range(0, len(mine), args.batch_size), desc="sampling", disable=rank != 0):
                indices = mine[start:start + args.batch_size]
                saves += [pool.submit(save_png, image, png(i)) for i, image in zip(indices, sample(indices))]
            for future in saves:
                future.result()  # re-raise any write error here
            if distributed:
                dist.barrier()  # every PNG is on disk before rank 0 packs them
            if rank == 0:
                h, w = np.asarray(Image.open(png(0))).shape[:2]
                images = np.empty((args.num_samples, h, w, 3), dtype=np.uint8)
                read = lambda i: np.asarray(Image.open(png(i))).reshape(h, w, -1)  # gray: (h, w, 1)
                for i, image in enumerate(tqdm(pool.map(read, range(args.num_samples)), desc="packing",
                                               total=args.num_samples)):
                    images[i] = image  # gray broadcasts to 3 channels, the layout FID tools read
                np.savez(args.out.rstrip("/") + ".npz", arr_0=images)
                print(f"wrote {args.num_samples} PNGs to {args.out}/ and {args.out.rstrip('/')}.npz {images.shape}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
