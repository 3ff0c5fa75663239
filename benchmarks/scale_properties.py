"""The small-run properties of training, checked on a million-row bank: exact resume, one artifact, the safety net's
record, and ``--bank_sharding rows`` on two processes equal to the replicated bank.

    python benchmarks/scale_properties.py --data_dir HAYSTACK-data/beir \\
        --extra_rows_file HAYSTACK-data/distractors_1000000.npy \\
        --extra_ids_file HAYSTACK-data/distractors_1000000.ids.json \\
        --bank_init_file scifact_bank.npy --output_dir OUT [--parts resume,shard] \\
        [--json_out benchmarks/results/scale_properties_1m.json]

Every run is ``hf_qret.cli train recipes/scifact.yaml`` (or ``recipes/train.py`` under ``torch.distributed.run``)
over the BEIR folder's corpus plus the precomputed rows (``--extra_rows_file``), the corpus's untrained embeddings
as ``--bank_init_file``, the default index (``auto``: ``OPQ16,IVF1024,PQ16`` at this size), a loss logged every step.

- **resume** (a, b, c): run A trains ``--max_steps`` steps straight, with a checkpoint every ``--save_steps``. When
  A publishes ``checkpoint-<save_steps>``, that checkpoint and A's untrained snapshot (``_untrained``, the safety
  net's) are copied into run B's folder; after A, B resumes from it (``--resume_from_checkpoint``). Compared: the
  final bank (``bank.safetensors``), the index (serialized bytes; per inverted list the ids and codes), the query
  encoder's weights (``model.safetensors``), the doc ids, and every logged loss after the checkpoint. Each artifact
  is checked for the served files, for no leftover working folders, scored by ``hf-qret evaluate OUT --data DATA
  --split dev``, and its ``qret_config.json`` is checked for a consistent record (global step, index state, the
  safety net's verdict, and the verdict's trained metric against what ``hf-qret evaluate`` measures).
- **shard** (d): the same ``--shard_steps`` steps under ``torch.distributed.run --nproc_per_node 2`` (gloo, one
  OpenMP thread per process: torchrun's default), once with the replicated bank (``--bank_sharding none``) and once
  with ``--bank_sharding rows``, a checkpoint at the last step; compared as above (losses from the checkpoint's
  ``trainer_state.json``).

Wall seconds and each run's peak RSS (``ru_maxrss`` of the run's process tree from ``os.wait4``: the largest single
process) are recorded. The last stdout line is the JSON record; ``--json_out`` merges it into that file (parts run
separately accumulate) and writes a Markdown summary next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BANK_KEY = "embeddings"  # the tensor of bank.safetensors
WORKING_NAMES = ("_untrained", "_staging-", ".tmp", "_document_encoder.tmp")


def log(message: str) -> None:
    print(f"[scale_properties] {message}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------------- running
def run_child(argv: list[str], log_path: Path, watch: Any = None) -> dict[str, float]:
    """Runs ``argv`` (output to ``log_path``); ``watch()`` is polled every second while it runs. Returns its wall
    seconds and peak RSS (GB, the largest process of its tree)."""
    clock = time.perf_counter()
    with open(log_path, "w") as handle:
        child = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
        done = threading.Event()
        if watch is not None:

            def poll() -> None:
                while not done.wait(1.0):
                    watch()

            threading.Thread(target=poll, daemon=True).start()
        _, status, usage = os.wait4(child.pid, 0)
        done.set()
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])}... failed ({child.returncode}); see {log_path}")
    return {"wall_s": round(time.perf_counter() - clock, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2)}


def train_argv(args: argparse.Namespace, out: Path, *extra: str, processes: int = 1) -> list[str]:
    common = [
        str(REPO / "recipes" / "scifact.yaml"), "--data_dir", str(args.data_dir), "--eval_split", "dev",
        "--output_dir", str(out), "--extra_rows_file", str(args.extra_rows_file),
        "--extra_ids_file", str(args.extra_ids_file), "--bank_init_file", str(args.bank_init_file),
        "--report_to", "none", "--logging_steps", "1", "--save_strategy", "steps", "--opq_niter", str(args.opq_niter),
        *extra,
    ]  # fmt: skip
    if processes == 1:
        return [sys.executable, "-m", "hf_qret.cli", "train", *common]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
            str(port), str(REPO / "recipes" / "train.py"), *common]  # fmt: skip


def evaluate(out: Path, args: argparse.Namespace, log_path: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "hf_qret.cli", "evaluate", str(out), "--data", str(args.data_dir), "--split", "dev"]
    usage = run_child(argv, log_path)
    return {
        **json.loads(log_path.read_text().strip().splitlines()[-1]),
        **{f"evaluate_{k}": v for k, v in usage.items()},
    }


# ------------------------------------------------------------------------------------------------------ comparing
def array_diff(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    if a.shape != b.shape:
        return {"shape": [list(a.shape), list(b.shape)], "bitwise_equal": False}
    bitwise = bool(np.array_equal(a.view(np.uint8), b.view(np.uint8)))
    diff = 0.0 if bitwise else float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    return {"shape": list(a.shape), "bitwise_equal": bitwise, "max_abs_diff": diff}


def compare_arrays(left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> dict[str, Any]:
    """Every array of two name-to-array maps: bitwise equal, else the max abs difference."""
    result: dict[str, Any] = {name: array_diff(left[name], right[name]) for name in sorted(left) if name in right}
    result["keys_equal"] = sorted(left) == sorted(right)
    return result


def compare_tensors(a: Path, b: Path) -> dict[str, Any]:
    """Every tensor of two safetensors files: bitwise equal, else the max abs difference."""
    from safetensors.numpy import load_file

    return compare_arrays(load_file(str(a)), load_file(str(b)))


def compare_bank(a: Path, b: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    left = load_file(str(a / "bank.safetensors"))  # read once: 1.5 GB at a million rows
    result = compare_arrays(left, load_file(str(b / "bank.safetensors")))
    # how many of the corpus's rows differ from their untrained embedding (precomputed rows are never positives)
    untrained = np.asarray(np.load(ARGS.bank_init_file, mmap_mode="r"))
    rows = left[BANK_KEY][: len(untrained)]
    result["corpus_rows_moved_in_first"] = int(np.any(rows != untrained, axis=1).sum())
    return result


def compare_checkpoint(a: Path, b: Path) -> dict[str, Any]:
    """Two checkpoints of the same step: bank, served and mining index, query encoder, row-optimizer state."""
    result: dict[str, Any] = {
        "bank": compare_bank(a, b),
        "index": compare_index(a, b),
        "query_encoder": compare_encoder(a, b),
    }
    if (a / "mining_index.faiss").is_file():
        result["mining_index"] = compare_index(a, b, "mining_index.faiss")
    for name in ("bank_optimizer.safetensors", "bank_anchors.safetensors"):
        if (a / name).is_file() and (b / name).is_file():
            result[name] = compare_tensors(a / name, b / name)
    return result


def compare_encoder(a: Path, b: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    left = load_file(str(a / "model.safetensors"))
    compared = compare_arrays(left, load_file(str(b / "model.safetensors")))
    diffs = [compared[name] for name in sorted(left) if name in compared]
    return {
        "tensors": len(left),
        "keys_equal": compared["keys_equal"],
        "bitwise_equal": all(d["bitwise_equal"] for d in diffs),
        "max_abs_diff": max(d.get("max_abs_diff", float("inf")) for d in diffs),
    }


def read_index(folder: Path, name: str) -> Any:
    """``folder/name``, or (a sharded run's checkpoint) its shards ``NAME-shard-R-of-N.faiss`` merged in rank order."""
    import faiss

    from hf_qret.index.sharding import merge_shard_indexes

    if (folder / name).is_file():
        return faiss.read_index(str(folder / name))
    stem = name.removesuffix(".faiss")
    files = sorted(
        folder.glob(f"{stem}-shard-*-of-*.faiss"), key=lambda p: int(p.name.split("-shard-")[1].split("-")[0])
    )
    parts = [faiss.read_index(str(p)) for p in files]
    starts = np.cumsum([0] + [part.ntotal for part in parts[:-1]]).tolist()
    return merge_shard_indexes(parts, starts, name)


def compare_index(a: Path, b: Path, name: str = "index.faiss") -> dict[str, Any]:
    import faiss

    left, right = (read_index(p, name) for p in (a, b))
    result: dict[str, Any] = {
        "ntotal": [int(left.ntotal), int(right.ntotal)],
        "serialized_bytes_equal": bool(np.array_equal(faiss.serialize_index(left), faiss.serialize_index(right))),
    }
    try:
        ivf = [faiss.extract_index_ivf(index) for index in (left, right)]
    except RuntimeError:  # not an IVF index (a smaller bank's factory): the serialized bytes say it all
        return result
    lists = [x.invlists for x in ivf]
    order_equal = members_equal = True
    other_codes = other_lists = 0
    for number in range(ivf[0].nlist):
        sizes = [inv.list_size(number) for inv in lists]
        ids = [faiss.rev_swig_ptr(inv.get_ids(number), n).copy() for inv, n in zip(lists, sizes)]
        codes = [
            faiss.rev_swig_ptr(inv.get_codes(number), n * inv.code_size).copy().reshape(n, -1)
            for inv, n in zip(lists, sizes)
        ]
        order_equal &= sizes[0] == sizes[1] and bool(np.array_equal(*ids))
        # by id, whatever the order inside the list: the same rows in this list, with the same codes?
        common, left_at, right_at = np.intersect1d(ids[0], ids[1], assume_unique=True, return_indices=True)
        other_lists += sizes[0] - len(common)
        members_equal &= len(common) == sizes[0] == sizes[1]
        other_codes += int(np.any(codes[0][left_at] != codes[1][right_at], axis=1).sum())
    result.update(
        {
            "ivf_lists_in_the_same_order": order_equal,
            "ivf_same_rows_in_each_list": members_equal,
            "rows_in_another_list": other_lists,
            "rows_with_other_codes": other_codes,
        }
    )
    if isinstance(left, faiss.IndexPreTransform):
        mats = [faiss.downcast_VectorTransform(x.chain.at(0)) for x in (left, right)]
        result["opq_rotation"] = array_diff(*(faiss.vector_to_array(m.A) for m in mats))
    result["coarse_centroids"] = array_diff(*(x.quantizer.reconstruct_n(0, x.nlist) for x in ivf))
    return result


def losses(checkpoint: Path, after: int = 0) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {int(h["step"]): float(h["loss"]) for h in history if "loss" in h and int(h["step"]) > after}


def compare_losses(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    steps = sorted(set(a) & set(b))
    return {
        "steps": steps,
        "a": [a[s] for s in steps],
        "b": [b[s] for s in steps],
        "equal": [a[s] for s in steps] == [b[s] for s in steps] and len(steps) > 0,
        "max_abs_diff": max((abs(a[s] - b[s]) for s in steps), default=None),
    }


def artifact_check(out: Path) -> dict[str, Any]:
    """The served files are there, the working folders are gone, and the record is consistent."""
    from hf_qret.serving.artifact import load_retrieval_files
    from hf_qret.serving.manifest import artifact_files

    files = artifact_files(out)
    served = ["index.faiss", "doc_ids.json", "qret_config.json", "model.safetensors", "bank.safetensors", "config.json"]
    leftovers = sorted(p.name for p in out.iterdir() if any(w in p.name for w in WORKING_NAMES))
    loaded = load_retrieval_files(out, load_bank=True)
    config = loaded.config
    state = config.get("index_state") or {}
    net = config.get("safety_net") or {}
    return {
        "served_files_present": {name: name in files for name in served},
        "artifact_files": len(files),
        "artifact_bytes": sum((out / f).stat().st_size for f in files),
        "working_leftovers": leftovers,
        "checkpoints": sorted(p.name for p in out.glob("checkpoint-*")),
        "loads": {
            "index_ntotal": int(loaded.index.ntotal),
            "doc_ids": len(loaded.doc_ids),
            "bank_rows": len(loaded.bank),
        },
        "index_factory": config.get("index_factory"),
        "global_step": config.get("global_step"),
        "index_state": state,
        "safety_net": net,
        "opq_niter": config.get("opq_niter"),
        "bank_sharding": config.get("bank_sharding"),
    }


def record_consistent(check: dict[str, Any], steps: int, evaluated: dict[str, Any] | None) -> dict[str, Any]:
    state, net = check["index_state"], check["safety_net"]
    trained = net.get("shipped", "trained") == "trained"
    result = {
        # the trained model: the last step's, its index refreshed at that step; the untrained one: step 0's, with
        # the index built before training (no refresh)
        "global_step_matches_verdict": check["global_step"] == (steps if trained else 0),
        "index_state_step_is_global_step": state.get("step") == check["global_step"],
        "shipped_index_is_the_verdicts": state.get("last_refresh_step") == (steps if trained else None),
        "no_rows_stale_in_shipped_index": state.get("rows_reencoded_since_refresh") == 0,
        "verdict": net.get("shipped"),
        "verdict_follows_metrics": net.get("shipped")
        == ("trained" if (net.get("trained") or 0) >= (net.get("untrained") or 0) else "untrained"),
    }
    if evaluated is not None and net:
        shipped = net.get(net.get("shipped"))
        measured = evaluated["quantized"]["ndcg@10"]
        result["shipped_metric_in_record"] = shipped
        result["evaluate_quantized_ndcg@10"] = measured
        result["record_matches_evaluate_abs_diff"] = abs(shipped - measured) if shipped is not None else None
    return result


# ---------------------------------------------------------------------------------------------------------- parts
def run_resume(args: argparse.Namespace, a: Path, b: Path, checkpoint: str, steps: list[str]) -> tuple[dict, dict]:
    """Run A straight; B resumed from A's checkpoint, copied into B's folder (with A's untrained snapshot) as soon
    as A publishes it."""
    for folder in (a, b):
        shutil.rmtree(folder, ignore_errors=True)
    b.mkdir(parents=True)
    copied: dict[str, Any] = {}

    def copy_when_published() -> None:
        if copied or not (a / checkpoint).is_dir():
            return
        clock = time.perf_counter()
        copied["at"] = time.strftime("%H:%M:%S")
        shutil.copytree(a / checkpoint, b / checkpoint)
        shutil.copytree(a / "_untrained", b / "_untrained")
        copied["copy_s"] = round(time.perf_counter() - clock, 1)
        log(f"copied {checkpoint} and _untrained into {b} in {copied['copy_s']}s")

    log(f"run A: {args.max_steps} steps straight")
    runs = {"A": run_child(train_argv(args, a, *steps), args.output_dir / "resume_A.log", copy_when_published)}
    if not copied:
        raise SystemExit(f"{a / checkpoint} never appeared; see {args.output_dir / 'resume_A.log'}")
    log(f"run B: resumed from {checkpoint}")
    resume = ["--resume_from_checkpoint", str(b / checkpoint)]
    runs["B"] = run_child(train_argv(args, b, *steps, *resume), args.output_dir / "resume_B.log")
    return runs, copied


def part_resume(args: argparse.Namespace) -> dict[str, Any]:
    a, b = args.output_dir / "resume_A", args.output_dir / "resume_B"
    checkpoint = f"checkpoint-{args.save_steps}"
    steps = ["--max_steps", str(args.max_steps), "--save_steps", str(args.save_steps)]
    if args.compare_only:  # the runs of an earlier call, compared again
        runs, copied = args.previous["resume"]["runs"], args.previous["resume"]["checkpoint_copy"]
    else:
        runs, copied = run_resume(args, a, b, checkpoint, steps)
    log("comparing")
    result: dict[str, Any] = {
        "runs": runs,
        "checkpoint_copy": copied,
        "bank": compare_bank(a, b),
        "index": compare_index(a, b),
        "query_encoder": compare_encoder(a, b),
        "doc_ids_equal": (a / "doc_ids.json").read_bytes() == (b / "doc_ids.json").read_bytes(),
        "losses_after_checkpoint": compare_losses(
            losses(a / f"checkpoint-{args.max_steps}", args.save_steps),
            losses(b / f"checkpoint-{args.max_steps}", args.save_steps),
        ),
        "final_checkpoint": compare_checkpoint(a / f"checkpoint-{args.max_steps}", b / f"checkpoint-{args.max_steps}"),
        "artifacts": {},
    }
    for name, out in (("A", a), ("B", b)):
        check = artifact_check(out)
        evaluated = evaluate(out, args, args.output_dir / f"evaluate_{name}.log")
        check["evaluate"] = evaluated
        check["record"] = record_consistent(check, args.max_steps, evaluated)
        result["artifacts"][name] = check
    result["eval_results_equal"] = _eval_results(a) == _eval_results(b)
    return result


def _eval_results(out: Path) -> Any:
    results = json.loads((out / "eval_results.json").read_text())
    return {k: v for k, v in results.items() if "runtime" not in k and "per_second" not in k and "timing" not in k}


def part_shard(args: argparse.Namespace) -> dict[str, Any]:
    steps = ["--max_steps", str(args.shard_steps), "--save_steps", str(args.shard_steps)]
    runs, folders = {}, {}
    for kind in ("rows", "none"):  # the sharded run first: it needs about half the memory per process
        out = args.output_dir / f"shard_{kind}"
        folders[kind] = out
        if args.compare_only:  # the runs of an earlier call, compared again
            runs[kind] = args.previous["shard"]["runs"][kind]
            continue
        shutil.rmtree(out, ignore_errors=True)
        log(f"two processes, --bank_sharding {kind}: {args.shard_steps} steps")
        argv = train_argv(args, out, *steps, "--bank_sharding", kind, processes=2)
        runs[kind] = run_child(argv, args.output_dir / f"shard_{kind}.log")
    r, s = folders["none"], folders["rows"]
    last = f"checkpoint-{args.shard_steps}"
    result = {
        "runs": runs,
        "bank": compare_bank(r, s),
        "index": compare_index(r, s),
        "query_encoder": compare_encoder(r, s),
        "doc_ids_equal": (r / "doc_ids.json").read_bytes() == (s / "doc_ids.json").read_bytes(),
        "losses": compare_losses(losses(r / last), losses(s / last)),
        "final_checkpoint": compare_checkpoint(r / last, s / last),
        "shard_files_in_checkpoint": sorted(p.name for p in (s / last).glob("*-shard-*")),
        "artifacts": {},
    }
    for kind, out in folders.items():
        check = artifact_check(out)
        check["record"] = record_consistent(check, args.shard_steps, None)
        result["artifacts"][kind] = check
    result["eval_results_equal"] = _eval_results(r) == _eval_results(s)
    return result


# ---------------------------------------------------------------------------------------------------------- output
def _rows(where: str, c: dict[str, Any]) -> list[str]:
    """Table rows of one comparison (an artifact's or a checkpoint's bank, index, encoder)."""
    bank, index, encoder = c["bank"][BANK_KEY], c["index"], c["query_encoder"]
    rows = [
        f"| {where}: bank ({bank['shape'][0]:,} rows) | {bank['bitwise_equal']} | {bank['max_abs_diff']:.3g} |",
        f"| {where}: index.faiss (bytes) | {index['serialized_bytes_equal']} "
        f"(lists in the same order {index.get('ivf_lists_in_the_same_order')}) | rows in another list / with other "
        f"codes: {index.get('rows_in_another_list')} / {index.get('rows_with_other_codes')} |",
        f"| {where}: query encoder ({encoder['tensors']} tensors) | {encoder['bitwise_equal']} | "
        f"{encoder['max_abs_diff']:.3g} |",
    ]
    if "mining_index" in c:
        m = c["mining_index"]
        rows.append(
            f"| {where}: mining_index.faiss (bytes) | {m['serialized_bytes_equal']} (lists in the same order "
            f"{m.get('ivf_lists_in_the_same_order')}) | rows in another list / with other codes: "
            f"{m.get('rows_in_another_list')} / {m.get('rows_with_other_codes')} |"
        )
    for name in ("bank_optimizer.safetensors", "bank_anchors.safetensors"):
        if name in c:
            same = all(v["bitwise_equal"] for k, v in c[name].items() if isinstance(v, dict))
            rows.append(f"| {where}: {name} (every tensor) | {same} | |")
    return rows


def _losses(name: str, losses: dict[str, Any]) -> str:
    return f"| losses of steps {losses['steps']} ({name}) | {losses['equal']} | {losses['max_abs_diff']:.3g} |"


def _compared(c: dict[str, Any], losses_row: str) -> list[str]:
    """The comparison table of two runs: artifact and last checkpoint, losses, doc ids, evaluation."""
    return [
        "| compared | bitwise equal | max abs diff |",
        "|---|---|---:|",
        *_rows("artifact", c),
        *_rows("last checkpoint", c["final_checkpoint"]),
        losses_row,
        f"| doc ids | {c['doc_ids_equal']} | |",
        f"| eval_results.json (every metric) | {c['eval_results_equal']} | |",
    ]


def markdown(record: dict[str, Any]) -> str:
    lines = [f"# Training properties at {record.get('rows', 0):,} rows", "", record["setup"], ""]
    if "resume" in record:
        r = record["resume"]
        lines += [
            "## (a) exact resume, (b) one artifact, (c) the safety net's record",
            "",
            f"`{r['command']}`",
            "",
            "A: straight; B: resumed from A's checkpoint. Compared, A vs B:",
            "",
            *_compared(r, _losses("after the checkpoint", r["losses_after_checkpoint"])),
            "",
            "| run | wall s (shared CPU) | peak RSS GB | shipped | global_step | record's dev nDCG@10 / hf-qret evaluate |",
            "|---|---:|---:|---|---:|---|",
        ]
        for name in ("A", "B"):
            art, run = r["artifacts"][name], r["runs"][name]
            rec = art["record"]
            lines.append(
                f"| {name} | {run['wall_s']} | {run['peak_rss_gb']} | {rec['verdict']} | {art['global_step']} | "
                f"{rec.get('shipped_metric_in_record', float('nan')):.4f} / "
                f"{rec.get('evaluate_quantized_ndcg@10', float('nan')):.4f} |"
            )
        lines.append("")
    if "shard" in record:
        s = record["shard"]
        lines += [
            "## (d) two processes: --bank_sharding rows vs the replicated bank",
            "",
            f"`{s['command']}`",
            "",
            "Compared, --bank_sharding none vs rows (both 2 processes):",
            "",
            *_compared(s, _losses("every step", s["losses"])),
            "",
            "| run | wall s (shared CPU) | peak RSS GB (largest process) | shipped |",
            "|---|---:|---:|---|",
        ]
        for kind in ("none", "rows"):
            run, art = s["runs"][kind], s["artifacts"][kind]
            lines.append(
                f"| --bank_sharding {kind} | {run['wall_s']} | {run['peak_rss_gb']} | {art['record']['verdict']} |"
            )
        lines.append("")
    if record.get("notes"):
        lines += ["## Notes", "", *(f"- {note}" for note in record["notes"]), ""]
    return "\n".join(lines)


ARGS: argparse.Namespace


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, required=True, help="the BEIR folder (with a dev split)")
    parser.add_argument("--extra_rows_file", type=Path, required=True)
    parser.add_argument("--extra_ids_file", type=Path, required=True)
    parser.add_argument("--bank_init_file", type=Path, required=True)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--parts", default="resume,shard", help="comma-separated: resume, shard")
    parser.add_argument("--max_steps", type=int, default=12)
    parser.add_argument("--save_steps", type=int, default=6)
    parser.add_argument("--shard_steps", type=int, default=6)
    parser.add_argument("--opq_niter", type=int, default=50)
    parser.add_argument("--json_out", type=Path)
    parser.add_argument(
        "--compare_only",
        action="store_true",
        help="compare the runs already in --output_dir (wall and RSS: --json_out's)",
    )
    ARGS = args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rows = np.load(args.extra_rows_file, mmap_mode="r").shape[0] + np.load(args.bank_init_file, mmap_mode="r").shape[0]
    record: dict[str, Any] = {}
    if args.json_out and args.json_out.is_file():
        record = json.loads(args.json_out.read_text())
    args.previous = dict(record)
    record.pop("command", None)
    command = " ".join(["python", *sys.argv])
    record.update({
        "rows": int(rows),
        "setup": (
            f"recipes/scifact.yaml over {rows:,} rows (SciFact + precomputed distractor rows), default index (auto), "
            f"--opq_niter {args.opq_niter}, a loss logged every step; resume: {args.max_steps} steps, checkpoint every "
            f"{args.save_steps}; shard: {args.shard_steps} steps on 2 gloo processes (1 OpenMP thread each). "
            "Wall times on a shared, busy 2-core AMD EPYC (AVX-512, no AMX) under nice: not benchmark figures."
        ),
    })  # fmt: skip
    for part in filter(None, args.parts.split(",")):  # --parts "": only the Markdown, from --json_out
        record[part] = {"resume": part_resume, "shard": part_shard}[part](args)
        if not args.compare_only:
            record[part]["command"] = command
        else:
            record[part]["command"] = args.previous[part]["command"]
            record[part]["compared_again"] = command
        if args.json_out:
            args.json_out.write_text(json.dumps(record, indent=1) + "\n")
    if args.json_out:
        args.json_out.with_suffix(".md").write_text(markdown(record))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
