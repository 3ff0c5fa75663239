"""Where ``index_factory auto`` should switch from ``RQ16x8`` to ``OPQ16,IVF<nlist>,PQ16``: both served as the
library serves a cosine model (``normalize_decoded``: each query's top rows re-scored by their decoded cosine) over
haystacks of growing size, real SciFact rows plus the distractor rows of ``benchmarks/haystack.py``.

Per size: build time, untrained dev nDCG@10 (all-MiniLM-L6-v2 queries; the distractors are non-relevant) and search
queries/s at k = 10 on 1 thread and on all threads (batches of 32 queries, as ``haystack.py`` measures serving).
``RQ16x8`` decodes every code per query, so its speed falls with rows; the crossing of the 1,000 queries/s serving
goal is interpolated between the two sizes that bracket it, for 1 thread and for all threads.

    python benchmarks/switch_point.py --data_dir RUNS/scifact_1m-data/beir --bank_file scifact_bank.npy \\
        --distractors RUNS/scifact_1m-data/distractors_1000000.npy --rows 25000 40000 55000 70000 \\
        --out benchmarks/results/switch_point.json

Run it on an otherwise idle machine: the queries/s are wall-clock measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from end_to_end import cpu_flags, machine  # noqa: E402
from haystack import load_model, score, search_qps  # noqa: E402

GOAL_QPS = 1000


def crossing_rows(sizes: list[dict], factory: str, key: str, goal: float = GOAL_QPS) -> dict:
    """Where ``factory``'s queries/s (``key``) crosses ``goal``: interpolated linearly in rows between the two measured
    sizes that bracket it (``None`` when no pair does), and, for reference, ``rows x qps / goal`` at every size (the
    crossing if search cost were exactly proportional to rows; it grows with size, a fixed per-query cost).

    Example:
        >>> sizes = [{"rows": 10, "factory": "F", "q": 2000.0}, {"rows": 30, "factory": "F", "q": 500.0}]
        >>> crossing_rows(sizes, "F", "q")["rows_at_goal"]
        23
    """
    points = sorted((r["rows"], r[key]) for r in sizes if r["factory"] == factory)
    at_goal = None
    for (rows_a, qps_a), (rows_b, qps_b) in zip(points, points[1:]):
        if qps_a >= goal > qps_b:
            at_goal = round(rows_a + (qps_a - goal) / (qps_a - qps_b) * (rows_b - rows_a))
            break
    return {"rows_at_goal": at_goal, "proportional_estimate_each_size": [round(r * q / goal) for r, q in points]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="the BEIR folder (its dev split is scored)")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--bank_file", required=True, help="the real corpus's float32 rows (.npy, corpus order)")
    parser.add_argument("--distractors", required=True, help="distractor rows (.npy) from benchmarks/haystack.py")
    parser.add_argument("--rows", type=int, nargs="+", required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from hf_qret.data import load_beir
    from hf_qret.evaluation.evaluator import RetrievalEvaluator
    from hf_qret.index.auto import LARGE_FACTORY, LARGE_NPROBE, SMALL_FACTORY, ivf_lists
    from hf_qret.index.core import QuantizedIndex
    from hf_qret.serving.encoder import encode_texts

    data = load_beir(args.data_dir, split=args.split)
    real = np.load(args.bank_file).astype(np.float32)
    if len(real) != len(data.doc_ids):
        parser.error(f"--bank_file has {len(real)} rows, the corpus {len(data.doc_ids)}")
    distractors = np.load(args.distractors, mmap_mode="r")
    evaluator = RetrievalEvaluator(data.queries, data.qrels)
    queries = encode_texts(load_model(), [data.queries[q] for q in evaluator.query_ids], role="query")

    sizes = []
    for rows in args.rows:
        haystack = np.concatenate([real, np.asarray(distractors[: rows - len(real)])])
        doc_ids = data.doc_ids + [f"d{i}" for i in range(len(haystack) - len(real))]
        for factory, params in ((SMALL_FACTORY, None), (LARGE_FACTORY.format(nlist=ivf_lists(rows)),
                                                        f"nprobe={LARGE_NPROBE}")):  # fmt: skip
            index = QuantizedIndex(haystack.shape[1], factory, params)
            index.normalize_decoded = True
            clock = time.perf_counter()
            index.build(haystack)
            row = {
                "rows": len(haystack),
                "factory": factory,
                "search_params": params,
                "build_s": round(time.perf_counter() - clock, 1),
                **score(evaluator, queries, index, doc_ids),
                "qps_k10_1thread": round(search_qps(index, queries, 10, 1), 1),
                "qps_k10_all": round(search_qps(index, queries, 10, None), 1),
            }
            print(json.dumps(row), flush=True)
            sizes.append(row)
            del index

    crossing = {threads: crossing_rows(sizes, SMALL_FACTORY, f"qps_k10_{threads}") for threads in ("1thread", "all")}
    record = {"machine": machine(), "cpu_flags": cpu_flags(), "queries": len(queries), "goal_qps": GOAL_QPS, "sizes": sizes,
              f"{SMALL_FACTORY}_crossing": crossing}  # fmt: skip
    print(json.dumps(record))
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
