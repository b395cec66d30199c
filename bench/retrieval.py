"""Image retrieval: FROMAGe's torch matmul + topk vs our exact index vs our IVF index, in one run.

Data: unit vectors clustered like CLIP image embeddings (a hierarchical Gaussian mixture on the
sphere around a shared mean direction: 100 topics x 100 concepts), and held-out queries drawn
farther from the concepts, as text queries sit farther from images than images from each other.
Per collection size: build time, bytes per vector, p50/p95 latency of 1 query and of a batch of 64
(top-5; the three methods timed in turn on the same queries, so they see the same machine load),
and recall@5 against the torch baseline's exact top-5. The IVF index is what `choose_factory`
picks for that size (IVF with nlist ~ sqrt(n) even below the exact threshold), with its default
nprobe, unless --factory is given; a sweep over nprobe shows that knob's recall/latency trade-off.

    python -m bench.retrieval [--sizes 100000 1000000] [--device cpu|cuda] [--factory IVF1024,Flat]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from bench import synchronize
from retrieval_index.index import ImageIndex, ImageInfo, choose_factory, ivf_nlist

RESULTS = Path(__file__).resolve().parent / "results"
K, BATCH, N_QUERIES = 5, 64, 256
TOPICS, CONCEPTS = 100, 100


def clustered_vectors(n: int, dim: int, seed: int, spread: float = 0.8) -> np.ndarray:
    """(n, dim) unit vectors: shared mean + topic + concept + per-vector noise, normalised."""
    rng = np.random.default_rng(1234)  # the same topics and concepts for data and queries
    mean = rng.standard_normal(dim, dtype=np.float32)
    topics = mean / np.linalg.norm(mean) + rng.standard_normal((TOPICS, dim), dtype=np.float32) / np.sqrt(dim)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    concepts = np.repeat(topics, CONCEPTS, axis=0)
    concepts += 0.7 * rng.standard_normal(concepts.shape, dtype=np.float32) / np.sqrt(dim)
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # in chunks: 1M x 256 float64 noise would be 2 GB
        m = min(n - start, 100_000)
        x = concepts[rng.integers(0, len(concepts), m)]
        x += spread * rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def torch_topk(emb: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """FROMAGe's retrieval: scores against every image vector, then topk."""
    return torch.topk(queries @ emb.T, k, dim=-1).indices  # (B, n) -> (B, k)


def add_all(index: ImageIndex, x: np.ndarray) -> np.ndarray:
    """Add `x` with placeholder metadata through the public API; returns the ids (n,)."""
    ids = []
    step = 50_000
    for start in tqdm(range(0, len(x), step), desc=f"adding {len(x)}", unit="chunk", leave=False):
        rows = range(start, min(len(x), start + step))
        ids += index.add(x[rows.start:rows.stop],
                         [ImageInfo(f"bench/{i}.jpg", f"{i:064x}", 224, 224) for i in rows])
    return np.array(ids, np.int64)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def time_in_turns(fns: dict, args_for, max_reps: int, budget_s: float, device: str) -> dict[str, list[float]]:
    """Call each fn once per round, in turn, on the round's argument; times in ms."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up (first GPU replica, caches)
        fn(args_for(0))
        synchronize(device)
    start = time.perf_counter()
    for rep in range(max_reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(args_for(rep))
            synchronize(device)
            times[name].append((time.perf_counter() - t) * 1e3)
        if rep >= 4 and time.perf_counter() - start > budget_s:
            break
    return times


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def run_size(n: int, dim: int, device: str, factory: str | None, work: Path) -> list[dict]:
    x = clustered_vectors(n, dim, seed=0)
    queries = clustered_vectors(N_QUERIES, dim, seed=1, spread=1.4)
    rows = {name: {"n": n, "method": name} for name in ("torch matmul+topk", "exact (Flat)", "IVF")}

    t = time.perf_counter()
    emb = torch.from_numpy(x).to(device)
    q_torch = torch.from_numpy(queries).to(device)
    synchronize(device)
    rows["torch matmul+topk"].update(build_s=time.perf_counter() - t, bytes_per_vector=4 * dim)
    truth = torch.cat([torch_topk(emb, q_torch[i:i + BATCH], K) for i in range(0, N_QUERIES, BATCH)]).cpu().numpy()

    exact_dir, ivf_dir = work / f"exact-{n}", work / f"ivf-{n}"
    t = time.perf_counter()
    exact = ImageIndex.create(exact_dir, dim, "bench")
    ids = add_all(exact, x)
    exact.save()
    rows["exact (Flat)"].update(build_s=time.perf_counter() - t,
                                bytes_per_vector=(exact_dir / "index.faiss").stat().st_size / n,
                                meta_bytes_per_vector=(exact_dir / "meta.sqlite").stat().st_size / n)
    truth_ids = ids[truth]  # (Q, K) rows -> index ids

    shutil.copytree(exact_dir, ivf_dir)
    ivf = ImageIndex.load(ivf_dir, "bench", mmap=False)
    t = time.perf_counter()
    if factory is None:  # what the index picks for n vectors; IVF all the same for small n
        factory = choose_factory(n, dim)
        factory = f"IVF{ivf_nlist(n)},Flat" if factory == "Flat" else factory
    chosen = ivf.rebuild(factory, progress=True)
    ivf.save()
    rows["IVF"].update(method=f"IVF ({chosen}, nprobe {ivf.nprobe})",
                       build_s=rows["exact (Flat)"]["build_s"] + time.perf_counter() - t,
                       bytes_per_vector=(ivf_dir / "index.faiss").stat().st_size / n)

    def ids_of(index: ImageIndex, q: np.ndarray) -> np.ndarray:
        return np.array([[h.id for h in hits] for hits in index.search(q, K)])

    rows["exact (Flat)"].update(  # the data's shape, to compare with real embeddings
        mean_pairwise_cos=float((x[:1000] @ x[1000:2000].T).mean()),
        query_top1_cos=float(np.mean([hits[0].score for hits in exact.search(queries, 1)])))
    for name, index in (("exact (Flat)", exact), ("IVF", ivf)):
        found = np.concatenate([ids_of(index, queries[i:i + BATCH]) for i in range(0, N_QUERIES, BATCH)])
        rows[name]["recall_at_5"] = recall(found, truth_ids)
    rows["torch matmul+topk"]["recall_at_5"] = 1.0

    fns = {"torch matmul+topk": lambda i: torch_topk(emb, q_torch[i % N_QUERIES][None], K),
           "exact (Flat)": lambda i: exact.search(queries[i % N_QUERIES], K),
           "IVF": lambda i: ivf.search(queries[i % N_QUERIES], K)}
    single = time_in_turns(fns, lambda i: i, max_reps=100, budget_s=30, device=device)
    batch_fns = {"torch matmul+topk": lambda s: torch_topk(emb, q_torch[s:s + BATCH], K),
                 "exact (Flat)": lambda s: exact.search(queries[s:s + BATCH], K),
                 "IVF": lambda s: ivf.search(queries[s:s + BATCH], K)}
    batched = time_in_turns(batch_fns, lambda rep: (rep * BATCH) % N_QUERIES, max_reps=20, budget_s=60,
                            device=device)
    sweep = nprobe_sweep(ivf, queries, truth_ids) if ivf.nprobe is not None else []
    for name, row in rows.items():
        row.update(q1_p50_ms=pct(single[name], 50), q1_p95_ms=pct(single[name], 95),
                   b64_p50_ms=pct(batched[name], 50), b64_p95_ms=pct(batched[name], 95),
                   reps_1q=len(single[name]), reps_b64=len(batched[name]))
    base = rows["torch matmul+topk"]
    for row in rows.values():
        row["q1_speedup"] = base["q1_p50_ms"] / row["q1_p50_ms"]
        row["b64_speedup"] = base["b64_p50_ms"] / row["b64_p50_ms"]
    exact.close()
    ivf.close()
    shutil.rmtree(exact_dir)
    shutil.rmtree(ivf_dir)
    rows["IVF"]["nprobe_sweep"] = sweep
    return list(rows.values())


def nprobe_sweep(index: ImageIndex, queries: np.ndarray, truth_ids: np.ndarray) -> list[dict]:
    """Recall@5 and single-query p50 for a range of nprobe: the knob's trade-off on this data."""
    default, out = index.nprobe, []
    for nprobe in (1, 2, 4, 8, 16, 32, 64):
        try:
            index.nprobe = nprobe
        except ValueError:  # more lists probed than a small index has
            break
        found = np.array([[h.id for h in hits] for hits in index.search(queries, K)])
        times = []
        for q in queries[:50]:
            t = time.perf_counter()
            index.search(q, K)
            times.append((time.perf_counter() - t) * 1e3)
        out.append({"nprobe": nprobe, "recall_at_5": recall(found, truth_ids), "q1_p50_ms": pct(times, 50)})
    index.nprobe = default
    return out


def table(rows: list[dict]) -> str:
    head = ("| n | method | build s | bytes/vec | 1 query p50 / p95 ms | 64 queries p50 / p95 ms "
            "| 1-query speedup | recall@5 |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['method']} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} "
                     f"| {r['q1_p50_ms']:.2f} / {r['q1_p95_ms']:.2f} | {r['b64_p50_ms']:.1f} / {r['b64_p95_ms']:.1f} "
                     f"| {r['q1_speedup']:.1f}x | {r['recall_at_5']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="for the torch baseline")
    parser.add_argument("--factory", help="IVF factory string (default: choose_factory for each size)")
    parser.add_argument("--out", type=Path, default=RESULTS / "retrieval.json")
    args = parser.parse_args()

    env = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
           "faiss_gpus": faiss.get_num_gpus(), "torch_device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "load_avg_start": os.getloadavg()[0]}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as work:
        for n in args.sizes:
            rows += run_size(n, args.dim, args.device, args.factory, Path(work))
            print(table([r for r in rows if r["n"] == n]), flush=True)
            for point in rows[-1]["nprobe_sweep"]:
                print(f"  nprobe {point['nprobe']:3d}: recall@5 {point['recall_at_5']:.3f}, "
                      f"1 query p50 {point['q1_p50_ms']:.2f} ms")
    env["load_avg_end"] = os.getloadavg()[0]
    print(f"\n{env}\n\n{table(rows)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "k": K, "batch": BATCH, "dim": args.dim, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
