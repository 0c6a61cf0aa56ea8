"""Helpers of the analysis tests: generated run folders (as the trainer writes them), PNG checks."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import yaml


def write_run(folder: Path, rows: list[dict], *, config: dict | None = None,
              fmt: str = "jsonl", flatness: dict | None = None) -> Path:
    """A run folder as the trainer leaves it (metrics.jsonl or metrics.csv, config.yaml)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(folder / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: "" if v is None else v for k, v in r.items()})
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if flatness is not None:
        (folder / "flatness.json").write_text(json.dumps(flatness))
    return folder


def assert_png(path: Path) -> tuple[int, int]:
    """``path`` is a complete PNG file; returns (width, height)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82", f"{path} is truncated"
    return width, height
