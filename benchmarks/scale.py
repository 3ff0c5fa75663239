"""Scale of the bank side of hf-qret: memory, index build, mining throughput, bank step and incremental refresh.

Synthetic corpus: ``--rows`` L2-normalised vectors around ``--clusters`` Gaussian centres, generated chunk by chunk
straight into the bank's storage (``--bank_dtype``, in RAM or memory-mapped under ``--mmap DIR``), so a float32
copy of the whole corpus never exists. Then, timing each part:

1. ``index_build_s``: train the ``--index`` factory on a random sample of ``--train_rows`` rows, then add every row
   (streamed in 64k-row chunks).
2. ``mine_qps``: ``--queries`` queries (noisy copies of random bank rows) searched like training does it, batches
   of ``--batch`` queries for the top ``--k`` rows (``mine_qps_one_batch``: all queries in one search call). With
   ``--mining_nlist`` the queries go through the mining shortlist (:class:`~hf_qret.index.shortlist.MiningShortlist`);
   ``shortlist_topk_overlap`` is the share of the whole index's top ``--k`` it finds (first 512 queries).
3. ``step_ms``: the bank side of a training step, median over the timed steps: gather the batch's positives and
   mined candidates (the union, ~3,000 rows for 32 x 100) as float32, a scaled dot-product cross-entropy with random
   query vectors (``requires_grad``), backward (sparse row gradients), :class:`~hf_qret.training.optim.RowAdam` step. No
   transformer encoder.
4. ``refresh_s``: ``incremental`` index refresh after the ``--steps`` training steps (``refreshed_rows`` = rows the
   steps changed); ``--full_refresh`` also times a full re-encode (``full_reencode_s``).

Memory: ``bank_bytes`` (row storage), ``codes_bytes`` (index codes, plus ids and direct map for IVF),
``optimizer_bytes`` (RowAdam's touched-row state), ``peak_rss_bytes`` (``ru_maxrss``; includes the mapped pages of a
memory-mapped bank, and the ~0.5 GB of Python, torch and FAISS themselves), ``peak_rss_after`` (the peak after each
phase) and ``rss_ratio = peak_rss_bytes / (bank_bytes + codes_bytes + optimizer_bytes)``.
Prints one JSON object as its last line.

    python benchmarks/scale.py --rows 1000000 --dim 384 --index PQ16 --json
    python benchmarks/scale.py --rows 1000000 --dim 384 --index IVF1024,PQ16 --search_params nprobe=16 --json
    python benchmarks/scale.py --rows 1000000 --dim 384 --index PQ16 --mining_nlist 1024 --mining_nprobe 16 --json
    python benchmarks/scale.py --rows 10000000 --dim 384 --index PQ16 --bank_dtype fp16 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_qret.bank.core import TargetBank  # noqa: E402
from hf_qret.index.core import QuantizedIndex, set_faiss_threads  # noqa: E402
from hf_qret.training.optim import RowAdam  # noqa: E402

CHUNK = 16384  # rows generated at a time (a few MB of float32 temporaries)


def log(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def rss_parts() -> dict[str, int]:
    """Current anonymous and file-backed resident memory (Linux), bytes."""
    parts = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                key, value = line.split(":")
                parts["rss_anon_bytes" if key == "RssAnon" else "rss_file_bytes"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return parts


def generate(bank: TargetBank, clusters: int, seed: int) -> np.ndarray:
    """Fills the bank with clustered unit vectors, chunk by chunk; returns the centres."""
    rng = np.random.default_rng(seed)
    dim = bank.dim
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = np.float32(0.6 / np.sqrt(dim))  # noise norm ~0.6 of the centre's
    for start in range(0, len(bank), CHUNK):
        count = min(CHUNK, len(bank) - start)
        chunk = rng.standard_normal((count, dim), dtype=np.float32)
        chunk *= noise
        chunk += centres[rng.integers(0, clusters, count)]
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        bank.write_rows(start, torch.from_numpy(chunk))
    bank.clear_changed()
    return centres


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--index", default="PQ16", help="faiss.index_factory string (inner product)")
    parser.add_argument("--search_params", default=None, help="e.g. nprobe=16 for IVF")
    parser.add_argument("--mining_nlist", type=int, default=0, help="mining shortlist lists (flat PQ/OPQ indexes)")
    parser.add_argument("--mining_nprobe", type=int, default=16, help="lists scanned per query with --mining_nlist")
    parser.add_argument("--bank_dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--mmap", default=None, help="folder for a memory-mapped bank file (default: bank in RAM)")
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--train_rows", type=int, default=262144, help="index training sample size")
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100, help="bank steps before the incremental refresh")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    parser.add_argument("--faiss_threads", type=int, default=0, help="0: FAISS's default")
    parser.add_argument("--full_refresh", action="store_true", help="also time a full re-encode of every row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print only the JSON result line on stdout")
    args = parser.parse_args(argv)
    if args.steps - args.warmup < 20:
        parser.error("time at least 20 steps: --steps - --warmup >= 20")
    if args.queries < args.batch * args.steps:
        parser.error(f"--queries must cover the steps' batches: at least {args.batch * args.steps}")
    set_faiss_threads(args.faiss_threads)
    import faiss

    # 1. the bank, generated straight into its storage
    start_rss = peak_rss()
    start = time.perf_counter()
    tmp = None
    if args.mmap:
        Path(args.mmap).mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=args.mmap)
        bank = TargetBank.zeros(args.rows, args.dim, None, args.bank_dtype, mmap_path=Path(tmp) / "bank.npy")
    else:
        bank = TargetBank.zeros(args.rows, args.dim, None, args.bank_dtype)
    generate(bank, args.clusters, args.seed)
    generate_s = time.perf_counter() - start
    phases = {"start": start_rss, "generate": peak_rss()}
    log(f"bank {args.rows} x {args.dim} {args.bank_dtype}: {bank.nbytes / 1e9:.2f} GB in {generate_s:.1f}s")

    # 2. the index: trained on a sample, every row added in chunks
    start = time.perf_counter()
    index = QuantizedIndex(
        args.dim, args.index, args.search_params, mining_nlist=args.mining_nlist, mining_nprobe=args.mining_nprobe
    )
    train_rows = min(args.train_rows, args.rows)
    index.build(bank.float32_rows(), max_train_rows=train_rows)
    index_build_s = time.perf_counter() - start
    phases["index_build"] = peak_rss()
    log(f"index {args.index}: built in {index_build_s:.1f}s (trained on {train_rows} rows)")

    # 3. mining: training-shaped batches of queries near random documents
    rng = np.random.default_rng(args.seed + 1)
    positives = rng.integers(0, args.rows, args.queries)
    queries = bank.float32_rows()[positives] + rng.standard_normal((args.queries, args.dim), dtype=np.float32) * (
        np.float32(0.4 / np.sqrt(args.dim))
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index.mine(queries[: args.batch], args.k)  # warm-up (and the GPU copy, when there is a GPU)
    mined = []
    start = time.perf_counter()
    for first in range(0, args.queries, args.batch):
        mined.append(index.mine(queries[first : first + args.batch], args.k)[1])
    mine_s = time.perf_counter() - start
    start = time.perf_counter()
    index.mine(queries, args.k)
    one_batch_s = time.perf_counter() - start
    overlap = None
    if index.shortlist is not None:  # how much of the whole index's top k the shortlist finds
        probe = queries[: min(512, args.queries)]
        _, exact = index.search(probe, args.k)
        shortlisted = np.concatenate(mined)[: len(probe)]
        overlap = float(np.mean([np.isin(a[a >= 0], b).mean() for a, b in zip(exact, shortlisted)]))
        log(f"shortlist {args.mining_nlist} lists, nprobe {args.mining_nprobe}: {overlap:.3f} of the top-{args.k}")
    phases["mine"] = peak_rss()
    batches = np.split(positives, range(args.batch, args.queries, args.batch))
    recall_self = float(np.mean([(m == p[:, None]).any(axis=1).mean() for m, p in zip(mined, batches)]))
    log(f"mining: {args.queries / mine_s:.0f} queries/s in batches of {args.batch} (k={args.k}), "
        f"{args.queries / one_batch_s:.0f}/s in one batch; positive in top-{args.k}: {recall_self:.3f}")  # fmt: skip

    # 4. bank steps: gather candidates (fp32) -> loss -> backward (sparse) -> RowAdam
    optimizer = RowAdam(bank, lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)
    times, sizes = [], []
    for step in range(args.steps):
        batch_pos = positives[step * args.batch : (step + 1) * args.batch]
        pool = np.concatenate([batch_pos, mined[step].reshape(-1)])
        candidates = np.unique(pool[pool >= 0])
        targets = torch.from_numpy(np.searchsorted(candidates, batch_pos))
        candidates = torch.from_numpy(candidates)
        query = torch.randn(len(batch_pos), args.dim, generator=generator).requires_grad_(True)
        begin = time.perf_counter()
        rows = bank.gather(candidates)
        scores = 20.0 * torch.nn.functional.normalize(query, dim=1) @ rows.T
        loss = torch.nn.functional.cross_entropy(scores, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        query.grad = None
        if step >= args.warmup:
            times.append(time.perf_counter() - begin)
        sizes.append(len(candidates))
    step_ms = 1000 * statistics.median(times)
    phases["steps"] = peak_rss()
    log(f"bank step: {step_ms:.1f} ms median over {len(times)} steps, {statistics.mean(sizes):.0f} candidates/step")

    # 5. incremental refresh of the rows the steps changed
    changed = bank.changed_rows()
    start = time.perf_counter()
    refreshed = index.refresh(bank.float32_rows(), mode="incremental", rows=changed)
    refresh_s = time.perf_counter() - start
    bank.clear_changed()
    phases["refresh"] = peak_rss()
    log(f"incremental refresh: {refreshed} rows in {refresh_s:.2f}s")
    full_reencode_s = None
    if args.full_refresh:
        start = time.perf_counter()
        index.refresh(bank.float32_rows(), mode="reencode")
        full_reencode_s = round(time.perf_counter() - start, 3)
        log(f"full re-encode: {full_reencode_s:.2f}s")

    peak = peak_rss()
    total = bank.nbytes + index.codes_nbytes + optimizer.nbytes
    result = {
        "rows": args.rows,
        "dim": args.dim,
        "index": args.index,
        "search_params": args.search_params,
        "mining_shortlist": {"nlist": args.mining_nlist, "nprobe": args.mining_nprobe} if args.mining_nlist else None,
        "bank_dtype": args.bank_dtype,
        "mmap": bool(args.mmap),
        "bank_bytes": bank.nbytes,
        "codes_bytes": index.codes_nbytes,
        "optimizer_bytes": optimizer.nbytes,
        "touched_rows": optimizer.num_touched_rows,
        "generate_s": round(generate_s, 2),
        "index_train_rows": train_rows,
        "index_build_s": round(index_build_s, 2),
        "mine_qps": round(args.queries / mine_s, 1),
        "mine_qps_one_batch": round(args.queries / one_batch_s, 1),
        "mine_batch": args.batch,
        "k": args.k,
        "positive_in_topk": round(recall_self, 4),
        "shortlist_topk_overlap": None if overlap is None else round(overlap, 4),
        "candidates_per_step": round(statistics.mean(sizes), 1),
        "step_ms": round(step_ms, 2),
        "timed_steps": len(times),
        "refresh_s": round(refresh_s, 3),
        "refreshed_rows": int(refreshed),
        "full_reencode_s": full_reencode_s,
        "peak_rss_bytes": peak,
        "rss_ratio": round(peak / total, 3),
        "peak_rss_after": phases,
        **rss_parts(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "torch_threads": torch.get_num_threads(),
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "cpu_count": os.cpu_count(),
    }
    if tmp is not None:
        del bank, optimizer
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    if not args.json:
        print(json.dumps(result, indent=2), file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
