"""
Time the drifting loss at the ablation shape per GPU, next to the feature encoder it rides on.

    python bench_drift.py            # latent ResNet-MAE width 256 on 32x32x4; 8 classes x (64 gen, 64 pos, 16 unc)
    python bench_drift.py --small    # CPU smoke run with the tiny encoder

Each row is the median over --iters calls after --warmup untimed ones (compilation), timed with CUDA events;
'host ms' is how long Python took to issue the work (when it nears 'ms', the row is launch bound).
  encoder  activations of the Nc*Ng generated latents, forward + backward to the input, and of the
           Nc*(Np+Nn) real ones, forward only; bf16 autocast, channels_last, torch.compile with --compile.
  sets + drift  from fixed encoder maps: drift.feature_sets of the generated and real maps (plus norm_x and the
           raw output, as train.py) and drift.feature_drift_loss over every set, 3 temperatures, forward +
           backward to the generated maps, all eager.
  drift    drift.feature_drift_loss alone, forward + backward, from fixed sets: what train.py runs after its
           compiled encoder-and-feature-sets function, eager and (with --compile) through drift.compile_drift.
  memory   the per-location set of a 32x32 and of an 8x8 map (C = 256) alone: the peak memory per location
           stays flat, far below one (G, Ng, Nt, D) float32 difference tensor, printed for comparison.
Per-GPU batch: the official ablation (configs/gen/latent_ablation.yaml) draws 64 classes per step over 8
devices, so 8 per GPU. --nc 64 puts the whole step on one GPU; its feature sets alone take ~63 GB (bf16 per location).
"""
import argparse
import statistics
import time

import torch

import drift
from model import MAE_models

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--encoder", default="latent_256", help="MAE_models key")
parser.add_argument("--nc", type=int, default=8, help="classes on this GPU")
parser.add_argument("--n_gen", type=int, default=64, help="generated samples per class")
parser.add_argument("--n_pos", type=int, default=64, help="positives per class")
parser.add_argument("--n_unc", type=int, default=16, help="unconditional negatives per class")
parser.add_argument("--iters", type=int, default=10, help="timed calls per row")
parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation)")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
parser.add_argument("--small", action="store_true", help="tiny encoder and batch on the CPU, a smoke run")
parser.add_argument("--profile", action="store_true", help="then profile 3 drift loss calls: the top kernels")
args = parser.parse_args()
if not (args.small or torch.cuda.is_available()):
    parser.error("no GPU: this benchmark times GPUs at full size (--small: a CPU smoke run)")
if args.small:
    args.encoder, args.nc, args.n_gen, args.n_pos, args.n_unc, args.iters, args.warmup = "tiny", 2, 4, 4, 2, 2, 1

device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
cuda = device.type == "cuda"
use_compile = cuda if args.compile is None else args.compile
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
torch.backends.cudnn.benchmark = True
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
torch.manual_seed(0)


def timed(fn):
    """(median ms, median host ms, peak GiB above what was allocated before) of fn()."""
    for _ in range(args.warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    times, host = [], []
    for _ in range(args.iters):
        t = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            host.append(1e3 * (time.perf_counter() - t))
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            fn()
            times.append(1e3 * (time.perf_counter() - t))
            host.append(times[-1])
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    return statistics.median(times), statistics.median(host), peak


# ---- encoder: forward + backward to the input on the generated batch, forward on the real one ----
nc, n_gen, n_real = args.nc, args.nc * args.n_gen, args.nc * (args.n_pos + args.n_unc)
enc = MAE_models[args.encoder](in_channels=4).to(device).eval().requires_grad_(False)
enc = enc.to(memory_format=torch.channels_last)
activations = torch.compile(enc.activations) if use_compile else enc.activations
x_gen = torch.randn(n_gen, 4, 32, 32, device=device).to(memory_format=torch.channels_last).requires_grad_()
x_real = torch.randn(n_real, 4, 32, 32, device=device).to(memory_format=torch.channels_last)


def encoder_step():
    x_gen.grad = None
    with autocast:
        maps = activations(x_gen)
    sum(m.mean() for m in maps.values()).backward()  # gradient to the input only (frozen weights)
    with torch.no_grad(), autocast:
        activations(x_real)


# ---- drift: feature sets and the loss over all of them, from fixed maps ----
with torch.no_grad(), autocast:
    gen_maps = {k: v.requires_grad_() for k, v in enc.activations(x_gen).items()}  # bf16, channels_last
    real_maps = enc.activations(x_real)
raw_gen = x_gen.detach().clone().requires_grad_()  # the generator output: 'global' and 'norm_x' sets
alpha = drift.sample_alpha(nc, 3.0, generator=torch.Generator().manual_seed(0)).to(device)
w_unc = drift.cfg_weight(alpha, args.n_gen, args.n_unc)[:, None].expand(nc, args.n_unc)  # (Nc, Nn)


def loss_from_sets(gen, real):
    gen = {k: v.unflatten(0, (nc, -1)) for k, v in gen.items()}  # (Nc, Ng, L, C)
    real = {k: v.unflatten(0, (nc, -1)) for k, v in real.items()}  # (Nc, Np + Nn, L, C)
    pos = {k: v[:, :args.n_pos] for k, v in real.items()}
    unc = {k: v[:, args.n_pos:] for k, v in real.items()}
    loss, _ = drift.feature_drift_loss(gen, pos, unc, w_unc)
    loss.backward()


def build_sets():
    """The feature sets of the generated maps (with autograd) and of the real ones (without), as train.py."""
    gen = drift.feature_sets(gen_maps, enc.input_patchified(raw_gen), raw=raw_gen)
    with torch.no_grad():
        real = drift.feature_sets(real_maps, enc.input_patchified(x_real), raw=x_real)
    return gen, real


def sets_and_drift_step():
    for t in (raw_gen, *gen_maps.values()):
        t.grad = None
    loss_from_sets(*build_sets())


with torch.no_grad():  # fixed sets, the generated ones as leaves that take the gradient
    fixed_gen, fixed_real = build_sets()
    fixed_gen = {k: v.detach().requires_grad_() for k, v in fixed_gen.items()}


def drift_step():
    for t in fixed_gen.values():
        t.grad = None
    loss_from_sets(fixed_gen, fixed_real)


sets = drift.feature_sets({k: v[:1] for k, v in gen_maps.items()}, x_gen[:1], raw=x_gen[:1])
largest = max(sets, key=lambda k: sets[k].shape[1] * sets[k].shape[2])
name = torch.cuda.get_device_name() if cuda else "CPU"
print(f"{name}, torch {torch.__version__}: MAE {args.encoder}, {nc} classes x ({args.n_gen} gen, {args.n_pos} pos, "
      f"{args.n_unc} unc); "
      f"{len(sets)} feature sets, {sum(v[0].numel() for v in sets.values()) / 1e6:.2f}M floats per sample; "
      f"largest {largest} {tuple(sets[largest].shape[1:])}: G = {nc * sets[largest].shape[1]} groups of "
      f"{args.n_gen} x {args.n_gen + args.n_unc + args.n_pos}; compile {use_compile}")
rows = {"encoder fwd+bwd (gen) + fwd (real)": timed(encoder_step),
        "feature sets + drift loss, eager": timed(sets_and_drift_step), "drift loss alone, eager": timed(drift_step)}
if use_compile:  # as train.py on GPUs; the profile and the memory rows below then run compiled too
    drift.compile_drift()
    rows["drift loss alone, compiled"] = timed(drift_step)
print(f"{'part':40s} {'ms':>9s} {'host ms':>9s} {'peak GiB':>9s}")
for part, (ms, host, peak) in rows.items():
    print(f"{part:40s} {ms:9.2f} {host:9.2f} {peak:9.2f}")
encoder_ms = rows["encoder fwd+bwd (gen) + fwd (real)"][0]
for part, (ms, _, _) in list(rows.items())[1:]:
    print(f"{part}: drift / (encoder + drift) = {100 * ms / (encoder_ms + ms):.1f}%")

if args.profile:  # where the drift's time goes: kernels (or CPU ops) by total time
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            drift_step()
        if cuda:
            torch.cuda.synchronize()
    by = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=by, row_limit=25, max_name_column_width=60))

# ---- memory against the number of locations: one per-location set (C = 256) alone ----
print(f"\n{'per-location set':18s} {'L':>5s} {'G':>6s} {'ms':>8s} {'peak MiB':>9s} {'MiB / loc':>9s} "
      f"{'(G,Ng,Nt,D) GiB':>16s}")
n_t, C = args.n_gen + args.n_pos + args.n_unc, 256
for side in (32, 8):
    L = side * side
    g = torch.randn(nc, args.n_gen, L, C, device=device, requires_grad=True)
    p, u = torch.randn(nc, args.n_pos, L, C, device=device), torch.randn(nc, args.n_unc, L, C, device=device)

    def one_set():
        g.grad = None
        drift.feature_drift_loss({"f": g}, {"f": p}, {"f": u}, w_unc)[0].backward()
    ms, _, peak = timed(one_set)
    naive = nc * L * args.n_gen * n_t * C * 4 / 2**30
    print(f"{f'{side}x{side} map':18s} {L:5d} {nc * L:6d} {ms:8.2f} {peak * 1024:9.1f} {peak * 1024 / L:9.3f} "
          f"{naive:16.1f}")
