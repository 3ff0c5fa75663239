"""Codebook distillation on saved artifacts: the 16-byte nDCG@10 (all / seen / unseen) before and after
:func:`hf_qret.index.distill.distill_codebooks`, with the inputs the trainer's train-end step gives it
(:mod:`hf_qret.training.distillation`): the training queries through the artifact's query encoder plus
``--doc_queries`` bank rows (the same seeded sample), ``--epochs`` epochs, the artifact's ``normalize_decoded``.

    python benchmarks/distill_codebooks.py --run NAME=ARTIFACT_DIR:DATA_DIR[:HELDOUT_FRACTION] ... \\
        [--split dev] [--epochs 4] [--doc_queries 10000] [--rebuild] [--json_out benchmarks/results/distill_codebooks.json]

``--rebuild``: the artifact's index is first retrained on its saved bank (for artifacts whose codebooks were already
distilled at train end), so that settings of the distillation can be compared on the same trained bank.

``HELDOUT_FRACTION``: the artifact was trained with ``--heldout_docs_fraction`` (its training and evaluation split
are carved from ``train`` as the recipe carves them). "seen": evaluation queries with a relevant document that is a
training positive. Training runs apply the same step at train end; this script measures it on artifacts trained
before it existed (the safety net's choice is not re-made here).
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


def splits(data_dir: str, split: str, fraction: float | None):
    from hf_qret.data import load_beir
    from hf_qret.recipe import heldout_docs_data

    if fraction:
        return heldout_docs_data(load_beir(data_dir, split="train"), fraction)
    return load_beir(data_dir, split="train"), load_beir(data_dir, split=split)


def ndcg(index, queries, evaluation, doc_ids, slices) -> dict[str, float]:
    from hf_qret.evaluation.evaluator import search_run
    from hf_qret.evaluation.metrics import compute_metrics

    qids = [q for q in evaluation.qrels if q in evaluation.queries]
    run = search_run(queries, qids, index, doc_ids, 100)
    out = {"all": compute_metrics(run, evaluation.qrels)["ndcg@10"]}
    for name, ids in slices.items():
        out[name] = compute_metrics(run, evaluation.qrels, query_ids=ids)["ndcg@10"] if ids else None
    return {k: (round(v, 4) if v is not None else None) for k, v in out.items()}


def measure(name: str, artifact: str, data_dir: str, fraction: float | None, args) -> dict:
    from sentence_transformers import SentenceTransformer

    from hf_qret.index.distill import distill_codebooks
    from hf_qret.serving.artifact import load_retrieval_files
    from hf_qret.serving.encoder import encode_texts

    train, evaluation = splits(data_dir, args.split, fraction)
    files = load_retrieval_files(artifact, load_bank=True)
    bank = np.asarray(files.bank.float32_rows()[: len(files.doc_ids)], dtype=np.float32)
    model = SentenceTransformer(artifact, device="cpu")
    qids = [q for q in evaluation.qrels if q in evaluation.queries]
    queries = encode_texts(model, [evaluation.queries[q] for q in qids], role="query")
    positives = {d for docs in train.qrels.values() for d, s in docs.items() if s > 0}
    seen = [q for q in qids if any(d in positives and s > 0 for d, s in evaluation.qrels[q].items())]
    slices = {"seen": seen, "unseen": [q for q in qids if q not in set(seen)]}
    texts = list(dict.fromkeys(train.queries[q] for q in train.qrels if q in train.queries))
    train_queries = encode_texts(model, texts, role="query")
    sample = min(len(bank), args.doc_queries)
    rows = np.sort(np.random.default_rng(args.seed).choice(len(bank), sample, replace=False))
    distill_queries = np.concatenate([train_queries, bank[rows]])
    index = files.index
    if args.rebuild:  # codebooks retrained on the saved bank, as the run's final refresh trains them before distilling
        from hf_qret.index.core import QuantizedIndex

        rebuilt = QuantizedIndex(bank.shape[1], index.factory, normalize_decoded=index.normalize_decoded)
        rebuilt.build(bank)
        index = rebuilt
    before = ndcg(index, queries, evaluation, files.doc_ids, slices)
    flat = ndcg(_flat(index, bank), queries, evaluation, files.doc_ids, slices)
    clock = time.perf_counter()
    report = distill_codebooks(
        index,
        bank,
        distill_queries,
        cosine=bool(index.normalize_decoded),
        epochs=args.epochs,
        seed=args.seed,
        learning_rate=args.learning_rate,
        candidates=args.candidates,
    )
    seconds = time.perf_counter() - clock
    after = ndcg(index, queries, evaluation, files.doc_ids, slices)
    row = {
        "name": name, "artifact": artifact, "eval_queries": len(qids), "seen": len(seen),
        "unseen": len(qids) - len(seen), "train_queries": len(texts), "doc_queries": sample,
        "normalize_decoded": bool(index.normalize_decoded), "factory": index.factory, "flat": flat,
        "before": before, "after": after, "distillation": report if isinstance(report, str) else report.record(),
        "seconds": round(seconds, 1),
    }  # fmt: skip
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def _flat(index, bank):
    from hf_qret.index.core import QuantizedIndex

    flat = QuantizedIndex(bank.shape[1], "Flat")
    flat.build(bank)
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="NAME=ARTIFACT:DATA[:HELDOUT_FRACTION]")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--doc_queries", type=int, default=10_000)
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="retrain the index on the saved bank first (an artifact already distilled)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--json_out", type=Path)
    args = parser.parse_args()
    rows = []
    for spec in args.run:
        name, _, rest = spec.partition("=")
        parts = rest.split(":")
        rows.append(measure(name, parts[0], parts[1], float(parts[2]) if len(parts) > 2 else None, args))
    result = {
        "rebuild": args.rebuild,
        "epochs": args.epochs,
        "doc_queries": args.doc_queries,
        "seed": args.seed,
        "learning_rate": args.learning_rate,
        "candidates": args.candidates,
        "runs": rows,
    }
    if args.json_out:
        tmp = args.json_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.json_out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
