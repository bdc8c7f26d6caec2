"""Tests of data.py on the CPU: the sample queues, the ImageNet caches of prepare_imagenet.py, the downloader, the
MAE's random crops."""
import math
import os
import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from data import Data, SampleQueue, crop_boxes, download_file, random_resized_crop


def test_queue_draw_has_no_duplicates_and_stays_in_class():
    # each row of a draw is n distinct items, all of the drawn class
    q = SampleQueue(3, 8, "cpu")
    ids = torch.arange(24)
    q.push(ids, ids % 3)
    rows, _ = q.draw(torch.tensor([0, 1, 2, 2]), 8, torch.Generator().manual_seed(0))
    assert all(len(set(r.tolist())) == 8 and set(r.remainder(3).tolist()) == {c} for r, c in zip(rows, [0, 1, 2, 2]))


def test_queue_evicts_oldest_first():
    # after 21 pushes into a queue of 8 (one push larger than the queue), it holds exactly the newest 8
    q = SampleQueue(1, 8, "cpu")
    for chunk in (torch.arange(0, 3), torch.arange(3, 15), torch.arange(15, 21)):
        q.push(chunk, torch.zeros_like(chunk))
    assert sorted(q.draw(torch.tensor([0]), 8, torch.Generator())[0][0].tolist()) == list(range(13, 21))


def test_queue_draws_only_filled_slots():
    # a queue holding 3 items draws exactly those 3
    q = SampleQueue(2, 8, "cpu")
    q.push(torch.tensor([5, 6, 7]), torch.tensor([1, 1, 1]))
    assert sorted(q.draw(torch.tensor([1]), 3, torch.Generator())[0][0].tolist()) == [5, 6, 7]


def test_queue_extra_travels_with_its_id():
    # each id comes out of a draw with the floats it was pushed with, through class sorting and eviction
    q = SampleQueue(2, 4, "cpu", extra=2)
    for chunk in (torch.arange(0, 6), torch.arange(6, 15)):
        q.push(chunk, chunk % 2, torch.stack([chunk.float(), -chunk.float()], 1))
    ids, extra = q.draw(torch.tensor([0, 1]), 4, torch.Generator().manual_seed(0))
    assert sorted(ids[1].tolist()) == [7, 9, 11, 13] and torch.equal(extra, torch.stack([ids, -ids], 2).float())


def test_queue_state_of_another_size_is_one_clear_error():
    # a resume with another --queue_size (or data of other classes) stops instead of mixing the two layouts
    saved = SampleQueue(2, 4, "cpu").state_dict()
    SampleQueue(2, 4, "cpu").load_state_dict(saved)
    for other in (SampleQueue(2, 8, "cpu"), SampleQueue(3, 4, "cpu"), SampleQueue(2, 4, "cpu", extra=4)):
        with pytest.raises(ValueError, match="--queue_size"):
            other.load_state_dict(saved)


def test_cifar100_or_cut_batches_are_one_clear_error(tmp_path):
    # CIFAR-100's python files (fine_labels, not labels) or a cut file are named, not a KeyError or pickle error
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="data_batch_1: not a CIFAR-10 python batch"):
        Data("cifar10", str(tmp_path), "train", "cpu")
    (tmp_path / "test_batch").write_bytes((tmp_path / "test_batch").read_bytes()[:20])
    with pytest.raises(ValueError, match="test_batch: not a CIFAR-10 python batch"):
        Data("cifar10", str(tmp_path), "test", "cpu")


def test_latent_cache_fetch_picks_flip(tmp_path):
    # item 2i is image i's cached latent, item 2i+1 its flip's, as stored (no sampling at fetch)
    latents = np.random.default_rng(0).standard_normal((3, 2, 4, 32, 32)).astype(np.float16)
    np.save(tmp_path / "train_latents.npy", latents)
    np.save(tmp_path / "train_labels.npy", np.array([0, 1, 2]))
    data = Data("imagenet", str(tmp_path), "train", "cpu")
    x = data.fetch(torch.tensor([0, 3, 3]))  # image 0 as is, image 1 flipped, twice
    assert data.shape == (4, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.from_numpy(latents[0, 0]).float())
    assert torch.equal(x[1], torch.from_numpy(latents[1, 1]).float()) and torch.equal(x[1], x[2])


def test_pixel_cache_fetch_flips(tmp_path):
    # item id 2i+1 is image i mirrored left-right, scaled to [-1, 1]
    pixels = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    np.save(tmp_path / "train_pixels.npy", pixels)
    np.save(tmp_path / "train_labels.npy", np.array([0, 1]))
    data = Data("imagenet_pixels", str(tmp_path), "train", "cpu")
    x, x_flip = data.fetch(torch.tensor([2, 3]))
    assert torch.equal(x_flip, x.flip(-1)) and x.min() >= -1 and x.max() <= 1 and x.shape == (3, 256, 256)


def test_cifar10_batches_decode_to_red_green_blue_planes(tmp_path):
    # the official python batches store each image as 3072 bytes: the 32x32 red plane, then green, then blue
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = {f: rng.integers(0, 256, (4, 3072), dtype=np.uint8) for f in [f"data_batch_{i}" for i in range(1, 6)]}
    for f, data in rows.items():
        (folder / f).write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1, 2, 9]}))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": rows["data_batch_1"], b"labels": [0, 1, 2, 9]}))
    data = Data("cifar10", str(tmp_path), "train", "cpu")
    first = rows["data_batch_1"][1]
    assert len(data) == 20 and data.num_classes == 10 and data.shape == (3, 32, 32)
    assert np.array_equal(data.uint8_images()[1, 3, 5], first[[3 * 32 + 5, 1024 + 3 * 32 + 5, 2048 + 3 * 32 + 5]])


def test_failed_download_leaves_nothing_and_names_the_fix(tmp_path, monkeypatch):
    # a transfer that dies half way: RuntimeError with the url and the hint, no partial file, no cached file
    def dies(url, path):
        open(path, "wb").write(b"half")
        raise urllib.error.URLError("connection reset")
    monkeypatch.setattr(urllib.request, "urlretrieve", dies)
    with pytest.raises(RuntimeError, match="http://x/f.bin.*copy it by hand"):
        download_file("http://x/f.bin", str(tmp_path / "f.bin"), "copy it by hand")
    assert os.listdir(tmp_path) == []


def torchvision_crop_area(rng, min_area, side=256):
    """Area fraction of one crop of torchvision's RandomResizedCrop.get_params on a side x side image."""
    for _ in range(10):
        target = side * side * rng.uniform(min_area, 1)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= side and 0 < h <= side:
            return w * h / side ** 2
    return 1.0


def test_crop_areas_follow_torchvision():
    # draws that do not fit are drawn again, not clamped: the mean area is torchvision's (clamping gave 0.593)
    rng = np.random.default_rng(0)
    reference = np.mean([torchvision_crop_area(rng, 0.2) for _ in range(20000)])
    w, h, cx, cy = crop_boxes(200000, 0.2, torch.Generator().manual_seed(0))
    assert abs((w * h).mean().item() - reference) < 0.006
    assert (cx - w / 2 >= 0).all() and (cx + w / 2 <= 1).all() and (cy - h / 2 >= 0).all() and (cy + h / 2 <= 1).all()


def test_random_resized_crop_keeps_shape_and_uint8_levels():
    # a batch of images in [-1, 1] comes back the same shape, on the 256 uint8 levels of [-1, 1] (PIL's crops are
    # uint8) after the bicubic resampling
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    y = random_resized_crop(x, 0.2, torch.Generator().manual_seed(0))
    levels = (y + 1) * 127.5
    assert y.shape == x.shape and levels.min() >= 0 and levels.max() <= 255 and not torch.equal(y, x)
    assert torch.allclose(levels, levels.round(), atol=1e-4)
