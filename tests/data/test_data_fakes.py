"""Writers of tiny fake data sets in the official on-disk formats (shared by the data tests)."""

from __future__ import annotations

import pickle

import numpy as np
from PIL import Image


def write_cifar100(root, n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, n).tolist()
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * n}, f)
        out[split] = (data, labels)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    return out


def write_cifar10(root, per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        out[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"k{i}".encode() for i in range(10)]}, f)
    return out


def save_jpeg(path, size=(64, 64), mode="RGB", seed=0, quality=95):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        arr = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    elif mode == "CMYK":
        arr = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    else:
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path, quality=quality)


def write_tiny(root, wnids=("n02", "n01", "n03"), per_class=3):
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for ci, w in enumerate(wnids):
        for k in range(per_class):
            save_jpeg(folder / "train" / w / "images" / f"{w}_{k}.JPEG", seed=ci * 10 + k)
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for k, w in enumerate(wnids):
        save_jpeg(folder / "val" / "images" / f"val_{k}.JPEG", seed=100 + k)
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t10\t10")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder
