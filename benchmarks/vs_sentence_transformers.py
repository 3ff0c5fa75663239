"""One SciFact training epoch: hf-qret vs sentence-transformers MultipleNegativesRankingLoss.

Both train all-MiniLM-L6-v2 on the same (claim, abstract) pairs with the same batch size for one epoch on this
machine. MNRL encodes every positive abstract (up to 256 tokens) at every step; hf-qret encodes only the claims and
scores them against the TargetBank, which is encoded once beforehand (``bank_encode_s``, reported separately and in
``speedup_incl_bank``). Prints one JSON object as its last line:
``{"qret_epoch_s", "st_epoch_s", "speedup", "bank_encode_s", "speedup_incl_bank", ...}``.

    python benchmarks/vs_sentence_transformers.py --json [--batch_size 32] [--opq_niter 50]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--index_factory", default="OPQ16,PQ16")
    parser.add_argument("--opq_niter", type=int, default=50, help="OPQ rotation training iterations per retrain")
    args = parser.parse_args(argv)

    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from hf_qret import QRetTrainer, QRetTrainingArguments, TargetBank, build_pairs_dataset, load_beir
    from hf_qret.config import resolve_model_path
    from hf_qret.data import doc_text
    from hf_qret.serving.encoder import encode_texts

    data = load_beir(REPO / "recipes" / "data" / "scifact", split="train")
    pairs = build_pairs_dataset(data)
    model_path = resolve_model_path("all-MiniLM-L6-v2")
    common = dict(per_device_train_batch_size=args.batch_size, num_train_epochs=1, learning_rate=2e-5,
                  report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
                  dataloader_pin_memory=False, seed=0, logging_steps=10_000)  # fmt: skip

    with tempfile.TemporaryDirectory() as out:
        # sentence-transformers MNRL: in-batch negatives, every positive passage encoded each step
        model = SentenceTransformer(model_path, device="cpu")
        st_pairs = Dataset.from_dict(
            {"anchor": pairs["query"], "positive": [doc_text(data.corpus[d]) for d in pairs["positive_id"]]}
        )
        st_trainer = SentenceTransformerTrainer(
            model=model,
            args=SentenceTransformerTrainingArguments(output_dir=f"{out}/st", **common),
            train_dataset=st_pairs,
            loss=MultipleNegativesRankingLoss(model),
        )
        start = time.perf_counter()
        st_trainer.train()
        st_epoch = time.perf_counter() - start

        # hf-qret: bank encoded once, then epochs that encode only the queries
        model = SentenceTransformer(model_path, device="cpu")
        start = time.perf_counter()
        bank = TargetBank.from_encoder(partial(encode_texts, model), data.doc_texts(), data.doc_ids)
        bank_encode = time.perf_counter() - start
        qret_trainer = QRetTrainer(
            model,
            QRetTrainingArguments(
                output_dir=f"{out}/qret",
                index_factory=args.index_factory,
                opq_niter=args.opq_niter,
                refresh_on_epoch_end=True,
                **common,
            ),  # fmt: skip
            train_dataset=pairs,
            bank=bank,
        )
        start = time.perf_counter()
        qret_trainer.train()
        qret_epoch = time.perf_counter() - start

    result = {
        "qret_epoch_s": round(qret_epoch, 2),
        "st_epoch_s": round(st_epoch, 2),
        "speedup": round(st_epoch / qret_epoch, 2),
        "bank_encode_s": round(bank_encode, 2),
        "speedup_incl_bank": round(st_epoch / (qret_epoch + bank_encode), 2),
        "pairs": len(pairs),
        "batch_size": args.batch_size,
        "index_factory": args.index_factory,
        "opq_niter": args.opq_niter,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
