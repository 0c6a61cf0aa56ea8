"""Data sets, keyed augmentation and replayable batch sources.

``build_data(...)`` is the entry point of the trainer; the pieces are importable on their own:
``datasets`` (on-disk formats -> arrays / file lists), ``augment`` (recipes and keyed parameters),
``imageops`` / ``policies`` (batched tensor ops), ``pilops`` (PIL-exact resampling for
``vit-official``), ``sources`` (torch backends), ``dali`` (DALI),
``memory`` (a small in-memory source), ``keyed`` (the key formula and counter-based generators),
``protocol`` (what every source provides: keys, mid-epoch resume, data streams),
``keyed_loader`` (``KeyedLoader``: keyed replay for any map-style ``Dataset`` and its transforms).
"""

from .augment import RECIPES, Augmenter, Recipe, get_recipe
from .build import BACKENDS, DATASETS, DataBundle, build_data
from .dali import DaliSource, dali_available
from .datasets import (
    ArrayData,
    DataFormatError,
    FileData,
    UnreadableImageError,
    load_cifar,
    load_digits_split,
    load_tiny_imagenet,
    scan_image_folder,
)
from .keyed import InvalidKeyError
from .keyed_loader import KeyedLoader
from .memory import InMemorySource
from .protocol import StreamedSource
from .sources import FileSource, KeyedIndexer, TensorSource

__all__ = [
    "ArrayData", "Augmenter", "BACKENDS", "DATASETS", "DaliSource", "DataBundle", "DataFormatError",
    "FileData", "FileSource", "InMemorySource", "InvalidKeyError", "KeyedIndexer", "KeyedLoader",
    "RECIPES",
    "Recipe", "StreamedSource", "TensorSource", "UnreadableImageError", "build_data",
    "dali_available", "get_recipe", "load_cifar", "load_digits_split", "load_tiny_imagenet",
    "scan_image_folder",
]
