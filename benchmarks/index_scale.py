"""Scale of the served index: 16-byte factories at a million 384-d vectors (train, add, search, recall, memory).

Synthetic corpus (the generator of ``benchmarks/scale.py``: unit vectors around ``--clusters`` Gaussian centres, noise
norm ~0.6 of a centre's) and ``--queries`` queries (noisy copies of random rows), written once to ``--data_dir``
with the exact top-100 of a flat inner-product search. Then each factory runs in a fresh process (its own peak RSS):

- ``train_s`` (on a ``--train_rows`` random sample, as the trainer samples) and ``add_s`` (every row, streamed),
- ``bytes_per_vector`` (``sa_code_size``; IVF adds an 8-byte id per vector, in ``index_bytes``) and ``index_bytes``
  (the serialized index),
- ``qps_1_thread`` and ``qps_all_threads``: queries per second at k = 100 (one search call per batch of 32 queries,
  the serving/mining shape),
- ``recall10_at10`` / ``recall10_at100``: the share of the flat index's true top-10 found in the index's top-10 /
  top-100,
- ``peak_rss_bytes`` of the process (data and ground truth included: read with ``mmap``, so only touched pages count).

``--mining_nlist N`` adds the mining shortlist (:class:`~hf_qret.index.shortlist.MiningShortlist`) to a flat PQ
factory and reports ``shortlist_top100_overlap``: the share of the whole index's top-100 it returns.
The last stdout line is one JSON object (``{"rows", "dim", "factories": [...]}``); ``--out FILE`` also writes it.

    python benchmarks/index_scale.py --rows 1000000 --out benchmarks/results/index_scale_1m.json
    python benchmarks/index_scale.py --rows 100000 --factory RQ16x8 --factory OPQ16,PQ16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: (factory, FAISS runtime parameters, residual-quantizer beam, mining shortlist lists): the recipe's RQ16x8 (beam 1,
#: the training default, and FAISS's 5), OPQ16,PQ16, and one IVF variant at the same 16-byte codes.
DEFAULT_FACTORIES = [
    ("RQ16x8", None, 1, 0),
    ("RQ16x8", None, 5, 0),
    ("OPQ16,PQ16", None, None, 0),
    ("IVF1024,PQ16", "nprobe=16", None, 0),
    ("PQ16", None, None, 1024),
]
BATCH = 32
CHUNK = 65536


def log(message: str) -> None:
    print(f"[index_scale] {message}", file=sys.stderr, flush=True)


def make_data(folder: Path, rows: int, dim: int, queries: int, clusters: int, seed: int) -> None:
    """Corpus, queries and the flat top-100, written once (``.npy``)."""
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = np.float32(0.6 / np.sqrt(dim))
    corpus = np.lib.format.open_memmap(folder / "corpus.tmp.npy", mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, CHUNK):
        count = min(CHUNK, rows - start)
        chunk = rng.standard_normal((count, dim), dtype=np.float32) * noise + centres[rng.integers(0, clusters, count)]
        corpus[start : start + count] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    picked = rng.integers(0, rows, queries)
    query_vectors = corpus[picked] + rng.standard_normal((queries, dim), dtype=np.float32) * np.float32(0.4 / dim**0.5)
    query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(dim)
    best_scores = np.full((queries, 100), -np.inf, dtype=np.float32)
    best_ids = np.full((queries, 100), -1, dtype=np.int64)
    for start in range(0, rows, CHUNK * 4):  # exact top-100, chunk by chunk
        flat.reset()
        flat.add(np.ascontiguousarray(corpus[start : start + CHUNK * 4]))
        scores, ids = flat.search(query_vectors, 100)
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_ids = np.concatenate([best_ids, ids + start], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :100]
        best_scores = np.take_along_axis(merged_scores, order, axis=1)
        best_ids = np.take_along_axis(merged_ids, order, axis=1)
    corpus.flush()
    del corpus
    os.replace(folder / "corpus.tmp.npy", folder / "corpus.npy")
    np.save(folder / "queries.npy", query_vectors)
    np.save(folder / "truth.npy", best_ids)


def qps(searcher, queries: np.ndarray, k: int = 100) -> tuple[float, np.ndarray]:
    searcher(queries[:BATCH], k)  # warm-up
    found = []
    start = time.perf_counter()
    for first in range(0, len(queries), BATCH):
        found.append(searcher(queries[first : first + BATCH], k)[1])
    return len(queries) / (time.perf_counter() - start), np.vstack(found)


def recall(found: np.ndarray, truth: np.ndarray, depth: int) -> float:
    return float(np.mean([len(set(f[:depth]) & set(t[:10])) / 10 for f, t in zip(found, truth)]))


def run_factory(folder: Path, factory: str, params: str | None, beam: int | None, nlist: int, args) -> dict:
    """One factory, in this (fresh) process."""
    import faiss

    from hf_qret.index.core import QuantizedIndex

    corpus = np.load(folder / "corpus.npy", mmap_mode="r")
    queries = np.load(folder / "queries.npy")[: args.queries]
    truth = np.load(folder / "truth.npy")[: args.queries]
    threads = faiss.omp_get_max_threads()
    index = QuantizedIndex(
        corpus.shape[1], factory, params, use_gpu=False, rq_beam_size=beam, mining_nlist=nlist, mining_nprobe=16
    )
    start = time.perf_counter()
    index.train(corpus, max_train_rows=args.train_rows)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    index.add(corpus)
    add_s = time.perf_counter() - start
    result = {
        "factory": factory,
        "search_params": params,
        "rq_beam_size": beam,
        "train_rows": min(args.train_rows, len(corpus)),
        "train_s": round(train_s, 1),
        "add_s": round(add_s, 1),
        "bytes_per_vector": index.bytes_per_vector,
        "index_bytes": int(faiss.serialize_index(index.index).size),
    }
    faiss.omp_set_num_threads(1)
    one, found = qps(index.search, queries[: args.queries_1_thread])
    faiss.omp_set_num_threads(threads)
    every, found = qps(index.search, queries)
    result.update(
        qps_1_thread=round(one, 1),
        qps_all_threads=round(every, 1),
        threads=threads,
        recall10_at10=round(recall(found, truth, 10), 4),
        recall10_at100=round(recall(found, truth, 100), 4),
    )
    if nlist:
        mined_qps, mined = qps(index.mine, queries)
        overlap = np.mean([len(set(m) & set(f)) / len(f) for m, f in zip(mined, found)])
        result.update(mining_nlist=nlist, mining_nprobe=16, shortlist_qps=round(mined_qps, 1),
                      shortlist_top100_overlap=round(float(overlap), 4))  # fmt: skip
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def parse_factory(text: str) -> tuple[str, str | None, int | None, int]:
    """``FACTORY[;params][;beam=N][;nlist=N]``."""
    factory, *rest = text.split(";")
    params, beam, nlist = None, None, 0
    for part in rest:
        if part.startswith("beam="):
            beam = int(part[5:])
        elif part.startswith("nlist="):
            nlist = int(part[6:])
        else:
            params = part
    return factory, params, beam, nlist


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--queries_1_thread", type=int, default=256, help="queries timed single-threaded")
    parser.add_argument(
        "--train_rows",
        type=int,
        default=65536,
        help="training sample (the trainer caps it at 262,144; 65,536 keeps "
        "the beam-5 residual quantizer's build within minutes on 2 cores)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", type=Path, help="where the corpus and ground truth are kept (default: a cache)")
    parser.add_argument(
        "--factory", action="append", help="FACTORY[;params][;beam=N][;nlist=N], repeatable (default: the table's)"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    folder = args.data_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"hf_qret_index_scale_{args.rows}_{args.dim}"
    if args._child is not None:
        print(json.dumps(run_factory(folder, *parse_factory(args._child), args)))
        return None
    if not (folder / "truth.npy").is_file():
        log(f"writing {args.rows} x {args.dim} vectors and the exact top-100 to {folder}")
        start = time.perf_counter()
        make_data(folder, args.rows, args.dim, args.queries, args.clusters, args.seed)
        log(f"data in {time.perf_counter() - start:.0f}s")
    specs = args.factory or [
        ";".join([f] + ([p] if p else []) + ([f"beam={b}"] if b else []) + ([f"nlist={n}"] if n else []))
        for f, p, b, n in DEFAULT_FACTORIES
    ]
    passed = [
        f"--{name}={getattr(args, name)}"
        for name in ("rows", "dim", "queries", "queries_1_thread", "train_rows", "seed")
    ]
    rows = []
    for spec in specs:
        log(f"{spec} ...")
        child = subprocess.run(
            [sys.executable, __file__, *passed, f"--data_dir={folder}", f"--_child={spec}"],
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            raise SystemExit(f"{spec} failed:\n{child.stderr[-3000:]}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        log(json.dumps(rows[-1]))
    result = {
        "rows": args.rows,
        "dim": args.dim,
        "queries": args.queries,
        "cpu_count": os.cpu_count(),
        "factories": rows,
    }
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
