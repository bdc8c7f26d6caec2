"""
Throughput of the networks alone on one GPU: generator forward+backward (B/2, L/2, B/16, L/16) and the
ResNet-MAE encoder forward + backward to its input (what a generator step asks of it), in bf16 with
torch.compile, model.py's attention and channels_last. Prints img/s, TFLOP/s and MFU against the card's
dense bf16 peak. FLOPs come from the models' own flops_per_sample(): backward = 2x forward for the
generator (weight and input gradients; remat's recompute not counted), 1x forward for the frozen encoder
(input gradients only).

    python bench_model.py                # one H100 / H200
    python bench_model.py --small        # CPU smoke run
"""
import argparse
import gc
import time

import torch

from model import DiT_models, MAE_models
from train import peak_flops

parser = argparse.ArgumentParser()
parser.add_argument("--small", action="store_true", help="tiny presets on the CPU (smoke test)")
parser.add_argument("--no_compile", action="store_true", help="eager mode")
parser.add_argument("--iters", type=int, default=10, help="timed iterations (median)")
parser.add_argument("--rows", default="", help="only the rows whose name contains this (e.g. MAE)")
args = parser.parse_args()
if not (args.small or torch.cuda.is_available()):
    parser.error("no GPU: this benchmark times GPUs at full size (--small: a CPU smoke run)")

device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
PEAK = peak_flops(device) or float("nan")  # dense bf16 of this card, as train.py states MFU against


def timed(fn):
    for _ in range(3):  # warm-up and compilation stay out of the numbers
        fn()
    times = []
    for _ in range(args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_generator(key, batch, **kw):
    model = DiT_models[key](**kw).to(device)
    step = model if args.no_compile or device.type != "cuda" else torch.compile(model)
    noise, style = model.draw_inputs(range(batch), device)
    labels = torch.randint(model.num_classes, (batch,), device=device)
    alpha = torch.ones(batch, device=device)

    def fn():
        with torch.autocast(device.type, torch.bfloat16):
            out = step(noise, labels, alpha, style)
        out.float().square().mean().backward()
    return timed(fn), 3 * model.flops_per_sample()


def bench_encoder(key, batch, **kw):
    model = MAE_models[key](**kw).to(device).to(memory_format=torch.channels_last).requires_grad_(False).eval()
    size = 32 * model.input_patch_size
    x = torch.randn(batch, model.in_channels, size, size, device=device).to(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def loss(x):  # the maps' consumer in the same graph, as train.py's feature sets are (the same loss run eagerly
        # after the compiled encoder took ~10% longer at width 256 on an H200)
        with torch.autocast(device.type, torch.bfloat16):
            return sum(m.float().square().mean() for m in model.activations(x).values())
    step = loss if args.no_compile or device.type != "cuda" else torch.compile(loss)

    def fn():
        step(x).backward()
    return timed(fn), 2 * model.flops_per_sample()


if args.small:
    runs = [("gen T/2", bench_generator, "T/2", 8, {}), ("MAE tiny", bench_encoder, "tiny", 8, {})]
else:  # per-GPU generated batch of the ablation (4096 over 8 GPUs). Without remat, L/2 and L/16 at 512 and B/16 at
    # 1024 do not fit an 80 GB card (B/16 1024: 111 GB on an H200); with remat, L/2 at 1024 does not either.
    runs = [("gen B/2", bench_generator, "B/2", 512, {}),
            ("gen L/2 remat", bench_generator, "L/2", 512, {"remat": True}),
            ("gen B/16", bench_generator, "B/16", 1024, {}),
            ("gen L/16 remat", bench_generator, "L/16", 512, {"remat": True}),
            ("MAE latent_256 enc fwd+bwd-to-input", bench_encoder, "latent_256", 512, {}),
            ("MAE latent_640 enc fwd+bwd-to-input", bench_encoder, "latent_640", 512, {})]

print(f"device: {name}, torch {torch.__version__}, compile: {not args.no_compile}, peak {PEAK / 1e12:.0f} TFLOP/s")
print(f"{'what':<38} {'batch':>6} {'ms':>9} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'mem GB':>7}")
for what, fn, key, batch, kw in [r for r in runs if args.rows in r[0]]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        seconds, flops = fn(key, batch, **kw)
    except torch.OutOfMemoryError:
        print(f"{what:<38} {batch:>6} out of memory")
        seconds = None
    torch._dynamo.reset()
    gc.collect()  # a failed row's tensors can stay in reference cycles of its traceback and starve the next rows
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if seconds is None:
        continue
    tflops = flops * batch / seconds / 1e12
    mem = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    print(f"{what:<38} {batch:>6} {seconds * 1e3:>9.1f} {batch / seconds:>9.0f} {tflops:>8.1f} "
          f"{tflops * 1e12 / PEAK:>6.1%} {mem:>7.1f}")
