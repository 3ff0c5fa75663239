"""Ablation of hf-qret's accuracy options on the SciFact dev split: nDCG@10 over all / seen / unseen-target claims.

For each index (default: the recipe's 16-byte ``RQ16x8`` and the 8-byte ``RQ8x8``) it trains the recipe
(``recipes/scifact.yaml``: all-MiniLM-L6-v2, 4 epochs) once per variant and seed and reads the dev evaluation the
recipe writes (``eval_results.json``). Rows:

- ``untrained``: the pretrained encoder and bank, index built over the bank;
- ``query-only``: the query encoder trains, the bank is frozen (``bank_learning_rate 0``);
- ``seed``: the seed method (bank rows trained by backprop, negatives mined from the quantized index, codebooks
  retrained at every epoch end, no other option);
- one row per option added to the seed method alone;
- ``default``: the recipe as shipped (the library's defaults);
- one row per default swapped back to what it replaced (``adam-bank``, ``incremental``).

Options that were measured here and retired from the library (quantization-aware scores, learned codebooks, the
anchor pull, the encoder scored against the pretrained rows, quantizer distillation) are in ``docs/experiments.md``
with their numbers.

"Seen" claims have a relevant document that was a training positive; "unseen" claims have none. Prints a markdown
table, then one JSON object as the last line. Results are cached per run folder (``--out``), so an interrupted
ablation resumes where it stopped; ``--fresh`` retrains everything.

    python benchmarks/ablation.py --out runs/ablation [--factories RQ16x8 RQ8x8] [--variants seed default]
        [--seeds 42 43 44] [--data_dir path/to/nfcorpus --max_steps 600]
        [--markdown benchmarks/results/ablation.md] [--json]

Each cell is the mean over ``--seeds`` (FAISS training and the data order vary with the seed; the JSON line keeps
every seed's numbers). ``--data_dir``/``--max_steps`` point the same recipe at another BEIR folder (NFCorpus: every
dev query but one has a training positive, so its "unseen" cells are one query: read them as empty). Takes about 4 minutes per run with an
``OPQ`` index and about 7 with ``RQ16x8`` on 2 idle CPU cores (the corpus is encoded once, into
``--out/bank.safetensors``; copy an encoded bank there to skip it).
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

#: The seed method: the bank and the query encoder train against each other (one loss), every candidate row moves
#: (row-wise Adam), codebooks retrained at every epoch end.
SEED = [
    "--bank_learning_rate", "0.001", "--refresh_mode", "retrain", "--bank_update", "all", "--bank_queries", "encoder",
    "--bank_keep_norm", "false", "--bank_optimizer", "adam",
]  # fmt: skip


def _with(base: list[str], **options: str) -> list[str]:
    argv = list(base)
    for key, value in options.items():
        flag = f"--{key}"
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


#: name -> (description, recipe overrides). ``untrained`` is read from the seed run's before-training evaluation.
VARIANTS: dict[str, tuple[str, list[str] | None]] = {
    "untrained": ("pretrained encoder and bank", None),
    "query-only": ("query encoder trained, bank frozen", _with(SEED, bank_learning_rate="0")),
    "seed": ("seed method: bank + query encoder, codebooks retrained per epoch", SEED),
    "+positives-only": ("seed + only rows of training-positive documents move", _with(SEED, bank_update="positives")),
    "+keep-norm": ("seed + rows keep their initial norm", _with(SEED, bank_keep_norm="true")),
    "default": ("the recipe as shipped (recipes/scifact.yaml)", []),
    "adam-bank": (
        "the recipe with the bank on row-wise Adam (lr 0.002, its default), the optimizer before SGD",
        ["--bank_optimizer", "adam"],
    ),
    "incremental": (
        "the recipe with refresh_mode incremental (the pretrained bank's codebooks kept, moved rows re-encoded)",
        ["--refresh_mode", "incremental"],
    ),
}

#: The recipe's 16-byte index and its 8-byte sibling (benchmarks/results/factories.md).
FACTORIES = ("RQ16x8", "RQ8x8")


def run_variant(
    out: Path,
    factory: str,
    name: str,
    overrides: list[str],
    bank_file: Path,
    fresh: bool,
    seed: int = 42,
    recipe_options: list[str] | None = None,
) -> dict:
    """Trains one variant with one seed (unless its results are cached) and returns its ``eval_results.json``."""
    folder = out / factory.replace(",", "_") / f"{name.lstrip('+')}-seed{seed}"
    results_file = folder / "eval_results.json"
    if results_file.is_file() and not fresh:
        return json.loads(results_file.read_text())
    command = [
        sys.executable, str(REPO / "recipes" / "train.py"), str(RECIPE), "--output_dir", str(folder),
        "--index_factory", factory, "--bank_init_file", str(bank_file), "--save_strategy", "no",
        "--disable_tqdm", "true", "--train_on_eval_split", "false", "--keep_untrained_if_better", "false",
        "--seed", str(seed), *(recipe_options or []), *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    log = folder.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ))
    if done.returncode != 0:
        raise SystemExit(f"{factory} {name}: the recipe failed (exit {done.returncode}); see {log}")
    print(f"{factory} {name} seed {seed}: trained in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    return json.loads(results_file.read_text())


def row(results: dict, stage: str) -> dict[str, float | None]:
    """nDCG@10 of one run's stage; a slice the run did not report (no query in it) is ``None``."""
    metrics = results[stage]
    key = f"{stage}_quantized_ndcg@10"

    def rounded(name: str) -> float | None:
        return None if metrics.get(name) is None else round(metrics[name], 4)

    return {
        "all": rounded(key),
        "seen": rounded(f"{key}_seen"),
        "unseen": rounded(f"{key}_unseen"),
        "flat_all": rounded(f"{stage}_flat_ndcg@10"),
    }


def mean_row(rows: list[dict[str, float | None]], seeds: list[int]) -> dict:
    """The mean of each cell over the seeds' rows, with the per-seed values kept (``per_seed``)."""
    out: dict = {}
    for cell in rows[0]:
        values = [r[cell] for r in rows if r[cell] is not None]
        out[cell] = round(statistics.mean(values), 4) if values else None
    out["seeds"] = seeds
    out["per_seed"] = rows
    return out


def markdown(table: dict[str, dict[str, dict]], descriptions: dict[str, str]) -> str:
    """One row per variant: quantized nDCG@10 all / seen / unseen per index (the mean over the seeds column)."""
    factories = list(table)
    header = "| variant | seeds | " + " | ".join(f"{f} all | {f} seen | {f} unseen" for f in factories) + " |"
    lines = [header, "|---" * (2 + 3 * len(factories)) + "|"]
    names = [n for n in VARIANTS if any(n in table[f] for f in factories)]
    for name in names:
        cells = []
        for factory in factories:
            values = table[factory].get(name)
            cells += [
                f"{values[s]:.3f}" if values and values.get(s) is not None else "–" for s in ("all", "seen", "unseen")
            ]
        seeds = "/".join(sorted({str(len(table[f][name]["seeds"])) for f in factories if name in table[f]}))
        lines.append(f"| {name} ({descriptions[name]}) | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ablation", help="Folder of the runs (cached results).")
    parser.add_argument("--factories", nargs="+", default=list(FACTORIES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="Training seeds; cells are means.")
    parser.add_argument("--data_dir", help="Another BEIR folder for the recipe (default: the recipe's SciFact).")
    parser.add_argument("--max_steps", type=int, help="The recipe's --max_steps (default: its epochs).")
    parser.add_argument("--fresh", action="store_true", help="Retrain runs whose results are cached.")
    parser.add_argument("--markdown", help="Also write the markdown table to this file.")
    parser.add_argument("--json", action="store_true", help="(The JSON line is always printed last.)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bank_file = out / "bank.safetensors"
    recipe_options = []
    if args.data_dir:
        recipe_options += ["--data_dir", str(Path(args.data_dir).resolve())]
    if args.max_steps:
        recipe_options += ["--max_steps", str(args.max_steps)]
    trained = [n for n in args.variants if n in VARIANTS and VARIANTS[n][1] is not None]
    #: the untrained row is the before-training evaluation of a trained run (the same pretrained model and bank)
    untrained_source = next((n for n in ("default", "seed", *trained) if n in trained), "seed")
    trained_runs: dict[tuple[str, str, int], dict] = {}

    def trained_run(factory: str, name: str, seed: int) -> dict:
        """One recipe run's results, trained (or read from its cache) once per invocation, ``--fresh`` included."""
        key = (factory, name, seed)
        if key not in trained_runs:
            trained_runs[key] = run_variant(
                out, factory, name, VARIANTS[name][1], bank_file, args.fresh, seed, recipe_options
            )
        return trained_runs[key]

    table: dict[str, dict[str, dict]] = {}
    for factory in args.factories:
        table[factory] = {}
        for name in args.variants:
            untrained = VARIANTS[name][1] is None
            source, stage = (untrained_source, "untrained") if untrained else (name, "trained")
            rows = [row(trained_run(factory, source, seed), stage) for seed in args.seeds]
            table[factory][name] = mean_row(rows, args.seeds)
    descriptions = {name: description for name, (description, _) in VARIANTS.items()}
    text = markdown(table, descriptions)
    print(text)
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
    print(json.dumps(table))
    return table


if __name__ == "__main__":
    main()
