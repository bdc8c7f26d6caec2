"""Tests of train.py on the CPU: tiny models, tiny synthetic data written as real Fashion-MNIST IDX files."""
import gzip
import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from convnext import ConvNeXtV2
from data import resized_crop
from model import DiT_models
from vae import AutoencoderKL

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_GEN = ["--stage", "gen", "--dataset", "fmnist", "--model", "T/2", "--nc", "2", "--n_pos", "4", "--n_neg", "4",
            "--n_unc", "2", "--warmup", "2", "--log_every", "1", "--sample_every", "0", "--ckpt_every", "2"]


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    """20 train and 5 test images per class, each class a different brightness."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 50)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28)) + 15 * labels[:, None, None]
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return str(root)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny CPU models: a second thread only fights the other processes on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mae_ckpt(fmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("mae")
    train.main(["--stage", "mae", "--dataset", "fmnist", "--data", fmnist, "--model", "tiny", "--steps", "2",
                "--batch_size", "8", "--warmup", "1", "--log_every", "1", "--out", str(out)])
    return str(out / "ckpt.pt")


def run_gen(fmnist, mae_ckpt, out, *extra):
    return train.main([*TINY_GEN, "--data", fmnist, "--encoder", mae_ckpt, "--out", str(out), *extra])


def file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_preset_sets_defaults_and_flags_win():
    # a preset replaces the stage defaults, and an explicit flag replaces the preset
    args = train.get_args(["--stage", "gen", "--preset", "fmnist", "--lr", "1e-3"])
    assert (args.model, args.nc, args.encoder, args.lr) == ("S/2", 10, "runs/fmnist_mae/ckpt.pt", 1e-3)
    assert train.get_args(["--preset", "fmnist"]).cudagraphs  # the preset's CUDA graphs, and a flag that undoes them
    assert not train.get_args(["--preset", "fmnist", "--no-cudagraphs"]).cudagraphs


def test_remat_flag_alone_recomputes_every_block_and_with_k_the_first_k():
    # --remat (the official use_remat) and --remat K reach the model as a block count
    counts = [DiT_models["B/2"](remat=train.get_args(flags).remat).remat
              for flags in ([], ["--remat"], ["--remat", "8"])]
    assert counts == [0, 12, 8]


def test_memory_budget_saves_fewer_bytes_for_the_same_gradients():
    # train.memory_budget(0.9) around the compiled generator's first call (inductor on the CPU): its forward saves
    # fewer bytes for the backward, which recomputes the rest, and the gradients match the eager model's
    torch.manual_seed(0)
    gen = DiT_models["T/2"]()
    torch.nn.init.normal_(gen.final_layer.linear.weight)  # adaLN-zero starts at f = 0, where every gradient is 0
    noise, style = gen.draw_inputs(range(8))
    inputs = (noise, torch.arange(8) % 10, torch.full((8,), 2.0), style)
    grads, saved = [], []
    for compiled, budget in [(False, 1.0), (True, 1.0), (True, 0.9)]:
        torch._dynamo.reset()  # a new compile, not the last one's graph
        fn, nbytes = torch.compile(gen, dynamic=False) if compiled else gen, []
        with train.memory_budget(budget), torch.autograd.graph.saved_tensors_hooks(
                lambda t: nbytes.append(t.nbytes) or t, lambda t: t):
            out = fn(*inputs)
        grads.append(torch.autograd.grad(out.square().mean(), list(gen.parameters())))
        saved.append(sum(nbytes))
    assert saved[2] < 0.9 * saved[1]
    for g_eager, g_budget in zip(grads[0], grads[2]):
        torch.testing.assert_close(g_budget, g_eager, rtol=1e-4, atol=1e-6)


def test_memory_budget_needs_compile(fmnist, tmp_path):
    # on the CPU train.py does not compile, so a budget could do nothing: one message instead
    with pytest.raises(ValueError, match="--memory_budget acts through torch.compile"):
        run_gen(fmnist, "none", tmp_path, "--memory_budget", "0.9")


def test_compile_options_are_inductor_settings():
    # train.py calls torch.compile, which checks its options, only on GPUs: a renamed setting must fail here
    assert set(train.FEATURE_COMPILE) | set(train.GEN_COMPILE) <= set(torch._inductor.list_options())


def test_mae_stage_writes_checkpoint(mae_ckpt):
    # a few MAE steps leave a stage-mae checkpoint with finite EMA weights
    ckpt = torch.load(mae_ckpt, weights_only=True)
    assert ckpt["args"]["stage"] == "mae" and ckpt["step"] == 2
    assert all(v.isfinite().all() for v in ckpt["ema"][0.9995].values())


def test_gen_stage_writes_grid(fmnist, mae_ckpt, tmp_path):
    # a few generator steps write a checkpoint and a sample grid
    run_gen(fmnist, mae_ckpt, tmp_path, "--steps", "2", "--sample_every", "2")
    assert os.path.exists(tmp_path / "ckpt.pt") and os.path.exists(tmp_path / "grid_000002.png")


def test_minutes_ends_the_run_early_with_checkpoint_and_grid(fmnist, mae_ckpt, tmp_path):
    # --minutes 0.0001 is over at the first log step: the run ends there as it would at --steps
    run_gen(fmnist, mae_ckpt, tmp_path, "--steps", "50", "--minutes", "0.0001", "--sample_every", "25")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1
    assert os.path.exists(tmp_path / "grid_000001.png")


def test_minutes_says_when_the_mae_stops_before_its_fine_tune(fmnist, tmp_path, capsys):
    train.main(["--stage", "mae", "--dataset", "fmnist", "--data", fmnist, "--model", "tiny", "--steps", "50",
                "--batch_size", "8", "--cls_steps", "10", "--minutes", "0.0001", "--out", str(tmp_path)])
    assert "without the classification fine-tune (from step 40)" in capsys.readouterr().out


def test_cooldown_decays_lr_linearly_over_the_last_steps(fmnist, mae_ckpt, tmp_path, capsys):
    run_gen(fmnist, mae_ckpt, tmp_path, "--steps", "4", "--warmup", "1", "--lr", "1e-3", "--cooldown", "2")
    lrs = [float(ln.split("| lr ")[1].split()[0]) for ln in capsys.readouterr().out.splitlines() if "| lr " in ln]
    assert lrs == [1e-6, 1e-3, 1e-3, 5e-4]  # the official warmup's first update at 1e-6


def test_resume_is_exact(fmnist, mae_ckpt, tmp_path):
    # 4 steps straight equal 2 steps + resume + 2 steps, bit for bit (weights, EMA, queue)
    straight = run_gen(fmnist, mae_ckpt, tmp_path / "a", "--steps", "4", "--ckpt_every", "4")
    run_gen(fmnist, mae_ckpt, tmp_path / "b", "--steps", "2")
    resumed = run_gen(fmnist, mae_ckpt, tmp_path / "b", "--steps", "4", "--resume", str(tmp_path / "b" / "ckpt.pt"))
    assert all(torch.equal(p, q) for p, q in zip(straight.state_dict().values(), resumed.state_dict().values()))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["ema"][0.999][k], b["ema"][0.999][k]) for k in a["ema"][0.999])
    assert torch.equal(a["queue"]["class"]["ids"], b["queue"]["class"]["ids"])


def test_two_process_gloo_run_stays_in_sync(fmnist, mae_ckpt, tmp_path):
    # under torchrun with 2 CPU processes, both ranks end with identical parameters
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "train.py"), *TINY_GEN, "--data", fmnist, "--encoder", mae_ckpt, "--out", str(tmp_path),
           "--steps", "2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "identical on all 2 processes: True" in result.stdout, result.stdout + result.stderr


def test_latent_cache_trains(tmp_path):
    # the generator stage runs on a (random) latent cache laid out as prepare_imagenet.py writes it
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train_latents.npy", rng.standard_normal((40, 2, 4, 32, 32)).astype(np.float16))
    np.save(tmp_path / "train_labels.npy", np.arange(40) % 4)
    model = train.main([*TINY_GEN, "--dataset", "imagenet", "--data", str(tmp_path), "--encoder", "none",
                        "--out", str(tmp_path / "run"), "--steps", "1"])
    assert model.in_channels == 4 and all(p.isfinite().all() for p in model.parameters())


def test_latent_mae_encodes_crops_of_the_images(tmp_path, monkeypatch):
    # paper A.3 (the official latent MAE configs: use_aug, no cache): the MAE on latents sees SD-VAE latents of random
    # crops of the images (a small random VAE here); without the pixel cache, one clear error, and
    # --crop_min 1 trains on the cached latents alone
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train_latents.npy", rng.standard_normal((8, 2, 4, 32, 32)).astype(np.float16))
    np.save(tmp_path / "train_labels.npy", np.arange(8) % 2)
    mae = ["--stage", "mae", "--dataset", "imagenet", "--data", str(tmp_path), "--model", "tiny", "--steps", "1",
           "--batch_size", "4", "--out", str(tmp_path / "mae")]
    with pytest.raises(ValueError, match="prepare_imagenet.py --pixels"):
        train.main(mae)
    train.main([*mae, "--crop_min", "1"])
    np.save(tmp_path / "train_pixels.npy", rng.integers(0, 256, (8, 256, 256, 3), dtype=np.uint8))
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    seen = []
    monkeypatch.setattr(vae, "encode", lambda x: seen.append(x.shape) or AutoencoderKL.encode(vae, x))
    monkeypatch.setattr(train, "load_vae", lambda path: vae)
    model = train.main([*mae, "--out", str(tmp_path / "mae_crops")])
    assert seen == [(4, 3, 256, 256)] and all(p.isfinite().all() for p in model.parameters())


def test_pixel_run_with_convnext_trains(tmp_path, monkeypatch):
    # pixel space (Table 8): a patch-16 generator on 256x256 RGB drifts on MAE and ConvNeXt-V2 features;
    # a small random ConvNeXt-V2 stands in for the pretrained one (no download here)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train_pixels.npy", rng.integers(0, 256, (8, 256, 256, 3), dtype=np.uint8))
    np.save(tmp_path / "train_labels.npy", np.arange(8) % 2)
    small = ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), resolution=64).eval().requires_grad_(False)
    monkeypatch.setattr(train, "load_convnext_v2", lambda name, path: small)
    mae = train.main(["--stage", "mae", "--dataset", "imagenet_pixels", "--data", str(tmp_path), "--model", "tiny",
                      "--steps", "1", "--batch_size", "4", "--out", str(tmp_path / "mae")])
    assert mae.input_patch_size == 8
    seen = []  # the reals are random-resized crops, as the official pixel configs' (use_aug), of boxes drawn at push
    crop = lambda x, *box: seen.append((x.shape, box)) or resized_crop(x, *box)  # noqa: E731
    monkeypatch.setattr(train, "resized_crop", crop)
    model = train.main([*TINY_GEN, "--dataset", "imagenet_pixels", "--data", str(tmp_path), "--model", "T/16",
                        "--encoder", str(tmp_path / "mae" / "ckpt.pt"), "--convnext", "base",
                        "--out", str(tmp_path / "run"), "--steps", "2"])
    assert model.patch_size == 16 and all(p.isfinite().all() for p in model.parameters())
    assert [x for x, _ in seen] == [(2 * (4 + 2), 3, 256, 256)] * 2  # 2 classes x (4 positives + 2 unc), 2 steps
    w, h = torch.stack([torch.stack(box) for _, box in seen]).unbind(1)[:2]  # crop_boxes' draws: area in [0.2, 1]
    assert ((w * h > 0.2 - 1e-6) & (w * h <= 1)).all() and (w * h < 1).any()


def test_missing_data_is_one_clear_error(tmp_path):
    # a data folder without the CIFAR-10 batches names what it expected
    with pytest.raises(ValueError, match="CIFAR-10 python batches"):
        train.main(["--stage", "mae", "--dataset", "cifar10", "--data", str(tmp_path), "--out", str(tmp_path)])


def test_wrong_data_files_are_one_clear_error(tmp_path):
    # files with the Fashion-MNIST names but not IDX content are rejected as such
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            with gzip.open(tmp_path / f"{split}-{kind}-ubyte.gz", "wb") as f:
                f.write(b"<html>not found</html>")
    with pytest.raises(ValueError, match="not a whole gzipped IDX ubyte file"):
        train.main(["--stage", "mae", "--dataset", "fmnist", "--data", str(tmp_path), "--out", str(tmp_path)])


def test_cut_or_uncompressed_data_files_are_one_clear_error(fmnist, tmp_path):
    # a download cut short, or the files unpacked but still named .gz, are rejected as such
    for folder, spoil in (("cut", lambda b: b[:len(b) // 2]), ("raw", gzip.decompress)):
        (tmp_path / folder).mkdir()
        for name in os.listdir(fmnist):
            whole = open(os.path.join(fmnist, name), "rb").read()
            (tmp_path / folder / name).write_bytes(spoil(whole) if name.startswith("train") else whole)
    for folder in ("cut", "raw"):
        with pytest.raises(ValueError, match="not a whole gzipped IDX ubyte file"):
            train.main(["--stage", "mae", "--dataset", "fmnist", "--data", str(tmp_path / folder), "--out",
                        str(tmp_path)])


def test_resume_from_other_stage_is_one_clear_error(fmnist, mae_ckpt, tmp_path):
    # resuming a generator run from an MAE checkpoint names both stages
    with pytest.raises(ValueError, match="--stage mae --model tiny checkpoint; this run is --stage gen"):
        run_gen(fmnist, mae_ckpt, tmp_path, "--steps", "2", "--resume", mae_ckpt)


def test_encoder_from_generator_checkpoint_is_one_clear_error(fmnist, mae_ckpt, tmp_path):
    # --encoder must be an MAE checkpoint, not a generator's
    run_gen(fmnist, "none", tmp_path / "g", "--steps", "1")
    with pytest.raises(ValueError, match="expected a checkpoint of --stage mae"):
        run_gen(fmnist, str(tmp_path / "g" / "ckpt.pt"), tmp_path, "--steps", "1")


def test_nan_stops_and_keeps_last_checkpoint(fmnist, mae_ckpt, tmp_path):
    # an infinite learning rate stops the run with one message, and the last good checkpoint is untouched
    run_gen(fmnist, mae_ckpt, tmp_path, "--steps", "2")
    before = file_hash(tmp_path / "ckpt.pt")
    with pytest.raises(FloatingPointError, match="became NaN/inf"):
        run_gen(fmnist, mae_ckpt, tmp_path, "--steps", "4", "--lr", "inf", "--resume", str(tmp_path / "ckpt.pt"))
    assert file_hash(tmp_path / "ckpt.pt") == before


def test_unreadable_fid_weights_stop_the_run_before_training(fmnist, mae_ckpt, tmp_path):
    # a partial download of the Inception weights is one clear error at the start, not after the training steps
    (tmp_path / "incep.pth").write_bytes(b"PK\x03\x04 not the whole file")
    with pytest.raises(ValueError, match="incep.pth: not a readable weights file"):
        run_gen(fmnist, mae_ckpt, tmp_path / "run", "--steps", "2", "--fid_ref", "test",
                "--fid_weights", str(tmp_path / "incep.pth"))
    assert not (tmp_path / "run" / "ckpt.pt").exists()


UNUSABLE = [(["--steps", "-5"], "--steps"), (["--alpha_range", "-1", "0.5"], "--alpha_range"),
            (["--temperatures", "0"], "--temperatures"), (["--log_every", "0"], "--log_every"),
            (["--ema_decays", "1.5"], "--ema_decays"), (["--memory_budget", "0"], "--memory_budget")]


@pytest.mark.parametrize("bad, rule", UNUSABLE)
def test_unusable_arguments_are_one_clear_error(bad, rule, fmnist, tmp_path):
    # values no run can use stop before anything is built, naming the broken rule
    with pytest.raises(ValueError, match=f"bad arguments: .*{rule}"):
        run_gen(fmnist, "none", tmp_path, *bad)
    assert not os.listdir(tmp_path)


def test_resume_on_other_data_is_one_clear_error(fmnist, tmp_path):
    # a generator of 10 Fashion-MNIST classes does not resume on CIFAR-10-shaped data
    run_gen(fmnist, "none", tmp_path / "a", "--steps", "1")
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(cifar / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(range(10)) * 2}, f)
    with pytest.raises(ValueError, match="data of other shape or classes"):
        run_gen(fmnist, "none", tmp_path / "b", "--steps", "2", "--dataset", "cifar10", "--data", str(cifar.parent),
                "--resume", str(tmp_path / "a" / "ckpt.pt"))


def test_fid_reference_of_images_stops_the_run_before_training(fmnist, mae_ckpt, tmp_path):
    # --fid_ref must hold Inception statistics; an npz of images is refused at the start, not after training
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((4, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="images.npz: expected an npz of Inception statistics"):
        run_gen(fmnist, mae_ckpt, tmp_path / "run", "--steps", "2", "--fid_ref", str(tmp_path / "images.npz"))
    assert not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.parametrize("script, row", [("bench_train.py", "whole step"), ("bench_drift.py", "8x8 map"),
                                         ("bench_model.py", "MAE tiny")])
def test_benchmarks_print_their_tables_on_the_cpu(script, row):
    # --small: tiny models on the CPU, so that a change of the APIs they time cannot leave a GPU benchmark broken
    result = subprocess.run([sys.executable, os.path.join(HERE, script), "--small"], cwd=HERE, capture_output=True,
                            text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith(row)]
    assert result.returncode == 0 and lines and any(c.isdigit() for c in lines[-1][len(row):]), \
        result.stdout + result.stderr
