"""Per-process memory of the bank, its optimizer state and the index: replicated vs sharded (``bank_sharding``).

N gloo processes on one machine each build what a training process holds: the bank (synthetic rows), the row
optimizer after a few steps (every process's candidate rows get a gradient, exchanged as the trainer exchanges them)
and the quantized index over the bank, then mine once. Replicated: every process holds the whole of each; sharded
(``ShardedTargetBank`` / ``ShardedIndex``): each holds its slice of the rows. Reported per process: the bytes of the
bank tensor, of the optimizer state and of the FAISS index (``serialize_index``), and the peak RSS above the
process's RSS before the bank existed (``VmHWM - VmRSS`` at start: the transient training sample included).

    python benchmarks/shard_memory.py --rows 200000 --dim 384 --worlds 2 4 \\
        --out benchmarks/results/shard_memory.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHUNK = 16384


def _status(key: str) -> int:
    """A ``/proc/self/status`` memory line, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _rows(start: int, end: int, dim: int) -> np.ndarray:
    """Rows ``start..end`` of the synthetic unit-norm bank (the same values whichever process makes them)."""
    out = np.empty((end - start, dim), dtype=np.float32)
    for chunk in range(start // CHUNK, (end - 1) // CHUNK + 1):
        lo, hi = chunk * CHUNK, (chunk + 1) * CHUNK
        values = np.random.default_rng(chunk).standard_normal((CHUNK, dim), dtype=np.float32)
        values /= np.linalg.norm(values, axis=1, keepdims=True)
        a, b = max(lo, start), min(hi, end)
        out[a - start : b - start] = values[a - lo : b - lo]
    return out


def worker(rank: int, world: int, port: int, mode: str, opts: dict, out: str) -> None:
    import torch.distributed as dist

    from hf_qret.bank.collectives import ShardLayout
    from hf_qret.bank.core import TargetBank
    from hf_qret.bank.sharding import ShardedTargetBank
    from hf_qret.index.core import QuantizedIndex, set_faiss_threads
    from hf_qret.index.sharding import ShardedIndex
    from hf_qret.training.distributed import all_reduce_row_grad
    from hf_qret.training.optim import RowAdam

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    set_faiss_threads(1)
    torch.set_num_threads(1)
    count, dim = opts["rows"], opts["dim"]
    layout = ShardLayout.create(count)
    base_rss = _status("VmRSS")
    start_time = time.perf_counter()
    start, end = (layout.start, layout.end) if mode == "sharded" else (0, count)
    if mode == "sharded":
        bank = ShardedTargetBank.zeros(layout, dim)
        index = ShardedIndex(dim, opts["factory"], layout)
    else:
        bank = TargetBank.zeros(count, dim)
        index = QuantizedIndex(dim, opts["factory"])
    for first in range(start, end, CHUNK):  # filled chunk by chunk: the rows exist once
        bank.write_rows(first - start, _rows(first, min(end, first + CHUNK), dim))
    optimizer = RowAdam(bank, lr=1e-3)
    for step in range(opts["steps"]):  # each process's own candidates, as the trainer's global batch would have
        rng = np.random.default_rng(1000 * step + rank)
        candidates = torch.from_numpy(np.unique(rng.integers(0, count, opts["candidates"])))
        query = torch.from_numpy(rng.standard_normal(dim).astype(np.float32))
        (bank.gather(candidates) @ query).sum().backward()
        if mode == "sharded":
            bank.exchange_gradients()
        else:
            all_reduce_row_grad(bank.local_weight)
        optimizer.step()
        optimizer.zero_grad()
    index.build(bank.local_float32_rows(), max_train_rows=opts["train_rows"])
    queries = np.random.default_rng(7 + rank).standard_normal((64, dim)).astype(np.float32)
    index.mine(queries, 100)
    seconds = time.perf_counter() - start_time
    record = {
        "rank": rank,
        "bank_rows": int(bank.local_weight.shape[0]),
        "bank_bytes": int(bank.local_nbytes),
        "optimizer_bytes": int(optimizer.nbytes),
        "index_bytes": int(index.faiss.serialize_index(index.index).size),
        "rss_now_above_start_bytes": _status("VmRSS") - base_rss,
        "peak_rss_above_start_bytes": _status("VmHWM") - base_rss,
        "peak_rss_bytes": _status("VmHWM"),
        "seconds": round(seconds, 1),
    }
    record["bank_optimizer_index_bytes"] = record["bank_bytes"] + record["optimizer_bytes"] + record["index_bytes"]
    records: list = [None] * world
    dist.all_gather_object(records, record)
    if rank == 0:
        Path(out).write_text(json.dumps(records))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(world: int, mode: str, opts: dict, scratch: Path) -> list[dict]:
    out = scratch / f"{mode}-{world}.json"
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=worker, args=(r, world, port, mode, opts, str(out))) for r in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    if any(p.exitcode != 0 for p in processes):
        raise SystemExit(f"{mode} at {world} processes failed: exit codes {[p.exitcode for p in processes]}")
    return json.loads(out.read_text())


def table(results: dict) -> str:
    mb = 1 << 20
    lines = [
        f"# Per-process memory: replicated vs sharded bank ({results['rows']:,} x {results['dim']} fp32, "
        f"{results['factory']})",
        "",
        "Worst process of each run (`benchmarks/shard_memory.py`; gloo, CPU, "
        f"{results['steps']} optimizer steps of ~{results['candidates']} candidate rows per process, index trained on "
        f"{results['train_rows']:,} rows). Bank + optimizer + index: the bytes of the bank tensor, the row "
        "optimizer's state and the FAISS index; peak RSS: the process's peak above its RSS before the bank existed.",
        "",
        "| processes | mode | bank MB | optimizer MB | index MB | bank + optimizer + index MB | peak RSS MB | ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for world, runs in results["runs"].items():
        base = max(r["bank_optimizer_index_bytes"] for r in runs["replicated"])
        for mode in ("replicated", "sharded"):
            worst = max(runs[mode], key=lambda r: r["bank_optimizer_index_bytes"])
            peak = max(r["peak_rss_above_start_bytes"] for r in runs[mode])
            lines.append(
                f"| {world} | {mode} | {worst['bank_bytes'] / mb:.0f} | {worst['optimizer_bytes'] / mb:.1f} | "
                f"{worst['index_bytes'] / mb:.1f} | {worst['bank_optimizer_index_bytes'] / mb:.0f} | {peak / mb:.0f} | "
                f"{worst['bank_optimizer_index_bytes'] / base:.2f} |"
            )
    lines += [
        "",
        "The bank, its optimizer state and the index scale as 1/N (the optimizer state by blocks of 16,384 touched "
        "rows). The peak RSS above the start also holds what every process has whatever the sharding: FAISS's encoding "
        "buffers (chunks of up to 128 MB of float32 rows), the allocator's retained pages, and, on process 0, the "
        "codebook training sample gathered from the shards (the replicated processes each train on the same sample).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--factory", default="PQ16")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=4096)
    parser.add_argument("--train_rows", type=int, default=65536)
    parser.add_argument("--out", default="benchmarks/results/shard_memory.json")
    args = parser.parse_args()
    opts = {k: getattr(args, k) for k in ("rows", "dim", "factory", "steps", "candidates", "train_rows")}
    scratch = Path(args.out).with_suffix(".tmp")
    scratch.mkdir(parents=True, exist_ok=True)
    results = {**opts, "torch": torch.__version__, "cpus": os.cpu_count(), "runs": {}}
    for world in args.worlds:
        results["runs"][str(world)] = {mode: run(world, mode, opts, scratch) for mode in ("replicated", "sharded")}
        print(json.dumps({"world": world, **results["runs"][str(world)]}), flush=True)
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
