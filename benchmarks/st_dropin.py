"""The sentence-transformers drop-in with hf-qret's defaults: text pairs + ``corpus=`` + an IR evaluator.

The script a sentence-transformers user writes, converted the documented way (swap the trainer and arguments
classes, pass ``corpus=``) and given **no hf-qret option** other than ``output_dir``: the training claims of a BEIR
folder as ``{"anchor", "positive"}`` text pairs, the whole corpus as ``corpus=``, an ``InformationRetrievalEvaluator``
on the dev split, ``num_train_epochs`` (or ``max_steps``) and the batch size. Every ``QRetTrainingArguments`` method
option stays at its default (the index factory included), so this measures what a library user gets.

Per seed, the artifact that ``save_model()`` writes is scored with ``hf-qret evaluate --seen-qrels`` on the dev split
(nDCG@10 of the flat bank and of the quantized index, over all / seen / unseen queries). The untrained model is scored
once (first seed) through ``trainer.evaluate()`` before training. The last stdout line is one JSON object with every
seed's numbers and their means.

    python benchmarks/st_dropin.py --output_dir runs/st_dropin                       # SciFact (shipped), 4 epochs
    python benchmarks/st_dropin.py --output_dir runs/st_dropin_nf --data_dir DIR --max_steps 600   # NFCorpus
    python benchmarks/st_dropin.py --set index_factory=OPQ16,PQ16 ...                # override an option

The corpus is encoded once, into the first seed's ``_qret_cache``, and reused by the other seeds.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data" / "scifact"
CACHE = "_qret_cache"


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _pick(report: dict) -> dict:
    """nDCG@10 of the flat bank and the quantized index, over all / seen / unseen queries."""
    picked = {kind: round(report[kind]["ndcg@10"], 4) for kind in ("flat", "quantized")}
    for part in ("seen", "unseen"):
        for kind in ("flat", "quantized"):
            picked[f"{part}_{kind}"] = round(report[part][kind]["ndcg@10"], 4) if report[part]["queries"] else None
    return picked


def run_seed(cli: argparse.Namespace, seed: int, out: Path, overrides: dict, evaluate_untrained: bool) -> dict:
    """One drop-in run: build the script's inputs, train, save, score the saved artifact."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from hf_qret import QRetTrainer, QRetTrainingArguments, load_beir
    from hf_qret.cli import evaluate_main
    from hf_qret.config import resolve_model_path
    from hf_qret.data import doc_text

    data = Path(cli.data_dir)
    train, dev = load_beir(data, split="train"), load_beir(data, split=cli.eval_split)
    corpus = {doc_id: doc_text(doc) for doc_id, doc in train.corpus.items()}
    pairs = [(train.queries[q], corpus[d]) for q, docs in train.qrels.items() for d, s in docs.items() if s > 0]
    train_dataset = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
    relevant = {q: {d for d, s in docs.items() if s > 0} for q, docs in dev.qrels.items()}
    evaluator = InformationRetrievalEvaluator(queries=dev.queries, corpus=corpus, relevant_docs=relevant, name="dev")

    args = QRetTrainingArguments(
        output_dir=str(out),
        num_train_epochs=cli.epochs,
        max_steps=cli.max_steps,
        per_device_train_batch_size=cli.batch_size,
        seed=seed,
        report_to="none",
        save_strategy="no",
        **overrides,
    )
    model = SentenceTransformer(resolve_model_path(cli.model), device="cpu")
    start = time.perf_counter()
    trainer = QRetTrainer(model=model, args=args, train_dataset=train_dataset, corpus=corpus, evaluator=evaluator)
    setup_s = time.perf_counter() - start
    untrained = trainer.evaluate(metric_key_prefix="untrained") if evaluate_untrained else {}
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    trainer.save_model()
    seen = next((data / "qrels").glob("train.tsv*"))
    report = evaluate_main([str(out), "--data", str(data), "--split", cli.eval_split, "--seen-qrels", str(seen)])
    row = {
        "seed": seed,
        "index_factory": trainer.index.factory,
        "bytes_per_vector": trainer.index.bytes_per_vector,
        "steps": trainer.state.global_step,
        "setup_s": round(setup_s, 1),
        "train_s": round(train_s, 1),
        "trained": _pick(report),
        "dev_seen_queries": report["seen"]["queries"],
        "dev_unseen_queries": report["unseen"]["queries"],
    }
    if untrained:
        row["untrained"] = {
            kind: round(next(v for k, v in untrained.items() if k.endswith(f"_{kind}_ndcg@10")), 4)
            for kind in ("flat", "quantized")
        }
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(REPO / "runs" / "st_dropin"))
    parser.add_argument("--data_dir", default=str(DATA), help="a BEIR folder with qrels/train and the eval split")
    parser.add_argument("--eval_split", default="dev")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--max_steps", type=int, default=-1, help="overrides --epochs when > 0")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a QRetTrainingArguments option (repeatable); none by default")  # fmt: skip
    cli = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    overrides = {key: _value(value) for key, value in (item.split("=", 1) for item in cli.set)}

    root = Path(cli.output_dir)
    rows = []
    for number, seed in enumerate(cli.seeds):
        out = root / f"seed-{seed}"
        first_cache = root / f"seed-{cli.seeds[0]}" / CACHE
        if number and first_cache.is_dir() and not (out / CACHE).exists():
            shutil.copytree(first_cache, out / CACHE)  # the corpus is encoded once
        rows.append(run_seed(cli, seed, out, overrides, evaluate_untrained=number == 0))
        print(json.dumps(rows[-1]), flush=True)

    def mean(key: str) -> float | None:
        values = [row["trained"][key] for row in rows if row["trained"][key] is not None]
        return round(statistics.fmean(values), 4) if values else None

    result = {
        "data_dir": Path(cli.data_dir).name,
        "epochs": cli.epochs,
        "max_steps": cli.max_steps,
        "batch_size": cli.batch_size,
        "overrides": overrides,
        "seeds": cli.seeds,
        "index_factory": rows[0]["index_factory"],
        "bytes_per_vector": rows[0]["bytes_per_vector"],
        "untrained": rows[0].get("untrained"),
        "mean": {key: mean(key) for key in rows[0]["trained"]},
        "per_seed": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
