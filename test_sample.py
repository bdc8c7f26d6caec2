"""Tests for vae.py, prepare_imagenet.py and sample.py (CPU, tiny shapes). diffusers (and the safetensors
package it brings) are test-only references, from requirements-test.txt."""

import json
import os

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import prepare_imagenet
import sample
import vae
from data import Data

TINY_VAE = dict(block_out_channels=(32, 64), norm_num_groups=8, latent_channels=4, layers_per_block=2)


def perturbed(module, seed=0, std=0.05):
    """Random non-trivial weights (zero-init layers and GroupNorm affines included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))
    return module


def vae_pair():
    """diffusers' AutoencoderKL and ours, holding the same (perturbed) weights."""
    torch.manual_seed(0)
    blocks = len(TINY_VAE["block_out_channels"])
    ref = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks,
                                  up_block_types=("UpDecoderBlock2D",) * blocks, **TINY_VAE)
    ref = perturbed(ref).eval()
    ours = vae.AutoencoderKL(**TINY_VAE)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def write_safetensors(path, tensors):
    """The format by hand: u64 header size, JSON header, raw little-endian bytes."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().flatten().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + b"".join(blobs))


def save_vae_folder(folder, state, config, fmt="bin"):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", **config}, f)
    path = os.path.join(folder, f"diffusion_pytorch_model.{fmt}")
    torch.save(state, path) if fmt == "bin" else write_safetensors(path, state)
    return folder


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    # One down/up step (factor 2) and one resnet per stage keep prepare/sample tests cheap.
    config = dict(block_out_channels=[16, 32], norm_num_groups=8, latent_channels=4, layers_per_block=1)
    model = perturbed(vae.AutoencoderKL(**config), seed=1)
    return save_vae_folder(str(tmp_path_factory.mktemp("vae")), model.state_dict(), config)


def close(a, b, rel=1e-4):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


# ----------------------------------------------------------------------------- vae.py
def test_vae_encoder_moments_match_diffusers():
    # same weights, same input -> same posterior mean and logvar
    ref, ours = vae_pair()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dist, (mean, logvar) = ref.encode(x).latent_dist, ours.encode(x)
    assert close(mean, dist.mean) and close(logvar, dist.logvar)


def test_vae_decoder_matches_diffusers():
    # same weights, same latent -> same image
    ref, ours = vae_pair()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert close(ours.decode(z), ref.decode(z).sample)


def test_vae_default_is_sd_vae_size():
    # the SD-VAE has 83,653,863 parameters, 49,490,199 of them in the decoder side
    with torch.device("meta"):  # shapes only, no memory or init time
        model = vae.AutoencoderKL()
    count = lambda *mods: sum(p.numel() for m in mods for p in m.parameters())
    assert (count(model), count(model.decoder, model.post_quant_conv)) == (83_653_863, 49_490_199)


def test_safetensors_reader_round_trips_handwritten_file(tmp_path):
    # F32, F16 and BF16 tensors come back bit for bit
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen).half(),
               "c": torch.randn(2, 3, 4, generator=gen).bfloat16(), "d": torch.tensor(2.5)}
    write_safetensors(tmp_path / "t.safetensors", tensors)
    back = vae.read_safetensors(tmp_path / "t.safetensors")
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in tensors.items())


def test_safetensors_reader_reads_package_file(tmp_path):
    # files written by the safetensors package read back bit for bit
    gen = torch.Generator().manual_seed(0)
    tensors = {"x.weight": torch.randn(4, 3, generator=gen), "y": torch.randn(5, generator=gen).half(),
               "z": torch.randn(2, 2, generator=gen).bfloat16()}
    safetensors.torch.save_file(tensors, str(tmp_path / "t.safetensors"))
    back = vae.read_safetensors(tmp_path / "t.safetensors")
    assert all(torch.equal(back[k], t) for k, t in tensors.items())


def test_load_vae_accepts_both_attention_namings(tmp_path):
    # to_q/to_k/to_v/to_out.0 (safetensors) and query/key/value/proj_attn (.bin) give the same model
    model = perturbed(vae.AutoencoderKL(**TINY_VAE))
    new = model.state_dict()
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in new.items():
        for a, b in old_names.items():
            k = k.replace(f"attentions.0.{a}.", f"attentions.0.{b}.")
        old[k] = v
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_VAE.items()}
    a = vae.load_vae(save_vae_folder(str(tmp_path / "new"), new, config, fmt="safetensors"))
    b = vae.load_vae(save_vae_folder(str(tmp_path / "old"), old, config, fmt="bin"))
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(a.decode(z), model.decode(z)) and torch.equal(b.decode(z), model.decode(z))


def test_load_vae_rejects_foreign_state_dict(tmp_path, tiny_vae_dir):
    # a state dict that does not fit the folder's config is a ValueError
    with open(os.path.join(tiny_vae_dir, "config.json")) as f:
        config = json.load(f)
    state = vae.AutoencoderKL(**TINY_VAE).state_dict()  # 2 resnets per stage, the config says 1
    with pytest.raises(ValueError):
        vae.load_vae(save_vae_folder(str(tmp_path / "x"), state, config))


def test_download_caches_once_and_fails_clearly(tmp_path, monkeypatch):
    # the first call copies the URL into CACHE_DIR, the second reuses it; an unreachable URL is a RuntimeError
    source = tmp_path / "remote.safetensors"
    write_safetensors(source, {"w": torch.ones(2)})
    monkeypatch.setattr(vae, "CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(vae, "URLS", {"mse": source.as_uri(), "ema": (tmp_path / "missing").as_uri()})
    path = vae.download("mse")
    source.unlink()
    assert vae.download("mse") == path and torch.equal(vae.read_safetensors(path)["w"], torch.ones(2))
    with pytest.raises(RuntimeError, match="missing"):
        vae.download("ema")


# ----------------------------------------------------------------------------- prepare_imagenet.py
def test_center_crop_takes_the_middle_when_short_side_fits():
    # a 256-high image is not resized: the crop is columns [(300-256)//2, +256)
    arr = np.random.default_rng(0).integers(0, 256, (256, 300, 3), dtype=np.uint8)
    assert np.array_equal(prepare_imagenet.center_crop(Image.fromarray(arr), 256), arr[:, 22:278])


def test_center_crop_halves_with_box_filter():
    # 4x4-constant blocks survive two BOX halvings exactly (1024x1200 -> 256x300), then the center crop
    arr = np.random.default_rng(1).integers(0, 256, (256, 300, 3), dtype=np.uint8)
    big = arr.repeat(4, axis=0).repeat(4, axis=1)
    assert np.array_equal(prepare_imagenet.center_crop(Image.fromarray(big), 256), arr[:, 22:278])


@pytest.fixture
def jpeg_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["n02", "n01"]):  # sorted order gives n01 label 0
        os.makedirs(tmp_path / "data" / "train" / name)
        for j in range(3):
            size = (40 + 8 * j, 36 + 4 * c)
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / "train" / name / f"{j}.JPEG", quality=95)
    return tmp_path


def run_prepare(root, vae_dir, *extra):
    prepare_imagenet.main(["--data_path", str(root / "data"), "--out", str(root / "out"), "--splits", "train",
                           "--image_size", "32", "--vae", vae_dir, "--batch_size", "2", "--num_workers", "0", *extra])


def expected_latents(vae_dir, files):
    model = vae.load_vae(vae_dir)
    crops = np.stack([prepare_imagenet.center_crop(Image.open(f), 32) for f in files])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    eps = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(len(files))])
    out = []
    with torch.no_grad():
        for image in (x, x.flip(3)):
            mean, logvar = model.encode(image)
            out.append((mean + (0.5 * logvar).exp() * eps) * vae.SCALE)
    return torch.stack(out, 1).numpy()  # (N, 2, 4, 16, 16)


def test_prepare_imagenet_writes_documented_layout(jpeg_folder, tiny_vae_dir):
    # latents [N, flip, 4, s, s] float16 of image and flipped image, one posterior sample each with image i's noise
    # from seed i (the same for both flips, as the official cache); labels in sorted-class order
    run_prepare(jpeg_folder, tiny_vae_dir)
    latents = np.load(jpeg_folder / "out" / "train_latents.npy", mmap_mode="r")
    labels = np.load(jpeg_folder / "out" / "train_labels.npy")
    files, _ = prepare_imagenet.image_folder(str(jpeg_folder / "data" / "train"))
    assert latents.dtype == np.float16 and latents.shape == (6, 2, 4, 16, 16)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 0, 1, 1, 1] and "n01" in files[0]
    np.testing.assert_allclose(latents, expected_latents(tiny_vae_dir, files), rtol=2e-3, atol=1e-4)


def test_prepare_imagenet_resume_redoes_only_unfinished_ranges(jpeg_folder, tiny_vae_dir):
    # ranges listed as done are skipped; a range missing from the progress file is recomputed
    run_prepare(jpeg_folder, tiny_vae_dir)
    progress = jpeg_folder / "out" / "train_latents.done0"
    lines = progress.read_text().splitlines()
    assert lines == ["0 2", "2 4", "4 6"]
    progress.write_text("0 2\n4 6\n")  # as if the run had stopped before finishing [2, 4)
    with pytest.raises(ValueError, match="has not finished writing it"):  # training refuses the unfinished cache
        Data("imagenet", str(jpeg_folder / "out"), "train", "cpu")
    latents = np.load(jpeg_folder / "out" / "train_latents.npy", mmap_mode="r+")
    good = np.array(latents[2:4])
    latents[:] = 7.0
    latents.flush()
    run_prepare(jpeg_folder, tiny_vae_dir)
    after = np.load(jpeg_folder / "out" / "train_latents.npy")
    assert (after[:2] == 7).all() and (after[4:] == 7).all() and np.array_equal(after[2:4], good)
    assert len(Data("imagenet", str(jpeg_folder / "out"), "train", "cpu")) == 6


def test_prepare_imagenet_checks_every_split_before_starting(jpeg_folder, tiny_vae_dir):
    # a missing split folder stops the run before the first split is written
    with pytest.raises(ValueError, match="val: no such folder"):
        run_prepare(jpeg_folder, tiny_vae_dir, "--splits", "train,val")
    assert not (jpeg_folder / "out").exists()


def test_prepare_imagenet_pixels_are_center_crops(jpeg_folder, tiny_vae_dir):
    # --pixels stores the uint8 crops, HWC
    run_prepare(jpeg_folder, tiny_vae_dir, "--pixels")
    pixels = np.load(jpeg_folder / "out" / "train_pixels.npy")
    files, _ = prepare_imagenet.image_folder(str(jpeg_folder / "data" / "train"))
    assert np.array_equal(pixels, np.stack([prepare_imagenet.center_crop(Image.open(f), 32) for f in files]))


# ----------------------------------------------------------------------------- sample.py
def tiny_checkpoint(path, in_channels=4):
    # as train.py saves it: vars(args) and one EMA state dict per decay
    args = {"stage": "gen", "model": "T/2", "input_size": 8, "in_channels": in_channels, "num_classes": 10,
            "ema_decays": [0.9, 0.99]}
    raw, ema, ema2 = (perturbed(sample.build_generator(args), seed=s).state_dict() for s in (2, 3, 4))
    torch.save({"model": raw, "ema": {0.9: ema, 0.99: ema2}, "opt": {}, "step": 1, "args": args}, path)
    return str(path)


def run_sample(tmp_path, ckpt, vae_dir, out, *extra):
    sample.main(["--ckpt", ckpt, "--vae", vae_dir, "--out", str(tmp_path / out), "--grid", str(tmp_path / f"{out}.png"),
                 "--grid_size", "4", "--batch_size", "3", *extra])
    return np.load(tmp_path / f"{out}.npz")["arr_0"]


def test_sample_writes_grid_pngs_and_npz(tmp_path, tiny_vae_dir):
    # latent T/2 (8x8x4) through the factor-2 tiny VAE: 16x16 RGB; npz arr_0 uint8 [N, 16, 16, 3]
    images = run_sample(tmp_path, tiny_checkpoint(tmp_path / "c.pt"), tiny_vae_dir, "s", "--num_samples", "5")
    assert images.dtype == np.uint8 and images.shape == (5, 16, 16, 3)
    assert sorted(os.listdir(tmp_path / "s")) == [f"{i:06d}.png" for i in range(5)]
    assert np.asarray(Image.open(tmp_path / "s.png")).shape == (2 + 2 * 18, 2 + 2 * 18, 3)  # 2x2 grid, 2px pad


def test_sample_gray_model_npz_has_three_equal_channels(tmp_path, tiny_vae_dir):
    # 1-channel pixel models: gray PNGs, npz repeated to [N, H, W, 3]
    images = run_sample(tmp_path, tiny_checkpoint(tmp_path / "g.pt", in_channels=1), tiny_vae_dir, "g",
                        "--num_samples", "3")
    assert images.shape == (3, 8, 8, 3) and (images == images[..., :1]).all()


def test_sample_picks_the_requested_weights(tmp_path):
    # default = first EMA decay; --ema 0.99 and --raw load those state dicts
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    saved = torch.load(ckpt, weights_only=True)
    for extra, state in [((), saved["ema"][0.9]), ((0.99, False), saved["ema"][0.99]), ((None, True), saved["model"])]:
        model = sample.load_generator(ckpt, *extra)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_other_seed_other_images_same_seed_same_images(tmp_path, tiny_vae_dir):
    # --seed reaches the noise (it once moved only bits that torch's 32-bit generator seed drops)
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    a, b = (run_sample(tmp_path, ckpt, tiny_vae_dir, f"s{s}", "--num_samples", "3", "--seed", s) for s in "01")
    assert not (a == b).all(axis=(1, 2, 3)).any()  # no image repeats under the other seed
    assert np.array_equal(run_sample(tmp_path, ckpt, tiny_vae_dir, "again", "--num_samples", "3"), a)


def test_draw_inputs_rejects_seeds_beyond_32_bits():
    # torch's CPU generator would silently drop the high bits
    model = sample.build_generator({"model": "T/2", "input_size": 8, "in_channels": 4, "num_classes": 10})
    with pytest.raises(ValueError, match="2\\*\\*32"):
        model.draw_inputs([2**32])


def test_sample_two_ranks_give_the_same_images_as_one(tmp_path, tiny_vae_dir, two_ranks):
    # seeds follow the global index: a 2-process gloo run packs the same npz as a 1-process run
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    one = run_sample(tmp_path, ckpt, tiny_vae_dir, "one", "--num_samples", "7")
    two_ranks(sample.main, ["--ckpt", ckpt, "--vae", tiny_vae_dir, "--out", str(tmp_path / "two"), "--grid", "",
                            "--batch_size", "2", "--num_samples", "7"])
    # the same images, but for the odd value one level off (float sums in another process may round the other way)
    diff = np.abs(np.load(tmp_path / "two.npz")["arr_0"].astype(int) - one)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_make_grid_places_images_row_major():
    # image k lands at row k // cols, column k % cols
    images = np.arange(5, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3) + 1
    grid = sample.make_grid(images, pad=1)
    assert grid.shape == (7, 10, 3) and grid[1, 1, 0] == 1 and grid[1, 4, 0] == 2 and grid[4, 1, 0] == 4


def test_checkpoints_sample_cannot_use_are_one_clear_error(tmp_path):
    # an MAE checkpoint, a truncated file and a missing .pt each stop with one message, no download attempted
    mae = torch.load(tiny_checkpoint(tmp_path / "g.pt"), weights_only=True)
    torch.save({**mae, "args": {**mae["args"], "stage": "mae", "model": "tiny"}}, tmp_path / "mae.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "g.pt").read_bytes()[:1000])
    for name, message in (("mae.pt", "--stage mae checkpoint"), ("cut.pt", "not a train.py checkpoint"),
                          ("nope.pt", "no checkpoint file")):
        with pytest.raises(ValueError, match=message):
            sample.load_generator(str(tmp_path / name))
