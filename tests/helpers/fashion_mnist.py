"""The real Fashion-MNIST files (Debian's ``dataset-fashion-mnist``) laid out for torchvision.

torchvision's ``FashionMNIST(root)`` reads the uncompressed IDX files from
``<root>/FashionMNIST/raw/``; the package ships them gzipped in :data:`FASHION_DIR`. Tests that
need them skip with a message when the package is absent.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")

needs_fashion = pytest.mark.skipif(
    not all((FASHION_DIR / f"{name}.gz").is_file() for name in FILES),
    reason=f"the real Fashion-MNIST files are not in {FASHION_DIR} "
           "(apt-get install dataset-fashion-mnist)")


def _first_records(raw: bytes, n: int | None) -> bytes:
    """The IDX file ``raw`` cut to its first ``n`` records (header count rewritten): still the
    real format and the real images, only fewer of them."""
    if n is None:
        return raw
    dims = raw[3]
    header = 4 + 4 * dims
    count = int.from_bytes(raw[4:8], "big")
    n = min(n, count)
    record = 1
    for d in range(1, dims):
        record *= int.from_bytes(raw[4 + 4 * d: 8 + 4 * d], "big")
    return raw[:4] + n.to_bytes(4, "big") + raw[8:header] + raw[header: header + n * record]


def fashion_root(root: Path, n_train: int | None = None, n_test: int | None = None) -> Path:
    """Write ``<root>/FashionMNIST/raw/*-ubyte`` from the real files (the first ``n_train`` /
    ``n_test`` items when given); returns ``root`` (torchvision's ``root``, the trainer's
    ``--data-dir``)."""
    raw_dir = root / "FashionMNIST" / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        data = gzip.decompress((FASHION_DIR / f"{name}.gz").read_bytes())
        (raw_dir / name).write_bytes(_first_records(data, n_train if name.startswith("train")
                                                    else n_test))
    return root
