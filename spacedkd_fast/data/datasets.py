"""Data sets on disk in their official formats: arrays and labels, nothing random.

Two shapes of data set come out of here:

- :class:`ArrayData`: every image decoded up front into one ``uint8`` array ``[N, H, W, 3]``
  (CIFAR-10/100, Tiny-ImageNet, the embedded ``digits`` set). Small enough to live on a GPU.
- :class:`FileData`: a list of image files and labels (ImageNet-style folders), decoded per batch.

Broken inputs raise :class:`DataFormatError` (a ``ValueError``) or ``FileNotFoundError`` with the
path and the layout that was expected. Unreadable images: Tiny-ImageNet is decoded up front, so an
unreadable file there is skipped with a warning naming it; folder data sets decode per batch, where
skipping would silently change a keyed batch, so the folder source raises an error naming the file
(:class:`UnreadableImageError`). CMYK, palette and grayscale images are converted to RGB.
"""

from __future__ import annotations

import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")

CIFAR100_FOLDER = "cifar-100-python"
CIFAR10_FOLDER = "cifar-10-batches-py"
TINY_FOLDER = "tiny-imagenet-200"
CIFAR100_LAYOUT = f"{CIFAR100_FOLDER}/{{train,test,meta}} (python pickles with b'data' and b'fine_labels')"
CIFAR10_LAYOUT = (
    f"{CIFAR10_FOLDER}/{{data_batch_1..5,test_batch,batches.meta}} (python pickles with b'data' and b'labels')"
)
TINY_LAYOUT = (
    f"{TINY_FOLDER}/wnids.txt, {TINY_FOLDER}/train/<wnid>/images/*.JPEG, "
    f"{TINY_FOLDER}/val/images/*.JPEG + {TINY_FOLDER}/val/val_annotations.txt"
)
FOLDER_LAYOUT = "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG"


class DataFormatError(ValueError):
    """A data set file or folder exists but does not have the expected layout or content."""


class UnreadableImageError(DataFormatError):
    """An image file could not be decoded."""


@dataclass(frozen=True)
class ArrayData:
    """A decoded data set.

    ``images``: ``uint8 [N, H, W, 3]`` (RGB, channels last, C-contiguous); ``labels``: ``int64 [N]``
    in ``[0, len(classes))``; ``source``: where it was read from (for messages).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DataFormatError(
                f"{self.source}: images must be uint8 [N, H, W, 3], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DataFormatError(
                f"{self.source}: {self.images.shape[0]} images but labels of shape "
                f"{list(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class FileData:
    """Image files and their labels (decoded per batch): ``paths[i]`` has label ``labels[i]``."""

    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    source: str
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


# ----------------------------------------------------------------------------------------- images
def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Decode one image file to ``uint8 [H, W, 3]`` RGB (CMYK / grayscale / palette converted).

    Raises :class:`UnreadableImageError` naming the file when it cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.draft("RGB", im.size)  # JPEG: decode straight to RGB where the codec can
            rgb = im.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UnreadableImageError(f"cannot decode image {path}: {exc}") from exc


def _decode_many(paths: list[str], *, skip_unreadable: bool, size: tuple[int, int] | None):
    """Decode ``paths`` in a thread pool (PIL releases the GIL while decoding).

    Returns ``(images uint8 [M, H, W, 3], kept_positions)``; with ``skip_unreadable`` unreadable files
    are dropped with one warning that names them.
    """

    def one(p: str):
        try:
            img = decode_image(p)
        except UnreadableImageError:
            if skip_unreadable:
                return None
            raise
        if size is not None and img.shape[:2] != size:
            raise DataFormatError(f"{p}: expected a {size[0]}x{size[1]} image, got {img.shape[0]}x{img.shape[1]}")
        return img

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        decoded = list(pool.map(one, paths))
    kept = [i for i, img in enumerate(decoded) if img is not None]
    bad = [paths[i] for i, img in enumerate(decoded) if img is None]
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image(s): {shown}", stacklevel=3)
    if not kept:
        return np.zeros((0, *(size or (0, 0)), 3), np.uint8), kept
    return np.stack([decoded[i] for i in kept]), kept


# ------------------------------------------------------------------------------------------ CIFAR
def _read_pickle(path: Path, layout: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing CIFAR file {path}; expected layout: {layout}")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise DataFormatError(f"cannot read CIFAR pickle {path} ({type(exc).__name__}: {exc}); "
                              f"expected layout: {layout}") from exc
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}; "
                              f"expected layout: {layout}")
    return obj


def _cifar_arrays(path: Path, label_key: bytes, layout: str) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(path, layout)
    if b"data" not in d or label_key not in d:
        raise DataFormatError(f"{path}: pickle lacks b'data' or {label_key!r} (keys: "
                              f"{sorted(k for k in d)}); expected layout: {layout}")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataFormatError(f"{path}: b'data' must be uint8 [N, 3072] with N labels, got "
                              f"{data.dtype} {list(data.shape)} and {len(labels)} labels")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # stored channel-planar
    return np.ascontiguousarray(images), labels


def _try_download_cifar(root: Path, num_classes: int, folder: Path) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR100 if num_classes == 100 else torchvision.datasets.CIFAR10
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise FileNotFoundError(
            f"CIFAR-{num_classes} not found at {folder} and the download failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def load_cifar(root: str | os.PathLike, num_classes: int, split: str, *,
               download: bool = False) -> ArrayData:
    """CIFAR-10 or CIFAR-100 from the python pickle folder under ``root``.

    ``split`` is ``"train"`` or ``"test"``. With ``download=True`` a missing folder is fetched
    through torchvision (only then is the network used).
    """
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    folder = root / (CIFAR100_FOLDER if num_classes == 100 else CIFAR10_FOLDER)
    layout = CIFAR100_LAYOUT if num_classes == 100 else CIFAR10_LAYOUT
    if not folder.is_dir():
        if download:
            _try_download_cifar(root, num_classes, folder)
        else:
            raise FileNotFoundError(
                f"CIFAR-{num_classes} not found: expected the folder {folder} ({layout}). "
                f"Pass download=True (--download) to fetch it, or point --data-dir at its parent."
            )
    if num_classes == 100:
        images, labels = _cifar_arrays(folder / split, b"fine_labels", layout)
        meta_path = folder / "meta"
        names_key = b"fine_label_names"
    else:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        parts = [_cifar_arrays(folder / f, b"labels", layout) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        meta_path = folder / "batches.meta"
        names_key = b"label_names"
    classes = [str(i) for i in range(num_classes)]
    if meta_path.is_file():
        meta = _read_pickle(meta_path, layout)
        if names_key in meta and len(meta[names_key]) == num_classes:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(f"{folder / split}: labels outside [0, {num_classes})")
    return ArrayData(images, labels, classes, str(folder / split))


def cifar_present(root: str | os.PathLike, num_classes: int = 100) -> bool:
    """Whether the CIFAR pickle folder exists under ``root`` (nothing is read)."""
    folder = CIFAR100_FOLDER if num_classes == 100 else CIFAR10_FOLDER
    return (Path(root) / folder).is_dir()


# ---------------------------------------------------------------------------------- Tiny-ImageNet
def _list_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def load_tiny_imagenet(root: str | os.PathLike, split: str) -> ArrayData:
    """Tiny-ImageNet-200 (64 x 64 RGB) decoded into memory.

    Classes are the wnids of ``wnids.txt`` sorted alphabetically (the order torchvision's
    ``ImageFolder`` gives the ``train/`` folder). ``split``: ``"train"`` or ``"val"`` (the labelled
    validation set is the test set). Unreadable images are skipped with a warning.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    folder = Path(root) / TINY_FOLDER
    if not folder.is_dir():
        raise FileNotFoundError(f"Tiny-ImageNet not found: expected the folder {folder} "
                                f"({TINY_LAYOUT}); it cannot be downloaded by this package "
                                "(torchvision has no Tiny-ImageNet class): unpack "
                                "tiny-imagenet-200.zip there")
    wnids_file = folder / "wnids.txt"
    if not wnids_file.is_file():
        raise FileNotFoundError(f"missing {wnids_file}; expected layout: {TINY_LAYOUT}")
    wnids = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    if not wnids:
        raise DataFormatError(f"{wnids_file} lists no classes; expected layout: {TINY_LAYOUT}")
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[str] = []
    labels: list[int] = []
    if split == "train":
        for w in wnids:
            img_dir = folder / "train" / w / "images"
            if not img_dir.is_dir():
                raise FileNotFoundError(f"missing class folder {img_dir}; expected layout: {TINY_LAYOUT}")
            files = _list_images(img_dir)
            if not files:
                raise DataFormatError(f"empty class folder {img_dir}; expected layout: {TINY_LAYOUT}")
            paths += files
            labels += [index[w]] * len(files)
    else:
        ann = folder / "val" / "val_annotations.txt"
        img_dir = folder / "val" / "images"
        if not ann.is_file() or not img_dir.is_dir():
            raise FileNotFoundError(f"missing {ann} or {img_dir}; expected layout: {TINY_LAYOUT}")
        for lineno, line in enumerate(ann.read_text().splitlines(), 1):
            parts = line.split("\t") if "\t" in line else line.split()
            if not parts or not parts[0].strip():
                continue
            if len(parts) < 2 or parts[1] not in index:
                raise DataFormatError(f"{ann}:{lineno}: expected '<file>\\t<wnid>...' with a wnid "
                                      f"from wnids.txt, got {line!r}")
            paths.append(str(img_dir / parts[0]))
            labels.append(index[parts[1]])
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} file(s) named in {ann} are missing, e.g. {missing[0]}")
    images, kept = _decode_many(paths, skip_unreadable=True, size=None)
    if len(kept) and len({tuple(i.shape) for i in images[:1]}) != 1:
        raise DataFormatError(f"{folder}: images of different sizes")
    return ArrayData(images, np.asarray(labels, np.int64)[kept], wnids, str(folder / split))


# ------------------------------------------------------------------------------ ImageNet folders
def scan_image_folder(root: str | os.PathLike, split: str) -> FileData:
    """An ImageNet-style folder ``root/<split>/<class>/*.JPEG`` (classes sorted by name).

    An empty class folder is an error (labels would silently shift); files are decoded later.
    """
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: expected {folder} ({FOLDER_LAYOUT})")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataFormatError(f"{folder} holds no class folders; expected layout: {FOLDER_LAYOUT}")
    paths: list[str] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        files = []
        for dirpath, _, names in os.walk(folder / c):
            files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise DataFormatError(f"empty class folder {folder / c} (no {'/'.join(IMAGE_EXTENSIONS)} "
                                  f"files); expected layout: {FOLDER_LAYOUT}")
        files.sort()
        paths += files
        labels += [i] * len(files)
    return FileData(paths, np.asarray(labels, np.int64), classes, str(folder))


# ------------------------------------------------------------------------------- embedded digits
def read_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images float64 [1797, 8, 8] in 0..16, labels int64)``.

    Read from the file scikit-learn installs (``sklearn/datasets/data/digits.csv.gz``: 64 pixels
    and the label per row) without importing ``sklearn.datasets``, which takes over a second at
    every trainer start; ``load_digits`` is the fallback where the file is not at that place.
    """
    import gzip
    from importlib.util import find_spec

    spec = find_spec("sklearn")  # finds the package without importing it
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    files = [Path(r) / "datasets" / "data" / "digits.csv.gz" for r in roots]
    if files and files[0].is_file():
        with gzip.open(files[0], "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, np.float64), np.asarray(bunch.target, np.int64)


def load_digits_split(split: str, *, image_size: int = 32, test_fraction: float = 0.2) -> ArrayData:
    """scikit-learn's bundled ``digits`` (1,797 8x8 grayscale images, 10 classes), offline.

    Split deterministically and stratified: within each class a fixed permutation (numpy PCG64,
    seed 0) puts the first ``round(test_fraction * n_c)`` samples in the test set. Pixel values
    0..16 are scaled to 0..255 and the images upscaled to ``image_size`` with bilinear
    interpolation (no antialiasing), replicated to 3 channels: ``uint8 [N, S, S, 3]``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    import torch
    import torch.nn.functional as F

    images8, labels = read_sklearn_digits()
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(labels), bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        test_mask[idx[: int(round(test_fraction * len(idx)))]] = True
    keep = test_mask if split == "test" else ~test_mask
    x = torch.from_numpy(images8[keep] * (255.0 / 16.0)).unsqueeze(1)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).squeeze(1)
    images = np.ascontiguousarray(np.repeat(x.numpy()[..., None], 3, axis=-1))
    return ArrayData(images, labels[keep], [str(i) for i in range(10)], f"sklearn digits ({split})")
