"""A trained index grown with new documents vs one trained over all of them: SciFact dev nDCG@10 of the 16-byte index.

1. Splits the SciFact corpus in two halves: the *base* half holds every training positive (plus random documents up
   to half the corpus), the *added* half holds no training positive.
2. Trains the recipe (``recipes/scifact.yaml``, ``OPQ16,PQ16``) on the base half (``--eval_split ""``: its dev
   qrels point into both halves), which saves the artifact with its document encoder.
3. Loads it with ``QuantizedRetriever``, ``add_documents`` the other half (encoded with the shipped document
   encoder, coded with the trained codebooks) and ``save_pretrained``\\ s the grown artifact.
4. Evaluates the grown artifact and one trained by the recipe over the whole corpus (``--full``) on the dev split
   with ``hf-qret evaluate`` (flat bank and quantized index; seen/unseen slices).

Prints one JSON object (last line) and writes it to ``--json``.

    python recipes/train.py recipes/scifact.yaml --output_dir runs/grow_full \\
        --bank_init_file runs/bank_init_full.safetensors
    python benchmarks/grow_index.py --full runs/grow_full --out runs/grow \\
        --bank_init runs/bank_init_full.safetensors --json benchmarks/results/grow_index.json

``--bank_init`` (the full run's encoded corpus) lets the half run reuse the pretrained rows of its documents instead
of encoding them again (the rows are the same: one encoder, one corpus).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "scifact.yaml"
DATA = REPO / "recipes" / "data" / "scifact"


def split_corpus(data: Path, out: Path, seed: int = 0) -> tuple[list[str], list[str]]:
    """Writes the base half as a BEIR folder (``out``: corpus, queries, train qrels); returns (base, added) ids."""
    import gzip

    from hf_qret.data import load_beir

    train = load_beir(data, split="train")
    positives = {d for docs in train.qrels.values() for d, s in docs.items() if s > 0}
    rest = [d for d in train.doc_ids if d not in positives]
    random.Random(seed).shuffle(rest)
    fill = max(0, (len(train.doc_ids) + 1) // 2 - len(positives))
    base_set = positives | set(rest[:fill])
    base = [d for d in train.doc_ids if d in base_set]
    added = [d for d in train.doc_ids if d not in base_set]
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for doc_id in base:
            handle.write(json.dumps({"_id": doc_id, **train.corpus[doc_id]}, ensure_ascii=False) + "\n")
    queries = next(p for p in (data / "queries.jsonl", data / "queries.jsonl.gz") if p.is_file())
    opener = gzip.open if queries.suffix == ".gz" else open
    with opener(queries, "rt", encoding="utf-8") as source, open(out / "queries.jsonl", "w", encoding="utf-8") as target:
        target.write(source.read())
    (out / "qrels" / "train.tsv").write_text((data / "qrels" / "train.tsv").read_text(encoding="utf-8"), encoding="utf-8")
    return base, added


def slice_bank(full_init: Path, all_ids: list[str], base: list[str], target: Path) -> None:
    from safetensors.numpy import load_file, save_file

    rows = load_file(str(full_init))["embeddings"]
    position = {d: i for i, d in enumerate(all_ids)}
    save_file({"embeddings": rows[[position[d] for d in base]].copy()}, str(target))


def evaluate(artifact: Path, data: Path) -> dict:
    from hf_qret.cli import evaluate_main

    return evaluate_main([str(artifact), "--data", str(data), "--split", "dev", "--seen-qrels", str(data / "qrels" / "train.tsv")])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", required=True, help="an artifact the recipe trained over the whole corpus")
    parser.add_argument("--out", default="runs/grow", help="work folder (half data, half and grown artifacts)")
    parser.add_argument("--data", default=str(DATA), help="the SciFact BEIR folder")
    parser.add_argument("--bank_init", help="the full run's --bank_init_file (reused for the half run's rows)")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--skip_train", action="store_true", help="reuse OUT/half from an earlier run")
    parser.add_argument("--skip_grow", action="store_true", help="reuse OUT/grown from an earlier run (evaluate only)")
    args = parser.parse_args(argv)

    from hf_qret import QuantizedRetriever
    from hf_qret.data import doc_text, load_beir

    out, data = Path(args.out), Path(args.data)
    half_data, half, grown = out / "data", out / "half", out / "grown"
    base, added = split_corpus(data, half_data)
    full_data = load_beir(data, split="dev")
    train_seconds = None
    if not args.skip_train:
        command = [sys.executable, str(REPO / "recipes" / "train.py"), str(RECIPE), "--data_dir", str(half_data),
                   "--eval_split", "", "--output_dir", str(half)]  # fmt: skip
        if args.bank_init:
            slice_bank(Path(args.bank_init), full_data.doc_ids, base, out / "bank_init_half.safetensors")
            command += ["--bank_init_file", str(out / "bank_init_half.safetensors")]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        train_seconds = round(time.perf_counter() - start, 1)

    add_seconds = None
    if not args.skip_grow:
        retriever = QuantizedRetriever.from_pretrained(half)
        start = time.perf_counter()
        retriever.add_documents([doc_text(full_data.corpus[d]) for d in added], added)
        add_seconds = round(time.perf_counter() - start, 1)
        retriever.save_pretrained(grown)

    results = {"grown": evaluate(grown, data), "full": evaluate(args.full, data)}
    key = ("quantized", "ndcg@10")
    diff = results["grown"][key[0]][key[1]] - results["full"][key[0]][key[1]]
    summary = {
        "benchmark": "grow_index",
        "index_factory": results["full"]["index_factory"],
        "bytes_per_vector": results["full"]["bytes_per_vector"],
        "base_documents": len(base),
        "added_documents": len(added),
        "training_positives_added": 0,
        "half_train_seconds": train_seconds,
        "add_documents_seconds": add_seconds,
        "dev_quantized_ndcg@10": {"grown": results["grown"]["quantized"]["ndcg@10"], "full": results["full"]["quantized"]["ndcg@10"]},
        "grown_minus_full_quantized_ndcg@10": round(diff, 6),
        "within_0.01": abs(diff) <= 0.01,
        "results": results,
    }
    text = json.dumps(summary)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(text)
    return summary


if __name__ == "__main__":
    main()
