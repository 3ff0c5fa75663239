"""The bank's row optimizer in isolation: bank-only training against frozen query embeddings.

The bank rows learn against a frozen pretrained encoder's queries (``bank_queries: initial``, the default), so the
bank's own dynamics can be replayed without the encoder: the training queries
are encoded once by the pretrained model, and each step mines candidates from the quantized index, scores them with
the recipe's loss and steps the bank (row-wise Adam, global-step Adam, Adagrad or SGD; moved rows keep their norm).
The dev split is then searched flat and through the index retrained on the moved bank, with the pretrained query
encoder: what the bank alone does to retrieval. A variant takes ~1-2 minutes on a loaded 2-core machine.

    python benchmarks/bank_only.py --data path/to/nfcorpus --bank runs/nf/bank.safetensors \\
        --steps 600 --variants adam:0.002 sgd:0.2 adam-global:0.002 adam-eps1e-3:0.002 adagrad:0.01
    python benchmarks/bank_only.py --data recipes/data/scifact --bank runs/sf/bank.safetensors --epochs 4 \\
        --positives_only --variants adam:0.002 sgd:0.2

``--bank`` is an encoded corpus (the recipe's ``--bank_init_file``; encoded and written there when missing). Prints
one JSON line per variant: dev nDCG@10 before and after (flat, quantized, seen / unseen), the mean drift of the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_qret.bank.core import TargetBank  # noqa: E402
from hf_qret.data import build_pairs_dataset, load_beir  # noqa: E402
from hf_qret.evaluation.evaluator import RetrievalEvaluator, search_run  # noqa: E402
from hf_qret.index.core import QuantizedIndex  # noqa: E402
from hf_qret.index.mining import IndexMiner  # noqa: E402
from hf_qret.training.collator import positives_by_query  # noqa: E402
from hf_qret.training.distributed import row_gradients  # noqa: E402
from hf_qret.training.loss import CandidateCrossEntropyLoss  # noqa: E402
from hf_qret.training.optim import RowAdam, RowSGD  # noqa: E402


class GlobalStepAdam(RowAdam):
    """Row-wise Adam with the bias correction of the global step (as ``torch.optim.SparseAdam``), not the row's."""

    global_steps = 0

    @torch.no_grad()
    def step(self, closure=None) -> int:
        rows, grads = row_gradients(self.bank.weight)
        if rows.numel() == 0:
            return 0
        self.global_steps += 1
        (beta1, beta2), grads, slots = self.betas, grads.float(), self._slots(rows)
        exp_avg = self._read(self._avg_blocks, slots).mul_(beta1).add_(grads, alpha=1 - beta1)
        exp_avg_sq = self._read(self._sq_blocks, slots).mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        self._write(self._avg_blocks, slots, exp_avg)
        self._write(self._sq_blocks, slots, exp_avg_sq)
        bias1, bias2 = 1 - beta1**self.global_steps, 1 - beta2**self.global_steps
        return self._move(rows, (exp_avg / bias1) / ((exp_avg_sq / bias2).sqrt() + self.eps))


class RowAdagrad(RowAdam):
    """Row-wise Adagrad (the squared-gradient sum kept in RowAdam's second-moment slots)."""

    @torch.no_grad()
    def step(self, closure=None) -> int:
        rows, grads = row_gradients(self.bank.weight)
        if rows.numel() == 0:
            return 0
        grads, slots = grads.float(), self._slots(rows)
        total = self._read(self._sq_blocks, slots).addcmul_(grads, grads)
        self._write(self._sq_blocks, slots, total)
        return self._move(rows, grads / (total.sqrt() + self.eps))


def make_optimizer(kind: str, bank: TargetBank, lr: float, norms: torch.Tensor) -> RowAdam:
    if kind == "sgd":
        return RowSGD(bank, lr=lr, keep_norms=norms)
    if kind == "adagrad":
        return RowAdagrad(bank, lr=lr, eps=1e-8, keep_norms=norms)
    if kind == "adam-global":
        return GlobalStepAdam(bank, lr=lr, keep_norms=norms)
    if kind.startswith("adam-eps"):
        return RowAdam(bank, lr=lr, eps=float(kind[len("adam-eps") :]), keep_norms=norms)
    if kind == "adam":
        return RowAdam(bank, lr=lr, keep_norms=norms)
    raise SystemExit(f"unknown optimizer {kind!r}: adam, adam-global, adam-eps<EPS>, adagrad or sgd")


def encode_queries(data_dir: str, cache: Path, train, dev) -> tuple[np.ndarray, np.ndarray]:
    if not cache.is_file():
        from sentence_transformers import SentenceTransformer

        from hf_qret.config import resolve_model_path

        model = SentenceTransformer(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"), device="cpu")
        train_q = model.encode([train.queries[q] for q in train.qrels], batch_size=64)
        dev_q = model.encode([dev.queries[q] for q in dev.qrels if q in dev.queries], batch_size=64)
        np.savez(cache, train=train_q, dev=dev_q)
    loaded = np.load(cache)
    return loaded["train"].astype("float32"), loaded["dev"].astype("float32")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="BEIR folder with train and dev qrels")
    parser.add_argument("--bank", required=True, help="the encoded corpus (.safetensors), written when missing")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=0, help="train this many epochs instead of --steps")
    parser.add_argument("--factory", default="PQ16", help="index to mine from and to evaluate (PQ16: fast to train)")
    parser.add_argument("--positives_only", action="store_true", help="bank_update 'positives' (the recipe's)")
    parser.add_argument("--variants", nargs="+", default=["adam:0.002", "sgd:0.2"], help="OPTIMIZER:LR ...")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train, dev = load_beir(args.data, split="train"), load_beir(args.data, split="dev")
    if not os.path.isfile(args.bank):
        from sentence_transformers import SentenceTransformer

        from hf_qret.config import resolve_model_path
        from hf_qret.serving.encoder import encode_texts

        model = SentenceTransformer(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"), device="cpu")
        TargetBank.from_encoder(lambda t: encode_texts(model, t), train.doc_texts(), train.doc_ids).save(args.bank)
    train_q, dev_q = encode_queries(args.data, Path(args.bank).with_suffix(".queries.npz"), train, dev)
    query_row = {q: i for i, q in enumerate(train.qrels)}
    dev_ids = [q for q in dev.qrels if q in dev.queries]
    pairs = build_pairs_dataset(train)
    seen = {d for docs in train.qrels.values() for d in docs}
    evaluator = RetrievalEvaluator(dev.queries, dev.qrels, seen_doc_ids=seen)
    keys = ("flat_ndcg@10", "quantized_ndcg@10", "quantized_ndcg@10_seen", "quantized_ndcg@10_unseen")

    def evaluate(bank: TargetBank, index: QuantizedIndex) -> dict[str, float]:
        flat = QuantizedIndex(bank.dim, "Flat")
        flat.add(bank.float32_rows())
        runs = {
            kind: search_run(dev_q, dev_ids, searcher, bank.doc_ids)
            for kind, searcher in (("flat", flat), ("quantized", index))
        }
        scores = evaluator.score(runs)
        return {k: round(scores[k], 4) for k in keys if k in scores}

    per_epoch = (len(pairs) + args.batch_size - 1) // args.batch_size
    steps = args.epochs * per_epoch if args.epochs else args.steps
    query_ids, positive_ids = list(pairs["query_id"]), list(pairs["positive_id"])
    positives_of = positives_by_query(pairs)  # a query's rows are its positives
    positive_sets = [positives_of[q] for q in query_ids]
    results = []
    for variant in args.variants:
        kind, lr = variant.split(":")
        torch.manual_seed(args.seed)
        rng = np.random.default_rng(args.seed)
        bank = TargetBank.from_file(args.bank, train.doc_ids)
        initial = bank.weight.detach().clone()
        index = QuantizedIndex(bank.dim, args.factory)
        index.build(bank.float32_rows())
        before = evaluate(bank, index)
        optimizer = make_optimizer(kind, bank, float(lr), bank.row_norms())
        movable = torch.zeros(len(bank), dtype=torch.bool)
        movable[bank.rows_of(sorted(set(positive_ids)))] = True
        miner, loss_fn = IndexMiner(index, 100), CandidateCrossEntropyLoss(20.0)
        start = time.perf_counter()
        for step in range(steps):
            if step % per_epoch == 0:
                order = rng.permutation(len(pairs))
            batch = order[(step % per_epoch) * args.batch_size : (step % per_epoch + 1) * args.batch_size].tolist()
            queries = torch.from_numpy(train_q[[query_row[query_ids[i]] for i in batch]])
            positives = torch.tensor([bank.row_of(positive_ids[i]) for i in batch])
            sets = [bank.rows_of(positive_sets[i]) for i in batch]
            width = max(len(s) for s in sets)
            mined = miner.mine(queries, positives, torch.tensor([s + [-1] * (width - len(s)) for s in sets]))
            candidates = bank.gather(mined.candidates)
            if args.positives_only:
                candidates = torch.where(movable[mined.candidates].unsqueeze(1), candidates, candidates.detach())
            loss, _ = loss_fn(queries, candidates, mined.targets, mined.mask)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        drift = float((bank.weight.detach() - initial).norm(dim=1).mean())
        index.refresh(bank.float32_rows(), mode="retrain")
        result = {
            "variant": variant, "steps": steps, "factory": args.factory, "positives_only": args.positives_only,
            "untrained": before, "trained": evaluate(bank, index), "mean_row_drift": round(drift, 4),
            "seconds": round(time.perf_counter() - start),
        }  # fmt: skip
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
