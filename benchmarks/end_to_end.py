"""End to end, cold start to saved artifact: the SciFact recipe vs sentence-transformers fine-tune + re-encode.

Two child processes, one after the other, on the same machine:

(a) **hf-qret**: ``python recipes/train.py recipes/scifact.yaml --output_dir DIR --seed S``, the recipe as shipped
    (corpus encoding, training with its safety-net evaluations, index refreshes, the saved artifact; with the YAML's
    ``train_on_eval_split`` also the second run on train + dev). Its phases come from the recipe's own
    ``eval_results.json`` (``timings_s``), its nDCG@10 is that of the run trained on the training claims alone,
    evaluated on the dev split (what the recipe prints).
(b) **the usual alternative**: sentence-transformers ``MultipleNegativesRankingLoss`` (no-duplicates batches) on the
    same (claim, abstract) pairs with the YAML's epochs, batch size, learning rate, weight decay and seed, then the
    whole corpus re-encoded with ``encode_document`` and the same 16-byte index built over it
    (:class:`hf_qret.index.core.QuantizedIndex` with the recipe's factory and settings), model and index saved.
    Its wall time stops when the index is saved; the dev evaluation after it is not counted.

Each wall time runs from the moment the child is started (interpreter start and imports included) to its artifact.
The last stdout line is one JSON object: ``qret_wall_s``, ``st_wall_s``, ``speedup`` (= st / qret),
``qret_ndcg10_16b``, ``st_ndcg10_16b`` (dev split, same index factory), both runs' phases in seconds and the
machine. ``--only qret`` (or ``st``) runs one side, e.g. to measure the recipe's quality over several seeds.

    python benchmarks/end_to_end.py                         # both, seed 42
    python benchmarks/end_to_end.py --only qret --seed 43   # the recipe alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes" / "scifact.yaml"


def _recipe_settings(config: Path) -> dict:
    import yaml

    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    data_dir = Path(settings.get("data_dir", "data/scifact"))
    settings["data_dir"] = str(data_dir if data_dir.is_absolute() else (config.parent / data_dir).resolve())
    return settings


def _run_child(argv: list[str], log: Path) -> tuple[float, float]:
    """Runs ``argv`` (output to ``log``); returns its start time and wall seconds."""
    start = time.time()
    with open(log, "w") as out:
        code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.time() - start
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{argv[1]} failed (exit {code}); the end of its log {log}:\n{tail}")
    return start, wall


def run_qret(config: Path, seed: int, out: Path) -> dict:
    """The recipe as shipped, in a fresh process."""
    argv = [sys.executable, "recipes/train.py", str(config), "--output_dir", str(out), "--seed", str(seed)]
    _, wall = _run_child(argv, out.parent / "qret.log")
    results = json.loads((out / "eval_results.json").read_text())
    trained = results["trained"]
    return {
        "wall_s": round(wall, 1),
        "phases_s": results.get("timings_s", {}),
        "ndcg10_16b": round(trained["trained_quantized_ndcg@10"], 4),
        "ndcg10_flat": round(trained["trained_flat_ndcg@10"], 4),
        "ndcg10_16b_unseen": round(trained.get("trained_quantized_ndcg@10_unseen", float("nan")), 4),
        "shipped": results.get("shipped"),
        "trained_on": results.get("trained_on"),
    }


def run_st(config: Path, seed: int, out: Path) -> dict:
    """sentence-transformers MNRL + re-encode + index, in a fresh process (this script as the child)."""
    argv = [sys.executable, str(Path(__file__)), "--_st_child", str(out), "--config", str(config), "--seed", str(seed)]
    start, _ = _run_child(argv, out.parent / "st.log")
    child = json.loads((out / "st_result.json").read_text())
    child["wall_s"] = round(child.pop("done_at") - start, 1)
    return child


def st_child(config: Path, seed: int, out: Path) -> None:
    """The alternative's pipeline; writes ``OUT/st_result.json`` (``done_at``: when its artifact was saved)."""
    phases: dict[str, float] = {}
    clock = time.perf_counter()
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.training_args import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from hf_qret.config import QRetTrainingArguments, resolve_model_path
    from hf_qret.data import build_pairs_dataset, doc_text, load_beir
    from hf_qret.index.core import QuantizedIndex

    settings = _recipe_settings(config)
    train = load_beir(settings["data_dir"], split=settings.get("train_split", "train"))
    pairs = build_pairs_dataset(train)
    model = SentenceTransformer(resolve_model_path(settings["model_name_or_path"]), device="cpu")
    dataset = Dataset.from_dict(
        {"anchor": pairs["query"], "positive": [doc_text(train.corpus[d]) for d in pairs["positive_id"]]}
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st_trainer"),
        num_train_epochs=settings["num_train_epochs"],
        per_device_train_batch_size=settings["per_device_train_batch_size"],
        learning_rate=settings["learning_rate"],
        weight_decay=settings.get("weight_decay", 0.0),
        seed=seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        report_to="none",
        save_strategy="no",
        logging_steps=settings.get("logging_steps", 10),
        use_cpu=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=MultipleNegativesRankingLoss(model)
    )
    phases["load"] = time.perf_counter() - clock
    clock = time.perf_counter()
    trainer.train()
    phases["train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    vectors = model.encode_document(train.doc_texts(), convert_to_numpy=True).astype("float32")
    phases["encode_corpus"] = time.perf_counter() - clock

    clock = time.perf_counter()
    index = QuantizedIndex.from_args(vectors.shape[1], QRetTrainingArguments(output_dir=str(out / "unused")))
    index.build(vectors)
    phases["index"] = time.perf_counter() - clock

    clock = time.perf_counter()
    model.save(str(out / "model"))
    index.faiss.write_index(index.index, str(out / "index.faiss"))
    phases["save"] = time.perf_counter() - clock
    done_at = time.time()

    # not timed: the dev evaluation, as the recipe computes it (flat bank and 16-byte index)
    from hf_qret.evaluation.evaluator import search_run
    from hf_qret.evaluation.metrics import compute_metrics

    dev = load_beir(settings["data_dir"], split=settings.get("eval_split", "dev"))
    query_ids = list(dev.qrels)
    queries = model.encode_query([dev.queries[q] for q in query_ids], convert_to_numpy=True).astype("float32")
    flat = QuantizedIndex(vectors.shape[1], "Flat", use_gpu=False)
    flat.build(vectors)
    scores = {
        kind: compute_metrics(search_run(queries, query_ids, searcher, train.doc_ids), dev.qrels)["ndcg@10"]
        for kind, searcher in (("16b", index), ("flat", flat))
    }
    result = {
        "done_at": done_at,
        "phases_s": {name: round(seconds, 2) for name, seconds in phases.items()},
        "ndcg10_16b": round(scores["16b"], 4),
        "ndcg10_flat": round(scores["flat"], 4),
        "index_factory": index.factory,
        "pairs": len(dataset),
    }
    (out / "st_result.json").write_text(json.dumps(result))


def machine() -> dict:
    import torch

    name = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return {
        "cpu": name,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "gpu": torch.cuda.is_available(),
        "load_avg_before": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG, help="the recipe's YAML (default: recipes/scifact.yaml)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", choices=("qret", "st"), help="run one side only")
    parser.add_argument("--work_dir", type=Path, help="where both artifacts go (default: a temporary folder)")
    parser.add_argument("--_st_child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = args.config.resolve()
    if args._st_child is not None:
        st_child(config, args.seed, args._st_child)
        return None

    info = machine()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        (work / "qret").mkdir(parents=True, exist_ok=True)
        (work / "st").mkdir(parents=True, exist_ok=True)
        result: dict = {
            "seed": args.seed,
            "config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
        }
        qret = run_qret(config, args.seed, work / "qret" / "artifact") if args.only != "st" else None
        st = run_st(config, args.seed, work / "st") if args.only != "qret" else None
    if qret is not None:
        result.update(qret_wall_s=qret["wall_s"], qret_ndcg10_16b=qret["ndcg10_16b"])
    if st is not None:
        result.update(st_wall_s=st["wall_s"], st_ndcg10_16b=st["ndcg10_16b"])
    if qret is not None and st is not None:
        result["speedup"] = round(st["wall_s"] / qret["wall_s"], 2)
    result.update(qret=qret, st=st, machine=info)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
