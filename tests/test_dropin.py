"""QRetTrainer as a drop-in Trainer: gradient accumulation, eval_dataset loss, bf16 autocast, logs for report_to,
torch.compile wrappers, the converted sentence-transformers example, the accelerate config and multi-process bank
gradients."""

from __future__ import annotations

import difflib
import multiprocessing
import os
import runpy
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import REPO, dist_workers, free_port, torchrun
from test_trainer import make_args
from torch import nn
from transformers import TrainerCallback

from hf_qret import QRetTrainer, QuantizedIndex, QuantizedRetriever, TargetBank, build_pairs_dataset, load_beir
from hf_qret.serving.encoder import _unwrap, embedding_dim, encode_texts, is_sentence_transformer

EXAMPLES = REPO / "examples"


def no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def build(model, beir_dir, tmp_path, train_rows=None, eval_rows=None, callbacks=None, **overrides):
    data = load_beir(beir_dir, split="train")
    pairs = build_pairs_dataset(data)
    bank = TargetBank.from_encoder(partial(encode_texts, model), data.doc_texts(), data.doc_ids)
    index = QuantizedIndex(bank.dim, "PQ4")
    index.build(bank.numpy())
    trainer = QRetTrainer(
        model,
        make_args(tmp_path, **overrides),
        train_dataset=pairs if train_rows is None else pairs.select(range(train_rows)),
        eval_dataset=None if eval_rows is None else pairs.select(range(eval_rows)),
        bank=bank,
        index=index,
        callbacks=callbacks,
    )
    return trainer, pairs


class GradientSnapshot(TrainerCallback):
    """The accumulated gradients of the encoder and the bank right before the optimizer step."""

    def __init__(self) -> None:
        self.trainer = None
        self.encoder: dict[str, torch.Tensor] = {}
        self.bank: torch.Tensor | None = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.encoder = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        self.bank = self.trainer.bank.weight.grad.coalesce().to_dense().clone()


@pytest.mark.parametrize("bank_update,bank_queries", [("all", "encoder"), ("positives", "initial")])
def test_gradient_accumulation_matches_the_larger_batch(tiny_model_dir, beir_dir, tmp_path, bank_update, bank_queries):
    """batch 8 x GA 1 and batch 4 x GA 2 give the same gradients and the same step, encoder and bank.

    num_negatives = corpus size, so every micro-batch's candidate set is the whole corpus: the accumulated loss is
    then exactly the mean over the 8 queries of the same softmax (with k < corpus, micro-batches see different
    candidate unions; see README).
    """
    from sentence_transformers import SentenceTransformer

    def run(batch_size, accumulation):
        model = no_dropout(SentenceTransformer(tiny_model_dir, device="cpu"))
        snapshot = GradientSnapshot()
        trainer, _ = build(
            model, beir_dir, tmp_path / f"b{batch_size}", train_rows=8, callbacks=[snapshot],
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=1,
            num_negatives=300, max_grad_norm=0.0, logging_steps=1, bank_update=bank_update,
            bank_queries=bank_queries,
        )  # fmt: skip
        snapshot.trainer = trainer
        sizes = []
        mine = trainer.miner.mine
        trainer.miner.mine = lambda *a, **k: (lambda m: (sizes.append(m.num_candidates), m)[1])(mine(*a, **k))
        trainer.train()
        return trainer, snapshot, sizes

    full, full_grads, full_sizes = run(8, 1)
    accumulated, acc_grads, acc_sizes = run(4, 2)
    assert full_sizes == [300] and acc_sizes == [300, 300]
    assert full_grads.encoder.keys() == acc_grads.encoder.keys() and len(full_grads.encoder) > 10
    for name, grad in full_grads.encoder.items():
        torch.testing.assert_close(acc_grads.encoder[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    moved = full_grads.bank.abs().sum(dim=1).gt(0)
    if bank_update == "all":
        assert moved.all()  # every row is a candidate
    else:
        # only the training positives' rows (every row is a candidate)
        assert moved.nonzero().squeeze(1).tolist() == full.trainable_rows.nonzero().squeeze(1).tolist()
        assert 0 < int(moved.sum()) < len(moved)
    torch.testing.assert_close(acc_grads.bank, full_grads.bank, rtol=1e-4, atol=1e-7)
    # after the step
    for (name, a), b in zip(full.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(accumulated.bank.weight, full.bank.weight, rtol=1e-4, atol=1e-6)
    assert torch.equal(accumulated.bank_optimizer.row_steps, full.bank_optimizer.row_steps)
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (full, accumulated)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_eval_dataset_loss_goes_through_compute_loss(tiny_model, beir_dir, tmp_path):
    trainer, pairs = build(
        tiny_model, beir_dir, tmp_path, eval_rows=16, max_steps=4, eval_strategy="steps", eval_steps=2,
        per_device_eval_batch_size=8,
    )  # fmt: skip
    assert trainer.label_names == []  # a SentenceTransformer has no `labels`: the base prediction_step can't cope
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [2, 4]
    assert all(np.isfinite(entry["eval_loss"]) and entry["eval_loss"] > 0 for entry in evals)

    bank_before = trainer.bank.weight.detach().clone()
    metrics = trainer.evaluate()
    assert torch.equal(trainer.bank.weight.detach(), bank_before)  # evaluation never touches the bank
    assert trainer.bank.weight.grad is None
    # the same loss by hand: two batches of 8, in order, model in eval mode
    tiny_model.eval()
    with torch.no_grad():
        losses = [
            float(trainer.compute_loss(tiny_model, trainer.data_collator([pairs[i] for i in range(s, s + 8)])))
            for s in (0, 8)
        ]
    assert metrics["eval_loss"] == pytest.approx(np.mean(losses), rel=1e-5)

    prediction = trainer.predict(pairs.select(range(5)))
    assert prediction.predictions.shape == (5, 32)
    assert prediction.label_ids.tolist() == [trainer.bank.row_of(pairs[i]["positive_id"]) for i in range(5)]
    assert np.isfinite(prediction.metrics["test_loss"])


class LogRecorder(TrainerCallback):
    """What every report_to integration receives: the logs passed to on_log."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_bf16_autocast_on_cpu_and_logs_reach_integrations(tiny_model, beir_dir, tmp_path):
    recorder = LogRecorder()
    trainer, _ = build(tiny_model, beir_dir, tmp_path, callbacks=[recorder], bf16=True, max_steps=4)
    dtypes = []
    linear = next(m for m in tiny_model.modules() if isinstance(m, nn.Linear))
    linear.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    bank_before = trainer.bank.weight.detach().clone()
    trainer.train()
    assert dtypes and all(dtype == torch.bfloat16 for dtype in dtypes)  # the encoder ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())  # mixed precision, not a bf16 model
    assert trainer.bank.weight.dtype == torch.float32 and not torch.equal(trainer.bank.weight.detach(), bank_before)
    assert trainer.bank.weight.isfinite().all()
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert len(train_logs) == 2
    for log in train_logs:
        assert np.isfinite(log["loss"])
        assert {"mean_positive_rank", "num_candidates", "bank_learning_rate"} <= set(log)


def test_torch_compile_wrapper_is_unwrapped(tiny_model, beir_dir, tmp_path):
    compiled = torch.compile(tiny_model)  # lazy: nothing is compiled until it runs
    assert _unwrap(compiled) is tiny_model
    assert is_sentence_transformer(compiled) and embedding_dim(compiled) == 32
    trainer, _ = build(tiny_model, beir_dir, tmp_path)
    trainer.model_wrapped = compiled
    out = tmp_path / "artifact"
    trainer.save_model(str(out))
    assert (out / "modules.json").is_file() and (out / "index.faiss").is_file()


@pytest.mark.skipif(not os.environ.get("HF_QRET_SLOW_TESTS"), reason="torch.compile takes ~60 s on 2 CPU cores")
def test_torch_compile_training(tiny_model, beir_dir, tmp_path):
    trainer, _ = build(tiny_model, beir_dir, tmp_path, torch_compile=True, max_steps=2, logging_steps=1)
    trainer.train()
    assert all(np.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def run_example(name: str, argv: list[str], monkeypatch) -> dict:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_converted_sentence_transformers_script_runs(tiny_model_dir, beir_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "converted"
    import hf_qret

    argv = ["--model", tiny_model_dir, "--data_dir", str(beir_dir), "--eval_split", "train", "--output_dir", str(out),
            "--max_steps", "3", "--batch_size", "8"]  # fmt: skip
    asked, real = [], hf_qret.QRetTrainingArguments

    def small_index_args(*args, index_factory=None, **kwargs):  # RQ16x8 over 300 tiny vectors is slow and pointless
        asked.append(index_factory)
        return real(*args, index_factory="PQ4", **kwargs)

    monkeypatch.setattr(hf_qret, "QRetTrainingArguments", small_index_args)
    scope = run_example("convert_sentence_transformers.py", argv, monkeypatch)
    trainer = scope["trainer"]
    assert isinstance(trainer, QRetTrainer) and trainer.state.global_step == 3
    assert "eval_dev_quantized_ndcg@10" in capsys.readouterr().out  # the InformationRetrievalEvaluator, via the index
    assert asked == [None] and trainer.bank.doc_ids == list(scope["corpus"])  # no index named: the library's default
    assert {"index.faiss", "doc_ids.json", "bank.safetensors", "modules.json", "corpus.jsonl"} <= set(os.listdir(out))
    retriever = QuantizedRetriever.from_pretrained(out, device="cpu")
    hits = retriever.search(["protein gene"], k=5)[0]
    assert len(hits) == 5 and all(doc_id in trainer.bank.doc_ids for doc_id, _ in hits)


def test_conversion_diff_is_current():
    before = (EXAMPLES / "train_sentence_transformers.py").read_text().splitlines(keepends=True)
    after = (EXAMPLES / "convert_sentence_transformers.py").read_text().splitlines(keepends=True)
    names = ("train_sentence_transformers.py", "convert_sentence_transformers.py")
    diff = "".join(difflib.unified_diff(before, after, *names))
    assert (EXAMPLES / "convert_sentence_transformers.diff").read_text() == diff
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert len(changed) <= 6  # the class swaps and corpus= in place of the loss: nothing else


def test_accelerate_multi_gpu_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(EXAMPLES / "accelerate_multi_gpu.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_processes == 2 and config.mixed_precision == "bf16" and not config.use_cpu


def test_all_reduce_row_grad_averages_sparse_rows_across_processes(tmp_path):
    from dist_workers import reduce_rows_worker

    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=reduce_rows_worker, args=(rank, 2, port, str(tmp_path))) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0]
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    expected = torch.zeros(6, 3)
    expected[0] = torch.tensor([1.0, 2.0, 3.0]) / 2
    expected[2] = (torch.tensor([1.5, 1.5, 1.5]) + torch.tensor([4.0, 4.0, 4.0])) / 2
    expected[5] = torch.tensor([6.0, 0.0, -6.0]) / 2
    one_side = torch.zeros(6, 3)
    one_side[4] = 0.5
    for result in results:
        assert result["count"] == 3
        torch.testing.assert_close(result["grad"], expected)
        assert result["count_one_side"] == 1
        torch.testing.assert_close(result["grad_one_side"], one_side)
        assert result["count_none"] == 0 and result["grad_none"] is None


@pytest.mark.integration
def test_ddp_processes_keep_identical_banks(tiny_model_dir, beir_dir, tmp_path):
    """Two CPU processes (gloo DDP): the encoder and the bank stay identical on both after 3 steps."""
    dist_workers(tiny_model_dir, str(beir_dir), str(tmp_path), timeout=300)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    assert first["world"] == 2
    assert torch.equal(first["bank"], second["bank"])
    assert torch.equal(first["row_steps"], second["row_steps"]) and int(first["row_steps"].gt(0).sum()) > 8
    assert all(torch.equal(first["encoder"][k], second["encoder"][k]) for k in first["encoder"])
    # candidates are mined for the global batch: the same set on both processes, holding both processes' positives
    assert len(first["mined"]) == len(second["mined"]) == 3
    for mine_a, mine_b in zip(first["mined"], second["mined"]):
        assert torch.equal(mine_a["candidates"], mine_b["candidates"])
        assert not torch.equal(mine_a["positives"], mine_b["positives"])  # the processes saw different examples
        candidates = set(mine_a["candidates"].tolist())
        assert set(mine_a["positives"].tolist()) | set(mine_b["positives"].tolist()) <= candidates


def recipe_under_torchrun(model_dir: str, data: Path, out: Path, *extra: str, timeout: int = 600):
    """`torchrun --nproc_per_node 2 recipes/train.py recipes/scifact.yaml` with a tiny model and index on ``data``
    (eval split ``dev``), plus ``extra`` options; asserts exit 0 and returns the finished process."""
    return torchrun(
        REPO / "recipes" / "train.py", str(REPO / "recipes" / "scifact.yaml"),
        "--model_name_or_path", model_dir, "--data_dir", str(data), "--eval_split", "dev",
        "--output_dir", str(out), "--index_factory", "PQ4", "--num_negatives", "8",
        "--per_device_train_batch_size", "4", "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
        *extra, timeout=timeout, pythonpath=(REPO,), unset_env=("ACCELERATE_USE_CPU",),
    )  # fmt: skip


@pytest.mark.integration
def test_recipe_under_torchrun_on_cpus_is_one_distributed_run(tiny_model_dir, two_split_dir, tmp_path):
    """`torchrun --nproc_per_node 2 recipes/train.py ...` forms one gloo world: one writer, one artifact, exit 0."""
    out = tmp_path / "out"
    # --keep_untrained_if_better false: the tiny random model's dev score is noise, and this run must train
    result = recipe_under_torchrun(tiny_model_dir, two_split_dir, out, "--max_steps", "4", "--save_strategy", "steps",
                                   "--save_steps", "2",
                                   "--keep_untrained_if_better", "false", timeout=300)  # fmt: skip
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in result.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(out.glob("_staging*"))
    # each process's RNG state is in the checkpoint (a resume on 2 processes needs both), written before it moved
    for step in (2, 4):
        assert {p.name for p in (out / f"checkpoint-{step}").glob("rng_state*")} == {
            "rng_state_0.pth",
            "rng_state_1.pth",
        }
    assert (out / "index.faiss").is_file() and (out / "eval_results.json").is_file()


@pytest.mark.integration
def test_ddp_shared_mmap_bank_moves_each_row_once_per_step(tiny_model_dir, beir_dir, tmp_path):
    """Two gloo processes mapping one bank file: rank 0 writes each step's rows, so the shared bank ends exactly
    where the per-process banks in RAM do (before, every process applied the same update to the same file)."""
    dist_workers("--mmap", tiny_model_dir, str(beir_dir), str(tmp_path), timeout=600)
    first, second = (torch.load(tmp_path / f"mmap_rank{rank}.pt", weights_only=False) for rank in range(2))
    assert int(first["ram_row_steps"].gt(0).sum()) > 8  # rows moved
    for banks in (first, second):
        assert torch.equal(banks["ram_row_steps"], banks["mmap_row_steps"])
        np.testing.assert_allclose(banks["mmap"], banks["ram"], rtol=1e-6, atol=1e-7)
    assert np.array_equal(first["mmap"], second["mmap"])


@pytest.mark.integration
def test_recipe_under_torchrun_encodes_the_corpus_once_into_one_mmap_file(tiny_model_dir, two_split_dir, tmp_path):
    """`torchrun --nproc_per_node 2 recipes/train.py ... --bank_mmap true`: each process encodes half of the corpus
    into the one bank file (written by rank 0's creation, then by each process's share), and training runs."""
    out = tmp_path / "out"
    # --keep_untrained_if_better false: the tiny random model's dev score is noise, and the shipped model must train
    # --train_on_eval_split true: the second run on train + dev rewrites the working file (the YAML's default is one run)
    result = recipe_under_torchrun(tiny_model_dir, two_split_dir, out, "--bank_mmap", "true", "--max_steps", "2",
                                   "--keep_untrained_if_better", "false", "--train_on_eval_split", "true")  # fmt: skip
    assert "process 0 of 2 encodes documents 0-150 of 300" in result.stderr
    assert "process 1 of 2 encodes documents 150-300 of 300" in result.stderr
    # the working file is written by one process per model: the run on train, then the shipped model's rerun on
    # train + dev (or the untrained model shipped instead); before, every process rewrote it for the second model
    assert result.stderr.count("to the memory-mapped") == 2, result.stderr[-3000:]
    assert (out / "bank_mmap.npy").is_file() and (out / "index.faiss").is_file()
    assert not list(out.glob("*.tmp"))
