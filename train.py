"""
Train a Drifting Model (Deng et al. 2026) in its two stages, with one script.

  --stage mae  pretrain the ResNet-MAE feature encoder (paper A.3): 2x2 patches hidden with p=0.5, L2 loss on the
               hidden area, optionally a classification fine-tune over the last steps.
  --stage gen  train the one-step DiT generator with the drifting loss (paper Sec. 3.4-3.5, A.5-A.9) in the
               frozen encoder's feature space: each step N_c classes, N_neg generated, N_pos positives and N_unc
               unconditional reals per class, the reals drawn from MoCo-like sample queues (data.py).

Defaults are the paper's Table 8 "ablation" column (latent DiT-B/2, latent MAE of width 256), as the official
configs/gen/latent_ablation.yaml and configs/mae/latent_ablation_256.yaml. --preset picks small settings for
Fashion-MNIST; explicit flags win over both.

    python train.py --stage mae --preset fmnist       # -> runs/fmnist_mae/ckpt.pt
    python train.py --stage gen --preset fmnist       # -> runs/fmnist/{ckpt.pt, grid_*.png}, FID vs the test set
    torchrun --nproc_per_node 8 train.py --stage mae --data data/imagenet    # latents of prepare_imagenet.py
    torchrun --nproc_per_node 8 train.py --stage gen --data data/imagenet    # uses runs/mae/ckpt.pt

One script rather than two: both stages share data, DDP, EMA, optimizer, checkpoints and logging, and differ
in the model and a dozen lines of step.
"""
import argparse
import copy
import math
import os
import time
from contextlib import nullcontext

# Grown, not fixed-size, allocator segments: with fixed ones, 7 GiB once sat reserved but unusable between segments and
# the ablation step ran out of an 80 GB card's memory. Set before torch is imported; an explicit setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import numpy as np
import torch
import torch._functorch.config  # memory_budget
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.nn.parallel import DistributedDataParallel as DDP

import drift
import fid
from convnext import load_convnext_v2
from data import (Data, SampleQueue, Stream, crop_boxes, download_fmnist, init_distributed, random_resized_crop,
                  resized_crop)
from model import DiT_models, MAE_models
from official import load_official
from sample import generate, load_checkpoint, make_grid, save_png
from vae import encode_latents, load_vae

# Table 8, ablation column. The MAE stage follows configs/mae/latent_ablation_256.yaml (192 epochs of 8192).
STAGE_DEFAULTS = {
    "mae": dict(model="latent_256", lr=4e-3, warmup=4000, steps=30000, ema_decays=[0.9995], out="runs/mae"),
    "gen": dict(model="B/2", lr=2e-4, warmup=5000, steps=30000, ema_decays=[0.999], out="runs/gen",
                encoder="runs/mae/ckpt.pt"),
}
# Small runs: `--stage mae --preset P`, then `--stage gen --preset P` (which finds that encoder).
# fmnist: on one H100, MAE 2.7 min (1500 steps, the last 300 with the classification fine-tune), then the generator: 2.4
# min compiling, ~115 ms/step (~90 on CUDA graphs, added since), FID 14.9 at step 2600 (NOTES.md run B). lr 1.2e-3 beat
# 6e-4 early (19.5 vs 22.1 at step 1200); EMA 0.995: this short run still moves fast, and 0.999 lags (an earlier run:
# 15.0 vs 25.5). The MAE sees whole images (crop_min 1): its RandomResizedCrop (0.2, as on ImageNet) cost the generator
# 12-21 FID points at step 600 (NOTES.md, the crop table); runs A-E there trained with the crops.
# fmnist_cpu: a smoke run of the whole pipeline on a CPU in a few minutes (its 60 steps leave grey noise; no FID).
FMNIST = dict(dataset="fmnist", data="data/fashion-mnist", log_every=50, ckpt_every=500, sample_every=500)
PRESETS = {
    "fmnist": {
        "mae": dict(FMNIST, model="fmnist", steps=1500, batch_size=1024, lr=2e-3, warmup=200, ema_decays=[0.999],
                    cls_steps=300, cls_warmup=100, crop_min=1.0, out="runs/fmnist_mae"),
        "gen": dict(FMNIST, model="S/2", steps=2600, nc=10, n_pos=32, n_neg=32, n_unc=16, lr=1.2e-3, warmup=300,
                    ema_decays=[0.995], out="runs/fmnist", encoder="runs/fmnist_mae/ckpt.pt", fid_ref="test",
                    fid_alphas=[1.0, 1.5, 2.0], cudagraphs=True),
    },
    "fmnist_cpu": {  # 2 cores: MAE ~0.4 s/step, generator ~1.2 s/step
        "mae": dict(FMNIST, model="tiny", steps=150, batch_size=32, lr=2e-3, warmup=20, ema_decays=[0.99],
                    crop_min=1.0, log_every=10, out="runs/fmnist_cpu_mae"),
        "gen": dict(FMNIST, model="T/2", steps=60, nc=5, n_pos=8, n_neg=8, n_unc=4, lr=1e-3, warmup=10,
                    ema_decays=[0.95], log_every=10, sample_every=60, out="runs/fmnist_cpu",
                    encoder="runs/fmnist_cpu_mae/ckpt.pt"),
    },
}
PEAK_TFLOPS = (("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312))  # dense bf16, by device name


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Drifting Models training (both stages)")
    p.add_argument("--stage", choices=["mae", "gen"], default="gen", help="encoder pretraining or generator")
    p.add_argument("--preset", choices=["none", *PRESETS], default="none", help="small-run defaults (see PRESETS)")
    p.add_argument("--out", default=None, help="folder for ckpt.pt and sample grids (runs/mae, runs/gen)")
    p.add_argument("--resume", default="", help="checkpoint to continue from (exactly)")
    p.add_argument("--seed", type=int, default=0, help="init seed; step s of rank r draws from (seed, s, r)")
    # data
    p.add_argument("--dataset", choices=["fmnist", "cifar10", "imagenet", "imagenet_pixels"], default="imagenet",
                   help="imagenet = SD-VAE latent cache of prepare_imagenet.py; imagenet_pixels = its --pixels cache")
    p.add_argument("--data", default="data/imagenet", help="IDX dir, CIFAR-10 python dir or prepare_imagenet --out")
    # model and optimizer (None: the stage's column of STAGE_DEFAULTS)
    p.add_argument("--model", default=None, help="DiT_models key (gen) or MAE_models key (mae)")
    p.add_argument("--encoder", default=None, help="gen: --stage mae checkpoint (default: that stage's), official "
                   "MAE folder or name (hf://mae_latent_256), or none (raw-output drift only)")
    p.add_argument("--convnext", default="none", help="gen, pixel models (Table 8): drift on ConvNeXt-V2-Base "
                   "features too: 'base' (pretrained, downloaded once), a local file of that checkpoint, or none")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--minutes", type=float, default=0, help="stop at the first log step after this many minutes "
                   "of the training loop (0: no limit); the run then ends as at --steps (checkpoint, grid, FID)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (constant from warmup to --cooldown)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps")
    p.add_argument("--cooldown", type=int, default=0, help="linear decay to 0 over the last N of --steps (0: none, "
                   "as the paper)")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (all parameters)")
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.95], help="AdamW betas")
    p.add_argument("--grad_clip", type=float, default=2.0, help="global grad-norm clip")
    p.add_argument("--ema_decays", type=float, nargs="+", default=None, help="EMA decays kept at once")
    # generator batch (paper A.7-A.9)
    p.add_argument("--nc", type=int, default=64, help="classes per step, all ranks together (N_c)")
    p.add_argument("--n_pos", type=int, default=64, help="positives per class (N_pos)")
    p.add_argument("--n_neg", type=int, default=64, help="generated samples per class (N_neg)")
    p.add_argument("--n_unc", type=int, default=16, help="unconditional real negatives per class (N_unc)")
    p.add_argument("--queue_size", type=int, default=128, help="per-class sample queue length")
    p.add_argument("--global_queue_size", type=int, default=1000, help="unconditional sample queue length")
    p.add_argument("--push", type=int, default=64, help="newest real samples pushed into the queues per step")
    p.add_argument("--alpha_power", type=float, default=3.0, help="training alpha density ~ alpha^-power")
    p.add_argument("--alpha_range", type=float, nargs=2, default=[1.0, 4.0], help="training alpha interval")
    p.add_argument("--alpha_p_one", type=float, default=0.0, help="share of classes trained at alpha = 1")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.02, 0.05, 0.2], help="kernel temperatures")
    # ablations of the field (Table 1, Table 11)
    p.add_argument("--attraction", type=float, default=1.0, help="a in V = a V+ - b V-")
    p.add_argument("--repulsion", type=float, default=1.0, help="b in V = a V+ - b V-")
    p.add_argument("--softmax", choices=["both", "y"], default="both", help="kernel normalization axes")
    # MAE stage
    p.add_argument("--batch_size", type=int, default=8192, help="mae: global batch")
    p.add_argument("--mask_ratio", type=float, default=0.5, help="mae: share of 2x2 patches hidden")
    p.add_argument("--crop_min", type=float, default=0.2,
                   help="RandomResizedCrop min area (1: no crop) of the MAE's images (latents: of the image, then "
                   "encoded) and of the pixel generator's reals (imagenet_pixels)")
    p.add_argument("--cls_steps", type=int, default=0, help="mae: classification fine-tune over the last N steps")
    p.add_argument("--cls_warmup", type=int, default=1000, help="mae: steps to ramp lambda_cls from 0")
    p.add_argument("--lambda_cls", type=float, default=0.1, help="mae: final weight of the classification loss")
    # logging, samples, evaluation
    p.add_argument("--log_every", type=int, default=100, help="steps between log lines")
    p.add_argument("--ckpt_every", type=int, default=2000, help="steps between checkpoints (and at the end)")
    p.add_argument("--sample_every", type=int, default=2000, help="gen: steps between sample grids (0: never)")
    p.add_argument("--alpha", type=float, default=1.0, help="gen: CFG scale of grids and FID samples")
    p.add_argument("--fid_ref", default="", help="gen: 'test' (test split of --data) or stats npz; FID at the end")
    p.add_argument("--fid_n", type=int, default=10000, help="samples per FID")
    p.add_argument("--fid_every", type=int, default=0, help="gen: steps between FIDs during training (0: end only)")
    p.add_argument("--fid_alphas", type=float, nargs="+", default=None, help="gen: CFG scales of the final FID "
                   "(default: --alpha)")
    p.add_argument("--fid_weights", default=None, help="Inception weights for fid.load_inception (default: cached)")
    p.add_argument("--vae", default="mse",
                   help="vae.load_vae argument: decodes latent grids and FID samples, encodes the latent MAE's crops")
    p.add_argument("--no_compile", action="store_true", help="skip torch.compile (used by default on GPU)")
    p.add_argument("--cudagraphs", action=argparse.BooleanOptionalAction, default=False, help="gen: CUDA graphs "
                   "for the compiled generator, encoder and drift (torch.compile's reduce-overhead), for small models "
                   "whose pace the host's launches set (on in the fmnist preset)")
    p.add_argument("--remat", type=int, nargs="?", const=True, default=0, help="gen: recompute every DiT block "
                   "(--remat) or the first K (--remat K) in the backward (official use_remat), one more block forward "
                   "each (at the ablation shape on an H100, --memory_budget 0.9 ran as fast as K = 3 in 10 GiB less)")
    p.add_argument("--memory_budget", type=float, default=1.0, help="gen, compiled: the share of the activations "
                   "the generator and encoder may save for the backward (torch's activation_memory_budget); below 1, "
                   "the backward recomputes elementwise ops; 0.9 fits the ablation step in 64 GiB (H100: README)")
    args, _ = p.parse_known_args(argv)
    p.set_defaults(**{**STAGE_DEFAULTS[args.stage], **PRESETS.get(args.preset, {}).get(args.stage, {})})
    args = p.parse_args(argv)
    counts = (args.steps, args.nc, args.n_pos, args.n_neg, args.push, args.batch_size, args.log_every, args.ckpt_every)
    rules = {  # rule -> kept; a broken rule is one message now, not a deep error (or a silent wrong run) later
        "--steps, --nc, --n_pos, --n_neg, --push, --batch_size, --log_every, --ckpt_every at least 1": min(counts) >= 1,
        "--n_unc, --sample_every, --fid_every, --cls_steps not negative":
            min(args.n_unc, args.sample_every, args.fid_every, args.cls_steps) >= 0,
        "--alpha_range: 1 <= low <= high": 1 <= args.alpha_range[0] <= args.alpha_range[1],
        "--alpha_p_one in [0, 1]": 0 <= args.alpha_p_one <= 1,
        "--temperatures positive": min(args.temperatures) > 0,
        "--ema_decays in [0, 1)": all(0 <= d < 1 for d in args.ema_decays),
        "--mask_ratio in (0, 1)": 0 < args.mask_ratio < 1,
        "--crop_min in (0, 1]": 0 < args.crop_min <= 1,
        "--memory_budget in (0, 1]": 0 < args.memory_budget <= 1,
        "--alpha finite": math.isfinite(args.alpha),
        "--fid_n at least 2": args.fid_n >= 2,
    }
    broken = [rule for rule, kept in rules.items() if not kept]
    if broken:
        raise ValueError(f"bad arguments: {'; '.join(broken)}")
    return args


# -----------------------------------------------------------------------------
# The generator's loss

# torch.compile's options for the features: looped, not persistent, reductions. The GroupNorms' statistics and the
# feature sets' means and stds reduce over the spatial dims of channels_last maps, and several of inductor's
# persistent kernels for them read only 0.5-1.3 TB/s on an H200 (the GroupNorms' sums at stages 3 and 4 among them);
# looped, the ablation step's encoder on its 640 reals took 42.8 against 45.3 ms, and on its 512 generated samples,
# forward and backward to the input, 79.7 against 84.3 ms (NOTES.md, Throughput).
FEATURE_COMPILE = {"triton.persistent_reductions": False}
# The generator's: inductor fuses a norm's backward reductions over rows (the input's gradient) and over columns (the
# gain's and the modulation's) into one "mix-order" kernel; the rows each of its programs takes are then chosen by
# benchmarking, not by a heuristic. DiT-B/2's forward and backward at batch 512 took 187.0 against 190.0 ms on an H200,
# the ablation step 362.4-364.4 against 365.6 ms (NOTES.md, Throughput). The small presets go without: at the
# Fashion-MNIST shape it added 46 s to a cold compile on an H100, and nothing to a step the host paces.
GEN_COMPILE = {"triton.mix_order_reduction_autotune_split_size": True}


def memory_budget(budget):
    """A context for the step's forward: torch.compile's partitioner, which chooses what a graph's forward saves for
    its backward, then keeps at most `budget` of those bytes and recomputes the rest in the backward, the cheapest ops
    first (torch's activation_memory_budget). It acts on the graphs with a backward, the generator's and the encoder's
    on the generated samples, each partitioned once, at its compile in the first step."""
    return torch._functorch.config.patch(activation_memory_budget=budget)


def encoder_features(encoder, x, convnext=None):
    """The vectors drifted for a batch x (B, C, H, W): name -> (B, L, C'), the encoder's vector sets (paper A.5-A.6)
    plus the raw output ('global'); only 'global' without an encoder. Pixel models add the ConvNeXt-V2 sets,
    which the official release builds its own way (convnext.py), simply summed into the loss with the others."""
    sets = (drift.feature_sets({}, raw=x) if encoder is None else
            drift.feature_sets(encoder.activations(x), encoder.input_patchified(x), raw=x))
    if convnext is not None:
        sets.update(convnext.feature_sets(x))
    return sets


def drift_objective(x_gen, x_real, alpha, features, n_pos, n_unc, temperatures, reduce=None, **ablation):
    """Drifting loss of this rank's class groups (paper Sec. 3.4-3.5, A.5-A.7). x_gen (Nc*N_neg, C, H, W) and
    x_real (Nc*(N_pos+N_unc), C, H, W) are class-major, the reals being each class's positives then its
    unconditional negatives; alpha (Nc,) the CFG scale of each class; features: x -> encoder_features.
    The reals go through the encoder once, without autograd: in one pass with the generated samples the conv
    backward would run over their rows too."""
    nc = alpha.shape[0]
    with torch.no_grad():
        real = {k: v.unflatten(0, (nc, -1)) for k, v in features(x_real).items()}  # (Nc, N_pos+N_unc, L, C)
    gen = {k: v.unflatten(0, (nc, -1)) for k, v in features(x_gen).items()}  # (Nc, N_neg, L, C)
    pos = {k: v[:, :n_pos] for k, v in real.items()}
    unc = {k: v[:, n_pos:] for k, v in real.items()} if n_unc else None
    w_unc = drift.cfg_weight(alpha, gen["global"].shape[1], n_unc)[:, None].expand(nc, n_unc) if n_unc else None
    return drift.feature_drift_loss(gen, pos, unc, w_unc, temperatures=tuple(temperatures), reduce=reduce,
                                    inputs=x_gen if x_gen.requires_grad else None, **ablation)


def peak_flops(device):
    """Dense bf16 peak of this GPU (None if unknown or CPU): MFU is stated against it."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)


def load_encoder(path, in_channels, input_size):
    """The frozen feature encoder: EMA weights of a --stage mae checkpoint, or an official MAE artifact."""
    if path == "none":
        return None
    if path.startswith("hf://") or os.path.isdir(path):
        encoder = load_official(path)
    else:
        if not os.path.isfile(path):
            raise ValueError(f"--encoder {path}: no such file. Train one with --stage mae, or pass an official "
                             "MAE (hf://mae_latent_256) or none")
        ckpt = load_checkpoint(path)
        saved = ckpt["args"]
        if saved.get("stage") != "mae":
            raise ValueError(f"--encoder {path}: expected a checkpoint of --stage mae, got one of --stage "
                             f"{saved.get('stage')} ({saved.get('model')})")
        encoder = MAE_models[saved["model"]](in_channels=saved["in_channels"], num_classes=saved["num_classes"],
                                             input_patch_size=saved["input_size"] // 32)
        encoder.load_state_dict(next(iter(ckpt["ema"].values())))  # the first EMA decay of that run
    if not hasattr(encoder, "activations") or (encoder.in_channels, 32 * encoder.input_patch_size) != (in_channels,
                                                                                                  input_size):
        raise ValueError(f"--encoder {path}: expected an MAE encoder of {in_channels}-channel inputs {input_size} "
                         f"a side (the data's)")
    return encoder.eval().requires_grad_(False)


def save_checkpoint(path, ckpt):
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash mid-write leaves the previous checkpoint intact


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)

    # ---- distributed: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python runs one process ----
    rank, world, device = init_distributed()
    ddp = dist.is_initialized()
    print0 = print if rank == 0 else (lambda *a, **k: None)
    barrier = dist.barrier if ddp else (lambda: None)
    mean_over_ranks = (lambda t: funcol.all_reduce(t, "sum", dist.group.WORLD) / world) if ddp else (lambda t: t)
    gen_stage = args.stage == "gen"
    if gen_stage and args.nc % world:
        raise ValueError(f"--nc {args.nc} must divide by the number of processes {world}: ranks own whole classes")
    if not gen_stage and args.batch_size % world:
        raise ValueError(f"--batch_size {args.batch_size} must divide by the number of processes {world}")

    # ---- seeds and performance flags ----
    torch.manual_seed(args.seed)  # same init on every rank; each step reseeds per (seed, step, rank) below

    def step_seed(step, r):  # r = rank, or -1 for the draws shared by all ranks; never the init's seed itself
        return args.seed * 1_000_003 + step * 4099 + r + 2
    # TF32 for float32 matmuls outside autocast (the drift loss's distances: the official ran them at TPU
    # default precision, one bf16 pass)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # cuDNN times its conv algorithms once per shape (H200): the MAE stage's step 408 -> 392 ms (width 256, 1024
    # images), the generator stage's (the encoder's convs) 397 -> 393 ms at the same peak memory (bench_train.py)
    torch.backends.cudnn.benchmark = True
    # bf16 autocast on GPU (no GradScaler: bf16 has float32's range); float32 on the CPU
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    use_compile = device.type == "cuda" and not args.no_compile
    if args.memory_budget < 1 and not use_compile:
        raise ValueError("--memory_budget acts through torch.compile: it needs a GPU and no --no_compile")

    # ---- data ----
    if args.dataset == "fmnist" and rank == 0:
        download_fmnist(args.data)
    barrier()
    data = Data(args.dataset, args.data, "train", device)
    pixels = None  # the latent MAE's crops: of the image, then SD-VAE encoded (paper A.3; official: use_aug, no cache)
    if not gen_stage and args.dataset == "imagenet" and args.crop_min < 1:
        if not os.path.exists(os.path.join(args.data, "train_pixels.npy")):
            raise ValueError(f"{args.data}: the latent MAE crops the images before the SD-VAE, which needs the crops "
                             "of prepare_imagenet.py --pixels there too (or --crop_min 1: the cached latents only)")
        pixels, vae = Data("imagenet_pixels", args.data, "train", device), load_vae(args.vae).to(device)
        side = pixels.shape[-1] // vae.downsample
        if len(pixels) != len(data) or (vae.post_quant_conv.in_channels, side, side) != data.shape:
            raise ValueError(f"{args.data}: {len(pixels)} crops encode to {vae.post_quant_conv.in_channels}x{side}x"
                             f"{side} latents, the cache holds {len(data)} of {'x'.join(map(str, data.shape))}")
        if use_compile:  # 1024 crops a step: 1990 -> 1263 ms (H200, float32; compiling takes ~20 s)
            vae.encoder.forward = torch.compile(vae.encoder.forward)
    stream = Stream(len(data), args.seed, data.flip)
    qdev = data.labels.device  # queues and draws live where the labels do (GPU for small sets)
    # recorded in the checkpoint so sample.py and --encoder can rebuild the model
    args.in_channels, args.input_size, args.num_classes = data.shape[0], data.shape[-1], data.num_classes
    if args.fid_ref == "test" and args.dataset not in ("fmnist", "cifar10"):
        raise ValueError("--fid_ref test needs --dataset fmnist or cifar10; pass reference statistics (npz) instead")
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")

    # ---- models and EMA ----
    if gen_stage:
        if args.model not in DiT_models:
            raise ValueError(f"--model must be one of {list(DiT_models)} for --stage gen, got {args.model}")
        raw_model = DiT_models[args.model](input_size=args.input_size, in_channels=args.in_channels,
                                           num_classes=args.num_classes, remat=args.remat).to(device)
        encoder = load_encoder(args.encoder, args.in_channels, args.input_size)
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # cuDNN's bf16 convs
        if encoder is not None:
            encoder = encoder.to(device, memory_format=layout)
        convnext = None
        if args.convnext != "none":
            if args.in_channels != 3:
                raise ValueError("--convnext needs RGB pixel data (--dataset imagenet_pixels or cifar10)")
            convnext = load_convnext_v2("base", None if args.convnext == "base" else args.convnext)
            convnext = convnext.to(device, memory_format=layout)
        ablation = dict(attraction=args.attraction, repulsion=args.repulsion, softmax=args.softmax)
        fwd_flops = raw_model.flops_per_sample()
        enc_flops = encoder.flops_per_sample(args.input_size) if encoder is not None else 0
        enc_flops += convnext.flops_per_sample(args.input_size) if convnext is not None else 0
        n_gen, n_real = args.nc * args.n_neg, args.nc * (args.n_pos + args.n_unc)
        # generator fwd+bwd 3x; encoder on generated samples forward + backward to its input (no weight
        # gradients) ~2x; encoder on reals forward only. The drift loss's matmuls (~1%) are not counted.
        flops_per_step = n_gen * (3 * fwd_flops + 2 * enc_flops) + n_real * enc_flops
        images_per_step = n_gen
    else:
        if args.model not in MAE_models:
            raise ValueError(f"--model must be one of {list(MAE_models)} for --stage mae, got {args.model}")
        # the ResNet always runs on a 32x32 grid: 256x256 pixels are patchified 8x8 first (paper A.3)
        if args.input_size % 32:
            raise ValueError(f"the MAE needs images of a multiple of 32 a side, got {'x'.join(map(str, data.shape))}")
        raw_model = MAE_models[args.model](in_channels=args.in_channels, num_classes=args.num_classes,
                                           input_patch_size=args.input_size // 32).to(device)
        flops_per_step = 3 * args.batch_size * raw_model.flops_per_sample(args.input_size, with_decoder=True)
        images_per_step = args.batch_size
    emas = {d: copy.deepcopy(raw_model).requires_grad_(False).eval() for d in args.ema_decays}
    print0(f"{args.stage}: {args.model} {sum(p.numel() for p in raw_model.parameters()) / 1e6:.1f}M parameters, "
           f"{len(data)} {args.dataset} images {data.shape}, {world} process(es) on {device.type}")

    # ---- optimizer: AdamW on every parameter (the official optax.adamw has no decay mask) ----
    opt = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay, fused=device.type == "cuda")
    start_step, cursor = 0, 0
    if gen_stage:
        # pixel reals are random-resized crops, as the official pixel configs' (use_aug): each cropped once, when
        # pushed (its box kept with its id, the same box in both queues), and drawn as that crop while it stays
        crop_reals = args.dataset == "imagenet_pixels" and args.crop_min < 1
        box = 4 if crop_reals else 0  # floats kept with each id: (w, h, cx, cy)
        class_queue = SampleQueue(data.num_classes, args.queue_size, qdev, extra=box)
        global_queue = SampleQueue(1, args.global_queue_size, qdev, extra=box)

        def push(ids, generator):
            boxes = torch.stack(crop_boxes(len(ids), args.crop_min, generator, qdev), 1) if crop_reals else None
            class_queue.push(ids, data.labels[ids // 2], boxes)
            global_queue.push(ids, torch.zeros_like(ids), boxes)
        if args.n_pos > args.queue_size or args.n_unc > args.global_queue_size:
            raise ValueError("--n_pos / --n_unc cannot exceed --queue_size / --global_queue_size (no replacement)")

    # ---- resume ----
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        saved = ckpt["args"]
        if (saved.get("stage"), saved.get("model")) != (args.stage, args.model):
            raise ValueError(f"--resume {args.resume} is a --stage {saved.get('stage')} --model {saved.get('model')} "
                             f"checkpoint; this run is --stage {args.stage} --model {args.model}")
        if [saved.get(k) for k in ("in_channels", "input_size", "num_classes")] != [args.in_channels, args.input_size,
                                                                                   args.num_classes]:
            raise ValueError(f"--resume {args.resume}: trained on {saved.get('dataset')} data of other shape or "
                             f"classes than this run's --dataset {args.dataset} --data {args.data}")
        if set(ckpt["ema"]) != set(emas):
            raise ValueError(f"--resume: checkpoint has EMA decays {sorted(ckpt['ema'])}, run asks {args.ema_decays}")
        raw_model.load_state_dict(ckpt["model"])
        for d, ema in emas.items():
            ema.load_state_dict(ckpt["ema"][d])
        opt.load_state_dict(ckpt["opt"])
        start_step, cursor = ckpt["step"], ckpt["queue"]["cursor"]
        if gen_stage:
            class_queue.load_state_dict(ckpt["queue"]["class"])
            global_queue.load_state_dict(ckpt["queue"]["global"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        print0(f"resumed from {args.resume} at step {start_step}")
    elif gen_stage:  # fill every class queue (and the global one) before the first step
        fill = torch.Generator(qdev).manual_seed(2**62 + args.seed)  # its crops: a stream apart from the steps'
        while cursor < len(data) and (int(class_queue.count.min()) < args.queue_size
                                      or int(global_queue.count[0]) < args.global_queue_size):
            ids = stream.take(cursor, min(4096, len(data))).to(qdev)
            push(ids, fill)
            cursor += len(ids)
        if int(class_queue.count.min()) < args.n_pos:
            raise ValueError(f"some class has fewer than --n_pos {args.n_pos} training images")

    # ---- compile, then DDP ----
    # CUDA graphs replay each compiled graph's kernels with one launch: at the Fashion-MNIST shape, where the host's
    # launches set the pace, bench_train.py's step took 84.5 against 105.2 ms (H100), and 2 processes under DDP
    # 64-70 against 115-131 ms/step (H200s; NOTES.md Throughput).
    graphs = {"triton.cudagraphs": True} if use_compile and gen_stage and args.cudagraphs else {}
    options = {**GEN_COMPILE, **graphs} if gen_stage and args.preset == "none" else graphs
    model = torch.compile(raw_model, options=options) if use_compile else raw_model
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if gen_stage:
        features = lambda x: encoder_features(encoder, x, convnext)  # noqa: E731
        # The drift step is compiled on its own, one graph per feature width (drift.compile_drift): compiled with
        # the encoder, its ~90 feature sets x 3 temperatures would make a ~16k-node graph that takes many minutes.
        if use_compile:
            drift.compile_drift("reduce-overhead" if graphs else None)
            features = torch.compile(features, dynamic=False, options={**FEATURE_COMPILE, **graphs})
        vae = None
        if args.in_channels == 4 and ((rank == 0 and args.sample_every) or args.fid_ref):  # latents: decode
            vae = load_vae(args.vae).to(device).eval()

    # ---- training loop ----
    nc = args.nc // world
    peak = peak_flops(device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # any NaN/inf loss since the last check
    last_good = (None, start_step)  # (checkpoint written by this run, step)

    def check_finite(step):
        bad = nonfinite.float()
        if ddp:
            dist.all_reduce(bad, dist.ReduceOp.MAX)
        if bad.item() or not torch.stack([p.isfinite().all() for p in raw_model.parameters()]).all():
            kept = f"{last_good[0]} (step {last_good[1]}) is left as it was" if last_good[0] else "nothing saved"
            raise FloatingPointError(f"loss or parameters became NaN/inf between step {last_good[1]} and {step}; "
                                     f"stopping. {kept}. Try a lower --lr.")

    def checkpoint(step):
        state = {"model": raw_model.state_dict(), "ema": {d: e.state_dict() for d, e in emas.items()},
                 "opt": opt.state_dict(), "step": step, "args": vars(args),
                 "queue": {"cursor": cursor, **({"class": class_queue.state_dict(),
                                                 "global": global_queue.state_dict()} if gen_stage else {})},
                 "rng": {"cpu": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}}
        if rank == 0:
            save_checkpoint(ckpt_path, state)
        barrier()

    def sample_images(indices, classes, alpha=args.alpha, decay=args.ema_decays[0]):  # uint8 (B, H, W, C)
        ema = emas[decay]  # image i from noise seed i
        return np.concatenate([generate(ema, vae, indices[i:i + 250], classes, alpha, 0, device.type == "cuda")
                               for i in range(0, len(indices), 250)])

    # The Inception network loaded now (bad weights stop the run before it trains), the reference statistics once
    fid_state = {"net": fid.load_inception(args.fid_weights).to(device)} if gen_stage and args.fid_ref else {}
    if fid_state and args.fid_ref != "test":  # statistics: checked now, not after training
        fid_state["ref"] = fid.load_statistics(args.fid_ref)

    def evaluate_fid(step, alphas, decays=args.ema_decays[:1]):
        if "ref" not in fid_state:  # --fid_ref test: the test split's statistics, computed once
            fid_state["ref"] = fid.compute_statistics(Data(args.dataset, args.data, "test", device).uint8_images()
                                                      [rank::world], fid_state["net"], device=device, progress=False)
        for decay in decays:
            for alpha in alphas:
                images = sample_images(list(range(rank, args.fid_n, world)), list(range(data.num_classes)), alpha,
                                       decay)
                mu, sigma = fid.compute_statistics(images, fid_state["net"], device=device, progress=False)
                print0(f"step {step:6d} | FID {fid.frechet_distance(mu, sigma, *fid_state['ref']):.3f} "
                       f"({args.fid_n} samples at alpha {alpha:g}, EMA {decay}, reference {args.fid_ref})", flush=True)

    step, t_last, t_start = start_step, None, time.perf_counter()
    model.train()
    while step < args.steps:
        torch.manual_seed(step_seed(step, rank))  # masks, noise, the MAE's VAE samples: a function of the step
        # the official warmup (optax.linear_schedule): 1e-6 at the first update, linear to --lr at update --warmup
        warm = 1e-6 + (args.lr - 1e-6) * step / args.warmup if step < args.warmup else args.lr
        lr = min(warm, args.lr * (args.steps - step) / max(1, args.cooldown))
        for group in opt.param_groups:
            group["lr"] = lr
        if graphs:  # a new step: the graphs may reuse the last one's outputs
            torch.compiler.cudagraph_mark_step_begin()
        if gen_stage:
            # push the newest reals, then pick classes, alphas and queue draws for ALL ranks with one shared
            # generator, so the global batch is the same whatever the number of processes
            shared = torch.Generator(qdev).manual_seed(step_seed(step, -1))
            push(stream.take(cursor, args.push).to(qdev), shared)
            cursor += args.push
            classes = (torch.randperm(data.num_classes, generator=shared, device=qdev)[:args.nc]
                       if args.nc <= data.num_classes else
                       torch.randint(data.num_classes, (args.nc,), generator=shared, device=qdev))
            alpha = drift.sample_alpha(args.nc, args.alpha_power, *args.alpha_range, args.alpha_p_one,
                                       generator=shared, device=qdev)
            pos, pos_boxes = class_queue.draw(classes, args.n_pos, shared)  # (Nc, N_pos), (Nc, N_pos, 0 or 4)
            unc, unc_boxes = global_queue.draw(torch.zeros_like(classes), args.n_unc, shared)  # (Nc, N_unc), ...
            mine = slice(rank * nc, (rank + 1) * nc)  # this rank's class groups
            x_real = data.fetch(torch.cat([pos[mine], unc[mine]], dim=1).flatten())  # (nc*(N_pos+N_unc), C, H, W)
            if crop_reals:
                boxes = torch.cat([pos_boxes[mine], unc_boxes[mine]], dim=1).flatten(0, 1).to(device)  # (B, 4)
                x_real = resized_crop(x_real, *boxes.unbind(1))
            classes, alpha = classes[mine].to(device), alpha[mine].to(device)
            noise = torch.randn(nc * args.n_neg, *data.shape, device=device)
            style = torch.randint(raw_model.style_vocab, (nc * args.n_neg, raw_model.num_style_tokens), device=device)
            with autocast, memory_budget(args.memory_budget):
                x_gen = model(noise, classes.repeat_interleave(args.n_neg), alpha.repeat_interleave(args.n_neg), style)
                loss, info = drift_objective(x_gen, x_real, alpha, features, args.n_pos, args.n_unc, args.temperatures,
                                             mean_over_ranks if ddp else None, **ablation)
        else:
            ids = stream.take(cursor, args.batch_size)[rank::world].to(qdev)
            cursor += args.batch_size
            labels = data.labels[ids // 2].to(device)
            if pixels is not None:  # float32 (TF32) as the cache was made (bf16 would encode 1.6x as fast: README)
                x = encode_latents(vae, random_resized_crop(pixels.fetch(ids), args.crop_min))
            else:
                x = data.fetch(ids)
                x = random_resized_crop(x, args.crop_min) if args.crop_min < 1 else x
            ft_step = step - (args.steps - args.cls_steps)
            lambda_cls = args.lambda_cls * min(1.0, ft_step / max(1, args.cls_warmup)) if ft_step >= 0 else 0.0
            with autocast:  # a tensor lambda: a changing Python float would recompile
                loss, info = model(x, labels, mask_ratio=args.mask_ratio,
                                   lambda_cls=torch.tensor(lambda_cls, device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        opt.step()
        for d, ema in emas.items():
            torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1.0 - d)
        nonfinite |= ~torch.isfinite(loss.detach())
        step += 1

        if step == start_step + 1 or step % args.log_every == 0 or step == args.steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            check_finite(step)
            if gen_stage:  # mean square of the raw force per temperature, averaged over feature sets
                drift_T = [torch.stack([v for k, v in info.items() if k.startswith(f"drift_{T:g}/")]).mean()
                           for T in args.temperatures]
                extra = [info[f"drift_{T:g}/global"] for T in args.temperatures]
            else:
                drift_T, extra = [info["recon_loss"], info["accuracy"]], []
            out_of_time = float(args.minutes > 0 and now - t_start > 60 * args.minutes)  # any rank: all stop
            values = mean_over_ranks(torch.stack([loss.detach().float(), grad_norm.float(), *drift_T, *extra,
                                                  torch.tensor(out_of_time, device=device)])).tolist()
            if values.pop() > 0 and step < args.steps:
                ft_start = args.steps - args.cls_steps
                skipped = not gen_stage and args.cls_steps and step <= ft_start  # the MAE's fine-tune never ran
                print0(f"--minutes {args.minutes:g} reached: stopping at step {step}"
                       + (f", without the classification fine-tune (from step {ft_start})" if skipped else ""))
                args.steps = step
            line = f"step {step:6d} | loss {values[0]:.4f} | "
            if gen_stage:
                k = len(args.temperatures)
                line += "drift " + " ".join(f"T{T:g} {v:.3g}" for T, v in zip(args.temperatures, values[2:2 + k]))
                line += " (raw " + " ".join(f"{v:.3g}" for v in values[2 + k:]) + ")"
            else:
                line += f"recon {values[2]:.4f}" + (f" acc {values[3]:.3f}" if lambda_cls > 0 else "")  # head trained
            line += f" | gnorm {values[1]:.3f} | lr {lr:.2e}"
            if t_last is not None and step > t_last[1]:  # compile and warm-up (the first step) left out
                sec = (now - t_last[0]) / (step - t_last[1])
                line += f" | {1000 * sec:.1f} ms/step | {images_per_step / sec:.0f} img/s"
                if peak:
                    line += f" | MFU {100 * flops_per_step / sec / (peak * world):.1f}% of {peak / 1e12:.0f} TFLOP/s"
            if device.type == "cuda":
                line += f" | mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
            print0(line, flush=True)
            t_last = (time.perf_counter(), step)
        if step % args.ckpt_every == 0 or step == args.steps:
            check_finite(step)
            checkpoint(step)
            last_good = (ckpt_path, step)
            t_last = None
        if gen_stage and rank == 0 and args.sample_every and (step % args.sample_every == 0 or step == args.steps):
            grid_classes = list(range(min(10, data.num_classes)))  # one column per class
            save_png(make_grid(sample_images(list(range(10 * len(grid_classes))), grid_classes)),
                     os.path.join(args.out, f"grid_{step:06d}.png"))
            t_last = None
        if gen_stage and args.fid_ref and args.fid_every and step % args.fid_every == 0 and step < args.steps:
            evaluate_fid(step, [args.alpha])
            t_last = None

    # ---- teardown: ranks in sync?, optional FID ----
    sums = torch.stack([p.detach().double().sum() for p in raw_model.parameters()])
    if ddp:
        gathered = [torch.zeros_like(sums) for _ in range(world)]
        dist.all_gather(gathered, sums)
        in_sync = all(torch.equal(g, sums) for g in gathered)
    else:
        in_sync = True
    print0(f"done at step {step}: parameter checksum {sums.sum().item():.12e}, "
           f"identical on all {world} processes: {in_sync}")
    if gen_stage and args.fid_ref:
        evaluate_fid(step, args.fid_alphas or [args.alpha], args.ema_decays)  # every EMA at the end
    if ddp:
        if graphs:  # the CUDA graphs, which captured NCCL calls, first: with them alive a 2-GPU run never exited
            torch.compiler.reset()
        dist.destroy_process_group()
    return raw_model


if __name__ == "__main__":
    main()
