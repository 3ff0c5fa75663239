"""Which 16-byte (and 8-byte) FAISS index loses least: dev nDCG@10 of each factory over the *pretrained* bank.

No training: all-MiniLM-L6-v2 encodes the corpus and the dev queries once, then each factory is trained on the bank
(inner product), searched, and scored with hf-qret's metrics (pytrec_eval). Prints one JSON line per factory.

    python benchmarks/factories.py --data recipes/data/scifact --split dev --bank_init runs/bank_init.safetensors
    python benchmarks/factories.py --data path/to/nfcorpus --split dev RQ16x8 OPQ16,PQ16

``--bank_init``: the corpus already encoded (a recipe run's ``--bank_init_file``); without it the corpus is encoded.
Results: ``benchmarks/results/factories.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FACTORIES = ["Flat", "PQ16", "OPQ16,PQ16", "PQ32x4", "OPQ32,PQ32x4", "RQ16x8", "LSQ16x8", "OPQ16,RQ16x8",
                     "PRQ2x8x8", "PQ8", "OPQ8,PQ8", "RQ8x8", "LSQ8x8"]  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("factories", nargs="*", default=DEFAULT_FACTORIES)
    parser.add_argument("--data", default=str(REPO / "recipes" / "data" / "scifact"), help="a BEIR folder")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--bank_init", help="the corpus encoded by the model (.safetensors / .npy), in corpus order")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads (0: FAISS's default)")
    args = parser.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    from hf_qret.bank.storage import read_bank_file
    from hf_qret.config import resolve_model_path
    from hf_qret.data import load_beir
    from hf_qret.evaluation.metrics import compute_metrics
    from hf_qret.index.faiss_ops import import_faiss, set_faiss_threads

    faiss = import_faiss()
    set_faiss_threads(args.threads)
    data = load_beir(args.data, split=args.split)
    model = SentenceTransformer(resolve_model_path(args.model), device="cpu")
    if args.bank_init:
        bank = read_bank_file(Path(args.bank_init)).float().numpy()
    else:
        bank = model.encode(data.doc_texts(), batch_size=64, convert_to_numpy=True, show_progress_bar=True)
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    if len(bank) != len(data.doc_ids):
        raise SystemExit(f"--bank_init has {len(bank)} rows but {args.data} has {len(data.doc_ids)} documents.")
    query_ids = list(data.qrels)
    queries = model.encode([data.queries[q] for q in query_ids], batch_size=64, convert_to_numpy=True)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    results = []
    for factory in args.factories:
        start = time.perf_counter()
        index = faiss.index_factory(bank.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        index.train(bank)
        index.add(bank)
        scores, rows = index.search(queries, 100)
        run = {
            query_id: {data.doc_ids[row]: float(score) for score, row in zip(scores[i], rows[i]) if row >= 0}
            for i, query_id in enumerate(query_ids)
        }
        metrics = compute_metrics(run, data.qrels)
        result = {
            "data": Path(args.data).name,
            "split": args.split,
            "factory": factory,
            "bytes_per_vector": int(index.sa_code_size()),
            "ndcg@10": round(metrics["ndcg@10"], 4),
            "recall@100": round(metrics["recall@100"], 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
