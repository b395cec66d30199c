"""A persistent, searchable collection of L2-normalised image vectors and their metadata.

The folder holds three files (DESIGN.md): `index.faiss` (the vectors; FAISS ids are the SQLite ids),
`meta.sqlite` (one row per image) and `index.json` (dim, metric, factory, count, and the fingerprint
of the image mapping that made the vectors: vectors from another mapping are not comparable).

Durability. SQLite rows are committed with each `add`/`remove`; vectors reach disk on `save()`,
which writes temp files, fsyncs them and renames them over the old ones, `index.json` last. A save
cut short leaves the last good pair (or, past the first rename, a complete new pair that `load`
rolls forward), and `load` drops the rows whose vectors never reached disk, so an interrupted build
simply re-embeds those images. Ids are never reused (AUTOINCREMENT), which keeps that repair exact.

Concurrency: one writer and many readers in one process. A lock guards the FAISS index and the one
SQLite connection, and a search reads its hits' metadata under the same lock, so a hit never
refers to a half-added or half-removed image.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sqlite3
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from model.files import fsync

log = logging.getLogger(__name__)

INDEX_FILE, META_FILE, INFO_FILE = "index.faiss", "meta.sqlite", "index.json"
FORMAT_VERSION = 1
METRIC = "inner_product"
EXACT_BELOW = 100_000  # vectors; below this a Flat scan takes milliseconds and needs no training
TRAIN_PER_LIST = 64  # k-means sample per IVF list; FAISS's default of 256 makes CPU builds 4x slower
MMAP_ABOVE = 512 << 20  # bytes of index.faiss above which `load` memory-maps it
# Multiply-adds below which one query runs on one OpenMP thread: such a scan takes a few ms on one
# core, and waking threads cost more than they saved (3-10x slower on a busy 2-core machine).
SERIAL_WORK = 1 << 25
GPU_MAX_K = 2048  # the largest k FAISS GPU indexes search for
NORM_TOL = 1e-3
SHA256 = re.compile(r"[0-9a-f]{64}")
REBUILD_HINT = ("rebuild it with: python -m retrieval_index.build --checkpoint <checkpoint> "
                "--images <image folder> --index <new index folder>")

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    caption TEXT,
    source TEXT,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    added_at TEXT NOT NULL
)"""
COLUMNS = "id, path, sha256, caption, source, width, height, added_at"


class IndexFormatError(ValueError):
    """The folder is not a readable index: a file is missing, truncated or corrupt."""


class FingerprintMismatch(ValueError):
    """The index's vectors were made by another image mapping than the model's."""


@dataclass(frozen=True)
class ImageInfo:
    """What the caller knows about an image it adds; the index assigns `id` and `added_at`.

    A relative `path` is taken relative to the index folder, so an index can move with its images.
    """
    path: str
    sha256: str
    width: int
    height: int
    caption: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class ImageRecord:
    id: int
    path: str  # absolute
    sha256: str
    caption: str | None
    source: str | None
    width: int
    height: int
    added_at: str  # ISO 8601, UTC


@dataclass(frozen=True)
class Hit(ImageRecord):
    score: float  # inner product of unit vectors: cosine similarity


def choose_factory(n: int, dim: int, memory_budget: int | None = None) -> str:
    """Pick a FAISS factory string for `n` vectors by size, then by memory, as autofaiss does.

    Exact `Flat` below EXACT_BELOW vectors when it fits `memory_budget` (bytes; default half the
    RAM). Otherwise IVF with nlist ~ sqrt(n) (a power of two: 1024 lists at 1M), the cheapest
    coarse quantizer to train and assign on a CPU that still keeps one query at a few ms, with the
    most precise codes that fit: Flat (4*dim bytes a vector), SQ8 (dim bytes), PQ (dim/4, dim/8).
    """
    budget = memory_budget if memory_budget is not None else _physical_memory() // 2
    if n < EXACT_BELOW and n * (4 * dim + 8) <= budget:
        return "Flat"
    nlist = ivf_nlist(n)
    codes = [("Flat", 4 * dim), ("SQ8", dim)]
    codes += [(f"PQ{m}", m) for m in (dim // 4, dim // 8) if m > 0 and dim % m == 0]
    for code, nbytes in codes:
        if n * (nbytes + 8) + nlist * dim * 4 <= budget:
            return f"IVF{nlist},{code}"
    raise MemoryError(f"{n} vectors of dim {dim} do not fit in {budget} bytes even as {codes[-1][0]}")


def ivf_nlist(n: int) -> int:
    """IVF lists for `n` vectors: the power of two nearest sqrt(n)."""
    return 2 ** max(0, round(math.log2(math.sqrt(max(n, 1)))))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: ~1.5% of them (at least 8), recall@5 >= 0.99 on the bench data."""
    return min(nlist, max(8, nlist // 64))


class ImageIndex:
    """Image vectors + metadata in one folder; see the module docstring for the guarantees.

    Make one with `create` or `load`. Searches use the GPU when FAISS sees one (a replica of the
    CPU index, re-made after each change), the CPU otherwise; both return the same hits.
    """

    def __init__(self, folder: Path, info: dict, index: faiss.Index, conn: sqlite3.Connection,
                 *, mmapped: bool, use_gpu: bool | None) -> None:
        if use_gpu and faiss.get_num_gpus() == 0:
            raise RuntimeError("use_gpu=True but FAISS sees no GPU (is faiss-gpu installed?)")
        self.folder = folder
        self._info = info
        self._index = index
        self._conn = conn
        self._mmapped = mmapped
        self._use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
        self._gpu_index: faiss.Index | None = None
        self._dirty = False
        self._lock = threading.RLock()

    # ---- opening ---------------------------------------------------------------------------

    @classmethod
    def create(cls, folder: str | Path, dim: int, fingerprint: str, *,
               use_gpu: bool | None = None) -> ImageIndex:
        """Start an empty exact index in `folder` (created if needed) and save it at once."""
        folder = Path(folder).resolve()
        if (folder / INFO_FILE).exists() or (folder / META_FILE).exists():
            raise FileExistsError(f"{folder} already holds an index: load it, or remove it first")
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        folder.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(folder / META_FILE, check_same_thread=False)
        with conn:
            conn.execute(SCHEMA)
        info = {"format": FORMAT_VERSION, "dim": dim, "metric": METRIC, "factory": "Flat",
                "fingerprint": fingerprint}
        self = cls(folder, info, _new_faiss_index(dim, "Flat"), conn, mmapped=False, use_gpu=use_gpu)
        self._dirty = True
        self.save()
        return self

    @classmethod
    def load(cls, folder: str | Path, fingerprint: str | None, *, mmap: bool | None = None,
             use_gpu: bool | None = None) -> ImageIndex:
        """Open a saved index. `fingerprint` is the model's (None skips the check, for tools).

        `mmap=None` memory-maps index.faiss when it is larger than MMAP_ABOVE; the first write
        then reads it into memory.
        """
        folder = Path(folder).resolve()
        _finish_interrupted_save(folder)
        info = _read_info(folder)
        if fingerprint is not None and info["fingerprint"] != fingerprint:
            raise FingerprintMismatch(
                f"the index in {folder} was built with another image mapping (fingerprint "
                f"{info['fingerprint']!r}, the model's is {fingerprint!r}), so its vectors cannot be "
                f"compared with this model's; {REBUILD_HINT}")
        path = folder / INDEX_FILE
        size = path.stat().st_size if path.is_file() else None
        if size != info["faiss_bytes"]:
            raise IndexFormatError(f"{path} is missing or truncated ({size} bytes, {INFO_FILE} says "
                                   f"{info['faiss_bytes']}); {REBUILD_HINT}")
        mmapped = size >= MMAP_ABOVE if mmap is None else mmap
        index = _read_faiss(path, info["factory"], mmapped)
        if index.d != info["dim"] or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexFormatError(f"{path} holds dim {index.d} / metric {index.metric_type}, "
                                   f"{INFO_FILE} says dim {info['dim']} / {METRIC}; {REBUILD_HINT}")
        if index.ntotal != info["count"]:
            raise IndexFormatError(f"{path} holds {index.ntotal} vectors, {INFO_FILE} says "
                                   f"{info['count']}; {REBUILD_HINT}")
        if not (folder / META_FILE).is_file():
            raise IndexFormatError(f"{folder / META_FILE} is missing; {REBUILD_HINT}")
        conn = sqlite3.connect(folder / META_FILE, check_same_thread=False)
        self = cls(folder, {k: info[k] for k in ("format", "dim", "metric", "factory", "fingerprint")},
                   index, conn, mmapped=mmapped, use_gpu=use_gpu)
        try:
            self._reconcile()
        except sqlite3.DatabaseError as e:
            conn.close()
            raise IndexFormatError(f"{folder / META_FILE} is not a readable index database ({e}); "
                                   f"{REBUILD_HINT}") from e
        return self

    def _reconcile(self) -> None:
        """Make SQLite and FAISS agree after a save that did not happen or did not finish."""
        faiss_ids = _faiss_ids(self._index)
        meta_ids = np.array([r[0] for r in self._conn.execute("SELECT id FROM images")], np.int64)
        unsaved = np.setdiff1d(meta_ids, faiss_ids)  # added after the last save
        removed = np.setdiff1d(faiss_ids, meta_ids)  # removed after the last save
        if unsaved.size:
            log.warning("%s: dropping %d metadata rows whose vectors were never saved",
                        self.folder, unsaved.size)
            with self._conn:
                self._conn.executemany("DELETE FROM images WHERE id = ?",
                                       ((int(i),) for i in unsaved))
        if removed.size:
            log.warning("%s: removing %d vectors whose images were removed after the last save",
                        self.folder, removed.size)
            self._make_writable()
            self._index.remove_ids(removed)
            self._dirty = True

    # ---- properties ------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._info["dim"]

    @property
    def fingerprint(self) -> str:
        return self._info["fingerprint"]

    @property
    def factory(self) -> str:
        return self._info["factory"]

    @property
    def memory_mapped(self) -> bool:
        return self._mmapped

    @property
    def nprobe(self) -> int | None:
        """IVF lists probed per query (None for an exact index): more is slower and more exact."""
        ivf = faiss.try_extract_index_ivf(self._index)
        return None if ivf is None else ivf.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        with self._lock:
            ivf = faiss.try_extract_index_ivf(self._index)
            if ivf is None:
                raise ValueError(f"nprobe applies to IVF indexes; this one is {self.factory!r}")
            if not 1 <= value <= ivf.nlist:
                raise ValueError(f"nprobe must be in 1..{ivf.nlist}, got {value}")
            ivf.nprobe = int(value)
            self._gpu_index = None
            self._dirty = True

    def __len__(self) -> int:
        with self._lock:
            return self._index.ntotal

    def __repr__(self) -> str:
        return f"ImageIndex({str(self.folder)!r}, n={len(self)}, factory={self.factory!r})"

    # ---- writing ---------------------------------------------------------------------------

    def add(self, vectors: np.ndarray, images: Sequence[ImageInfo]) -> list[int | None]:
        """Add unit `vectors` (N, dim) with their `images`; returns each one's new id, or None
        where an image with the same sha256 is already in the index (or earlier in this batch)."""
        vectors = self._as_matrix(vectors, "vectors")
        if len(images) != len(vectors):
            raise ValueError(f"got {len(vectors)} vectors but {len(images)} images")
        norms = np.linalg.norm(vectors, axis=1)
        if norms.size and np.abs(norms - 1).max() > NORM_TOL:
            raise ValueError(f"vectors must be L2-normalised; norms range {norms.min():.4f}.."
                             f"{norms.max():.4f}")
        bad = next((im.sha256 for im in images if not SHA256.fullmatch(im.sha256)), None)
        if bad is not None:
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {bad!r}")
        added_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            self._make_writable()
            in_faiss = np.empty(0, np.int64)
            try:
                with self._conn:  # one transaction: rows commit only if their vectors went in
                    known = self._ids_by_sha256([im.sha256 for im in images])
                    first: dict[str, int] = {}  # sha256 -> position of its first new image
                    for pos, im in enumerate(images):
                        if im.sha256 not in known:
                            first.setdefault(im.sha256, pos)
                    self._conn.executemany(
                        "INSERT INTO images (path, sha256, caption, source, width, height, added_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        ((im.path, im.sha256, im.caption, im.source, int(im.width), int(im.height),
                          added_at) for im in (images[pos] for pos in first.values())))
                    new_id = self._ids_by_sha256(list(first))
                    ids = [new_id[im.sha256] if first.get(im.sha256) == pos else None
                           for pos, im in enumerate(images)]
                    if first:
                        rows = list(first.values())
                        new_ids = np.array([ids[pos] for pos in rows], np.int64)
                        self._index.add_with_ids(vectors[rows], new_ids)
                        in_faiss = new_ids
            except BaseException:
                if in_faiss.size:  # the commit failed after FAISS took the vectors
                    self._index.remove_ids(in_faiss)
                raise
            if in_faiss.size:
                self._gpu_index = None
                self._dirty = True
            return ids

    def remove(self, ids: Collection[int]) -> int:
        """Remove images by id; returns how many were in the index."""
        ids_arr = np.unique(np.asarray(list(ids), np.int64))
        if ids_arr.size == 0:
            return 0
        with self._lock:
            self._make_writable()
            with self._conn:
                self._conn.executemany("DELETE FROM images WHERE id = ?", ((int(i),) for i in ids_arr))
                removed = self._index.remove_ids(ids_arr)
            if removed:
                self._gpu_index = None
                self._dirty = True
            return int(removed)

    def rebuild(self, factory: str | None = None, *, memory_budget: int | None = None,
                progress: bool = False) -> str:
        """Re-index the stored vectors under `factory` (None: `choose_factory`); returns it.

        This is how an index grows past EXACT_BELOW into IVF: IVF must be trained before vectors
        are added, so it is made from the vectors already here. A compressed index (SQ8, PQ)
        rebuilds from its decoded, approximate vectors.
        """
        with self._lock:
            ids, vectors = _all_vectors(self._index)
            n = len(ids)
            factory = factory or choose_factory(n, self.dim, memory_budget)
            new = _new_faiss_index(self.dim, factory)
            ivf = faiss.try_extract_index_ivf(new)
            if ivf is not None:
                if n < ivf.nlist:
                    raise ValueError(f"{factory!r} needs at least {ivf.nlist} vectors to train, the "
                                     f"index has {n}; use 'Flat' or fewer lists")
                sample = np.random.default_rng(0).choice(n, min(n, TRAIN_PER_LIST * ivf.nlist),
                                                         replace=False)
                if self._use_gpu:
                    ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(self.dim))
                new.train(vectors[np.sort(sample)])
                ivf.nprobe = default_nprobe(ivf.nlist)
            step = 65_536
            with tqdm(total=n, desc=f"indexing as {factory}", unit="vec", disable=not progress) as bar:
                for start in range(0, n, step):
                    new.add_with_ids(vectors[start:start + step], ids[start:start + step])
                    bar.update(min(step, n - start))
            self._index, self._mmapped, self._gpu_index = new, False, None
            self._info["factory"] = factory
            self._dirty = True
            return factory

    def save(self) -> None:
        """Write the index atomically (temp files, fsync, rename; index.json last)."""
        with self._lock:
            if not self._dirty:
                return
            index_tmp, info_tmp = _tmp(self.folder / INDEX_FILE), _tmp(self.folder / INFO_FILE)
            index_tmp.unlink(missing_ok=True)
            info_tmp.unlink(missing_ok=True)
            faiss.write_index(self._index, str(index_tmp))
            fsync(index_tmp)
            info = {**self._info, "count": self._index.ntotal, "nprobe": self.nprobe,
                    "faiss_bytes": index_tmp.stat().st_size, "faiss_version": faiss.__version__}
            info_tmp.write_text(json.dumps(info, indent=2) + "\n")
            fsync(info_tmp)
            os.replace(index_tmp, self.folder / INDEX_FILE)
            os.replace(info_tmp, self.folder / INFO_FILE)
            fsync(self.folder)
            self._dirty = False

    def close(self) -> None:
        """Release the database and the index; unsaved vectors are dropped (`save` first)."""
        with self._lock:
            self._conn.close()
            self._index = self._gpu_index = None

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading ---------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int = 5,
               exclude: Collection[int] = ()) -> list[Hit] | list[list[Hit]]:
        """The `k` images most similar to each query, best first, skipping the ids in `exclude`.

        `queries`: (dim,) -> list[Hit]; (B, dim) -> one list per query. A numpy array or a torch
        tensor (any device). Excluded ids are searched past, so k hits come back while the index
        holds k images outside `exclude` (an IVF index returns fewer only if its probed lists do).
        """
        if hasattr(queries, "detach"):  # a torch tensor, maybe on a GPU
            queries = queries.detach().float().cpu().numpy()
        single = np.ndim(queries) == 1
        q = self._as_matrix(np.atleast_2d(queries), "queries")  # (B, dim)
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if any(isinstance(i, (bool, str, bytes)) or not isinstance(i, (int, np.integer)) for i in exclude):
            raise TypeError("exclude must hold image ids (ints), as returned in Hit.id")
        excluded = {int(i) for i in exclude}
        with self._lock:
            n = self._index.ntotal
            if n == 0:
                results: list[list[Hit]] = [[] for _ in q]
                return results[0] if single else results
            index = self._search_index()
            fetch = min(n, k + len(excluded), GPU_MAX_K if index is self._gpu_index else n)
            threads = faiss.omp_get_max_threads()
            if len(q) == 1 and self._scan_size() * self.dim < SERIAL_WORK:
                faiss.omp_set_num_threads(1)  # per calling thread, as OpenMP settings are
            try:
                scores, ids = index.search(q, fetch)  # (B, fetch) each
            finally:
                faiss.omp_set_num_threads(threads)
            found = {int(i) for i in np.unique(ids) if i >= 0} - excluded
            rows = self._rows(found)
        results = []
        for row_scores, row_ids in zip(scores, ids):
            hits = [Hit(*rows[i], score=float(s)) for s, i in zip(row_scores, row_ids.tolist()) if i in rows]
            results.append(hits[:k])
        return results[0] if single else results

    def get(self, id: int) -> ImageRecord | None:
        """The metadata of image `id`, or None if it is not in the index."""
        with self._lock:
            row = self._rows({int(id)}).get(int(id))
        return None if row is None else ImageRecord(*row)

    def records(self, offset: int, limit: int) -> list[ImageRecord]:
        """Images `offset .. offset + limit` of the collection, in the order they were added (a page)."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {COLUMNS} FROM images ORDER BY id LIMIT ? OFFSET ?",
                                      (max(0, int(limit)), max(0, int(offset)))).fetchall()
        return [ImageRecord(*self._absolute(row)) for row in rows]

    def id_for_sha256(self, sha256: str) -> int | None:
        """The id of the image with this content hash, or None: how callers skip known images."""
        with self._lock:
            row = self._conn.execute("SELECT id FROM images WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else row[0]

    # ---- internals -------------------------------------------------------------------------

    def _ids_by_sha256(self, shas: list[str]) -> dict[str, int]:
        """{sha256: id} of those `shas` already stored. Caller holds the lock."""
        found: dict[str, int] = {}
        for start in range(0, len(shas), 500):
            chunk = shas[start:start + 500]
            sql = f"SELECT sha256, id FROM images WHERE sha256 IN ({','.join('?' * len(chunk))})"
            found.update(self._conn.execute(sql, chunk))
        return found

    def _rows(self, ids: set[int]) -> dict[int, tuple]:
        """Metadata rows by id, paths made absolute. Caller holds the lock."""
        rows: dict[int, tuple] = {}
        id_list = sorted(ids)
        for start in range(0, len(id_list), 500):
            chunk = id_list[start:start + 500]
            sql = f"SELECT {COLUMNS} FROM images WHERE id IN ({','.join('?' * len(chunk))})"
            for row in self._conn.execute(sql, chunk):
                rows[row[0]] = self._absolute(row)
        return rows

    def _absolute(self, row: tuple) -> tuple:
        """A metadata row with its path (stored relative to the index folder) made absolute."""
        return (row[0], os.path.normpath(self.folder / row[1]), *row[2:])

    def _scan_size(self) -> float:
        """Vectors one query compares itself with: all of them, or the centroids + probed lists."""
        ivf = faiss.try_extract_index_ivf(self._index)
        n = self._index.ntotal
        return n if ivf is None else ivf.nlist + n * ivf.nprobe / ivf.nlist

    def _search_index(self) -> faiss.Index:
        """The GPU replica when a GPU is used (made on first need), else the CPU index."""
        if not self._use_gpu:
            return self._index
        if self._gpu_index is None:
            self._gpu_index = faiss.index_cpu_to_all_gpus(self._index)
        return self._gpu_index

    def _make_writable(self) -> None:
        """Swap a memory-mapped index for an in-memory copy: FAISS aborts on writes to a mapping."""
        if self._mmapped:
            self._index = _read_faiss(self.folder / INDEX_FILE, self.factory, mmap=False)
            self._mmapped = False

    def _as_matrix(self, x: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (N, {self.dim}), got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        return np.ascontiguousarray(arr)


def _new_faiss_index(dim: int, factory: str) -> faiss.Index:
    """An empty index for `factory`: 'Flat' (exact, wrapped in an IDMap) or any IVF string."""
    if factory == "Flat":
        return faiss.index_factory(dim, "IDMap,Flat", faiss.METRIC_INNER_PRODUCT)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"FAISS cannot build factory {factory!r}: {str(e).splitlines()[-1]}") from e
    if faiss.try_extract_index_ivf(index) is None:
        raise ValueError(f"factory must be 'Flat' or an IVF index (e.g. 'IVF1024,Flat', "
                         f"'IVF1024,SQ8'), got {factory!r}")
    return index


def _faiss_ids(index: faiss.Index) -> np.ndarray:
    """All ids stored in an IDMap or IVF index, (n,) int64."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
             for i in range(ivf.nlist) if lists.list_size(i)]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def _all_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,), vectors (n, dim)) of every stored vector, decoded."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        return ids, index.index.reconstruct_n(0, index.ntotal)
    ids = _faiss_ids(index)
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct by id
    try:
        return ids, index.reconstruct_batch(ids)
    finally:
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)


def _read_faiss(path: Path, factory: str, mmap: bool) -> faiss.Index:
    # FAISS maps IVF lists with IO_FLAG_MMAP and flat codes with IO_FLAG_MMAP_IFC (not both at once).
    flags = (faiss.IO_FLAG_MMAP if "IVF" in factory else faiss.IO_FLAG_MMAP_IFC) if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1]
        raise IndexFormatError(f"{path} is corrupt or truncated (FAISS: {reason}); {REBUILD_HINT}") from e


def _read_info(folder: Path) -> dict:
    path = folder / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no image index ({INFO_FILE} is missing); build one "
                                f"with: python -m retrieval_index.build --checkpoint <checkpoint> "
                                f"--images <image folder> --index {folder}")
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{path} is not valid JSON ({e}); {REBUILD_HINT}") from e
    required = ("format", "dim", "metric", "factory", "fingerprint", "count", "faiss_bytes")
    missing = [key for key in required if key not in info] if isinstance(info, dict) else required
    if missing:
        raise IndexFormatError(f"{path} lacks {list(missing)}; {REBUILD_HINT}")
    if info["format"] != FORMAT_VERSION or info["metric"] != METRIC:
        raise IndexFormatError(f"{path}: format {info['format']} / metric {info['metric']!r} is not "
                               f"{FORMAT_VERSION} / {METRIC!r}; {REBUILD_HINT}")
    return info


def _finish_interrupted_save(folder: Path) -> None:
    """Roll a save forward if it got past writing both temp files, else discard its leftovers.

    `save` writes index.faiss.tmp (fsynced) before index.json.tmp, so a complete index.json.tmp
    whose byte count matches the index file it will pair with means that pair is whole.
    """
    index_tmp, info_tmp = _tmp(folder / INDEX_FILE), _tmp(folder / INFO_FILE)
    if info_tmp.is_file():
        try:
            info = json.loads(info_tmp.read_text())
            target = index_tmp if index_tmp.is_file() else folder / INDEX_FILE
            complete = target.is_file() and info.get("faiss_bytes") == target.stat().st_size
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            complete = False
        if complete:
            log.warning("%s: finishing a save that was interrupted after its files were written", folder)
            if index_tmp.is_file():
                os.replace(index_tmp, folder / INDEX_FILE)
            os.replace(info_tmp, folder / INFO_FILE)
            fsync(folder)
    index_tmp.unlink(missing_ok=True)
    info_tmp.unlink(missing_ok=True)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
