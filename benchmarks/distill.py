"""Quantizer distillation (hf_qret.distill) applied to a saved artifact or to the untrained model: dev nDCG@10 of
the flat bank and of the quantized index before and after, over all / seen / unseen-target queries.

The encoder and bank are not retrained: the distillation only relearns the index's PQ centroids (and optionally the
OPQ rotation) from the flat bank's ranking and re-encodes every document, so one trained artifact serves every
variant. Query embeddings (training queries, labels unused; corpus pseudo-queries) are cached under ``--cache``.

    # the trained recipe's artifact
    python benchmarks/distill.py --artifact runs/base --data recipes/data/scifact --seeds 0 1 2
    # the untrained model (pretrained encoder + its bank), any factory
    python benchmarks/distill.py --untrained runs/bank_init.safetensors --factory OPQ8,PQ8 --data recipes/data/scifact
    # NFCorpus dev (the recipe's model, untrained)
    python benchmarks/distill.py --untrained runs/nf_bank.safetensors --data /work/shared/data/nfcorpus

Prints one JSON object as the last line: ``{"before": {...}, "after": [{...} per seed], "mean": {...}}`` with
``flat_all``, ``all``, ``seen``, ``unseen`` (quantized nDCG@10) per entry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _metrics(evaluator, model, bank, index) -> dict[str, float]:
    m = evaluator(model, bank, index)
    out = {"flat_all": m["flat_ndcg@10"], "all": m["quantized_ndcg@10"]}
    for name in ("seen", "unseen"):
        if f"quantized_ndcg@10_{name}" in m:
            out[name] = m[f"quantized_ndcg@10_{name}"]
            out[f"flat_{name}"] = m[f"flat_ndcg@10_{name}"]
    return {k: round(v, 4) for k, v in out.items()}


def _cached(path: Path, make) -> np.ndarray:
    if path.is_file():
        return np.load(path)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, value)
    return value


def load_setup(args):
    """(model, bank, index, train data, evaluator, tag) for ``--artifact`` or ``--untrained``."""
    from sentence_transformers import SentenceTransformer

    from hf_qret.artifact import load_retrieval_files
    from hf_qret.bank import TargetBank
    from hf_qret.config import resolve_model_path
    from hf_qret.data import load_beir
    from hf_qret.evaluation import RetrievalEvaluator
    from hf_qret.index import QuantizedIndex

    train = load_beir(args.data, split=args.train_split)
    dev = load_beir(args.data, split=args.split)
    seen = {d for docs in train.qrels.values() for d, s in docs.items() if s > 0}
    evaluator = RetrievalEvaluator(dev.queries, dev.qrels, seen_doc_ids=seen)
    if args.artifact:
        files = load_retrieval_files(args.artifact, load_bank=True)
        model = SentenceTransformer(args.artifact, device="cpu")
        bank, index = files.bank, files.index
        tag = str(Path(args.artifact).resolve())
        if args.factory and args.factory != index.factory:
            index = QuantizedIndex(bank.dim, args.factory)
            index.build(bank.float32_rows())
    else:
        model = SentenceTransformer(resolve_model_path(args.model), device="cpu")
        bank = TargetBank.from_file(args.untrained, train.doc_ids)
        factory = args.factory or "OPQ16,PQ16"
        tag = f"untrained:{args.model}"
        built = Path(args.cache) / hashlib.sha1(f"{tag}|{args.data}".encode()).hexdigest()[:12] / f"{factory}.faiss"
        if built.is_file():  # the index over the untrained bank, built once (OPQ training is the slow part)
            index = QuantizedIndex.load(built, factory)
        else:
            index = QuantizedIndex(bank.dim, factory)
            index.build(bank.float32_rows())
            built.parent.mkdir(parents=True, exist_ok=True)
            index.save(built)
    return model, bank, index, train, evaluator, tag


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", help="a trained artifact folder (encoder, bank, index)")
    source.add_argument("--untrained", help="the initial bank file (bank.safetensors) of the pretrained --model")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--factory", help="index factory (default: the artifact's; OPQ16,PQ16 untrained)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--queries", default="both", choices=["train", "pseudo", "both"])
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--num-random", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rotation", action="store_true", help="also learn the OPQ rotation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--variants", nargs="+", default=[""],
        help="several settings in one run (the setup and query encoding done once), each 'key=value,...' over the "
        "flags above, e.g. 'lr=3e-4' 'lr=1e-3,rotation=1' 'queries=train'",
    )  # fmt: skip
    parser.add_argument("--cache", default="runs/distill_cache")
    parser.add_argument("--save", help="write the (last seed's) distilled artifact here (copy of --artifact)")
    args = parser.parse_args(argv)

    from hf_qret.distill import distill_quantizer, pseudo_query_texts
    from hf_qret.encoder import encode_texts
    from hf_qret.index import QuantizedIndex

    model, bank, index, train, evaluator, tag = load_setup(args)
    key = hashlib.sha1(f"{tag}|{args.data}".encode()).hexdigest()[:12]
    cache = Path(args.cache) / key
    train_texts = [train.queries[q] for q in train.qrels]
    pseudo_texts = pseudo_query_texts(train.corpus, train.doc_ids)
    encoded = {
        "train": _cached(cache / "train.npy", lambda: encode_texts(model, train_texts, batch_size=64)),
        "pseudo": _cached(cache / "pseudo.npy", lambda: encode_texts(model, pseudo_texts, batch_size=64)),
    }
    vectors = bank.float32_rows()[:]
    before = _metrics(evaluator, model, bank, index)
    print(json.dumps({"before": before, "factory": index.factory}), file=sys.stderr)
    after, means = [], {}
    types = {"lr": float, "temperature": float, "top_k": int, "num_random": int, "rounds": int, "epochs": int,
             "rotation": lambda v: v not in ("0", "false"), "queries": str}  # fmt: skip
    for variant in args.variants:
        options = dict(vars(args))
        for item in filter(None, variant.split(",")):
            key, value = item.split("=", 1)
            options[key] = types[key](value)
        sources = ["train", "pseudo"] if options["queries"] == "both" else [options["queries"]]
        queries = np.concatenate([encoded[name] for name in sources])
        rows = []
        for seed in args.seeds:
            student = QuantizedIndex.from_index(index.faiss.clone_index(index.index), index.factory)
            start = time.perf_counter()
            result = distill_quantizer(
                student, vectors, queries, top_k=options["top_k"], num_random=options["num_random"],
                temperature=options["temperature"], rounds=options["rounds"], epochs=options["epochs"],
                learning_rate=options["lr"], learn_rotation=options["rotation"], seed=seed,
            )  # fmt: skip
            row = _metrics(evaluator, model, bank, student)
            row.update(variant=variant, seed=seed, seconds=round(time.perf_counter() - start, 1))
            row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in result.as_dict().items()})
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
        after += rows
        means[variant] = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("all", "seen", "unseen") if k in rows[0]}
    mean = means[args.variants[-1]]
    if args.save and args.artifact:
        import shutil

        shutil.copytree(args.artifact, args.save, dirs_exist_ok=True)
        student.save(Path(args.save) / "index.faiss")
    out = {"factory": index.factory, "queries": args.queries, "before": before, "after": after, "mean": mean, "means": means,
           "options": {k: v for k, v in vars(args).items() if k not in ("seeds", "cache", "save")}}  # fmt: skip
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
