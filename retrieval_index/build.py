"""Embed a folder of images into an ImageIndex with a checkpoint's visual encoder and image mapping.

    python -m retrieval_index.build --checkpoint assets/demo --images photos/ --index photos.index

Resumable: a file whose content (sha256) is already in the index is skipped before it is decoded,
and the index is saved every SAVE_EVERY_S seconds, so a killed build loses at most that much work
and the next run picks up where it stopped. Files that are not images, or do not decode, are
skipped and reported with the reason. The app builds its demo gallery's index with `build_index`.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from model.images import IMAGE_SUFFIXES, ImageError, file_sha256, load_image
from retrieval_index.index import INFO_FILE, FingerprintMismatch, ImageIndex, ImageInfo, choose_factory

SAVE_EVERY_S = 60.0


@dataclass
class BuildReport:
    index_dir: Path
    scanned: int = 0
    added: int = 0
    already_indexed: int = 0  # same content already in the index: a resumed build, or a copy
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of bad files
    unmatched_captions: int = 0  # --captions rows that named no file in the folder
    count: int = 0  # images in the index at the end
    factory: str = ""
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0

    def summary(self, max_listed: int = 10) -> str:
        lines = [f"index {self.index_dir}: {self.count} images ({self.factory})",
                 f"  scanned {self.scanned} files in {self.seconds:.1f}s: added {self.added} "
                 f"({self.images_per_second:.1f} images/s), {self.already_indexed} already indexed, "
                 f"{len(self.skipped)} skipped"]
        kinds = Counter(reason.split(" (")[0] for _, reason in self.skipped)
        lines += [f"    {n} x {kind}" for kind, n in kinds.most_common()]
        lines += [f"    {path}: {reason}" for path, reason in self.skipped[:max_listed]]
        if len(self.skipped) > max_listed:
            lines.append(f"    ... and {len(self.skipped) - max_listed} more")
        if self.unmatched_captions:
            lines.append(f"  {self.unmatched_captions} caption rows named no file in the folder")
        return "\n".join(lines)


def read_captions(tsv: str | Path) -> dict[str, str]:
    """`path<TAB>caption` rows (path relative to the image folder; a `path caption` header is
    allowed) -> {posix path: caption}."""
    captions: dict[str, str] = {}
    with open(tsv, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row or (line_no == 1 and row == ["path", "caption"]):
                continue
            if len(row) != 2 or not row[0]:
                raise ValueError(f"{tsv}:{line_no}: expected 'path<TAB>caption', got {len(row)} columns")
            captions[Path(row[0]).as_posix()] = row[1]
    return captions


def open_index(index_dir: str | Path, model) -> ImageIndex:
    """The index in `index_dir` if there is one (refused if another image mapping made it), else a new one."""
    if (Path(index_dir) / INFO_FILE).exists():
        return ImageIndex.load(index_dir, model.fingerprint)
    return ImageIndex.create(index_dir, model.image_mapping.out_features, model.fingerprint)


def build_index(model, images_dir: str | Path, index_dir: str | Path, *,
                captions: dict[str, str] | None = None, batch_size: int = 32, factory: str = "auto",
                source: str | None = None, progress: bool = True) -> BuildReport:
    """Add every image under `images_dir` (recursively) to the index in `index_dir`.

    `model`: an `ImageEmbedder`, or the `GroundedLM` that holds the same parts (`embed_images`, `fingerprint`,
    `image_mapping`). `factory`:
    'auto' re-indexes by `choose_factory` once the collection outgrows an exact index; any other
    string is passed to `ImageIndex.rebuild`. `source` (default: the folder's name) is stored with
    each image. Paths are stored relative to the index folder, so both can move together.
    """
    images_dir, index_dir = Path(images_dir).resolve(), Path(index_dir).resolve()
    if not images_dir.is_dir():
        raise NotADirectoryError(f"--images {images_dir} is not a folder")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    captions = dict(captions or {})
    source = source or images_dir.name
    files = sorted(p for p in images_dir.rglob("*")
                   if p.is_file() and index_dir not in p.parents and not p.name.startswith("."))
    report = BuildReport(index_dir)
    index = open_index(index_dir, model)
    pending: list[tuple[Image.Image, ImageInfo, str]] = []  # (image, info, path in the folder)
    start = last_save = time.monotonic()

    def flush() -> None:
        if not pending:
            return
        images, infos, _ = zip(*pending)
        try:
            vectors = _embed(model, list(images))  # (B, emb_dim)
        except Exception:  # one image the encoder cannot take: embed one by one to name it
            vectors, kept = [], []
            for image, info, rel in pending:
                try:
                    vectors.append(_embed(model, [image]))
                    kept.append(info)
                except Exception as e:
                    report.skipped.append((rel, f"could not embed ({e})"))
            vectors, infos = (np.concatenate(vectors), kept) if kept else (None, [])
        if infos:
            ids = index.add(vectors, list(infos))
            report.added += sum(id_ is not None for id_ in ids)
            report.already_indexed += sum(id_ is None for id_ in ids)
        pending.clear()

    try:
        with tqdm(total=len(files), unit="img", desc="embedding", disable=not progress) as bar:
            for path in files:
                report.scanned += 1
                bar.update()
                rel = path.relative_to(images_dir).as_posix()
                caption = captions.pop(rel, None)
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    report.skipped.append((rel, f"not an image file (suffix {path.suffix or 'none'!r})"))
                    continue
                try:
                    data = path.read_bytes()
                    sha = file_sha256(data)
                    if index.id_for_sha256(sha) is not None:
                        report.already_indexed += 1
                        continue
                    image = load_image(data)
                except ImageError as e:
                    report.skipped.append((rel, str(e)))
                    continue
                except OSError as e:
                    report.skipped.append((rel, f"unreadable ({e.strerror})"))
                    continue
                pending.append((image, ImageInfo(path=os.path.relpath(path, index_dir), sha256=sha,
                                                 width=image.width, height=image.height,
                                                 caption=caption, source=source), rel))
                if len(pending) >= batch_size:
                    flush()
                    if time.monotonic() - last_save > SAVE_EVERY_S:
                        index.save()
                        last_save = time.monotonic()
            flush()
        target = choose_factory(len(index), index.dim) if factory == "auto" else factory
        if target != index.factory:
            index.rebuild(target, progress=progress)
    finally:
        index.save()  # keep what was embedded, also when interrupted
        report.count, report.factory = len(index), index.factory
        index.close()
    report.unmatched_captions = len(captions)
    report.seconds = time.monotonic() - start
    return report


def _embed(model, images: list[Image.Image]) -> np.ndarray:
    return model.embed_images(images).float().cpu().numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrieval_index.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or preset (e.g. demo)")
    parser.add_argument("--images", required=True, help="folder of images, searched recursively")
    parser.add_argument("--index", required=True, help="index folder: created, or resumed if it exists")
    parser.add_argument("--captions", help="TSV of path<TAB>caption, paths relative to --images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--factory", default="auto",
                        help="'auto' (exact below 100k images, IVF above), 'Flat', or an IVF factory string")
    parser.add_argument("--source", help="stored with each image (default: the folder's name)")
    parser.add_argument("--device", help="torch device for the encoder (default: CUDA if available)")
    args = parser.parse_args(argv)

    from model.image_embedder import ImageEmbedder  # the encoder and image mapping only: the LM is not needed
    try:
        captions = read_captions(args.captions) if args.captions else None
        model = ImageEmbedder.from_pretrained(args.checkpoint, device=args.device)
        report = build_index(model, args.images, args.index, captions=captions,
                             batch_size=args.batch_size, factory=args.factory, source=args.source)
    except (FingerprintMismatch, FileNotFoundError, NotADirectoryError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
