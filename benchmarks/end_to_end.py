"""End to end, start to saved artifact: the SciFact recipe vs sentence-transformers fine-tune + re-encode + index.

Three kinds of child process, each timed from its start (interpreter, imports and model loading included) to its
saved artifact, on the same machine with the same settings:

(a) ``qret`` (cold): ``python recipes/train.py recipes/scifact.yaml``, the recipe as shipped: the corpus encoded into
    the bank, training with its safety-net evaluations before and after, the index refreshes, the saved artifact.
(b) ``qret_warm``: the same command with ``--bank_init_file`` pointing at corpus embeddings of the base model that
    already exist (a user who serves the base model today has them), so hf-qret encodes nothing. The file is made (or
    checked against the corpus) once, outside every timed run.
(c) ``st``: the usual alternative: sentence-transformers ``MultipleNegativesRankingLoss`` (no-duplicates batches) on
    the same (claim, abstract) pairs with the YAML's epochs, batch size, learning rate, weight decay and seed, then
    the whole corpus re-encoded with ``encode_document`` and the same 16-byte index built over it
    (:class:`hf_qret.index.core.QuantizedIndex`, the recipe's factory and settings), model and index saved. It has
    to re-encode in both cases: fine-tuning changed the document encoder.

Fair by construction: both sides encode the corpus in one precision, resolved once here with hf-qret's own rule
(:func:`hf_qret.serving.encoder.encode_autocast_dtype`: ``auto`` is bfloat16 autocast on a CPU with AMX or a CUDA GPU
with bf16, else float32) and passed explicitly to both (``--bank_encode_precision`` to the recipe, the same
``torch.autocast`` around ``encode_document``); the same device, ``max_seq_length``, encoding batch size and threads
(``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` of every child). Rounds alternate the order (qret, qret_warm, st, then st,
qret_warm, qret, ...). Both sides are scored on the dev split, overall and on the dev claims whose relevant
documents were / were not training positives (``seen`` / ``unseen``, :class:`hf_qret.evaluation.RetrievalEvaluator`'s
slices), flat and on the 16-byte index; the alternative's evaluation is not timed, the recipe's safety-net
evaluations are.

The last stdout line is one JSON object: medians over the runs ``qret_wall_s``, ``qret_warm_wall_s``, ``st_wall_s``,
``speedup`` (median of the per-round st / qret), ``speedup_warm`` (st / qret_warm), each wall's runs and spread,
``qret_ndcg10_16b``, ``st_ndcg10_16b`` and the seen/unseen and flat scores, the encode precision of each side,
``cpu_flags``, every run's phases and the machine.

    python benchmarks/end_to_end.py --runs 3                      # 3 alternating rounds of the three
    python benchmarks/end_to_end.py --runs 1 --warm_bank FILE.npy # reuse base-model corpus embeddings if they match
    python benchmarks/end_to_end.py --only qret --seed 43         # the recipe alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes" / "scifact.yaml"
SIDES = ("qret", "qret_warm", "st")
#: /proc/cpuinfo flags recorded in ``cpu_flags`` (the ones that decide which precision and kernels run).
CPU_FLAGS = {
    "amx": "amx_tile",
    "amx_bf16": "amx_bf16",
    "avx512": "avx512f",
    "avx512_bf16": "avx512_bf16",
    "avx2": "avx2",
}


# ---------------------------------------------------------------- pure helpers (tests/test_end_to_end_benchmark.py)
def run_order(runs: int, sides: tuple[str, ...] = SIDES) -> list[tuple[int, str]]:
    """``(round, side)`` in the order they run: every other round reversed, so no side always goes first."""
    if runs < 1:
        raise SystemExit(f"--runs must be at least 1, got {runs}.")
    return [(r, side) for r in range(runs) for side in (sides if r % 2 == 0 else sides[::-1])]


def median_spread(values: list[float]) -> dict:
    """Median, min, max and spread (max - min) of ``values``, rounded to 0.1 (0.0001 for values below 10)."""
    digits = 4 if max(abs(v) for v in values) < 10 else 1
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "spread": round(max(values) - min(values), digits),
        "runs": [round(v, digits) for v in values],
    }


def parse_cpu_flags(cpuinfo: str) -> dict[str, bool]:
    """Which of :data:`CPU_FLAGS` the first ``flags`` line of ``/proc/cpuinfo`` lists."""
    line = next((ln.split(":", 1)[1] for ln in cpuinfo.splitlines() if ln.split(":", 1)[0].strip() == "flags"), "")
    present = set(line.split())
    return {name: flag in present for name, flag in CPU_FLAGS.items()}


def cpu_flags() -> dict:
    """This machine's :func:`parse_cpu_flags` plus what torch detects (its CPU kernel level, AMX tiles)."""
    import torch

    try:
        flags = parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        flags = {}
    flags["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    flags["torch_amx"] = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return flags


def resolve_precision(requested: str, device: str) -> str:
    """``"bf16"`` or ``"fp32"``: what ``requested`` (``auto``/``fp32``/``bf16``) means on ``device``, by hf-qret's
    rule (:func:`hf_qret.serving.encoder.encode_autocast_dtype`), the one value both sides are then given."""
    import torch

    from hf_qret.serving.encoder import encode_autocast_dtype

    return "bf16" if encode_autocast_dtype(requested, device) is torch.bfloat16 else "fp32"


def encode_context(precision: str, device: str):
    """The ``torch.autocast`` hf-qret's ``encode_texts`` runs a model under for an explicit ``precision``."""
    import torch

    from hf_qret.serving.encoder import encode_autocast_dtype

    dtype = encode_autocast_dtype(precision, device)
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def scores_of(metrics: dict, prefix: str = "") -> dict[str, float]:
    """``ndcg10_16b``, ``ndcg10_flat`` and their ``_seen``/``_unseen`` from RetrievalEvaluator-style keys."""
    out = {}
    for kind, label in (("quantized", "16b"), ("flat", "flat")):
        for slice_name in ("", "_seen", "_unseen"):
            value = metrics.get(f"{prefix}{kind}_ndcg@10{slice_name}")
            if value is not None:
                out[f"ndcg10_{label}{slice_name}"] = round(value, 4)
    return out


def summarize(runs: dict[str, list[dict]], order: list[tuple[int, str]]) -> dict:
    """The JSON line's headline keys from each side's run results (``wall_s`` and the scores of :func:`scores_of`)."""
    out: dict = {"runs": max((r for r, _ in order), default=-1) + 1, "order": [side for _, side in order]}
    for side, results in runs.items():
        if not results:
            continue
        walls = median_spread([r["wall_s"] for r in results])
        out[f"{side}_wall_s"] = walls["median"]
        out[f"{side}_wall"] = walls
        if all("cpu_s" in r for r in results):
            out[f"{side}_cpu_s"] = round(statistics.median(r["cpu_s"] for r in results), 1)
        for key in results[0]:
            if key.startswith("ndcg10_"):
                out[f"{side}_{key}"] = round(statistics.median(r[key] for r in results), 4)
    for name, fast in (("speedup", "qret"), ("speedup_warm", "qret_warm")):
        if runs.get(fast) and runs.get("st"):
            ratios = [st["wall_s"] / q["wall_s"] for st, q in zip(runs["st"], runs[fast])]
            out[name] = round(statistics.median(ratios), 2)
            out[f"{name}_runs"] = [round(r, 2) for r in ratios]
            if all("cpu_s" in r for r in runs[fast] + runs["st"]):  # the same ratio in CPU seconds
                cpu = [st["cpu_s"] / q["cpu_s"] for st, q in zip(runs["st"], runs[fast])]
                out[f"{name}_cpu"] = round(statistics.median(cpu), 2)
    return out


# ---------------------------------------------------------------- children
def _recipe_settings(config: Path, data_dir: str | None = None) -> dict:
    import yaml

    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    path = Path(data_dir) if data_dir else Path(settings.get("data_dir", "data/scifact"))
    settings["data_dir"] = str(path if path.is_absolute() else (config.parent / path).resolve())
    return settings


def _run_child(argv: list[str], log: Path, env: dict) -> tuple[float, float, dict]:
    """Runs ``argv`` (output to ``log``); returns its start time, wall seconds and what else ran: its CPU seconds
    (user + system, all its threads) and the 1-minute load average before and after (another job on the cores shows
    there, and in CPU seconds far below wall x threads)."""
    load_start = os.getloadavg()[0]
    start = time.time()
    with open(log, "w") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.time() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{argv[1]} failed (exit {code}); the end of its log {log}:\n{tail}")
    seen = {
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "load_avg_start": round(load_start, 2),
        "load_avg_end": round(os.getloadavg()[0], 2),
    }
    return start, wall, seen


def run_qret(opts: argparse.Namespace, out: Path, env: dict, bank_init_file: Path | None = None) -> dict:
    """The recipe, in a fresh process, with the benchmark's precision, sequence length and encoding batch."""
    argv = [sys.executable, "recipes/train.py", str(opts.config), "--output_dir", str(out), "--seed", str(opts.seed)]
    argv += ["--data_dir", opts.settings["data_dir"], "--bank_encode_precision", opts.precision]
    argv += ["--max_seq_length", str(opts.max_seq_length), "--doc_batch_size", str(opts.encode_batch_size)]
    if opts.max_steps:
        argv += ["--max_steps", str(opts.max_steps)]
    if bank_init_file is not None:
        argv += ["--bank_init_file", str(bank_init_file)]
    _, wall, seen = _run_child(argv, out.parent / f"{out.name}.log", env)
    results = json.loads((out / "eval_results.json").read_text())
    recorded = json.loads((out / "qret_config.json").read_text()) if (out / "qret_config.json").is_file() else {}
    return {
        "wall_s": round(wall, 1),
        **seen,
        "phases_s": results.get("timings_s", {}),
        **scores_of(results.get("trained", {}), "trained_"),
        "untrained": scores_of(results.get("untrained", {}), "untrained_"),
        "encode_precision": None if bank_init_file else opts.precision,
        "recorded_document_precision": recorded.get("document_precision"),
        "shipped": results.get("shipped"),
    }


def run_st(opts: argparse.Namespace, out: Path, env: dict) -> dict:
    """sentence-transformers MNRL + re-encode + index, in a fresh process (this script as the child)."""
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(Path(__file__)), "--_child", "st", "--_out", str(out), *opts.child_argv]
    start, _, seen = _run_child(argv, out.parent / f"{out.name}.log", env)
    child = json.loads((out / "st_result.json").read_text())
    child["wall_s"] = round(child.pop("done_at") - start, 1)
    return {**seen, **child}  # cpu_s: the child's own count when its artifact was saved (its evaluation left out)


def _child_setup(opts: argparse.Namespace):
    from hf_qret.config import resolve_model_path
    from hf_qret.data import load_beir

    train = load_beir(opts.settings["data_dir"], split=opts.settings.get("train_split", "train"))
    return train, resolve_model_path(opts.settings["model_name_or_path"])


def mnrl_trainer(
    model: Any,
    train: Any,
    settings: dict,
    output_dir: Path,
    seed: int,
    max_steps: int,
    logging_steps: int,
    use_cpu: bool,
) -> Any:
    """The alternative's trainer: sentence-transformers ``MultipleNegativesRankingLoss`` (no-duplicates batches) on
    ``train``'s (query, positive text) pairs with the recipe's ``settings`` (epochs, batch, rate, decay); also the
    peer of ``benchmarks/st_peer.py``."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.training_args import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from hf_qret.data import build_pairs_dataset, doc_text

    pairs = build_pairs_dataset(train)
    dataset = Dataset.from_dict(
        {"anchor": pairs["query"], "positive": [doc_text(train.corpus[d]) for d in pairs["positive_id"]]}
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=settings["num_train_epochs"],
        max_steps=max_steps,
        per_device_train_batch_size=settings["per_device_train_batch_size"],
        learning_rate=settings["learning_rate"],
        weight_decay=settings.get("weight_decay", 0.0),
        seed=seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        report_to="none",
        save_strategy="no",
        logging_steps=logging_steps,
        use_cpu=use_cpu,
    )
    return SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=MultipleNegativesRankingLoss(model)
    )


def st_child(opts: argparse.Namespace, out: Path) -> None:
    """The alternative's pipeline; writes ``OUT/st_result.json`` (``done_at``: when its artifact was saved)."""
    phases: dict[str, float] = {}
    clock = time.perf_counter()
    import torch
    from sentence_transformers import SentenceTransformer

    from hf_qret.config import QRetTrainingArguments
    from hf_qret.index.core import QuantizedIndex

    settings = opts.settings
    train, model_path = _child_setup(opts)
    model = SentenceTransformer(model_path, device=opts.device)
    model.max_seq_length = opts.max_seq_length
    trainer = mnrl_trainer(
        model, train, settings, out / "st_trainer", opts.seed, opts.max_steps or -1,
        logging_steps=settings.get("logging_steps", 10), use_cpu=opts.device == "cpu",
    )  # fmt: skip
    phases["load"] = time.perf_counter() - clock
    clock = time.perf_counter()
    trainer.train()
    phases["train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    with encode_context(opts.precision, opts.device):
        vectors = model.encode_document(
            train.doc_texts(), batch_size=opts.encode_batch_size, convert_to_numpy=True
        ).astype("float32")
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
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu_at_done = used.ru_utime + used.ru_stime

    # not timed: the dev evaluation, as the recipe scores it (flat and 16-byte, overall and seen/unseen)
    from hf_qret.data import load_beir
    from hf_qret.evaluation.evaluator import RetrievalEvaluator, search_run

    dev = load_beir(settings["data_dir"], split=settings.get("eval_split", "dev"))
    evaluator = RetrievalEvaluator(dev.queries, dev.qrels, seen_doc_ids=_seen_doc_ids(train))
    queries = model.encode_query(evaluator.queries, convert_to_numpy=True).astype("float32")
    flat = QuantizedIndex(vectors.shape[1], "Flat", use_gpu=False)
    flat.build(vectors)
    runs = {kind: search_run(queries, evaluator.query_ids, searcher, train.doc_ids) for kind, searcher in
            (("quantized", index), ("flat", flat))}  # fmt: skip
    result = {
        "done_at": done_at,
        "cpu_s": round(cpu_at_done, 1),
        "phases_s": {name: round(seconds, 2) for name, seconds in phases.items()},
        **scores_of(evaluator.score(runs)),
        "encode_precision": opts.precision,
        "torch_threads": torch.get_num_threads(),
        "max_seq_length": model.max_seq_length,
        "index_factory": index.factory,
        "pairs": len(trainer.train_dataset),
    }
    (out / "st_result.json").write_text(json.dumps(result))


def _seen_doc_ids(train) -> set[str]:
    """The training positives, as the recipe gives them to its evaluator."""
    return {d for docs in train.qrels.values() for d in docs}


def warm_child(opts: argparse.Namespace, out: Path) -> None:
    """Untimed: checks ``--warm_bank`` against the corpus (row count, dimension, a sample of rows re-encoded by the
    base model at cosine >= 0.999), else encodes the base model's bank to ``OUT/warm_bank.npy``; writes
    ``OUT/warm.json``."""
    import numpy as np

    from hf_qret.serving.encoder import configure_encoder
    from hf_qret.serving.sentence_encoder import load_encoder
    from hf_qret.training.corpus import document_encode

    train, model_path = _child_setup(opts)
    model = load_encoder(model_path, opts.device, trainable=True)  # the model as the recipe loads it
    model.max_seq_length = opts.max_seq_length
    configure_encoder(model)
    encode = document_encode(model, opts.encode_batch_size, precision=opts.precision)
    texts = train.doc_texts()
    report: dict = {"given": str(opts.warm_bank) if opts.warm_bank else None}
    if opts.warm_bank and Path(opts.warm_bank).is_file():
        rows = np.load(opts.warm_bank, mmap_mode="r")
        sample = sorted({0, len(texts) - 1, *range(0, len(texts), max(1, len(texts) // 14))})
        if rows.ndim == 2 and rows.shape[0] == len(texts):
            fresh = encode([texts[i] for i in sample])
            if rows.shape[1] == fresh.shape[1]:
                kept = np.asarray(rows[sample], dtype=np.float32)
                cosine = (kept * fresh).sum(1) / (np.linalg.norm(kept, axis=1) * np.linalg.norm(fresh, axis=1))
                report["min_cosine"] = round(float(cosine.min()), 6)
        report["shape"] = list(rows.shape)
        if report.get("min_cosine", 0.0) >= 0.999:
            report.update(path=str(Path(opts.warm_bank).resolve()), source="given, checked")
    if "path" not in report:
        target = out / "warm_bank.npy"
        clock = time.perf_counter()
        rows = encode(texts)
        tmp = target.with_name(target.name + ".tmp.npy")
        np.save(tmp, rows.astype(np.float32))
        os.replace(tmp, target)
        report.update(path=str(target), source="encoded untimed", encode_s=round(time.perf_counter() - clock, 1))
    (out / "warm.json").write_text(json.dumps(report))


def prepare_warm_bank(opts: argparse.Namespace, work: Path, env: dict) -> dict:
    argv = [sys.executable, str(Path(__file__)), "--_child", "warm", "--_out", str(work), *opts.child_argv]
    _run_child(argv, work / "warm.log", env)  # untimed
    return json.loads((work / "warm.json").read_text())


# ---------------------------------------------------------------- main
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
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_before": round(os.getloadavg()[0], 2),
    }


def _model_max_seq_length(model_path: str) -> int:
    config = Path(model_path) / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length", 256))
    return 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG, help="the recipe's YAML (default: recipes/scifact.yaml)")
    parser.add_argument("--data_dir", help="a BEIR folder instead of the YAML's (both sides)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", type=int, default=3, help="alternating rounds of each side (default 3)")
    parser.add_argument("--only", choices=SIDES, action="append", help="run these sides only (repeatable)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="corpus encoding precision of both sides; auto: hf-qret's rule on this device")  # fmt: skip
    parser.add_argument("--max_seq_length", type=int, help="both sides (default: the model's)")
    parser.add_argument("--encode_batch_size", type=int, default=64, help="corpus encoding batch of both sides")
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="OMP/MKL threads, every child"
    )
    parser.add_argument("--max_steps", type=int, help="cut training short on both sides (a smoke test)")
    parser.add_argument("--warm_bank", type=Path, help="base-model corpus embeddings (.npy, corpus order) to reuse")
    parser.add_argument("--work_dir", type=Path, help="where the artifacts go (default: a temporary folder)")
    parser.add_argument("--_child", choices=("st", "warm"), help=argparse.SUPPRESS)
    parser.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_device", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.config = opts.config.resolve()
    opts.settings = _recipe_settings(opts.config, opts.data_dir)
    if opts._device is None:
        import torch

        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        opts.device = opts._device
    if opts._child is None:
        opts.precision = resolve_precision(opts.precision, opts.device)  # one value, given to both sides
        if opts.max_seq_length is None:
            from hf_qret.config import resolve_model_path

            opts.max_seq_length = _model_max_seq_length(resolve_model_path(opts.settings["model_name_or_path"]))
    opts.child_argv = ["--config", str(opts.config), "--data_dir", opts.settings["data_dir"], "--seed", str(opts.seed),
                       "--precision", opts.precision, "--max_seq_length", str(opts.max_seq_length),
                       "--encode_batch_size", str(opts.encode_batch_size), "--_device", opts.device]  # fmt: skip
    if opts.max_steps:
        opts.child_argv += ["--max_steps", str(opts.max_steps)]
    if opts.warm_bank:
        opts.child_argv += ["--warm_bank", str(opts.warm_bank)]
    return opts


def dev_slices(opts: argparse.Namespace) -> dict[str, int]:
    """How many dev claims the seen / unseen slices hold (RetrievalEvaluator's rule)."""
    from hf_qret.data import load_beir
    from hf_qret.evaluation.evaluator import RetrievalEvaluator

    train = load_beir(opts.settings["data_dir"], split=opts.settings.get("train_split", "train"))
    dev = load_beir(opts.settings["data_dir"], split=opts.settings.get("eval_split", "dev"))
    evaluator = RetrievalEvaluator(dev.queries, dev.qrels, seen_doc_ids=_seen_doc_ids(train))
    return {"all": len(evaluator.query_ids), **{name: len(ids) for name, ids in evaluator.slices.items()}}


def main(argv: list[str] | None = None) -> dict | None:
    opts = parse_args(argv)
    if opts._child == "st":
        st_child(opts, opts._out)
        return None
    if opts._child == "warm":
        warm_child(opts, opts._out)
        return None

    sides = tuple(s for s in SIDES if not opts.only or s in opts.only)
    order = run_order(opts.runs, sides)
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "MKL_NUM_THREADS": str(opts.threads),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    info = machine()
    result: dict = {
        "seed": opts.seed,
        "config": str(opts.config.relative_to(REPO) if opts.config.is_relative_to(REPO) else opts.config),
        "data_dir": opts.settings["data_dir"],
        "max_steps": opts.max_steps,
    }
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as scratch:
        work = (opts.work_dir or Path(scratch)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        warm = prepare_warm_bank(opts, work, env) if "qret_warm" in sides else None
        for round_, side in order:
            out = work / f"{side}_{round_}"
            print(f"[end_to_end] round {round_}: {side}", file=sys.stderr, flush=True)
            if side == "st":
                runs[side].append(run_st(opts, out, env))
            else:
                runs[side].append(run_qret(opts, out, env, Path(warm["path"]) if side == "qret_warm" else None))
            print(f"[end_to_end]   {side}: {runs[side][-1]['wall_s']} s", file=sys.stderr, flush=True)
    result.update(summarize(runs, order))
    if runs.get("qret"):  # the base model, scored by the recipe before training (the same for every run)
        result.update({f"untrained_{key}": value for key, value in runs["qret"][0]["untrained"].items()})
    result.update(
        qret_encode_precision=opts.precision if "qret" in sides else None,
        st_encode_precision=runs["st"][0]["encode_precision"] if runs.get("st") else None,
        warm_bank=warm,
        max_seq_length=opts.max_seq_length,
        encode_batch_size=opts.encode_batch_size,
        threads=opts.threads,
        device=opts.device,
        dev_claims=dev_slices(opts),
        cpu_flags=cpu_flags(),
        phases_s={side: [r["phases_s"] for r in results] for side, results in runs.items()},
        details=runs,
        machine=info,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
