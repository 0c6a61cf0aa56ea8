"""Each on-disk format loads from tiny fakes written in the official layouts; broken inputs give
clear errors naming the path and the expected layout."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_fakes import save_jpeg, write_cifar10, write_cifar100, write_tiny

from spacedkd_fast.data import build_data
from spacedkd_fast.data.datasets import (
    DataFormatError,
    UnreadableImageError,
    decode_image,
    load_cifar,
    load_digits_split,
    load_tiny_imagenet,
    scan_image_folder,
)


# ------------------------------------------------------------------------------------ CIFAR
def test_cifar100_loads_with_labels_and_channel_order(tmp_path):
    raw = write_cifar100(tmp_path)
    d = load_cifar(tmp_path, 100, "train")
    data, labels = raw["train"]
    assert d.images.shape == (20, 32, 32, 3) and d.images.dtype == np.uint8
    assert d.labels.tolist() == labels
    # The pickle stores 1024 red, then green, then blue values per image, row-major.
    assert d.images[3, 5, 7, 0] == data[3, 5 * 32 + 7]
    assert d.images[3, 5, 7, 1] == data[3, 1024 + 5 * 32 + 7]
    assert d.images[3, 5, 7, 2] == data[3, 2048 + 5 * 32 + 7]
    assert d.classes[:2] == ["c0", "c1"]
    assert len(load_cifar(tmp_path, 100, "test")) == 10


def test_cifar10_concatenates_five_batches(tmp_path):
    raw = write_cifar10(tmp_path)
    d = load_cifar(tmp_path, 10, "train")
    assert len(d) == 20
    expected = sum((raw[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert d.labels.tolist() == expected
    t = load_cifar(tmp_path, 10, "test")
    assert t.labels.tolist() == raw["test_batch"][1]
    assert d.classes[9] == "k9"


def test_missing_cifar_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar(tmp_path, 100, "train")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        build_data("cifar10", data_dir=str(tmp_path))


def test_corrupt_pickle_is_a_clear_error(tmp_path):
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(DataFormatError, match=r"cifar-100-python/train.*expected layout"):
        load_cifar(tmp_path, 100, "train")


def test_pickle_without_the_expected_keys(tmp_path):
    write_cifar100(tmp_path)
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataFormatError, match="fine_labels"):
        load_cifar(tmp_path, 100, "test")


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(FileNotFoundError, match="download failed.*network unreachable"):
        load_cifar(tmp_path, 100, "train", download=True)


# ------------------------------------------------------------------------------ Tiny-ImageNet
def test_tiny_imagenet_loads_sorted_wnids_and_val_annotations(tmp_path):
    folder = write_tiny(tmp_path)
    tr = load_tiny_imagenet(tmp_path, "train")
    assert tr.classes == ["n01", "n02", "n03"]
    assert tr.images.shape == (9, 64, 64, 3)
    # Files of wnid n02 (class index 1) hold seeds 0..2.
    n02 = np.asarray(Image.open(folder / "train" / "n02" / "images" / "n02_1.JPEG").convert("RGB"))
    pos = [i for i in range(9) if tr.labels[i] == 1]
    assert any(np.array_equal(tr.images[i], n02) for i in pos)
    va = load_tiny_imagenet(tmp_path, "val")
    assert va.labels.tolist() == [1, 0, 2]  # val_0 is n02, val_1 n01, val_2 n03


def test_tiny_imagenet_grayscale_and_cmyk_are_converted(tmp_path):
    folder = write_tiny(tmp_path)
    save_jpeg(folder / "train" / "n01" / "images" / "n01_0.JPEG", mode="L", seed=5)
    save_jpeg(folder / "train" / "n01" / "images" / "n01_1.JPEG", mode="CMYK", seed=6)
    tr = load_tiny_imagenet(tmp_path, "train")
    assert tr.images.shape == (9, 64, 64, 3)
    gray = decode_image(folder / "train" / "n01" / "images" / "n01_0.JPEG")
    assert gray.shape == (64, 64, 3)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_tiny_imagenet_unreadable_jpeg_is_skipped_with_a_warning(tmp_path):
    folder = write_tiny(tmp_path)
    bad = folder / "train" / "n03" / "images" / "n03_2.JPEG"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.warns(UserWarning, match="n03_2.JPEG"):
        tr = load_tiny_imagenet(tmp_path, "train")
    assert len(tr) == 8
    assert (tr.labels == 2).sum() == 2


def test_tiny_imagenet_missing_and_empty_class_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200"):
        load_tiny_imagenet(tmp_path, "train")
    folder = write_tiny(tmp_path)
    for p in (folder / "train" / "n02" / "images").iterdir():
        p.unlink()
    with pytest.raises(DataFormatError, match=r"empty class folder .*n02/images"):
        load_tiny_imagenet(tmp_path, "train")


def test_tiny_imagenet_bad_annotation_line(tmp_path):
    folder = write_tiny(tmp_path)
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataFormatError, match="val_annotations.txt:1"):
        load_tiny_imagenet(tmp_path, "val")


# ---------------------------------------------------------------------------- image folders
def test_image_folder_scans_sorted_classes(tmp_path):
    for c, n in (("zebra", 2), ("ant", 3)):
        for k in range(n):
            save_jpeg(tmp_path / "train" / c / f"{k}.JPEG", seed=k)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    d = scan_image_folder(tmp_path, "train")
    assert d.classes == ["ant", "zebra"]
    assert d.labels.tolist() == [0, 0, 0, 1, 1]
    assert all(p.endswith(".JPEG") for p in d.paths)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train.*<class>"):
        scan_image_folder(tmp_path, "train")
    save_jpeg(tmp_path / "train" / "a" / "0.JPEG")
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(DataFormatError, match=r"empty class folder .*train/b"):
        scan_image_folder(tmp_path, "train")


def test_unreadable_jpeg_names_the_file(tmp_path):
    p = tmp_path / "broken.JPEG"
    p.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(UnreadableImageError, match="broken.JPEG"):
        decode_image(p)


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    p = tmp_path / "cmyk.jpg"
    save_jpeg(p, mode="CMYK", size=(20, 12))
    img = decode_image(p)
    assert img.shape == (12, 20, 3) and img.dtype == np.uint8
    ref = np.asarray(Image.open(p).convert("RGB"))
    assert np.array_equal(img, ref)


# ---------------------------------------------------------------------------------- digits
def test_digits_split_is_deterministic_stratified_and_complete():
    from sklearn.datasets import load_digits

    tr, te = load_digits_split("train"), load_digits_split("test")
    assert len(tr) + len(te) == 1797
    assert tr.images.shape[1:] == (32, 32, 3)
    assert np.array_equal(tr.images, load_digits_split("train").images)
    counts_te = np.bincount(te.labels, minlength=10)
    counts_all = np.bincount(load_digits().target, minlength=10)
    assert np.all(np.abs(counts_te - 0.2 * counts_all) <= 1)
    # Upscaled content matches the original 8x8 image: block means follow the 8x8 pixels.
    bunch = load_digits()
    small = tr.images[0, :, :, 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
    matches = [i for i in range(1797) if bunch.target[i] == tr.labels[0]
               and np.corrcoef(bunch.images[i].ravel(), small.ravel())[0, 1] > 0.95]
    assert matches


def test_digits_read_from_the_file_equal_sklearns_loader(monkeypatch):
    from sklearn.datasets import load_digits

    from spacedkd_fast.data import datasets

    bunch = load_digits()
    images, labels = datasets.read_sklearn_digits()
    assert images.dtype == np.float64 and labels.dtype == np.int64
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)
    # where the file is not found, sklearn's own loader gives the same arrays
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    images2, labels2 = datasets.read_sklearn_digits()
    assert np.array_equal(images2, bunch.images) and np.array_equal(labels2, bunch.target)


def test_no_warnings_when_loading_clean_data(tmp_path):
    write_tiny(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tiny_imagenet(tmp_path, "val")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_one_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        build_data("digits", device="cuda")
