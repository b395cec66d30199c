"""The build CLI: a folder of good, corrupt and non-image files becomes an index of the good ones."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from model.grounded import GroundedLM
from model.image_embedder import ImageEmbedder
from retrieval_index.build import build_index, main, read_captions
from retrieval_index.index import ImageIndex

REPO = Path(__file__).resolve().parents[1]


def noise_image(seed: int, size=(40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    """Four distinct good images (one in a subfolder, one a JPEG), a copy of one, and five bad files."""
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png", "trip/c.png"]):
        (folder / name).write_bytes(encoded(noise_image(i), "PNG"))
    (folder / "trip" / "d.jpg").write_bytes(encoded(noise_image(3), "JPEG"))
    (folder / "copy-of-a.png").write_bytes((folder / "a.png").read_bytes())
    (folder / "broken.jpg").write_bytes(encoded(noise_image(4), "JPEG")[:200])  # truncated
    (folder / "garbage.png").write_bytes(os.urandom(300))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "trip" / "clip.mp4").write_bytes(b"\x00" * 64)
    (folder / ".DS_Store").write_bytes(b"\x00\x01")  # hidden files are not scanned
    return folder


def test_cli_indexes_the_good_files_and_reports_the_rest(tiny_model, photo_folder, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "captions.tsv").write_text("path\tcaption\na.png\ta noisy square\ntrip/d.jpg\ta noisy jpeg\n")
    out = tmp_path / "photos.index"
    proc = subprocess.run(
        [sys.executable, "-m", "retrieval_index.build", "--checkpoint", str(tmp_path / "ckpt"),
         "--images", str(photo_folder), "--index", str(out), "--captions", str(tmp_path / "captions.tsv"),
         "--batch-size", "3", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout
    assert "4 images (Flat)" in summary and "scanned 10 files" in summary
    assert "added 4" in summary and "1 already indexed" in summary and "5 skipped" in summary
    for reason in ("broken.jpg: truncated or corrupt image data", "garbage.png: not an image",
                   "empty.png: empty file", "notes.txt: not an image file", "trip/clip.mp4: not an image file"):
        assert reason in summary
    assert "img/s" in proc.stderr  # tqdm's progress line

    with ImageIndex.load(out, tiny_model.fingerprint) as index:
        assert len(index) == 4
        for name, caption in [("a.png", "a noisy square"), ("b.png", None), ("trip/c.png", None),
                              ("trip/d.jpg", "a noisy jpeg")]:
            path = photo_folder / name
            image = Image.open(path).convert("RGB")
            hit = index.search(tiny_model.embed_images([image])[0], k=1)[0]  # its own vector comes back
            assert hit.path == str(path) and hit.caption == caption and hit.source == "photos"
            assert (hit.width, hit.height) == image.size and hit.score == pytest.approx(1.0, abs=1e-4)
            assert hit.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_rerun_resumes_by_hash(tiny_model, photo_folder, tmp_path):
    first = build_index(tiny_model, photo_folder, tmp_path / "idx", progress=False)
    assert (first.added, first.already_indexed, len(first.skipped), first.count) == (4, 1, 5, 4)
    (photo_folder / "trip" / "e.png").write_bytes(encoded(noise_image(5), "PNG"))
    watched = WatchedModel(tiny_model)
    second = build_index(watched, photo_folder, tmp_path / "idx", progress=False)
    assert (second.added, second.already_indexed, second.count) == (1, 5, 5)
    assert watched.embedded == 1  # known files are not even decoded


class WatchedModel:
    """The tiny model, counting the images it embeds; Ctrl-C during batch number `interrupt_at`."""

    def __init__(self, model: GroundedLM, interrupt_at: int = 0):
        self.model, self.interrupt_at, self.batches, self.embedded = model, interrupt_at, 0, 0
        self.image_mapping, self.fingerprint = model.image_mapping, model.fingerprint

    def embed_images(self, images):
        self.batches += 1
        if self.batches == self.interrupt_at:
            raise KeyboardInterrupt
        self.embedded += len(images)
        return self.model.embed_images(images)


def test_interrupted_build_keeps_finished_batches_and_resumes(tiny_model, photo_folder, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build_index(WatchedModel(tiny_model, interrupt_at=2), photo_folder, tmp_path / "idx",
                    batch_size=2, progress=False)
    with ImageIndex.load(tmp_path / "idx", tiny_model.fingerprint) as index:
        assert len(index) == 2  # the first batch was saved on the way out
    report = build_index(tiny_model, photo_folder, tmp_path / "idx", progress=False)
    assert (report.added, report.count) == (2, 4)


def test_index_of_another_image_mapping_is_refused(tiny_model, tiny_lm_dir, tiny_clip_dir, photo_folder,
                                                   tmp_path, capsys):
    build_index(tiny_model, photo_folder, tmp_path / "idx", progress=False)
    retrained = GroundedLM(tiny_config(tiny_lm_dir, tiny_clip_dir), quantize="none", device="cpu")
    assert retrained.fingerprint != tiny_model.fingerprint  # a fresh image mapping
    retrained.save_pretrained(tmp_path / "ckpt")
    code = main(["--checkpoint", str(tmp_path / "ckpt"), "--images", str(photo_folder),
                 "--index", str(tmp_path / "idx"), "--device", "cpu"])
    assert code == 2
    assert "another image mapping" in capsys.readouterr().err


def test_explicit_factory_rebuilds_at_the_end(tiny_model, photo_folder, tmp_path):
    for i in range(6, 30):
        (photo_folder / f"more{i}.png").write_bytes(encoded(noise_image(i), "PNG"))
    report = build_index(tiny_model, photo_folder, tmp_path / "idx", factory="IVF2,Flat", progress=False)
    assert (report.count, report.factory) == (28, "IVF2,Flat")
    with ImageIndex.load(tmp_path / "idx", tiny_model.fingerprint) as index:
        assert index.factory == "IVF2,Flat" and index.nprobe == 2


def test_captions_tsv_errors_name_the_line(tmp_path):
    (tmp_path / "ok.tsv").write_text("a.png\tred\nsub/b.png\tblue, with a comma\n\n")
    assert read_captions(tmp_path / "ok.tsv") == {"a.png": "red", "sub/b.png": "blue, with a comma"}
    (tmp_path / "bad.tsv").write_text("a.png\tred\nb.png has no tab\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: expected 'path<TAB>caption'"):
        read_captions(tmp_path / "bad.tsv")


def test_the_build_embeds_with_the_encoder_and_image_mapping_alone_as_the_chat_model_does(tiny_model, tmp_path,
                                                                                          colour_images):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    embedder = ImageEmbedder.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert embedder.fingerprint == tiny_model.fingerprint
    torch.testing.assert_close(embedder.embed_images(colour_images), tiny_model.embed_images(colour_images))
