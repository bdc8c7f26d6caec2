"""
Time one generator training step of train.py at the paper's ablation shape, per GPU, and each of its parts.

    python bench_train.py            # DiT-B/2 + latent-MAE width 256, 8 classes x (64 gen, 64 pos, 16 unc) per GPU
    python bench_train.py --small    # CPU smoke run with the tiny test models
    python bench_train.py --model S/2 --encoder fmnist --in_channels 1 --nc 10 --n_pos 32 --n_neg 32 --n_unc 16
                                     # the step of train.py --preset fmnist (which skips GEN_COMPILE); that preset's
                                     # generator runs on CUDA graphs: add --cudagraphs
    python bench_train.py --bound    # and the step's time if its Triton kernels ran at the memory's bandwidth

The ablation batch (Table 8) is N_c = 64 classes of 64 generated samples, 4096 in all; on 8 GPUs each owns
8 classes (512 generated, 640 real samples), the default here. The whole step is train.py's: generator
forward, drift_objective (encoder on the reals without autograd, on the generated samples with it; feature
sets; drift loss), backward, clip, fused AdamW, EMA. The inputs are synthetic: the queue draws and data
fetches of train.py (small next to the step for on-GPU data) are not timed. MFU counts the model FLOPs
train.py logs (generator 3x forward, encoder 2x forward on generated and 1x on real samples); the drift
loss's matmuls are shown separately. Each row also gives the host's time to issue the work ('host ms'): well
below the row's time, the GPU sets the pace; near it, either the host does or the GPU's launch queue is full and
launches wait; --cudagraphs (torch.compile's CUDA graphs, which take the launches off the host) tells them apart.
"""
import argparse
import collections
import os
import time
from contextlib import nullcontext

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as train.py (80 GB cards)
import torch

import drift
from convnext import ConvNeXt_models
from model import DiT_models, MAE_models
from train import FEATURE_COMPILE, GEN_COMPILE, drift_objective, encoder_features, memory_budget, peak_flops

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default="B/2", help="DiT_models key")
parser.add_argument("--encoder", default="latent_256", help="MAE_models key")
parser.add_argument("--in_channels", type=int, default=4, help="e.g. 1 for --model S/2 --encoder fmnist")
parser.add_argument("--nc", type=int, default=8, help="classes on this GPU")
parser.add_argument("--n_pos", type=int, default=64)
parser.add_argument("--n_neg", type=int, default=64)
parser.add_argument("--n_unc", type=int, default=16)
parser.add_argument("--iters", type=int, default=10, help="timed iterations per measurement")
parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation)")
parser.add_argument("--small", action="store_true", help="tiny models on the CPU, a smoke run")
parser.add_argument("--no_compile", action="store_true")
parser.add_argument("--cudagraphs", action="store_true", help="torch.compile mode='reduce-overhead' (CUDA graphs) "
                    "for the generator, the encoder features and the drift step")
parser.add_argument("--remat", type=int, nargs="?", const=True, default=0,
                    help="recompute all DiT blocks (or the first K) in the backward (train.py --remat [K])")
parser.add_argument("--memory_budget", type=float, default=1.0, help="the share of the activations torch.compile "
                    "saves for the generator's and encoder's backward, recomputing the rest (train.py --memory_budget)")
parser.add_argument("--profile", action="store_true", help="profile 3 whole steps (the top kernels and ops) "
                    "before timing the parts")
parser.add_argument("--bound", action="store_true", help="then the step's kernels by kind, and its time if its "
                    "Triton kernels moved their bytes (inductor's estimate) at the bandwidth of a plain add")
parser.add_argument("--convnext", action="store_true", help="pixel models: ConvNeXt-V2-Base features too "
                    "(random weights: the speed does not depend on them), e.g. --model B/16 --encoder pixel_640")
args = parser.parse_args()
if not (args.small or torch.cuda.is_available()):
    parser.error("no GPU: this benchmark times GPUs at full size (--small: a CPU smoke run)")
if args.bound and (args.small or args.no_compile or args.cudagraphs):
    parser.error("--bound needs a GPU and torch.compile without --cudagraphs")
if args.memory_budget < 1 and (args.small or args.no_compile):
    parser.error("--memory_budget acts through torch.compile: it needs a GPU and no --no_compile")
if args.small:
    args.model, args.encoder, args.nc, args.n_pos, args.n_neg, args.n_unc = "T/2", "tiny", 2, 4, 4, 2
    args.iters, args.warmup = 2, 1

device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
torch.backends.cudnn.benchmark = True
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
use_compile = device.type == "cuda" and not args.no_compile
mode = "reduce-overhead" if args.cudagraphs else None
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
triton_gb = [0.0]  # GB moved by inductor's Triton kernels, counted at every launch (--bound)
if args.bound:  # inductor then estimates each kernel's bytes as it writes it (benchmark_kernel; it prints module paths)
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    torch._inductor.config.benchmark_kernel = True
    launch = CachingAutotuner.run

    def counted_launch(self, *a, **kw):
        triton_gb[0] += self.inductor_meta.get("kernel_num_gb") or 0.0
        return launch(self, *a, **kw)
    CachingAutotuner.run = counted_launch
torch.manual_seed(0)

gen = DiT_models[args.model](in_channels=args.in_channels, remat=args.remat,
                             **({"input_size": 32} if args.small else {})).to(device)
enc = MAE_models[args.encoder](in_channels=gen.in_channels).eval().requires_grad_(False)
enc = enc.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
cnx = ConvNeXt_models["base"]().eval().requires_grad_(False).to(device) if args.convnext else None
ema = [p.detach().clone() for p in gen.parameters()]
opt = torch.optim.AdamW(gen.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=device.type == "cuda")
nc, n_gen, n_real = args.nc, args.nc * args.n_neg, args.nc * (args.n_pos + args.n_unc)
shape = (gen.in_channels, gen.input_size, gen.input_size)
noise, x_real = torch.randn(n_gen, *shape, device=device), torch.randn(n_real, *shape, device=device)
labels = torch.arange(nc, device=device).repeat_interleave(args.n_neg)
alpha = drift.sample_alpha(nc, 3.0, device=device)
alpha_g = alpha.repeat_interleave(args.n_neg)
style = torch.randint(gen.style_vocab, (n_gen, gen.num_style_tokens), device=device)

# As train.py: generator and encoder features compiled, the drift step compiled on its own (drift.compile_drift).
if use_compile:
    drift.compile_drift(mode)
gen_c, features = gen, lambda x: encoder_features(enc, x, cnx)  # noqa: E731
if use_compile:  # mode='reduce-overhead' is the option triton.cudagraphs
    gen_c = torch.compile(gen, dynamic=False, options={**GEN_COMPILE, "triton.cudagraphs": args.cudagraphs})
    features = torch.compile(features, dynamic=False, options={**FEATURE_COMPILE, "triton.cudagraphs": args.cudagraphs})
objective = lambda x, xr, a: drift_objective(  # noqa: E731
    x, xr, a, features, args.n_pos, args.n_unc, (0.02, 0.05, 0.2))


def timed(fn):
    """(seconds per call, host seconds per call): the host's time to issue a call, before the final sync."""
    def call():
        if args.cudagraphs:  # each call a new step: the graphs may reuse the last call's outputs' memory
            torch.compiler.cudagraph_mark_step_begin()
        fn()
    for _ in range(args.warmup):
        call()
    sync()
    start, host = time.perf_counter(), 0.0
    for _ in range(args.iters):
        t = time.perf_counter()
        call()
        host += time.perf_counter() - t
    sync()
    return (time.perf_counter() - start) / args.iters, host / args.iters


def train_step():  # as train.py's loop body
    with autocast, memory_budget(args.memory_budget):
        loss, _ = objective(gen_c(noise, labels, alpha_g, style), x_real, alpha)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(gen.parameters(), 2.0)
    opt.step()
    torch._foreach_lerp_(ema, list(gen.parameters()), 0.001)


def generator_fwd_bwd():  # each part clears the gradients it makes, as the step does (and CUDA graphs need)
    gen.zero_grad(set_to_none=True)
    with autocast, memory_budget(args.memory_budget):
        x = gen_c(noise, labels, alpha_g, style)
    x.float().square().mean().backward()


def encoder_real():
    with torch.no_grad(), autocast:
        features(x_real)


x_in = torch.randn(n_gen, *shape, device=device, requires_grad=True)


def encoder_gen_fwd_bwd_to_input():
    x_in.grad = None
    with autocast, memory_budget(args.memory_budget):
        f = features(x_in)
    sum(v.float().mean() for v in f.values()).backward()


own = (lambda t: t.clone()) if args.cudagraphs else (lambda t: t)  # CUDA graphs reuse their outputs' memory
with torch.no_grad(), autocast:  # fixed features for the drift loss alone, in the dtypes the step gives it
    f_gen = {k: own(v.unflatten(0, (nc, -1))).requires_grad_() for k, v in features(noise).items()}
    f_real = {k: own(v.unflatten(0, (nc, -1))) for k, v in features(x_real).items()}
f_pos = {k: v[:, :args.n_pos] for k, v in f_real.items()}
f_unc = {k: v[:, args.n_pos:] for k, v in f_real.items()}
w_unc = drift.cfg_weight(alpha, args.n_neg, args.n_unc)[:, None].expand(nc, args.n_unc)


def drift_loss_fwd_bwd():
    for v in f_gen.values():
        v.grad = None
    loss, _ = drift.feature_drift_loss(f_gen, f_pos, f_unc, w_unc)
    loss.backward()


def optimizer_clip_ema():
    torch.nn.utils.clip_grad_norm_(gen.parameters(), 2.0)
    opt.step()
    torch._foreach_lerp_(ema, list(gen.parameters()), 0.001)


# FLOPs: matmuls only (2 x MACs). The drift loss: per feature set (G groups of L locations x classes,
# D dims, N_neg gen against N_neg + N_unc + N_pos targets) one distance matmul plus one force matmul
# per temperature.
F_gen, F_enc = gen.flops_per_sample(), enc.flops_per_sample()
F_enc += cnx.flops_per_sample(gen.input_size) if cnx is not None else 0
flops = {"generator fwd+bwd (3x)": 3 * n_gen * F_gen, "encoder on real, fwd": n_real * F_enc,
         "encoder on gen, fwd+bwd to input (2x)": 2 * n_gen * F_enc}
n_targets = args.n_neg + args.n_unc + args.n_pos
flops["drift loss (not in MFU)"] = sum(2 * v.shape[0] * v.shape[2] * args.n_neg * n_targets * v.shape[3] * 4
                                       for v in f_gen.values())
model_flops = sum(v for k, v in flops.items() if "not in MFU" not in k)

phases = {"generator fwd+bwd (3x)": generator_fwd_bwd, "encoder on real, fwd": encoder_real,
          "encoder on gen, fwd+bwd to input (2x)": encoder_gen_fwd_bwd_to_input,
          "drift loss (not in MFU)": drift_loss_fwd_bwd, "optimizer + clip + EMA": optimizer_clip_ema}
name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
extra = " + ConvNeXt-V2-B" if cnx is not None else ""
print(f"{name}: {args.model} generator + MAE {args.encoder}{extra}, {nc} classes x ({args.n_neg} gen, "
      f"{args.n_pos} pos, {args.n_unc} unc) = {n_gen} generated, {n_real} real samples; compile {use_compile}, "
      f"CUDA graphs {args.cudagraphs}", flush=True)
if use_compile:
    print("compiling the whole step first (several minutes on a fresh machine: nothing prints until then)", flush=True)
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
step_time, step_host = timed(train_step)
memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"
peak = peak_flops(device)
mfu = f"{100 * model_flops / step_time / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16 dense" if peak else "n/a"
print(f"whole step: {1e3 * step_time:.1f} ms (host {1e3 * step_host:.1f} ms), {n_gen / step_time:.0f} generated "
      f"img/s per GPU | MFU {mfu} | peak memory {memory}", flush=True)  # first: the parts may run out of time
if args.profile:  # where a step's time goes: GPU kernels by total time, and the host time of the ops
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            train_step()
        sync()
    by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=by, row_limit=25, max_name_column_width=60))

if args.bound:  # the step if its Triton kernels moved their bytes as fast as a plain add; the others as they run
    a = torch.empty(2**29, dtype=torch.bfloat16, device=device)
    b, c = torch.empty_like(a), torch.empty_like(a)
    bandwidth = 3 * a.nbytes / timed(lambda: torch.add(a, b, out=c))[0]  # bytes/s
    del a, b, c
    triton_gb[0] = 0.0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            train_step()
        sync()
    kinds = collections.Counter()  # ms a step
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            n = e.name.lower()
            # model.py's Triton attention (_attn_kernel) and cuDNN attention's own pre- and post-kernels
            # (cudnn::fusion::...) count as attention, not as Triton's elementwise kernels or convs
            attention = any(k in n for k in ("_attn_kernel", "sdpa", "fmha", "flash", "cudnn::fusion"))
            kinds["Triton" if n.startswith("triton_") else "attention" if attention
                  else "matmul, conv" if any(k in n for k in ("gemm", "nvjet", "xmma", "conv", "cutlass"))
                  else "other"] += e.device_time_total / 3e3
    gb = triton_gb[0] / 3
    bound = sum(kinds.values()) - kinds["Triton"] + gb * 1e12 / bandwidth  # ms
    print("kernels a step: " + ", ".join(f"{k} {v:.1f} ms" for k, v in kinds.most_common()) +
          f"; the Triton kernels move {gb:.1f} GB ({gb / kinds['Triton']:.2f} TB/s)")
    print(f"at {bandwidth / 1e12:.2f} TB/s (a 1 GiB bf16 add) they would take {gb * 1e12 / bandwidth:.1f} ms: the step "
          f"{bound:.1f} ms" + (f", MFU {100 * model_flops / (bound / 1e3) / peak:.1f}%" if peak else ""), flush=True)
    if peak:  # the target against what the matmuls, convolutions and attention take as they run
        print(f"55% MFU needs the step in {model_flops / (0.55 * peak) * 1e3:.1f} ms; its matmuls, convolutions and "
              f"attention alone take {kinds['matmul, conv'] + kinds['attention']:.1f} ms", flush=True)

# Then each part alone, a row printed as soon as it is timed (each part compiles graphs of its own first).
print(f"{'part':40s} {'GFLOP':>10s} {'ms':>9s} {'TFLOP/s':>9s} {'host ms':>9s}", flush=True)
times = {}
for part, fn in phases.items():
    t, host = timed(fn)
    times[part], f = t, flops.get(part, 0)
    print(f"{part:40s} {f / 1e9:10.1f} {1e3 * t:9.2f} {f / t / 1e12:9.1f} {1e3 * host:9.2f}", flush=True)
print(f"{'sum of parts':40s} {'':10s} {1e3 * sum(times.values()):9.2f}")
print(f"{'whole step':40s} {model_flops / 1e9:10.1f} {1e3 * step_time:9.2f} {model_flops / step_time / 1e12:9.1f} "
      f"{1e3 * step_host:9.2f}")
print(f"{n_gen / step_time:.0f} generated img/s per GPU | MFU {mfu} | peak memory {memory}")
