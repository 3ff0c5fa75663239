"""Entry points of the multi-process tests in test_dropin.py (run in spawned / torchrun processes, not collected)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def reduce_rows_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Two gloo processes with different sparse bank gradients call all_reduce_row_grad; each saves what it got."""
    import torch
    import torch.distributed as dist

    # hf_qret.training.distributed needs only torch (the package and its sub-packages import nothing eagerly): no
    # transformers & co., which take seconds
    from hf_qret.training.distributed import all_reduce_row_grad

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        weight = torch.nn.Parameter(torch.zeros(6, 3))
        results = {}
        # 1. both processes have rows; rank 0's gradient is uncoalesced (row 2 twice)
        if rank == 0:
            rows, values = [0, 2, 2], [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]
        else:
            rows, values = [2, 5], [[4.0, 4.0, 4.0], [6.0, 0.0, -6.0]]
        weight.grad = torch.sparse_coo_tensor(torch.tensor([rows]), torch.tensor(values), (6, 3))
        results["count"] = all_reduce_row_grad(weight)
        results["grad"] = weight.grad.to_dense()
        # 2. one process has no gradient at all
        weight.grad = None if rank == 0 else torch.sparse_coo_tensor(torch.tensor([[4]]), torch.ones(1, 3), (6, 3))
        results["count_one_side"] = all_reduce_row_grad(weight)
        results["grad_one_side"] = weight.grad.to_dense()
        # 3. no process has a gradient
        weight.grad = None
        results["count_none"] = all_reduce_row_grad(weight)
        results["grad_none"] = weight.grad
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def ddp_train_main() -> None:
    """``torchrun --nproc_per_node 2 dist_workers.py MODEL BEIR OUT``: 3 DDP steps on the CPU (gloo)."""
    from functools import partial

    import torch
    from sentence_transformers import SentenceTransformer

    from hf_qret import QRetTrainer, QRetTrainingArguments, TargetBank, build_pairs_dataset, load_beir
    from hf_qret.serving.encoder import encode_texts

    model_dir, beir_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    model = SentenceTransformer(model_dir, device="cpu")
    data = load_beir(beir_dir, split="train")
    bank = TargetBank.from_encoder(partial(encode_texts, model), data.doc_texts(), data.doc_ids)
    args = QRetTrainingArguments(
        output_dir=str(out / "run"), index_factory="PQ4", num_negatives=8, per_device_train_batch_size=4,
        max_steps=3, learning_rate=1e-3, bank_learning_rate=1e-2, report_to="none", save_strategy="no", seed=0,
        bank_optimizer="adam",  # row-wise Adam: per-row step counts and moments to compare across processes
        use_cpu=True, dataloader_pin_memory=False, ddp_backend="gloo", disable_tqdm=True,
    )  # fmt: skip
    trainer = QRetTrainer(model, args, train_dataset=build_pairs_dataset(data), bank=bank)
    mined_batches = []
    mine = trainer.miner.mine

    def recording_mine(query_embeddings, positive_rows, *args, **kwargs):
        mined = mine(query_embeddings, positive_rows, *args, **kwargs)
        mined_batches.append({"candidates": mined.candidates.clone(), "positives": positive_rows.clone()})
        return mined

    trainer.miner.mine = recording_mine
    trainer.train()
    rank = int(os.environ["RANK"])
    torch.save(
        {
            "world": trainer.accelerator.num_processes,
            "bank": trainer.bank.local_weight.detach().clone(),
            "row_steps": trainer.bank_optimizer.row_steps.clone(),
            "mined": mined_batches,
            "encoder": {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()},
        },
        out / f"rank{rank}.pt",
    )


def ddp_mmap_main() -> None:
    """``torchrun --nproc_per_node 2 dist_workers.py --mmap MODEL BEIR OUT``: the same 3 DDP steps with a bank in RAM
    (one per process) and with one memory-mapped bank file both processes share (written by rank 0)."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from hf_qret import QRetTrainer, QRetTrainingArguments, TargetBank, build_pairs_dataset, load_beir
    from hf_qret.serving.encoder import encode_texts
    from hf_qret.training.distributed import barrier

    model_dir, beir_dir, out = sys.argv[2], sys.argv[3], Path(sys.argv[4])
    data = load_beir(beir_dir, split="train")
    rows = encode_texts(SentenceTransformer(model_dir, device="cpu"), data.doc_texts())
    banks = {}
    for kind in ("ram", "mmap"):
        args = QRetTrainingArguments(
            output_dir=str(out / kind), index_factory="PQ4", num_negatives=8, per_device_train_batch_size=4,
            max_steps=3, learning_rate=1e-3, bank_learning_rate=1e-2, report_to="none", save_strategy="no", seed=0,
            bank_optimizer="adam",  # row-wise Adam: per-row step counts and moments to compare across processes
            use_cpu=True, dataloader_pin_memory=False, ddp_backend="gloo", disable_tqdm=True,
        )  # fmt: skip
        rank = args.process_index  # forms the process group
        if kind == "ram":
            bank = TargetBank(torch.from_numpy(rows.copy()), data.doc_ids)
        else:
            path = out / "bank_mmap.npy"
            if rank == 0:
                TargetBank.create_mmap(path, len(rows), rows.shape[1], data.doc_ids).write_rows(0, rows)
            barrier()
            bank = TargetBank.open_mmap(path, data.doc_ids)
        model = SentenceTransformer(model_dir, device="cpu")
        trainer = QRetTrainer(model, args, train_dataset=build_pairs_dataset(data), bank=bank)
        trainer.train()
        barrier()
        banks[kind] = np.array(trainer.bank.local_weight.detach().numpy(), copy=True)
        banks[f"{kind}_row_steps"] = trainer.bank_optimizer.row_steps.clone()
    torch.save(banks, out / f"mmap_rank{rank}.pt")


def ddp_sharded_main() -> None:
    """``torchrun --nproc_per_node 2 dist_workers.py --sharded MODEL BEIR OUT``: the same 4 DDP steps with the bank
    replicated and with the bank sharded by rows (``bank_sharding='rows'``, a checkpoint at step 2), then the
    sharded run resumed from that checkpoint; each process saves the candidates, losses and bank of every step.

    ``... OUT --defaults``: the method's defaults (``RQ16x8``, row-wise SGD), the replicated and the sharded run only.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import TrainerCallback, set_seed

    from hf_qret import QRetTrainer, QRetTrainingArguments, TargetBank, build_pairs_dataset, load_beir
    from hf_qret.serving.encoder import encode_texts

    model_dir, beir_dir, out = sys.argv[2], sys.argv[3], Path(sys.argv[4])
    data = load_beir(beir_dir, split="train")
    rows = encode_texts(SentenceTransformer(model_dir, device="cpu"), data.doc_texts())
    record: dict = {}
    runs = (("replicated", "none", None), ("sharded", "rows", None), ("resumed", "rows", "sharded/checkpoint-2"))
    defaults = sys.argv[5:] == ["--defaults"]
    # row-wise Adam and PQ4 (and a checkpoint at step 2, resumed); or the defaults RQ16x8 and SGD, without resuming
    method = {} if defaults else {"index_factory": "PQ4", "bank_optimizer": "adam"}
    for kind, sharding, resume in runs[:2] if defaults else runs:
        args = QRetTrainingArguments(
            output_dir=str(out / ("sharded" if kind == "resumed" else kind)), num_negatives=8,
            per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3, bank_learning_rate=1e-2,
            report_to="none", save_strategy="steps" if sharding == "rows" and not defaults else "no", save_steps=2,
            seed=0, refresh_steps=2, bank_sharding=sharding, use_cpu=True, dataloader_pin_memory=False,
            ddp_backend="gloo", disable_tqdm=True, **method,
        )  # fmt: skip
        rank = args.process_index  # forms the process group
        set_seed(0)
        model = SentenceTransformer(model_dir, device="cpu")
        trainer = QRetTrainer(
            model,
            args,
            train_dataset=build_pairs_dataset(data),
            bank=TargetBank(torch.from_numpy(rows.copy()), data.doc_ids),
        )
        steps: dict = {"candidates": [], "losses": [], "banks": []}
        mine, forward = trainer.miner.mine, trainer.loss.forward

        def recording_mine(*a, _mine=mine, _steps=steps, **k):
            mined = _mine(*a, **k)
            _steps["candidates"].append(mined.candidates.clone())
            return mined

        def recording_forward(*a, _forward=forward, _steps=steps, **k):
            loss, stats = _forward(*a, **k)
            _steps["losses"].append(float(loss.detach()))
            return loss, stats

        class Banks(TrainerCallback):
            def on_step_end(self, args, state, control, _trainer=trainer, _steps=steps, **kwargs):
                _steps["banks"].append(_trainer.bank.local_weight.detach().clone())

        trainer.miner.mine, trainer.loss.forward = recording_mine, recording_forward
        trainer.add_callback(Banks())
        set_seed(0)
        trainer.train(resume_from_checkpoint=str(out / resume) if resume else None)
        trainer.save_model()
        steps["start"] = trainer.bank.shard.start if sharding == "rows" else 0
        if not defaults:  # row-wise Adam's per-row step counts
            steps["row_steps"] = trainer.bank_optimizer.row_steps.clone()
        if kind == "resumed":  # the safety net's restore (a saved artifact: one bank, one index) into the shards
            trainer.restore_snapshot(str(out / "sharded" / "checkpoint-2"))
            steps["restored"] = trainer.bank.local_weight.detach().clone()
            steps["restored_index_rows"] = trainer.index.local_ntotal
        record[kind] = steps
    torch.save(record, out / f"sharded_rank{rank}.pt")


def ddp_one_sided_main() -> None:
    """``torchrun --nproc_per_node 2 dist_workers.py --one-sided MODEL BEIR OUT``: a sharded trainer evaluates on
    both processes, then ``evaluate()`` on process 0 only and ``save_model()`` on process 1 only; each process saves
    the errors it got."""
    import torch
    import torch.distributed as dist
    from sentence_transformers import SentenceTransformer

    from hf_qret import QRetTrainer, QRetTrainingArguments, TargetBank, build_pairs_dataset, load_beir
    from hf_qret.errors import CollectiveCallError
    from hf_qret.serving.encoder import encode_texts

    model_dir, beir_dir, out = sys.argv[2], sys.argv[3], Path(sys.argv[4])
    data = load_beir(beir_dir, split="train")
    model = SentenceTransformer(model_dir, device="cpu")
    rows = encode_texts(model, data.doc_texts())
    args = QRetTrainingArguments(
        output_dir=str(out / "run"), index_factory="PQ4", num_negatives=8, per_device_eval_batch_size=16,
        report_to="none", save_strategy="no", bank_sharding="rows", use_cpu=True, dataloader_pin_memory=False,
        ddp_backend="gloo", disable_tqdm=True,
    )  # fmt: skip
    pairs = build_pairs_dataset(data)
    trainer = QRetTrainer(
        model, args, train_dataset=pairs, eval_dataset=pairs, bank=TargetBank(torch.from_numpy(rows), data.doc_ids)
    )
    rank = args.process_index
    record: dict = {"together": trainer.evaluate()}  # every process: works
    trainer.args.ddp_timeout = 5  # how long a process waits for the others (the process group keeps its own)
    for call, alone in (("evaluate", 0), ("save_model", 1)):
        if rank == alone:
            try:
                trainer.evaluate() if call == "evaluate" else trainer.save_model(str(out / "alone"))
            except CollectiveCallError as error:
                record[call] = str(error)
        dist.barrier()  # the other process waits here (another process group)
    torch.save(record, out / f"one_sided_rank{rank}.pt")


if __name__ == "__main__":
    if sys.argv[1] == "--mmap":
        ddp_mmap_main()
    elif sys.argv[1] == "--one-sided":
        ddp_one_sided_main()
    elif sys.argv[1] == "--sharded":
        ddp_sharded_main()
    else:
        ddp_train_main()
