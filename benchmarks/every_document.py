"""Every document, not only the trained ones: the recipe's 16-byte and flat nDCG@10 on queries whose relevant
documents training touched ("seen") and on those it never touched ("unseen"), per corpus, variant and seed.

Corpora (``--corpus NAME=DIR``, BEIR folders; the regime each measures):

- ``insuranceqa``: its own ``dev`` split (2,000 questions, 97 % of whose relevant answers are no training positive),
  600 steps at batch 32;
- ``scifact-heldout`` / ``nfcorpus-heldout``: a document-disjoint split carved from ``train``
  (``--heldout_docs_fraction``: the evaluation queries' relevant documents are never a training positive; every
  query is "unseen"), SciFact for the recipe's 4 epochs, NFCorpus for 600 steps;
- ``scifact``: the recipe's own ``dev`` split (recipes/data/scifact: 92 seen and 70 unseen claims);
- ``nfcorpus``: its own ``dev`` split (324 queries, 600 steps).

Variants (``--variants``): ``default`` (the library's defaults) and one per candidate change, each a list of recipe
options (:data:`VARIANTS`). Every run is ``recipes/train.py recipes/scifact.yaml`` with the corpus's options, the
variant's and ``--seed``; an encoded bank (``--bank NAME=FILE``, float32 ``.npy`` in corpus order) is reused so the
corpus is encoded once. Results are cached per run folder (``--out``); the Markdown table is the mean over seeds and
the JSON file keeps every run.

    python benchmarks/every_document.py --out runs/every --corpus insuranceqa=DATA/insuranceqa \\
        --bank insuranceqa=runs/iqa_bank.npy --variants default codes --seeds 42 43 44 \\
        --json benchmarks/results/every_document.json --markdown benchmarks/results/every_document.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "scifact.yaml"

#: What each corpus's runs add to the recipe.
CORPORA = {
    "insuranceqa": ["--eval_split", "dev", "--max_steps", "600"],
    "scifact-heldout": ["--heldout_docs_fraction", "0.2"],
    "nfcorpus-heldout": ["--heldout_docs_fraction", "0.2", "--max_steps", "600"],
    "scifact": ["--eval_split", "dev"],
    "nfcorpus": ["--eval_split", "dev", "--max_steps", "600"],
}

#: Candidate changes, each as recipe options added to the defaults.
VARIANTS = {
    "default": [],
    "raw-scores": ["--normalize_decoded", "false"],
    "previous-default": ["--doc_adapter_rank", "0", "--distill_doc_queries", "10000"],
    "adapter64": ["--doc_adapter_rank", "64"],
    "adapter64-alldocs": ["--doc_adapter_rank", "64", "--distill_doc_queries", "50000"],
}

METRICS = ("quantized_ndcg@10", "flat_ndcg@10")


def run_one(out: Path, corpus: str, data_dir: str, bank: str | None, variant: str, seed: int) -> dict:
    """Trains one run (or reads its cached ``eval_results.json``) and returns its evaluation."""
    folder = out / corpus / variant / f"seed{seed}"
    results_file = folder / "eval_results.json"
    if not results_file.is_file():
        argv = [sys.executable, str(REPO / "recipes" / "train.py"), str(RECIPE), "--data_dir", data_dir]
        argv += ["--output_dir", str(folder), "--seed", str(seed), "--report_to", "none", *CORPORA[corpus]]
        argv += VARIANTS[variant] + (["--bank_init_file", bank] if bank else [])
        start = time.perf_counter()
        log = folder.with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            subprocess.run(argv, check=True, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
        print(f"{corpus} {variant} seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(results_file.read_text())


def corpus_splits(corpus: str, data_dir: str):
    """``corpus``'s training and evaluation data, as its runs' recipe carves them."""
    from hf_qret.data import load_beir
    from hf_qret.recipe import heldout_docs_data

    train = load_beir(data_dir, split="train")
    options = CORPORA[corpus]
    if "--heldout_docs_fraction" in options:
        return heldout_docs_data(train, float(options[options.index("--heldout_docs_fraction") + 1]))
    return train, load_beir(data_dir, split=options[options.index("--eval_split") + 1])


def eval_data_of(corpus: str, data_dir: str):
    """The evaluation queries of ``corpus``'s runs and the documents their training saw (as the recipe carves them)."""
    train, held = corpus_splits(corpus, data_dir)
    return held, seen_docs_of(train)


def seen_docs_of(train) -> set[str]:
    """The documents ``train`` has as positives: an evaluation query with one of them as relevant is "seen"."""
    return {d for docs in train.qrels.values() for d, s in docs.items() if s > 0}


def serving_cells(folder: Path, held, seen_docs: set[str]) -> dict[str, float]:
    """The trained artifact's 16-byte index served three ways: the raw inner products of the decoded codes, their
    cosines (``normalize_decoded``) and the cosines' top 100 rescored with the int8 copy of the bank on disk (not a
    16-byte figure: 16 bytes in RAM plus 388 on disk)."""
    from hf_qret.evaluation.evaluator import RetrievalEvaluator, search_run
    from hf_qret.serving.retriever import QuantizedRetriever

    retriever = QuantizedRetriever.from_pretrained(folder, "cpu", load_bank=True)
    evaluator = RetrievalEvaluator(held.queries, held.qrels, seen_doc_ids=seen_docs)
    queries = retriever.encode_queries([held.queries[q] for q in evaluator.query_ids])
    out: dict[str, float] = {}

    class Rescored:
        @staticmethod
        def search(embeddings, k):
            return retriever.search_embeddings(embeddings, k)

    retriever.write_rescore_rows("int8")
    for name, normalize, rescore in (("raw", False, False), ("cosine", True, False), ("int8", True, True)):
        retriever.index.normalize_decoded = normalize
        if rescore:
            retriever.enable_rescoring(100)
        run = search_run(queries, evaluator.query_ids, Rescored, retriever.doc_ids, evaluator.k)
        metrics = evaluator.score({"q": run})
        for part, suffix in (("all", ""), ("seen", "_seen"), ("unseen", "_unseen")):
            value = metrics.get(f"q_ndcg@10{suffix}")
            if value is not None and value == value:
                out[f"served_{name}_{part}"] = float(value)
    return out


def cells(results: dict) -> dict[str, float]:
    """The run's untrained / trained flat and 16-byte nDCG@10, overall and on the seen / unseen queries."""
    out = {}
    for stage in ("untrained", "trained"):
        metrics = results.get(stage, {})
        for metric in METRICS:
            for part, suffix in (("all", ""), ("seen", "_seen"), ("unseen", "_unseen")):
                value = metrics.get(f"{stage}_{metric}{suffix}")
                if value is not None and value == value:  # NaN: no query in that slice
                    out[f"{stage}_{metric.split('_')[0]}_{part}"] = float(value)
    out["shipped_trained"] = float(results.get("shipped") == "trained")
    return out


def table(rows: dict[tuple[str, str], list[dict[str, float]]]) -> str:
    """Markdown: one row per corpus and variant, the mean over seeds (and the per-seed 16-byte numbers)."""
    lines = [
        "| corpus | variant | seeds | untrained flat | untrained 16 B | trained flat | **trained 16 B** | flat − 16 B "
        "| 16 B seen | 16 B unseen | per seed (16 B) | served raw all / seen / unseen | served cosine all / seen / "
        "unseen | + int8 rescore (16 B RAM + 388 B disk) all / unseen |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]

    def mean(runs: list[dict[str, float]], key: str) -> str:
        values = [r[key] for r in runs if key in r]
        return f"{statistics.mean(values):.3f}" if values else "–"

    for (corpus, variant), runs in rows.items():
        gap = statistics.mean(r["trained_flat_all"] - r["trained_quantized_all"] for r in runs)
        per_seed = " / ".join(f"{r['trained_quantized_all']:.3f}" for r in runs)
        lines.append(
            f"| {corpus} | {variant} | {len(runs)} | {mean(runs, 'untrained_flat_all')} | "
            f"{mean(runs, 'untrained_quantized_all')} | {mean(runs, 'trained_flat_all')} | "
            f"**{mean(runs, 'trained_quantized_all')}** | {gap:.3f} | {mean(runs, 'trained_quantized_seen')} | "
            f"{mean(runs, 'trained_quantized_unseen')} | {per_seed} | "
            + " / ".join(mean(runs, f"served_raw_{p}") for p in ("all", "seen", "unseen"))
            + " | "
            + " / ".join(mean(runs, f"served_cosine_{p}") for p in ("all", "seen", "unseen"))
            + " | "
            + " / ".join(mean(runs, f"served_int8_{p}") for p in ("all", "unseen"))
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--corpus", action="append", required=True, help="NAME=DIR, NAME one of " + ", ".join(CORPORA))
    parser.add_argument("--bank", action="append", default=[], help="NAME=FILE: the corpus's encoded bank (.npy)")
    parser.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    corpora = dict(item.split("=", 1) for item in args.corpus)
    banks = dict(item.split("=", 1) for item in args.bank)
    unknown = sorted(set(corpora) - set(CORPORA))
    if unknown:
        parser.error(f"unknown corpus {unknown[0]!r}; use one of {', '.join(CORPORA)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    raw = []
    for corpus, data_dir in corpora.items():
        for variant in args.variants:
            for seed in args.seeds:
                results = run_one(args.out, corpus, data_dir, banks.get(corpus), variant, seed)
                folder = args.out / corpus / variant / f"seed{seed}"
                served_file = folder / "served_variants.json"
                if not served_file.is_file():
                    served_file.write_text(json.dumps(serving_cells(folder, *eval_data_of(corpus, data_dir))))
                found = {**cells(results), **json.loads(served_file.read_text())}
                rows.setdefault((corpus, variant), []).append(found)
                raw.append({"corpus": corpus, "variant": variant, "seed": seed, **found,
                            "timings_s": results.get("timings_s")})  # fmt: skip
    markdown = table(rows)
    print(markdown)
    if args.markdown:
        args.markdown.write_text(markdown + "\n")
    if args.json:
        args.json.write_text(json.dumps({"variants": {v: VARIANTS[v] for v in args.variants}, "runs": raw}, indent=1))
    print(json.dumps({"runs": len(raw)}))


if __name__ == "__main__":
    main()
