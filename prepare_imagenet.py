"""
Cache ImageNet for training: ADM center crop, then one SD-VAE latent of each image and of its
horizontal flip (or, with --pixels, the uint8 crops), in memory-mappable .npy arrays.

    torchrun --nproc_per_node 8 prepare_imagenet.py --data_path /data/imagenet --out data/imagenet
    python prepare_imagenet.py --data_path /data/imagenet --out data/imagenet --pixels

--data_path holds one folder per split (train/, val/), each in ImageFolder layout: one subfolder per
class, classes numbered in sorted order, files sorted within a class. Files in --out, N = images
in the split, S = image_size (256), s = S/8 (32):

    {split}_labels.npy   int64   [N]                  class index of image i
    {split}_latents.npy  float16 [N, 2, 4, s, s]      [i, f] = the latent of image i (f=0) or of its
                                                      horizontal flip (f=1): mean + std * eps of the VAE
                                                      posterior, times vae.SCALE; eps drawn from seed i,
                                                      the same for both flips (16 KiB/image; train:
                                                      1,281,167 images, 21 GB)
    {split}_pixels.npy   uint8   [N, S, S, 3]         with --pixels: the crops, HWC (252 GB for train)
    {split}_{latents|pixels}.done{rank}                progress: one "lo hi" line per finished range

Read them with np.load(path, mmap_mode="r"). Each rank writes disjoint index ranges into the one
shared array, so run all ranks on one host (or a filesystem with coherent shared mmap). A rerun
skips every range listed in any progress file, whatever the world size or batch size was.
As the official cache (dataset/latent.py): one posterior sample per image and flip, drawn once, its
noise shared by the image and its flip; training reads these latents as they are.
"""

import argparse
import glob
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from data import init_distributed, rows_done
from vae import encode_latents, load_vae

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop(image, size):
    """ADM's center crop: halve with BOX while the short side is >= 2*size, bicubic-resize the short
    side to size, crop the center. Returns uint8 (size, size, 3)."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def image_folder(root):
    """(files, labels) in ImageFolder order: sorted class folders, sorted files within each."""
    if not os.path.isdir(root):
        raise ValueError(f"{root}: no such folder (--data_path holds one folder per split: --splits)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise ValueError(f"expected one subfolder per class in {root}, found none")
    files, labels = [], []
    for label, name in enumerate(classes):
        paths = sorted(p for p in glob.glob(os.path.join(root, name, "*")) if p.lower().endswith(IMAGE_EXTENSIONS))
        files += paths
        labels += [label] * len(paths)
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return files, np.array(labels, dtype=np.int64)


class CropDataset(torch.utils.data.Dataset):
    def __init__(self, files, size):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as image:
            return torch.from_numpy(center_crop(image, self.size).copy()), i  # (S, S, 3) uint8


def pending_chunks(progress_glob, n, batch_size):
    """Contiguous index ranges not yet listed in any progress file, cut into batch_size pieces."""
    todo = np.flatnonzero(~rows_done(progress_glob, n))
    runs = np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1) if len(todo) else []
    return [run[i:i + batch_size] for run in runs for i in range(0, len(run), batch_size)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", required=True, help="folder with one ImageFolder tree per split")
    parser.add_argument("--out", required=True, help="output folder for the .npy arrays")
    parser.add_argument("--splits", default="train,val", help="comma-separated subfolders of --data_path")
    parser.add_argument("--image_size", type=int, default=256, help="center-crop size")
    parser.add_argument("--pixels", action="store_true", help="cache the uint8 crops instead of VAE latents")
    parser.add_argument("--vae", default="mse", help="load_vae argument (ema and mse share the encoder)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per rank per step")
    parser.add_argument("--num_workers", type=int, default=8, help="DataLoader workers decoding JPEGs")
    parser.add_argument("--no_compile", action="store_true", help="skip torch.compile of the encoder (used on GPU)")
    args = parser.parse_args(argv)
    trees = {split: image_folder(os.path.join(args.data_path, split)) for split in args.splits.split(",")}  # all, first

    rank, world, device = init_distributed()  # one process, or one rank under torchrun
    distributed = dist.is_initialized()
    barrier = dist.barrier if distributed else (lambda: None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the cache is made once
    vae = None if args.pixels else load_vae(args.vae).to(device)
    if vae is not None and device.type == "cuda" and not args.no_compile:  # ~1.8x the images a second (README)
        vae.encoder.forward = torch.compile(vae.encoder.forward)
    kind = "pixels" if args.pixels else "latents"
    os.makedirs(args.out, exist_ok=True)

    for split, (files, labels) in trees.items():
        n, size = len(files), args.image_size
        if args.pixels:
            shape, dtype = (n, size, size, 3), np.uint8
        else:
            side = size // vae.downsample
            shape, dtype = (n, 2, vae.post_quant_conv.in_channels, side, side), np.float16
        path, progress = os.path.join(args.out, f"{split}_{kind}.npy"), os.path.join(args.out, f"{split}_{kind}.done")
        if rank == 0:
            np.save(os.path.join(args.out, f"{split}_labels.npy"), labels)
            if not os.path.exists(path):
                np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
        barrier()
        array = np.load(path, mmap_mode="r+")
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"{path} holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape}: "
                             "remove it (and its .done* files) to start over")
        chunks = pending_chunks(progress + "*", n, args.batch_size)[rank::world]
        barrier()  # every rank has read the progress files before any rank appends to its own

        loader = torch.utils.data.DataLoader(CropDataset(files, size), batch_sampler=[c.tolist() for c in chunks],
                                             num_workers=args.num_workers, pin_memory=device.type == "cuda")
        with open(f"{progress}{rank}", "a") as log:
            for crops, index in tqdm(loader, desc=f"{split} {kind}", disable=rank != 0):
                lo, hi = int(index[0]), int(index[-1]) + 1
                if args.pixels:
                    array[lo:hi] = crops.numpy()
                else:
                    x = crops.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
                    eps = torch.stack([torch.randn(shape[2:], generator=torch.Generator().manual_seed(i))
                                       for i in range(lo, hi)])  # image i's noise, whatever the ranks or batches
                    both = torch.cat([x, x.flip(3)])  # one encoder call for the batch and its flips
                    latents = encode_latents(vae, both, torch.cat([eps, eps]), chunk=len(both))  # (2B, 4, s, s)
                    array[lo:hi] = latents.unflatten(0, (2, -1)).transpose(0, 1).cpu().numpy()
                array.flush()  # data on disk before the range is marked done
                log.write(f"{lo} {hi}\n")
                log.flush()
        del array
        barrier()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
