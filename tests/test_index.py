"""ImageIndex: exact answers, exclusion, persistence, crash safety, bad files, concurrency."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from retrieval_index.index import (EXACT_BELOW, FingerprintMismatch, ImageIndex, ImageInfo,
                                   IndexFormatError, choose_factory)

DIM = 16
FP = "model-fingerprint-a"
REPO = Path(__file__).resolve().parents[1]


def unit(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def infos(start: int, n: int) -> list[ImageInfo]:
    return [ImageInfo(path=f"img/{i}.png", sha256=hashlib.sha256(str(i).encode()).hexdigest(),
                      width=32 + i, height=24, caption=f"caption {i}", source="test")
            for i in range(start, start + n)]


def brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    scores = queries @ vectors.T  # (B, n)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


@pytest.fixture
def filled(tmp_path) -> tuple[ImageIndex, np.ndarray, np.ndarray]:
    """An exact index of 500 vectors, saved; returns (index, vectors, ids)."""
    vectors = unit(500)
    index = ImageIndex.create(tmp_path / "idx", DIM, FP)
    ids = np.array(index.add(vectors, infos(0, 500)))
    index.save()
    yield index, vectors, ids
    index.close()


def assert_matches_brute_force(index: ImageIndex, vectors, ids, queries, k=7):
    want_ids, want_scores = brute_force(vectors, ids, queries, k)
    got = index.search(queries, k)
    assert [[h.id for h in hits] for hits in got] == want_ids.tolist()
    np.testing.assert_allclose([[h.score for h in hits] for hits in got], want_scores, atol=1e-5)


def test_search_agrees_with_numpy_brute_force(filled):
    index, vectors, ids = filled
    queries = unit(20, seed=1)
    assert_matches_brute_force(index, vectors, ids, queries)
    one = index.search(queries[3], k=3)  # a single (dim,) query gives one list of hits
    assert [h.id for h in one] == brute_force(vectors, ids, queries[3:4], 3)[0][0].tolist()
    hit = one[0]
    row = int(np.flatnonzero(ids == hit.id)[0])
    assert (hit.caption, hit.source, hit.width, hit.height) == (f"caption {row}", "test", 32 + row, 24)
    assert hit.path == str(index.folder.parent / "idx" / "img" / f"{row}.png")
    assert hit.sha256 == hashlib.sha256(str(row).encode()).hexdigest()


def test_torch_queries_are_accepted(filled):
    torch = pytest.importorskip("torch")
    index, vectors, ids = filled
    queries = unit(3, seed=2)
    got = index.search(torch.from_numpy(queries), k=4)
    assert [[h.id for h in hits] for hits in got] == brute_force(vectors, ids, queries, 4)[0].tolist()


def test_ivf_rebuild_keeps_ids_and_is_exact_when_probing_every_list(filled):
    index, vectors, ids = filled
    assert index.factory == "Flat" and index.nprobe is None
    assert index.rebuild("IVF8,Flat") == "IVF8,Flat"
    assert index.nprobe == 8  # default_nprobe never probes fewer than 8 lists
    queries = unit(20, seed=3)
    assert_matches_brute_force(index, vectors, ids, queries)
    index.nprobe = 1
    recall = np.mean([len({h.id for h in hits} & set(want)) / 7 for hits, want in
                      zip(index.search(queries, 7), brute_force(vectors, ids, queries, 7)[0])])
    assert recall < 1.0  # one list of eight misses some true neighbours: nprobe takes effect
    with pytest.raises(ValueError, match="nprobe must be in 1..8"):
        index.nprobe = 9


def test_exclusion_skips_ids_and_still_returns_k(filled):
    index, vectors, ids = filled
    query = unit(1, seed=4)[0]
    top = [h.id for h in index.search(query, k=10)]
    shown = set(top[:4])
    hits = index.search(query, k=6, exclude=shown)
    assert [h.id for h in hits] == top[4:10]
    keep = set(ids[:2].tolist())
    assert {h.id for h in index.search(query, k=5, exclude=set(ids.tolist()) - keep)} == keep
    with pytest.raises(TypeError, match="image ids"):
        index.search(query, k=5, exclude={"0" * 64})


def test_save_load_round_trip(filled, tmp_path):
    index, vectors, ids = filled
    index.rebuild("IVF8,Flat")
    index.nprobe = 3
    index.save()
    queries = unit(10, seed=5)
    before = index.search(queries, 5)
    index.close()
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert (info["dim"], info["metric"], info["factory"], info["count"], info["fingerprint"]) == \
        (DIM, "inner_product", "IVF8,Flat", 500, FP)
    for mmap in (False, True):
        with ImageIndex.load(tmp_path / "idx", FP, mmap=mmap) as loaded:
            assert (len(loaded), loaded.factory, loaded.nprobe, loaded.memory_mapped) == (500, "IVF8,Flat", 3, mmap)
            assert loaded.search(queries, 5) == before
            assert loaded.get(int(ids[7])).caption == "caption 7"
            assert loaded.id_for_sha256(hashlib.sha256(b"7").hexdigest()) == ids[7]
    with ImageIndex.load(tmp_path / "idx", FP, mmap=True) as loaded:  # a write leaves the mapping
        new_id = loaded.add(unit(1, seed=6), infos(500, 1))[0]
        assert not loaded.memory_mapped and len(loaded) == 501
        loaded.save()
    with ImageIndex.load(tmp_path / "idx", FP) as loaded:
        assert loaded.get(new_id).path.endswith("img/500.png") and len(loaded) == 501


def test_flat_index_loads_memory_mapped(filled, tmp_path):
    index, vectors, ids = filled
    index.close()
    with ImageIndex.load(tmp_path / "idx", FP, mmap=True) as loaded:
        assert loaded.memory_mapped
        assert_matches_brute_force(loaded, vectors, ids, unit(5, seed=7))
        assert loaded.remove([int(ids[0])]) == 1 and len(loaded) == 499


def test_duplicate_images_are_not_added_twice(filled):
    index, vectors, ids = filled
    batch = infos(498, 4)  # 498 and 499 are already in the index
    batch.append(batch[-1])  # and the batch repeats its own last image
    new = index.add(unit(5, seed=8), batch)
    assert new[:2] == [None, None] and new[4] is None
    assert new[2] is not None and new[3] is not None and len(index) == 502


def test_remove_takes_images_out_of_search_and_storage(filled, tmp_path):
    index, vectors, ids = filled
    query = vectors[10]
    assert index.search(query, k=1)[0].id == ids[10]
    assert index.remove([int(ids[10]), 10_000]) == 1
    assert index.search(query, k=1)[0].id != ids[10] and index.get(int(ids[10])) is None
    keep = np.arange(500) != 10
    assert_matches_brute_force(index, vectors[keep], ids[keep], unit(5, seed=9))
    index.save()
    index.close()
    with ImageIndex.load(tmp_path / "idx", FP) as loaded:
        assert len(loaded) == 499 and loaded.get(int(ids[10])) is None


def test_the_collection_pages_in_the_order_images_were_added(filled, tmp_path):
    index, _, ids = filled
    index.remove([int(ids[1]), int(ids[3])])
    first = index.records(0, 3)
    assert [r.id for r in first] == [int(ids[0]), int(ids[2]), int(ids[4])], "removed images are not on a page"
    assert first[0].path == str(tmp_path / "idx" / "img" / "0.png") and first[0].caption == "caption 0"
    pages = [index.records(offset, 48) for offset in range(0, len(index), 48)]
    assert [r.id for page in pages for r in page] == [int(i) for i in ids if i not in (ids[1], ids[3])]
    assert index.records(len(index), 48) == [] and index.records(0, 0) == []


def test_unsaved_changes_are_reconciled_on_load(filled, tmp_path):
    """Rows committed after the last save (the process died before saving) do not outlive it."""
    index, vectors, ids = filled
    index.add(unit(3, seed=10), infos(500, 3))
    index.remove([int(ids[0])])
    index.close()  # no save: index.faiss still has ids[0] and lacks the three new vectors
    with ImageIndex.load(tmp_path / "idx", FP) as loaded:
        assert len(loaded) == 499
        assert loaded.id_for_sha256(infos(500, 1)[0].sha256) is None  # a rebuild re-embeds it
        assert loaded.get(int(ids[0])) is None
        assert_matches_brute_force(loaded, vectors[1:], ids[1:], unit(5, seed=11))


def test_fingerprint_mismatch_is_refused_with_rebuild_instructions(filled, tmp_path):
    filled[0].close()
    with pytest.raises(FingerprintMismatch, match="python -m retrieval_index.build"):
        ImageIndex.load(tmp_path / "idx", "another-model")
    with ImageIndex.load(tmp_path / "idx", None) as loaded:  # tools may skip the check
        assert len(loaded) == 500


CRASH_SCRIPT = """
import os, sys
import numpy as np
import faiss
sys.path.insert(0, {repo!r})
from retrieval_index.index import ImageIndex, ImageInfo
point = {point!r}
real_write, real_replace = faiss.write_index, os.replace
def write_half_then_die(index, path):
    real_write(index, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    os._exit(1)
replaces = []
def replace_then_maybe_die(src, dst):
    replaces.append(dst)
    if point == "before_first_rename" or (point == "between_renames" and len(replaces) == 2):
        os._exit(1)
    real_replace(src, dst)
if point == "writing_index":
    faiss.write_index = write_half_then_die
os.replace = replace_then_maybe_die
index = ImageIndex.load({folder!r}, "{fp}")
x = np.random.default_rng(99).standard_normal((50, {dim})).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
index.add(x, [ImageInfo(f"new/{{i}}.png", f"{{i:064x}}", 8, 8) for i in range(50)])
index.save()
"""


@pytest.mark.parametrize("point,survivor", [("writing_index", "old"), ("before_first_rename", "new"),
                                            ("between_renames", "new")])
def test_crash_during_save_leaves_a_loadable_index(filled, tmp_path, point, survivor):
    """Killed mid-save, the folder loads as the last good index, or as the new one when the save
    had written all its files (load finishes the renames); never as a mix."""
    index, vectors, ids = filled
    index.close()
    script = CRASH_SCRIPT.format(repo=str(REPO), point=point, folder=str(tmp_path / "idx"), fp=FP, dim=DIM)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    with ImageIndex.load(tmp_path / "idx", FP) as loaded:
        assert len(loaded) == (500 if survivor == "old" else 550)
        with sqlite3.connect(tmp_path / "idx" / "meta.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == len(loaded)
        assert_matches_brute_force(loaded, vectors, ids, vectors[:3], k=1)
    assert not list((tmp_path / "idx").glob("*.tmp"))


def test_truncated_or_corrupt_files_give_a_clear_error(filled, tmp_path):
    filled[0].close()
    folder = tmp_path / "idx"
    good = (folder / "index.faiss").read_bytes()
    (folder / "index.faiss").write_bytes(good[: len(good) // 3])
    with pytest.raises(IndexFormatError, match="truncated.*python -m retrieval_index.build"):
        ImageIndex.load(folder, FP)
    (folder / "index.faiss").write_bytes(os.urandom(len(good)))  # right size, garbage inside
    with pytest.raises(IndexFormatError, match="corrupt"):
        ImageIndex.load(folder, FP)
    (folder / "index.faiss").write_bytes(good)
    info = (folder / "index.json").read_text()
    (folder / "index.json").write_text(info[:20])
    with pytest.raises(IndexFormatError, match="not valid JSON"):
        ImageIndex.load(folder, FP)
    (folder / "index.json").write_text(info)
    (folder / "meta.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(IndexFormatError, match="meta.sqlite is not a readable index database"):
        ImageIndex.load(folder, FP)
    with pytest.raises(FileNotFoundError, match="holds no image index"):
        ImageIndex.load(tmp_path / "nowhere", FP)


def test_bad_input_is_refused(filled, tmp_path):
    index, _, _ = filled
    with pytest.raises(ValueError, match="L2-normalised"):
        index.add(2 * unit(1), infos(900, 1))
    with pytest.raises(ValueError, match=r"shape \(N, 16\)"):
        index.add(unit(1, dim=8), infos(900, 1))
    with pytest.raises(ValueError, match="sha256"):
        index.add(unit(1), [ImageInfo("a.png", "not-a-hash", 1, 1)])
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full(DIM, np.nan, np.float32))
    with pytest.raises(ValueError, match="factory must be 'Flat' or an IVF"):
        index.rebuild("HNSW32")
    with pytest.raises(ValueError, match="needs at least 1024 vectors"):
        index.rebuild("IVF1024,Flat")
    with pytest.raises(FileExistsError):
        ImageIndex.create(tmp_path / "idx", DIM, FP)
    assert len(index) == 500


def test_empty_index_searches_to_nothing(tmp_path):
    with ImageIndex.create(tmp_path / "empty", DIM, FP) as index:
        assert index.search(unit(1)[0], k=3) == []
        assert index.search(unit(2), k=3) == [[], []]
    with ImageIndex.load(tmp_path / "empty", FP) as index:
        assert len(index) == 0


def test_choose_factory_by_size_and_memory():
    assert choose_factory(EXACT_BELOW - 1, 256) == "Flat"
    assert choose_factory(1_000_000, 256) == "IVF1024,Flat"
    assert choose_factory(100_000, 256) == "IVF256,Flat"
    flat_bytes = 1_000_000 * (4 * 256 + 8)
    assert choose_factory(1_000_000, 256, memory_budget=flat_bytes // 2) == "IVF1024,SQ8"
    assert choose_factory(1_000_000, 256, memory_budget=flat_bytes // 20) == "IVF1024,PQ32"
    assert choose_factory(50_000, 256, memory_budget=20_000_000) == "IVF256,SQ8"  # small, tight RAM
    with pytest.raises(MemoryError):
        choose_factory(1_000_000, 256, memory_budget=1_000_000)


def test_searches_stay_consistent_while_another_thread_writes(tmp_path):
    """Readers search while a writer adds images and removes some: every search returns k hits,
    each with its metadata, and every kept image is found as its own nearest neighbour."""
    vectors = unit(2000, seed=12)
    index = ImageIndex.create(tmp_path / "live", DIM, FP)
    kept: list[tuple[int, int]] = []  # (row, id) of images that stay
    doomed: list[int] = []  # rows of images added, then removed
    errors: list[BaseException] = []
    done, first_rows = threading.Event(), threading.Event()

    def writer():
        try:
            for start in range(0, 2000, 20):  # even rows stay, odd rows go right away
                new = index.add(vectors[start:start + 20], infos(start, 20))
                kept.extend((row, id_) for row, id_ in zip(range(start, start + 20, 2), new[::2]))
                index.remove(new[1::2])
                doomed.extend(range(start + 1, start + 20, 2))
                first_rows.set()
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)
        finally:
            first_rows.set()
            done.set()

    def reader(seed: int):
        rng = np.random.default_rng(seed)
        try:
            first_rows.wait()
            while not done.is_set() and kept:
                row, id_ = kept[rng.integers(len(kept))]
                hits = index.search(vectors[row], k=3)
                assert len(hits) == 3 and hits[0].id == id_ and hits[0].path.endswith(f"img/{row}.png")
                assert hits[0].score == pytest.approx(1.0, abs=1e-5)
                for hits in index.search(vectors[[doomed[-1], doomed[0]]] if doomed else unit(2), k=3):
                    assert len(hits) == 3 and all(h.sha256 and h.caption for h in hits)
                    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a reader or the writer hung"
    assert not errors, errors[0]
    assert len(index) == 1000
    index.close()
