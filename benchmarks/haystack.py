"""A million documents on one box: a real BEIR corpus hidden in N distractor rows drawn from its own embeddings.

    python benchmarks/haystack.py --corpus /path/to/scifact --distractors 1000000 --output_dir OUT \\
        [--bank_file scifact_bank.npy] [--json_out benchmarks/results/haystack_scifact_1m.json]

hf-qret never re-encodes a document no training query touches, so a corpus of real texts, queries and qrels plus N
rows without text whose vectors follow the real document embeddings is a faithful stand-in for a corpus of N real
documents. Steps:

1. **Data.** ``--corpus`` with a ``dev`` split is used as is; one without (SciFact: train only) gets the recipe's dev
   carving (:func:`hf_qret.data.carve_dev_split`, 20 % of the training queries, seed 13, as
   ``recipes/prepare_data.py``) in ``OUT-data/``, which is then the folder to evaluate on.
2. **Real bank.** ``--bank_file`` (float32 ``.npy``, rows in corpus order, the untrained model's document
   embeddings) when its row count matches the corpus; else the corpus is encoded with the library's document
   encoding and saved in ``OUT-data/bank.npy``.
3. **Distractors.** A Gaussian kernel density of the real rows in their PCA basis: each distractor is a random real
   row plus ``N(0, h^2 * Cov)`` noise (the kernel's covariance is the real rows' covariance; ``Cov`` has rank at most
   the number of documents), then L2-normalised like the model's embeddings. The bandwidth ``h`` is chosen so that
   the nearest-neighbour cosine similarities inside a sample of distractors match those inside the real documents
   (same sample size); both distributions' quantiles are reported (``nn_similarity``), with the similarity of each
   real document to its nearest distractor among as many distractors.
4. **(a) Untrained.** The base model's dev queries against the whole haystack: flat, and each ``--factory`` built
   by :class:`hf_qret.index.core.QuantizedIndex` (the library's sample and chunking): nDCG@10, recall@100, build
   seconds, index search queries/s at k = 10 (batches of 32; 1 thread and all), bytes.
5. **(b) Trained.** The recipe (``hf-qret train``, ``recipes/scifact.yaml``'s settings, everything else the library's
   defaults: ``index_factory auto``, mining, refreshes, the safety net, evaluation) on the training pairs over the
   whole haystack bank (the distractors are ``--extra_rows_file`` rows), in a child process: ``train_wall_s`` is its
   wall time (launch to saved artifact), ``peak_rss_gb`` its own peak RSS (read by ``benchmarks/rss_profile.py``,
   which runs it; ``peak_rss_phase`` is the log line before the peak; the profile is ``OUT-data/train_rss.json``).
   Then ``hf-qret evaluate OUT --data DATA --split dev`` (child process) scores the artifact; serving and mining speed
   are measured on the saved index.

The last stdout line is one JSON object; ``--json_out`` also writes it (and a Markdown table next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_FACTORIES = ["RQ16x8", "PQ16", "OPQ16,PQ16", "IVF{nlist},PQ16:nprobe=16"]
BATCH = 32
SEED = 0


def log(message: str) -> None:
    print(f"[haystack] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------- data
def prepare_data(corpus: Path, data_out: Path, split: str) -> Path:
    """The BEIR folder to train and evaluate on: ``corpus`` itself when it has ``split``, else a copy (links) with
    the recipe's dev split carved out of ``train``."""
    from hf_qret.data import carve_dev_split, load_qrels, write_qrels

    if any((corpus / "qrels" / f"{split}{ext}").is_file() for ext in (".tsv", ".tsv.gz")):
        return corpus
    data_out.mkdir(parents=True, exist_ok=True)
    for path in corpus.iterdir():
        if path.is_file() and path.name.startswith(("corpus", "queries")) and not (data_out / path.name).exists():
            os.symlink(path.resolve(), data_out / path.name)
    train, dev = carve_dev_split(load_qrels(corpus / "qrels" / "train.tsv"), 0.2, 13)
    write_qrels(train, data_out / "qrels" / "train.tsv")
    write_qrels(dev, data_out / "qrels" / f"{split}.tsv")
    log(f"carved {split}: {len(train)} train / {len(dev)} {split} queries -> {data_out}")
    return data_out


def real_bank(data, bank_file: Path | None, save_to: Path) -> np.ndarray:
    """The untrained model's document embeddings of the corpus, rows in corpus order."""
    for path in (bank_file, save_to):
        if path is not None and path.is_file():
            rows = np.load(path, mmap_mode="r")
            if rows.shape[0] == len(data.doc_ids):
                log(f"real bank: {path} {rows.shape}")
                return np.ascontiguousarray(rows, dtype=np.float32)
            log(f"{path}: {rows.shape[0]} rows, the corpus has {len(data.doc_ids)}: not used")
    from hf_qret.training.corpus import document_encode

    model = load_model()
    log(f"encoding {len(data.doc_ids)} documents")
    rows = np.asarray(document_encode(model, 64)(data.doc_texts()), dtype=np.float32)
    np.save(save_to, rows)
    return rows


def load_model():
    from hf_qret.config import DEFAULT_MODEL, resolve_model_path
    from hf_qret.serving.encoder import configure_encoder
    from hf_qret.serving.sentence_encoder import load_encoder

    model = load_encoder(resolve_model_path(DEFAULT_MODEL), "cpu")
    configure_encoder(model)
    return model


def nn_similarity(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Each row of ``a``'s largest cosine to another row of ``a`` (``b`` None) or to a row of ``b``."""
    sims = a @ (a if b is None else b).T
    if b is None:
        np.fill_diagonal(sims, -np.inf)
    return sims.max(axis=1)


def quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"q{int(q * 100):02d}": round(float(np.quantile(values, q)), 4) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}


class KernelSampler:
    """Distractors: a random real row plus ``N(0, h^2 Cov)`` noise (in the real rows' PCA basis), normalised."""

    def __init__(self, real: np.ndarray, seed: int = SEED) -> None:
        self.real = real
        self.mean = real.mean(axis=0)
        centred = real - self.mean
        _, singular, basis = np.linalg.svd(centred, full_matrices=False)
        self.scales = singular / np.sqrt(len(real) - 1)  # std along each principal axis
        self.basis = basis
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int, bandwidth: float) -> np.ndarray:
        parents = self.rng.integers(0, len(self.real), n)
        noise = (self.rng.standard_normal((n, len(self.scales))).astype(np.float32) * self.scales) @ self.basis
        rows = self.real[parents] + bandwidth * noise
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return rows.astype(np.float32)


def fit_bandwidth(sampler: KernelSampler, real: np.ndarray) -> tuple[float, dict]:
    """The bandwidth whose distractor-to-distractor nearest-neighbour similarities (a sample as large as the corpus)
    have the median of the real documents' (bisection on ``h``)."""
    target = float(np.median(nn_similarity(real)))
    low, high = 0.05, 3.0
    for _ in range(12):
        h = (low + high) / 2
        median = float(np.median(nn_similarity(sampler.sample(len(real), h))))
        low, high = (h, high) if median > target else (low, h)
    h = (low + high) / 2
    check = sampler.sample(len(real), h)
    report = {
        "bandwidth": round(h, 4),
        "sample_rows": len(real),
        "real_to_real": quantiles(nn_similarity(real)),
        "distractor_to_distractor": quantiles(nn_similarity(check)),
        "real_to_distractor": quantiles(nn_similarity(real, check)),
    }
    return h, report


def write_distractors(sampler: KernelSampler, h: float, n: int, folder: Path) -> tuple[Path, Path]:
    rows_path, ids_path = folder / f"distractors_{n}.npy", folder / f"distractors_{n}.ids.json"
    if rows_path.is_file() and ids_path.is_file():
        return rows_path, ids_path
    out = np.lib.format.open_memmap(
        str(rows_path) + ".tmp.npy", mode="w+", dtype=np.float32, shape=(n, real_dim(sampler))
    )
    for start in range(0, n, 65_536):
        stop = min(n, start + 65_536)
        out[start:stop] = sampler.sample(stop - start, h)
    out.flush()
    del out
    os.replace(str(rows_path) + ".tmp.npy", rows_path)
    ids_path.write_text(json.dumps([f"distractor-{i}" for i in range(n)]))
    return rows_path, ids_path


def real_dim(sampler: KernelSampler) -> int:
    return int(sampler.real.shape[1])


# ------------------------------------------------------------------------------------------------- measurements
def search_qps(index, queries: np.ndarray, k: int, threads: int | None) -> float:
    import faiss

    before = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        reps = max(1, 2048 // len(queries))
        batch = np.ascontiguousarray(np.concatenate([queries] * reps), dtype=np.float32)
        index.search(batch[:BATCH], k)  # warm
        clock = time.perf_counter()
        for start in range(0, len(batch), BATCH):
            index.search(batch[start : start + BATCH], k)
        return len(batch) / (time.perf_counter() - clock)
    finally:
        faiss.omp_set_num_threads(before)


def score(evaluator, query_embeddings: np.ndarray, index, doc_ids: list[str]) -> dict[str, float]:
    from hf_qret.evaluation.evaluator import search_run
    from hf_qret.evaluation.metrics import compute_metrics

    run = search_run(query_embeddings, evaluator.query_ids, index, doc_ids, 100)
    metrics = compute_metrics(run, evaluator.qrels, ("ndcg@10", "recall@100"))
    return {k: round(v, 4) for k, v in metrics.items()}


def untrained(haystack: np.ndarray, doc_ids: list[str], data, factories: list[str], queries: np.ndarray) -> list:
    """(a): flat and each factory over the whole haystack, the base model's dev queries."""
    from hf_qret.evaluation.evaluator import RetrievalEvaluator
    from hf_qret.index.auto import ivf_lists
    from hf_qret.index.core import QuantizedIndex

    evaluator = RetrievalEvaluator(data.queries, data.qrels)
    results = []
    for spec in ["Flat", *factories]:
        factory, _, params = spec.partition(":")
        factory = factory.format(nlist=ivf_lists(len(haystack)))
        index = QuantizedIndex(haystack.shape[1], factory, params or None)
        clock = time.perf_counter()
        index.build(haystack)
        build_s = time.perf_counter() - clock
        row = {
            "factory": factory,
            "search_params": params or None,
            "build_s": round(build_s, 1),
            "bytes_per_vector": index.bytes_per_vector,
            **score(evaluator, queries, index, doc_ids),
            "qps_k10_1thread": round(search_qps(index, queries, 10, 1), 1),
            "qps_k10_all": round(search_qps(index, queries, 10, None), 1),
        }
        log(f"untrained {row}")
        results.append(row)
        del index
    return results


def run_child(argv: list[str], log_path: Path) -> float:
    clock = time.perf_counter()
    with open(log_path, "w") as handle:
        code = subprocess.call(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        raise SystemExit(f"{' '.join(argv[:4])}... failed ({code}); see {log_path}")
    return time.perf_counter() - clock


def run_measured_child(argv: list[str], log_path: Path, profile_path: Path) -> tuple[float, dict]:
    """Runs ``argv`` under ``benchmarks/rss_profile.py`` (its output, timestamped, in ``log_path``): its wall seconds
    and the profile (``ru_maxrss_bytes``: the command's own peak; ``peak_phase``: the log line before the sampled
    peak).

    This process's ``RUSAGE_CHILDREN.ru_maxrss`` is not the child's peak: Linux starts a child's ``maxrss`` at the
    high-water mark of the address space it replaced at ``exec`` (``subprocess`` spawns with ``vfork``: this whole
    process's, haystack and untrained indexes included). ``rss_profile.py`` is a small process, so the peak it reads
    for its own child is the training command's.
    """
    profiler = [sys.executable, str(REPO / "benchmarks" / "rss_profile.py"), "--json_out", str(profile_path)]
    wall = run_child([*profiler, "--log", str(log_path), "--", *argv], profile_path.with_suffix(".log"))
    return wall, json.loads(profile_path.read_text())


def artifact_bytes(folder: Path) -> int:
    from hf_qret.serving.artifact import artifact_files

    return sum((folder / name).stat().st_size for name in artifact_files(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--distractors", type=int, required=True)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--bank_file", type=Path, help="the corpus's untrained document embeddings (.npy)")
    parser.add_argument("--factory", action="append", help="16-byte factories of (a), FACTORY[:PARAMS]")
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="more recipe options")
    parser.add_argument("--json_out", type=Path)
    args = parser.parse_args()

    from hf_qret.data import load_beir
    from hf_qret.serving.encoder import encode_texts

    out = args.output_dir
    work = out.with_name(out.name + "-data")
    work.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(args.corpus, work / "beir", args.split)
    dev = load_beir(data_dir, split=args.split)
    real = real_bank(dev, args.bank_file, work / "bank.npy")
    sampler = KernelSampler(real)
    h, similarity = fit_bandwidth(sampler, real)
    log(f"distractor kernel: {similarity}")
    rows_path, ids_path = write_distractors(sampler, h, args.distractors, work)
    distractors = np.load(rows_path, mmap_mode="r")
    nearest = np.full(len(real), -np.inf, dtype=np.float32)
    for start in range(0, len(distractors), 8192):
        nearest = np.maximum(nearest, (real @ np.asarray(distractors[start : start + 8192]).T).max(axis=1))
    similarity["real_to_nearest_of_all_distractors"] = quantiles(nearest)
    haystack = np.concatenate([real, np.asarray(distractors)])
    doc_ids = dev.doc_ids + json.loads(ids_path.read_text())
    model = load_model()
    queries = encode_texts(model, [dev.queries[q] for q in dev.qrels if q in dev.queries], role="query")
    del model
    factories = args.factory or DEFAULT_FACTORIES
    table = untrained(haystack, doc_ids, dev, factories, queries)
    del haystack

    # (b) the recipe with the library's defaults over the whole haystack bank
    train_argv = [
        sys.executable, "-m", "hf_qret.cli", "train", str(REPO / "recipes" / "scifact.yaml"),
        "--data_dir", str(data_dir), "--eval_split", args.split, "--output_dir", str(out),
        "--extra_rows_file", str(rows_path), "--extra_ids_file", str(ids_path),
        "--bank_init_file", str(args.bank_file if args.bank_file and args.bank_file.is_file() else work / "bank.npy"),
        "--report_to", "none", *args.train_args,
    ]  # fmt: skip
    log("training: " + " ".join(train_argv))
    train_wall, profile = run_measured_child(train_argv, work / "train.log", work / "train_rss.json")
    peak_rss = profile["ru_maxrss_bytes"]  # the training command's own peak (not this process's, see above)
    train_log = (work / "train.log").read_text()
    refreshes = [float(s) for s in re.findall(r"refreshed the .* index \(.*\) at step \d+ in ([0-9.]+)s", train_log)]
    config = json.loads((out / "qret_config.json").read_text())
    results = json.loads((out / "eval_results.json").read_text())
    steps = int(config.get("global_step") or 0) or 1
    eval_argv = [
        sys.executable,
        "-m",
        "hf_qret.cli",
        "evaluate",
        str(out),
        "--data",
        str(data_dir),
        "--split",
        args.split,
    ]
    run_child(eval_argv, work / "evaluate.log")
    evaluated = json.loads((work / "evaluate.log").read_text().strip().splitlines()[-1])

    # serving and mining speed of the saved index (embeddings in), and end to end (texts in)
    from hf_qret import QuantizedRetriever

    retriever = QuantizedRetriever.from_pretrained(out, "cpu")
    trained_queries = retriever.encode_queries([dev.queries[q] for q in dev.qrels if q in dev.queries])
    train_data = load_beir(data_dir, split="train")
    mining_queries = retriever.encode_queries(list(train_data.queries.values())[:1024])
    texts = list(dev.queries.values())
    clock = time.perf_counter()
    retriever.search(texts, k=10)
    end_to_end = len(texts) / (time.perf_counter() - clock)
    bank_bytes = (out / "bank.safetensors").stat().st_size
    index_bytes = (out / "index.faiss").stat().st_size
    flat = next(row for row in table if row["factory"] == "Flat")
    chosen = config["index_factory"]
    same = next((row for row in table if row["factory"] == chosen), None)
    record = {
        "corpus": args.corpus.name,
        "split": args.split,
        "real_documents": len(dev.doc_ids),
        "distractors": args.distractors,
        "rows": len(doc_ids),
        "dev_queries": len(queries),
        "nn_similarity": similarity,
        "untrained": table,
        "untrained_flat_ndcg10": flat["ndcg@10"],
        "untrained_flat_recall100": flat["recall@100"],
        "untrained_16b_ndcg10": same["ndcg@10"] if same else results["untrained"].get("untrained_quantized_ndcg@10"),
        "untrained_16b_recall100": same["recall@100"] if same else None,
        "index_factory": chosen,
        "index_search_params": config.get("index_search_params"),
        "index_choice": config.get("index_choice"),
        "trained_flat_ndcg10": evaluated["flat"]["ndcg@10"],
        "trained_flat_recall100": evaluated["flat"]["recall@100"],
        "trained_16b_ndcg10": evaluated["quantized"]["ndcg@10"],
        "trained_16b_recall100": evaluated["quantized"]["recall@100"],
        "shipped": results.get("shipped"),
        "train_wall_s": round(train_wall, 1),
        "global_step": config.get("global_step"),
        "seconds_per_step": round(results["timings_s"]["train"] / steps, 3),
        "index_seconds": results["timings_s"].get("index"),
        "refreshes": len(refreshes),
        "seconds_per_refresh": round(float(np.mean(refreshes)), 2) if refreshes else None,
        "mining_qps_k100": round(search_qps(retriever.index, mining_queries, 100, None), 1),
        "serving_qps_k10_1thread": round(search_qps(retriever.index, trained_queries, 10, 1), 1),
        "serving_qps_k10_all": round(search_qps(retriever.index, trained_queries, 10, None), 1),
        "end_to_end_qps_k10_all": round(end_to_end, 1),
        "peak_rss_gb": round(peak_rss / 1e9, 3),
        "peak_rss_phase": profile["peak_phase"],
        "bank_bytes": bank_bytes,
        "index_bytes": index_bytes,
        "rss_over_bank_plus_index": round(peak_rss / (bank_bytes + index_bytes), 2),
        "artifact_bytes": artifact_bytes(out),
        "evaluate_command": " ".join(["hf-qret", "evaluate", str(out), "--data", str(data_dir), "--split", args.split]),
        "cpu": os.cpu_count(),
    }
    record["goals"] = {
        "trained_16b_ge_untrained_flat": record["trained_16b_ndcg10"] >= record["untrained_flat_ndcg10"],
        "trained_16b_ge_untrained_16b_plus_0.10": record["trained_16b_ndcg10"] >= record["untrained_16b_ndcg10"] + 0.10,
        "train_wall_le_3600": record["train_wall_s"] <= 3600,
        "serving_ge_1000_qps": record["serving_qps_k10_all"] >= 1000,
        "rss_le_3x_bank_plus_index": record["rss_over_bank_plus_index"] <= 3,
    }
    line = json.dumps(record)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(record, indent=2) + "\n")
        args.json_out.with_suffix(".md").write_text(markdown(record) + "\n")
    print(line)


def markdown(r: dict) -> str:
    s = r["nn_similarity"]
    lines = [
        f"# Haystack: {r['corpus']} ({r['real_documents']:,} real documents) + {r['distractors']:,} distractors",
        "",
        f"2 CPU cores (AMD EPYC). {r['dev_queries']} {r['split']} queries. Raw: the JSON file of the same name.",
        "",
        f"Distractor kernel bandwidth {s['bandwidth']}; nearest-neighbour cosine quantiles (samples of "
        f"{s['sample_rows']:,} rows):",
        "",
        "| pair | q05 | q25 | q50 | q75 | q95 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in (
        "real_to_real",
        "distractor_to_distractor",
        "real_to_distractor",
        "real_to_nearest_of_all_distractors",
    ):
        q = s[name]
        lines.append(f"| {name} | {q['q05']} | {q['q25']} | {q['q50']} | {q['q75']} | {q['q95']} |")
    lines += [
        "",
        "(a) Untrained model over the whole haystack:",
        "",
        "| index | bytes/vector | build (s) | nDCG@10 | recall@100 | q/s k=10, 1 thread | q/s k=10, all |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["untrained"]:
        name = row["factory"] + (f" ({row['search_params']})" if row["search_params"] else "")
        lines.append(
            f"| `{name}` | {row['bytes_per_vector']} | {row['build_s']} | {row['ndcg@10']} | {row['recall@100']} | "
            f"{row['qps_k10_1thread']:,} | {row['qps_k10_all']:,} |"
        )
    lines += [
        "",
        f"(b) Trained with the library's defaults (`index_factory auto` -> `{r['index_factory']}`, "
        f"{r['index_search_params']}):",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    for key in ("trained_flat_ndcg10", "trained_16b_ndcg10", "trained_16b_recall100", "shipped", "train_wall_s",
                "global_step", "seconds_per_step", "refreshes", "seconds_per_refresh", "mining_qps_k100",
                "serving_qps_k10_1thread", "serving_qps_k10_all", "end_to_end_qps_k10_all", "peak_rss_gb",
                "rss_over_bank_plus_index", "artifact_bytes"):  # fmt: skip
        lines.append(f"| {key} | {r[key]} |")
    lines += ["", "Goals: " + ", ".join(f"{k}: {v}" for k, v in r["goals"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
