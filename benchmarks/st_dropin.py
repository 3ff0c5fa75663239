"""The sentence-transformers drop-in on SciFact: text pairs + corpus= + an InformationRetrievalEvaluator, one epoch.

Written from the drop-in contract (README, "Use it in an existing script"): the training claims of the shipped
recipe split (``recipes/data/scifact``: the BEIR train claims minus the dev claims carved by
``hf_qret.data.carve_dev_split``) as ``{"anchor", "positive"}`` text pairs, the whole corpus as ``corpus=``, one epoch
at batch 32 for ``OPQ16,PQ16`` and every other ``QRetTrainingArguments`` option at its default. Reports the
evaluator's numbers from ``trainer.evaluate()`` before and after, and ``hf-qret evaluate --seen-qrels`` of the
untrained and the trained artifact on the dev claims (all / seen / unseen target documents). The last stdout line is
one JSON object.

    python benchmarks/st_dropin.py --output_dir runs/st_dropin [--set learning_rate=2e-5 --set lr_scheduler_type=constant]

The corpus is encoded once into ``OUTPUT_DIR/_qret_cache``; a re-run with the same ``--output_dir`` reuses it.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data" / "scifact"


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(REPO / "runs" / "st_dropin"))
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--index_factory", default="OPQ16,PQ16")
    parser.add_argument("--skip_untrained", action="store_true", help="skip the untrained artifact's evaluation")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a QRetTrainingArguments option (repeatable)")  # fmt: skip
    cli = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)

    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from hf_qret import QRetTrainer, QRetTrainingArguments, QuantizedRetriever, load_beir
    from hf_qret.cli import evaluate_main
    from hf_qret.config import resolve_model_path
    from hf_qret.data import doc_text

    train, dev = load_beir(DATA, split="train"), load_beir(DATA, split="dev")
    corpus = {doc_id: doc_text(doc) for doc_id, doc in train.corpus.items()}
    pairs = [(train.queries[q], corpus[d]) for q, docs in train.qrels.items() for d, s in docs.items() if s > 0]
    train_dataset = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    relevant = {q: {d for d, s in docs.items() if s > 0} for q, docs in dev.qrels.items()}
    evaluator = InformationRetrievalEvaluator(queries=dev.queries, corpus=corpus, relevant_docs=relevant, name="dev")

    overrides = dict(item.split("=", 1) for item in cli.set)
    overrides = {k: _value(v) for k, v in overrides.items()}
    out = Path(cli.output_dir)
    args = QRetTrainingArguments(
        output_dir=str(out),
        index_factory=cli.index_factory,
        num_train_epochs=cli.epochs,
        per_device_train_batch_size=cli.batch_size,
        report_to="none",
        save_strategy="no",
        **overrides,
    )
    model = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")
    start = time.perf_counter()
    trainer = QRetTrainer(model=model, args=args, train_dataset=train_dataset, corpus=corpus, evaluator=evaluator)
    setup_s = time.perf_counter() - start
    untrained = trainer.evaluate()
    if not cli.skip_untrained:
        trainer.save_model(str(out / "untrained"))
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    trained = trainer.evaluate()
    trainer.save_model()

    hits = QuantizedRetriever.from_pretrained(out, device="cpu").search(["a query"], k=10)
    seen = str(DATA / "qrels" / "train.tsv")
    artifacts = {}
    for name, folder in (("untrained", out / "untrained"), ("trained", out)):
        if name == "untrained" and cli.skip_untrained:
            continue
        artifacts[name] = evaluate_main([str(folder), "--data", str(DATA), "--split", "dev", "--seen-qrels", seen])

    def pick(report: dict) -> dict:
        return {
            kind: round(report[kind]["ndcg@10"], 4) for kind in ("flat", "quantized")
        } | {
            f"{part}_{kind}": round(report[part][kind]["ndcg@10"], 4)
            for part in ("seen", "unseen")
            for kind in ("flat", "quantized")
        }

    result = {
        "pairs": len(train_dataset),
        "dev_queries": len(relevant),
        "bank_rows": len(trainer.bank),
        "bytes_per_vector": trainer.index.bytes_per_vector,
        "overrides": overrides,
        "evaluate_untrained": {k: round(v, 4) for k, v in untrained.items() if k.endswith("ndcg@10")},
        "evaluate_trained": {k: round(v, 4) for k, v in trained.items() if k.endswith("ndcg@10")},
        "ndcg@10_untrained": pick(artifacts["untrained"]) if "untrained" in artifacts else None,
        "ndcg@10_trained": pick(artifacts["trained"]),
        "dev_seen_queries": artifacts["trained"]["seen"]["queries"],
        "dev_unseen_queries": artifacts["trained"]["unseen"]["queries"],
        "search_ids_in_corpus": all(doc_id in corpus for doc_id, _ in hits[0]),
        "setup_s": round(setup_s, 1),
        "train_s": round(train_s, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
