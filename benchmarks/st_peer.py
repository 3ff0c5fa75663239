"""The peer row of ``benchmarks/every_document.py``: a sentence-transformers MNRL fine-tune on the same pairs.

For each corpus, all-MiniLM-L6-v2 is fine-tuned with sentence-transformers' ``MultipleNegativesRankingLoss``
(no-duplicates batches) on exactly the (query, positive) pairs the recipe trains on (for the ``*-heldout`` corpora:
the training split left after the document-disjoint carve, see ``hf_qret.recipe.heldout_docs_data``), with the
recipe's encoder settings (learning rate, weight decay, batch size, epochs or ``--max_steps``, seed). The whole
corpus is then re-encoded with the fine-tuned model and served from the library's default 16-byte index for its size
(``index_factory auto``: ``RQ16x8`` below 45,000 rows, scored by the decoded cosine as hf-qret serves a normalising
model), plus a flat index. Both are scored on the same evaluation queries as ``every_document.py``: nDCG@10 over all
queries and over those whose relevant documents were (``seen``) or were not (``unseen``) training positives.

    python benchmarks/st_peer.py --corpus insuranceqa=../shared/data/insuranceqa \\
        --corpus nfcorpus-heldout=../shared/data/nfcorpus --seed 42 --out runs/st_peer \\
        --json benchmarks/results/st_peer.json

The JSON is rewritten after every corpus (one record per corpus and seed, with the phase times).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from end_to_end import mnrl_trainer  # noqa: E402
from every_document import CORPORA, RECIPE, corpus_splits, seen_docs_of  # noqa: E402


def recipe_settings() -> dict:
    """The recipe's encoder settings, with the per-corpus ``--max_steps`` of ``every_document.CORPORA`` applied."""
    return yaml.safe_load(RECIPE.read_text())


def run(
    corpus: str,
    data_dir: str,
    seed: int,
    out: Path,
    max_seq_length: int,
    encode_batch_size: int,
    max_steps_override: int | None = None,
) -> dict:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from hf_qret.config import QRetTrainingArguments, resolve_model_path
    from hf_qret.evaluation.evaluator import RetrievalEvaluator, search_run
    from hf_qret.index.auto import resolve_auto_index
    from hf_qret.index.core import QuantizedIndex
    from hf_qret.index.exact import ExactSearch

    settings = recipe_settings()
    options = CORPORA[corpus]
    max_steps = int(options[options.index("--max_steps") + 1]) if "--max_steps" in options else -1
    if max_steps_override is not None:
        max_steps = max_steps_override
    phases: dict[str, float] = {}

    train, held = corpus_splits(corpus, data_dir)
    seen_docs = seen_docs_of(train)
    model = SentenceTransformer(resolve_model_path(settings["model_name_or_path"]), device="cpu")
    model.max_seq_length = max_seq_length
    output_dir = out / corpus / f"seed{seed}" / "st_trainer"
    trainer = mnrl_trainer(model, train, settings, output_dir, seed, max_steps, logging_steps=50, use_cpu=True)
    clock = time.perf_counter()
    trainer.train()
    phases["train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    vectors = model.encode_document(
        train.doc_texts(), batch_size=encode_batch_size, convert_to_numpy=True, show_progress_bar=False
    ).astype("float32")
    phases["encode_corpus"] = time.perf_counter() - clock

    clock = time.perf_counter()
    index_args = QRetTrainingArguments(output_dir=str(out / "unused"), report_to="none")
    choice = resolve_auto_index(index_args, len(vectors))
    index = QuantizedIndex.from_args(vectors.shape[1], index_args)
    index.normalize_decoded = True  # all-MiniLM-L6-v2 normalises: served as hf-qret serves it
    index.build(vectors)
    phases["index"] = time.perf_counter() - clock

    evaluator = RetrievalEvaluator(held.queries, held.qrels, seen_doc_ids=seen_docs)
    queries = model.encode_query(
        [held.queries[q] for q in evaluator.query_ids], convert_to_numpy=True, show_progress_bar=False
    ).astype("float32")
    flat = ExactSearch(vectors)
    runs = {
        "quantized": search_run(queries, evaluator.query_ids, index, train.doc_ids, evaluator.k),
        "flat": search_run(queries, evaluator.query_ids, flat, train.doc_ids, evaluator.k),
    }
    metrics = evaluator.score(runs)
    result = {"corpus": corpus, "seed": seed, "pairs": len(trainer.train_dataset), "steps": trainer.state.global_step,
              "index_factory": index.factory, "auto_choice": choice.reason if choice else None,
              "threads": torch.get_num_threads(), "max_seq_length": model.max_seq_length,
              "phases_s": {k: round(v, 1) for k, v in phases.items()}}  # fmt: skip
    for kind in ("flat", "quantized"):
        for part, suffix in (("all", ""), ("seen", "_seen"), ("unseen", "_unseen")):
            value = metrics.get(f"{kind}_ndcg@10{suffix}")
            if value is not None and value == value:
                result[f"st_{'16b' if kind == 'quantized' else 'flat'}_{part}"] = round(float(value), 4)
    result["queries"] = {"all": len(evaluator.query_ids)}
    np.save(out / corpus / f"seed{seed}" / "st_corpus.npy", vectors)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", action="append", required=True, help="NAME=DIR, NAME one of every_document's")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--encode_batch_size", type=int, default=64)
    parser.add_argument("--max_steps", type=int, default=None, help="override the corpus's steps (smoke runs)")
    args = parser.parse_args()
    records = json.loads(args.json.read_text())["runs"] if args.json.is_file() else []
    for spec in args.corpus:
        name, _, data_dir = spec.partition("=")
        if name not in CORPORA:
            parser.error(f"--corpus {name!r}: use one of {sorted(CORPORA)}")
        (args.out / name / f"seed{args.seed}").mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        record = run(name, data_dir, args.seed, args.out, args.max_seq_length, args.encode_batch_size, args.max_steps)
        record["wall_s"] = round(time.perf_counter() - start, 1)
        records = [r for r in records if (r["corpus"], r["seed"]) != (name, args.seed)] + [record]
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"runs": records}, indent=1))
        tmp.replace(args.json)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
