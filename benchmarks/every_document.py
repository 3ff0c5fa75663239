"""Every document, not only the trained ones: the recipe's 16-byte and flat nDCG@10 on queries whose relevant
documents training touched ("seen") and on those it never touched ("unseen"), per corpus, variant and seed.

Corpora (``--corpus NAME=DIR``, BEIR folders; the regime each measures):

- ``insuranceqa``: its own ``dev`` split (2,000 questions, 97 % of whose relevant answers are no training positive),
  600 steps at batch 32;
- ``scifact-heldout`` / ``nfcorpus-heldout``: a document-disjoint split carved from ``train``
  (``--heldout_docs_fraction``: the evaluation queries' relevant documents are never a training positive; every
  query is "unseen"), SciFact for the recipe's 4 epochs, NFCorpus for 600 steps;
- ``scifact``: the recipe's own ``dev`` split (recipes/data/scifact: 92 seen and 70 unseen claims).

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
}

#: Candidate changes, each as recipe options added to the defaults.
VARIANTS = {
    "default": [],
    "codes": ["--encoder_targets", "codes"],
    "bank": ["--encoder_targets", "bank"],
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
        "| 16 B seen | 16 B unseen | per seed (16 B) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
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
            f"{mean(runs, 'trained_quantized_unseen')} | {per_seed} |"
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
                rows.setdefault((corpus, variant), []).append(cells(results))
                raw.append({"corpus": corpus, "variant": variant, "seed": seed, **cells(results),
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
