"""Datasets shared by all training code. Items are `(image: PIL RGB, caption: str)`; the model preprocesses.

`ShapesDataset` serves the synthetic shapes world (see model/world/shapes.py); `TsvCaptionDataset` serves real
image-caption pairs in FROMAGe's CC3M format. `ShapesImages` and `ImageFolder` serve images alone, for training
that must see no caption (ESPER).
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from model.world import shapes
from model.images import IMAGE_SUFFIXES, ImageError, load_image

log = logging.getLogger(__name__)


class ShapesDataset(Dataset):
    """The first `size` scenes of a shapes-world split, rendered on demand (about 0.3 ms each)."""

    def __init__(self, split: str, size: int, image_size: int = 128, holdout: bool = False):
        if split not in shapes.SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(shapes.SPLITS)}")
        start, stop = shapes.SPLITS[split]
        if not 0 < size <= stop - start:
            raise ValueError(f"size must be in 1..{stop - start} for split {split!r}, got {size}")
        self.split, self.size, self.image_size, self.holdout = split, size, image_size, holdout

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> shapes.Sample:
        """The item with its attributes (`.scene`), for scoring."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size}")
        return shapes.sample(self.split, index, self.image_size, self.holdout)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        item = self.sample(index)
        return item.image, item.caption


class TsvCaptionDataset(Dataset):
    """Image-caption pairs listed in a TSV with a header naming `caption` and `image` columns (CC3M as
    FROMAGe prepares it). Image paths are relative to `image_root`, by default the TSV's folder.

    Rows are checked cheaply when loading: a row with an empty caption or image field, or whose image
    file does not exist, is skipped and counted in `skipped` (logged once). Files are decoded only in
    `__getitem__`; one that exists but does not decode raises `ImageError` naming the TSV line, so a
    corrupt file stops training loudly instead of silently shrinking the data.
    """

    def __init__(self, tsv_path: str | os.PathLike, image_root: str | os.PathLike | None = None):
        tsv_path = Path(tsv_path)
        self.image_root = Path(image_root) if image_root is not None else tsv_path.parent
        self.rows: list[tuple[int, Path, str]] = []  # (TSV line number, image path, caption)
        self.skipped = 0
        with open(tsv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            missing = {"caption", "image"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{tsv_path}: header must name 'caption' and 'image' columns; "
                                 f"missing {sorted(missing)} (header: {reader.fieldnames})")
            for row in reader:
                caption, image = (row.get("caption") or "").strip(), (row.get("image") or "").strip()
                path = self.image_root / image
                if not caption or not image or not path.is_file():
                    self.skipped += 1
                    continue
                self.rows.append((reader.line_num, path, caption))
        if self.skipped:
            log.warning("%s: skipped %d of %d rows (empty field or image file not found under %s)",
                        tsv_path, self.skipped, self.skipped + len(self.rows), self.image_root)
        self.tsv_path = tsv_path

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        line, path, caption = self.rows[index]
        try:
            return load_image(path), caption
        except ImageError as e:
            raise ImageError(f"{self.tsv_path} line {line}: {e}") from None


class ShapesImages(Dataset):
    """The first `size` scenes of a shapes-world split as images alone: they are drawn, never described
    (`shapes.image`), so nothing reading this dataset can reach a caption."""

    def __init__(self, split: str, size: int, image_size: int = 128, holdout: bool = False):
        if split not in shapes.SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(shapes.SPLITS)}")
        self.split, self.size, self.image_size, self.holdout = split, size, image_size, holdout

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Image.Image:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size}")
        return shapes.image(self.split, index, self.image_size, self.holdout)


class ImageFolder(Dataset):
    """Every image under `folder` (recursively), decoded through `load_image`. Files that are not images or do
    not decode are found once, when the folder is read, and listed in `skipped` as (path, reason), as the index
    build reports them; the rest are decoded again on demand, so a large folder is not held in memory."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} is not a folder")
        self.paths: list[Path] = []
        self.skipped: list[tuple[str, str]] = []
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            rel = path.relative_to(self.folder).as_posix()
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                self.skipped.append((rel, f"not an image file (suffix {path.suffix or 'none'!r})"))
                continue
            try:
                load_image(path)
            except ImageError as e:
                self.skipped.append((rel, str(e).removeprefix(f"{path.name}: ")))
                continue
            except OSError as e:
                self.skipped.append((rel, f"unreadable ({e.strerror})"))
                continue
            self.paths.append(path)
        if not self.paths:
            raise ValueError(f"{self.folder} holds no readable image ({len(self.skipped)} files skipped)")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return load_image(self.paths[index])
