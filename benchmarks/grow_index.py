"""A trained index grown with new documents vs one trained over all of them: SciFact dev nDCG@10 of the 16-byte index.

For each seed:

1. Splits the SciFact corpus in two halves: the *base* half holds every training positive (plus random documents up
   to half the corpus), the *added* half holds no training positive (the split is the same for every seed).
2. Trains the recipe (``recipes/scifact.yaml``: ``RQ16x8``, 16 bytes) on the train claims twice with that seed: over the
   base half, and over the whole corpus (``--eval_split ""``, ``--train_on_eval_split false``: the dev claims are
   held out of both, and both artifacts are measured the same way afterwards).
3. Loads the half artifact with ``QuantizedRetriever``, ``add_documents`` the other half (encoded with the shipped
   document encoder, coded with the trained codebooks) and ``save_pretrained``\\ s the grown artifact.
4. Evaluates the grown and the full artifact on the dev split with ``hf-qret evaluate`` (flat bank and quantized
   index; seen/unseen slices), and, to isolate what growing costs from what training on half a corpus changes, the
   grown artifact with its index rebuilt (codebooks trained again) over all of its rows: same encoder, same bank.

Prints one JSON object (last line: per-seed numbers and the means) and writes it to ``--json``.

    python benchmarks/grow_index.py --seeds 42 43 44 --bank_init runs/bank_init.safetensors \\
        --out runs/grow --json benchmarks/results/grow_index.json

``--bank_init`` (the encoded corpus, e.g. a recipe run's ``--bank_init_file``) lets both runs reuse the pretrained
rows instead of encoding the corpus again (the rows are the same: one encoder, one corpus).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "scifact.yaml"
DATA = REPO / "recipes" / "data" / "scifact"
#: Both runs train on the train claims only and ship what they trained; the dev claims stay held out.
TRAIN_OPTIONS = ["--eval_split", "", "--train_on_eval_split", "false", "--keep_untrained_if_better", "false"]


def split_corpus(data: Path, out: Path, seed: int = 0) -> tuple[list[str], list[str]]:
    """Writes the base half as a BEIR folder (``out``: corpus, queries, train qrels); returns (base, added) ids."""
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
    with (
        opener(queries, "rt", encoding="utf-8") as source,
        open(out / "queries.jsonl", "w", encoding="utf-8") as target,
    ):
        target.write(source.read())
    (out / "qrels" / "train.tsv").write_text(
        (data / "qrels" / "train.tsv").read_text(encoding="utf-8"), encoding="utf-8"
    )
    return base, added


def slice_bank(full_init: Path, all_ids: list[str], base: list[str], target: Path) -> None:
    from safetensors.numpy import load_file, save_file

    rows = load_file(str(full_init))["embeddings"]
    position = {d: i for i, d in enumerate(all_ids)}
    save_file({"embeddings": rows[[position[d] for d in base]].copy()}, str(target))


def evaluate(artifact: Path, data: Path) -> dict:
    from hf_qret.cli import evaluate_main

    return evaluate_main(
        [str(artifact), "--data", str(data), "--split", "dev", "--seen-qrels", str(data / "qrels" / "train.tsv")]
    )


def train(data_dir: Path, output_dir: Path, seed: int, bank_init: Path | None) -> float:
    command = [sys.executable, str(REPO / "recipes" / "train.py"), str(RECIPE), "--data_dir", str(data_dir),
               "--output_dir", str(output_dir), "--seed", str(seed), *TRAIN_OPTIONS]  # fmt: skip
    if bank_init is not None:
        command += ["--bank_init_file", str(bank_init)]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return round(time.perf_counter() - start, 1)


def rebuilt(grown: Path, target: Path) -> Path:
    """The grown artifact with its index trained again over all of its rows (same encoder, same bank)."""
    from hf_qret.index.core import QuantizedIndex
    from hf_qret.serving.artifact import INDEX_NAME, load_retrieval_files

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(grown, target)
    files = load_retrieval_files(target, load_bank=True)
    index = QuantizedIndex(files.config["dim"], files.config["index_factory"])
    index.build(files.bank.float32_rows())
    index.save(target / INDEX_NAME)
    return target


def quantized(result: dict, slice_: str | None = None) -> float:
    part = result if slice_ is None else result[slice_]
    return part["quantized"]["ndcg@10"]


def one_seed(
    seed: int, data: Path, out: Path, half_data: Path, base: list[str], added: list[str], bank_init: Path | None
) -> dict:
    from hf_qret import QuantizedRetriever
    from hf_qret.data import doc_text, load_beir

    full_data = load_beir(data, split="dev")
    half, grown, full = out / f"half-{seed}", out / f"grown-{seed}", out / f"full-{seed}"
    half_init = None
    if bank_init is not None:
        half_init = out / "bank_init_half.safetensors"
        if not half_init.is_file():
            slice_bank(bank_init, full_data.doc_ids, base, half_init)
    seconds = {"train_half": train(half_data, half, seed, half_init), "train_full": train(data, full, seed, bank_init)}
    retriever = QuantizedRetriever.from_pretrained(half)
    start = time.perf_counter()
    retriever.add_documents([doc_text(full_data.corpus[d]) for d in added], added)
    seconds["add_documents"] = round(time.perf_counter() - start, 1)
    retriever.save_pretrained(grown)
    results = {
        "grown": evaluate(grown, data),
        "full": evaluate(full, data),
        "grown_rebuilt": evaluate(rebuilt(grown, out / f"grown-rebuilt-{seed}"), data),
    }
    return {"seed": seed, "seconds": seconds, "results": results}


def summarise(runs: list[dict]) -> dict:
    def mean(name: str, slice_: str | None = None) -> float:
        return round(statistics.mean(quantized(run["results"][name], slice_) for run in runs), 4)

    table = {
        name: {"all": mean(name), "seen": mean(name, "seen"), "unseen": mean(name, "unseen"),
               "flat": round(statistics.mean(run["results"][name]["flat"]["ndcg@10"] for run in runs), 4)}
        for name in ("grown", "full", "grown_rebuilt")
    }  # fmt: skip
    per_seed = [round(quantized(r["results"]["grown"]) - quantized(r["results"]["full"]), 4) for r in runs]
    return {
        "mean_dev_quantized_ndcg@10": table,
        "grown_minus_full_per_seed": per_seed,
        "grown_minus_full_mean": round(statistics.mean(per_seed), 4),
        "grown_minus_rebuilt_mean": round(table["grown"]["all"] - table["grown_rebuilt"]["all"], 4),
        "within_0.01": abs(statistics.mean(per_seed)) <= 0.01,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--out", default="runs/grow", help="work folder (half data; half, full and grown artifacts)")
    parser.add_argument("--data", default=str(DATA), help="the SciFact BEIR folder")
    parser.add_argument("--bank_init", help="the whole corpus encoded by the pretrained model (.safetensors)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)

    out, data = Path(args.out), Path(args.data)
    base, added = split_corpus(data, out / "data")
    runs = []
    for seed in args.seeds:
        runs.append(
            one_seed(seed, data, out, out / "data", base, added, Path(args.bank_init) if args.bank_init else None)
        )
        summary = {
            "benchmark": "grow_index",
            "index_factory": runs[0]["results"]["full"]["index_factory"],
            "bytes_per_vector": runs[0]["results"]["full"]["bytes_per_vector"],
            "base_documents": len(base),
            "added_documents": len(added),
            "training_positives_added": 0,
            "seeds": [run["seed"] for run in runs],
            **summarise(runs),
            "runs": runs,
        }
        if args.json:  # after every seed: a partial result survives an interrupted run
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
