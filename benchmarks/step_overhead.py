"""Cost of hf-qret's mining and cross-batch candidates over a plain in-batch step.

Times real ``QRetTrainer`` optimizer steps (all-MiniLM-L6-v2, batch 32, SciFact claims, a SciFact-sized 5,183 x 384
bank and the default ``RQ16x8`` index, every other option at the library's defaults) two ways: the full hf-qret step (top-k from the quantized index, the cross-batch
candidate union, the row-wise bank update) and the same step whose candidates are only the batch's own positive bank
rows (no index search). Prints one JSON object as its last line:
``{"qret_step_s", "inbatch_step_s", "ratio", ...}`` (medians over the timed steps of ``--runs`` alternating runs of
each kind; ``ratio_per_run``: each pair's ratio).

    python benchmarks/step_overhead.py --json [--steps 25] [--warmup 5] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, from ``on_step_begin`` to ``on_step_end``."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def timed_run(
    in_batch: bool, steps: int, warmup: int, batch_size: int, num_negatives: int, factory: str
) -> list[float]:
    from sentence_transformers import SentenceTransformer

    from hf_qret import QRetTrainer, QRetTrainingArguments, TargetBank, build_pairs_dataset, load_beir
    from hf_qret.config import resolve_model_path

    data = load_beir(REPO / "recipes" / "data" / "scifact", split="train")
    model = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(data.doc_ids), 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    bank = TargetBank(torch.from_numpy(vectors), data.doc_ids)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = QRetTrainingArguments(
            output_dir=out, index_factory=factory, num_negatives=num_negatives, per_device_train_batch_size=batch_size,
            max_steps=warmup + steps, learning_rate=2e-5, report_to="none", save_strategy="no", logging_steps=10_000,
            refresh_on_epoch_end=False, refresh_steps=0, disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
            seed=0,
        )  # fmt: skip
        trainer = QRetTrainer(model, args, train_dataset=build_pairs_dataset(data), bank=bank, callbacks=[timer])
        trainer.refresh_callback.on_train_end = lambda *a, **k: None  # time steps only, not the final refresh
        if in_batch:
            # Candidates = the batch's own positives: no index search at all.
            trainer.miner.retrieve = lambda queries: np.full((len(queries), 0), -1, dtype=np.int64)
        trainer.train()
    return timer.times[warmup:]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON result line")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_negatives", type=int, default=100)
    parser.add_argument("--index_factory", default="RQ16x8", help="the library's default")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs of each kind (median over all steps)")
    args = parser.parse_args(argv)
    qret: list[float] = []
    inbatch: list[float] = []
    ratios = []
    for _ in range(args.runs):  # alternate, so a slow spell of a shared machine hits both kinds
        one = timed_run(False, args.steps, args.warmup, args.batch_size, args.num_negatives, args.index_factory)
        other = timed_run(True, args.steps, args.warmup, args.batch_size, args.num_negatives, args.index_factory)
        qret += one
        inbatch += other
        ratios.append(round(statistics.median(one) / statistics.median(other), 3))
    result = {
        "qret_step_s": round(statistics.median(qret), 4),
        "inbatch_step_s": round(statistics.median(inbatch), 4),
        "ratio": round(statistics.median(qret) / statistics.median(inbatch), 3),
        "ratio_per_run": ratios,
        "runs": args.runs,
        "steps": len(qret),
        "batch_size": args.batch_size,
        "num_negatives": args.num_negatives,
        "index_factory": args.index_factory,
        "torch_threads": torch.get_num_threads(),
    }
    if not args.json:
        print(f"hf-qret step {result['qret_step_s']}s vs in-batch step {result['inbatch_step_s']}s", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
