"""The training arguments: :class:`QRetTrainingArguments` (``transformers.TrainingArguments`` plus the bank, index and
mining options) and the choices they take."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..errors import ConfigError
from ..options import BANK_DTYPE_NAMES, ENCODE_PRECISIONS, POOLINGS, REFRESH_MODES, check_index_options

__all__ = ["BANK_LEARNING_RATES", "QRetTrainingArguments"]

#: Which candidate rows the bank optimizer moves.
BANK_UPDATES = ("all", "positives")
#: The bank's row optimizers and the learning rate each gets when ``bank_learning_rate`` is unset: the two are on
#: different scales (a row-wise Adam row moves by about the learning rate per coordinate, an SGD row by the learning
#: rate times its gradient).
BANK_LEARNING_RATES = {"adam": 2e-3, "sgd": 0.2}
BANK_OPTIMIZERS = tuple(BANK_LEARNING_RATES)
#: What the bank rows learn against: the trained encoder's queries or a frozen pretrained encoder's.
BANK_QUERIES = ("encoder", "initial")
#: Where the bank lives.
BANK_DEVICES = ("auto", "cpu", "cuda")
#: How the bank and the index are split across processes: every process holds all of them, or a slice of the rows.
BANK_SHARDINGS = ("none", "rows")
#: Index types whose per-process parts FAISS cannot merge into one served index (``bank_sharding='rows'``).
UNSHARDABLE_INDEXES = ("HNSW", "NSG", "IDMap")


@dataclass
class QRetTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the options of the target bank, the quantized index and the miner.

    The defaults are the method as measured best (``benchmarks/results/ablation.md``): a 16-byte residual quantizer
    (``RQ16x8``); the bank on row-wise SGD at 0.2; only the rows of training positives move and keep their norm; the
    bank learns against a frozen pretrained encoder's queries while the query encoder learns against the bank it is
    served with; the codebooks are retrained at each refresh. ``recipes/scifact.yaml`` sets only what is about its
    data. Options that were measured and lost are listed in ``docs/experiments.md``.

    Example:
        >>> args = QRetTrainingArguments(output_dir="out", report_to="none")
        >>> args.index_factory, args.bank_optimizer, args.bank_learning_rate
        ('auto', 'sgd', 0.2)
        >>> QRetTrainingArguments(output_dir="out", bank_optimizer="adam", report_to="none").bank_learning_rate
        0.002
    """

    lr_scheduler_type: str = field(
        default="constant",
        metadata={
            "help": "The encoder's learning rate schedule, which the bank's follows (transformers' SchedulerType). "
            "hf-qret's default is 'constant', not the Trainer's 'linear': a decaying schedule also decays the bank "
            "rows' updates (SciFact dev, 16-byte index: 4 epochs 0.757 vs 0.736 nDCG@10; the 1-epoch drop-in "
            "0.664 vs 0.616, benchmarks/st_dropin.py)."
        },
    )
    bank_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the target bank, separate from the encoder's (0: the bank stays frozen). Unset: "
            "the --bank_optimizer's own (hf_qret.config.BANK_LEARNING_RATES: 0.2 for 'sgd', 0.002 for 'adam'), "
            "since the two are on different scales."
        },
    )
    bank_weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay on updated bank rows."})
    bank_optimizer: str = field(
        default="sgd",
        metadata={
            "help": "The bank's row optimizer: 'sgd' (a row moves by bank_learning_rate * gradient: rows the loss "
            "hardly cares about hardly move; the default, measured better: SciFact 16 bytes 0.832 vs 0.824, NFCorpus "
            "0.333 vs 0.315) or 'adam' (row-wise Adam; a touched row moves by about bank_learning_rate per "
            "coordinate whatever its gradient's size). Their learning rates are on different scales: see "
            "--bank_learning_rate."
        },
    )
    index_factory: str = field(
        default="auto",
        metadata={
            "help": "faiss.index_factory string of the quantized index (inner product). Default 'auto': chosen from "
            "the number of bank rows (hf_qret.index.auto.choose_index): 'RQ16x8', a residual quantizer of 16 bytes "
            "per vector (SciFact untrained: 0.649 nDCG@10 of flat 0.670; OPQ16,PQ16: 0.557), below "
            "hf_qret.index.auto.AUTO_SWITCH_ROWS rows; 'OPQ16,IVF<nlist>,PQ16' with nprobe=16 from there on (RQ16x8's "
            "search slows with the corpus; docs/scale.md). Logged once and recorded in qret_config.json. Others: "
            "e.g. RQ8x8, PQ16, OPQ16,PQ16, IVF64,PQ16. Too few rows for the factory: it is adapted and says so "
            "(hf_qret.index.factory.fit_factory)."
        },
    )
    index_search_params: str | None = field(
        default=None, metadata={"help": "FAISS runtime parameters, e.g. 'nprobe=16' or 'efSearch=64'."}
    )
    opq_niter: int = field(
        default=50,
        metadata={
            "help": "Iterations of OPQ rotation training at every index (re)build (faiss.OPQMatrix.niter; FAISS's "
            "default is 50). Only for factories with an OPQ stage."
        },
    )
    rq_beam_size: int = field(
        default=1,
        metadata={
            "help": "Beam of a residual-quantizer index (RQ...) when its codebooks are trained and vectors encoded "
            "(faiss.ResidualQuantizer.max_beam_size; FAISS's default is 5). 1: every index build about 6x faster, "
            "the same SciFact nDCG@10 (benchmarks/results/end_to_end.md). Other factories ignore it."
        },
    )
    mining_nlist: int = field(
        default=0,
        metadata={
            "help": "Mining shortlist for a flat PQ/OPQ+PQ index: keep this many inverted lists over the same codes "
            "and mine from the --mining_nprobe nearest lists (same scores, far fewer codes scanned: for corpora of "
            "~1M+ rows on CPUs). 0: mine from the whole index."
        },
    )
    mining_nprobe: int = field(default=16, metadata={"help": "Lists scanned per query with --mining_nlist."})
    num_negatives: int = field(
        default=100, metadata={"help": "Top-k rows mined per query from the quantized index (cross-batch union)."}
    )
    scale: float | None = field(
        default=None,
        metadata={
            "help": "Inverse temperature of the candidate softmax. Default: 20 for cosine models (unit-norm "
            "embeddings), 1 for dot-product models (similarity_fn_name 'dot' and no Normalize module: TAS-B, "
            "Contriever, msmarco-*-dot), the MultipleNegativesRankingLoss conventions."
        },
    )
    pooling: str | None = field(
        default=None,
        metadata={
            "help": "Pooling of a plain transformers encoder (AutoModel): 'mean' (default) or 'cls'; recorded in "
            "the artifact so queries are encoded the same way. A SentenceTransformer's own Pooling module decides "
            "instead."
        },
    )
    refresh_steps: int = field(
        default=0, metadata={"help": "Rebuild the quantized index from the bank every N optimizer steps (0: never)."}
    )
    bank_update: str = field(
        default="positives",
        metadata={
            "help": "Which candidate rows the bank optimizer moves: 'positives' (the default: only rows of documents "
            "that are a positive of some training query, as a positive or as a negative; the rows of documents that are "
            "never a training positive take no row step and move only through the shared document adapter, "
            "--doc_adapter_rank) or 'all' (positives and mined negatives)."
        },
    )
    bank_queries: str = field(
        default="initial",
        metadata={
            "help": "What the bank rows learn against: 'initial' (the default: the queries of a frozen copy of the "
            "pretrained encoder, so the bank leads without chasing a moving encoder, while the query encoder learns "
            "against the bank it is served with) or 'encoder' (one joint loss: the encoder and the bank rows learn "
            "against each other; no frozen copy is kept)."
        },
    )
    bank_keep_norm: bool = field(
        default=True,
        metadata={
            "help": "Drift control: after every bank step, rescale the updated rows to their initial norm (a row "
            "that grows scores higher against every query and crowds out documents that never train)."
        },
    )
    refresh_on_epoch_end: bool = field(default=True, metadata={"help": "Rebuild the quantized index at epoch end."})
    normalize_decoded: bool | None = field(
        default=None,
        metadata={
            "help": "Score each quantized candidate by the cosine of its decoded vector, q . x_hat / |x_hat| (the "
            "index's top 100 per query re-scored with norms computed from the codes: no extra byte per vector), in "
            "mining, evaluation and serving. Unset (default): on for cosine models (unit-norm embeddings), off for "
            "dot-product models."
        },
    )
    refresh_mode: str = field(
        default="retrain",
        metadata={
            "help": "'retrain' (the default): retrain the codebooks on the moved bank and re-encode every row; "
            "'reencode': re-encode every row with the current codebooks; "
            "'incremental': re-encode, in place, only the rows changed since the last refresh (same codes as "
            "'reencode'; IVF and flat-code indexes such as PQ, OPQ+PQ, SQ; others fall back to 'reencode')."
        },
    )
    final_refresh_mode: str | None = field(
        default="retrain",
        metadata={
            "help": "How the run's last refresh builds the index that is evaluated and saved (at train end, or at "
            "the last epoch's end): 'retrain' (the default: codebooks trained on the final bank), 'reencode', "
            "'incremental', or unset: as --refresh_mode."
        },
    )
    distill_codebooks: int = field(
        default=4,
        metadata={
            "help": "Epochs of codebook distillation at train end (0: off): the flat ranking of the training queries "
            "and of --distill_doc_queries bank rows used as queries is distilled into the codebooks of an 8-bit "
            "additive-quantizer index (RQ16x8, the small-corpus default; other indexes are left alone), codes kept "
            "(hf_qret.index.distill); kept only if the KL of held-out queries falls. InsuranceQA dev, 16 bytes: 0.388 -> "
            "0.403 nDCG@10 (flat 0.420)."
        },
    )
    doc_adapter_rank: int = field(
        default=64,
        metadata={
            "help": "Width of the document adapter (0: none): a residual MLP shared by every bank row, trained with "
            "the query encoder (in its loss term) and baked into the bank before each index refresh, so documents no "
            "training query touches move too, without re-encoding the corpus (hf_qret.training.adapter; none when "
            "bank_learning_rate is 0). "
            "InsuranceQA dev, 16 bytes, seed 42: 0.404 -> 0.423 nDCG@10."
        },
    )
    doc_adapter_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "AdamW's learning rate of the document adapter (it follows the encoder's schedule)."},
    )
    distill_doc_queries: int = field(
        default=50_000,
        metadata={
            "help": "Bank rows used as queries by the codebook distillation (a fixed random sample; every row of a "
            "corpus up to this size, which covers every corpus 'auto' gives an RQ16x8 index)."
        },
    )
    bank_encode_precision: str = field(
        default="auto",
        metadata={
            "help": "Precision the corpus is encoded into the bank in: 'auto' (bfloat16 autocast where the hardware "
            "computes it natively: a CUDA GPU with bf16 or a CPU with AMX tiles, e.g. Sapphire Rapids; else float32), "
            "'fp32' or 'bf16'. On the 2-core AMX machine the reported numbers come from, 'auto' encodes SciFact 2.7x "
            "faster than float32 with rows at cosine 0.9999 of float32's."
        },
    )
    bank_dtype: str = field(
        default="fp32",
        metadata={
            "help": "Storage dtype of the bank: 'fp32', 'bf16' or 'fp16' (half the memory). Gathered rows are "
            "float32 for the loss; the row-wise Adam update is computed in float32 and written back in this dtype."
        },
    )
    bank_device: str = field(
        default="auto",
        metadata={
            "help": "Where the bank lives: 'auto' (the training device; the CPU for a memory-mapped bank), 'cpu' "
            "(gathered rows are copied to the training device; saves GPU memory) or 'cuda'."
        },
    )
    bank_pin_memory: bool = field(
        default=False,
        metadata={
            "help": "With a CPU bank and a CUDA training device, stage gathered rows in page-locked memory and copy "
            "them to the GPU asynchronously (ignored without CUDA)."
        },
    )
    bank_sharding: str = field(
        default="none",
        metadata={
            "help": "Under several processes (torchrun / accelerate launch): 'none' (default) keeps the whole bank, "
            "its optimizer state and the index on every process; 'rows' gives each process a contiguous slice of "
            "the bank rows, their optimizer state and the index over them (about 1/N of the memory each). "
            "Ignored (with a log line) by a single process."
        },
    )
    faiss_threads: int = field(
        default=0, metadata={"help": "FAISS OpenMP threads (faiss.omp_set_num_threads); 0 keeps FAISS's default."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs the query and positive columns."}
    )
    hub_push_training_state: bool = field(
        default=False,
        metadata={
            "help": "With push_to_hub and hub_strategy 'checkpoint' / 'all_checkpoints': also upload the whole "
            "checkpoint folder (last-checkpoint/ or checkpoint-N/) to resume from, which holds pickles (optimizer.pt, "
            "rng_state*.pth, training_args.bin) and the training state. Off: every push is the artifact's files only."
        },
    )
    keep_untrained_if_better: bool = field(
        default=True,
        metadata={
            "help": "Safety net (needs an evaluator): evaluate the untrained model before the first step and, if "
            "training ends worse on the evaluator's metric (metric_for_best_model, else the quantized index's "
            "nDCG@10), restore the untrained encoder, bank and index, warn loudly and say so in eval_results.json "
            "and the model card. The untrained model is kept in OUTPUT_DIR/_untrained during training."
        },
    )
    store_corpus_texts: bool | None = field(
        default=None,
        metadata={
            "help": "Ship the document texts in the artifact (corpus.jsonl), so QuantizedRetriever.search(..., "
            "return_text=True) returns documents. Default (unset): yes when the trainer built the bank from texts "
            "(corpus= / text pairs), no with a ready bank=; true with bank= needs corpus= to cover the bank."
        },
    )

    def __post_init__(self) -> None:
        from_launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "fp16" and not self.bf16
        if self.fp16 or from_launcher:
            # The bank is not in the encoder's optimizer: its row gradients would never be unscaled, and the bank
            # step would still run when the loss scaler skips the encoder's step on an overflow (an inf in a row's
            # Adam moments stays there for good).
            raise ConfigError(
                f"fp16 mixed precision ({'accelerate mixed_precision fp16' if from_launcher else '--fp16'}) is not "
                "supported: the loss scaler never unscales the bank's row gradients nor skips the bank step on an "
                "overflow. Use bf16=True (--bf16, or mixed_precision bf16; no loss scaler needed) instead; "
                "bank_dtype fp16 (the bank's storage) is unaffected."
            )
        super().__post_init__()
        check_index_options(self.opq_niter, self.mining_nlist, self.mining_nprobe, self.rq_beam_size)
        if self.num_negatives < 1:
            raise ConfigError(f"num_negatives must be at least 1, got {self.num_negatives}.")
        for name in ("distill_codebooks", "distill_doc_queries", "doc_adapter_rank"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}.")
        for name in ("refresh_mode", "final_refresh_mode"):
            value = getattr(self, name)
            if value not in REFRESH_MODES and not (name == "final_refresh_mode" and value is None):
                raise ConfigError(f"{name} must be one of {', '.join(REFRESH_MODES)}, got {value!r}.")
        if self.bank_optimizer not in BANK_OPTIMIZERS:
            raise ConfigError(
                f"bank_optimizer must be one of {', '.join(BANK_OPTIMIZERS)}, got {self.bank_optimizer!r}."
            )
        if self.bank_update not in BANK_UPDATES:
            raise ConfigError(f"bank_update must be one of {', '.join(BANK_UPDATES)}, got {self.bank_update!r}.")
        if self.bank_queries not in BANK_QUERIES:
            raise ConfigError(f"bank_queries must be one of {', '.join(BANK_QUERIES)}, got {self.bank_queries!r}.")
        if self.scale is not None and self.scale <= 0:
            raise ConfigError(
                f"scale must be > 0 (or unset: 20 for cosine models, 1 for dot models), got {self.scale}."
            )
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}.")
        if self.bank_learning_rate is None:  # after the bank_optimizer check: its own scale
            self.bank_learning_rate = BANK_LEARNING_RATES[self.bank_optimizer]
        if self.doc_adapter_learning_rate <= 0:
            raise ConfigError(
                f"doc_adapter_learning_rate must be > 0, got {self.doc_adapter_learning_rate} (turn the adapter off "
                "with doc_adapter_rank 0 instead)."
            )
        if self.bank_learning_rate < 0:
            raise ConfigError(f"bank_learning_rate must be >= 0, got {self.bank_learning_rate}.")
        self._check_scale_options()

    def _check_scale_options(self) -> None:
        if self.bank_dtype not in BANK_DTYPE_NAMES:
            raise ConfigError(f"bank_dtype must be one of {', '.join(BANK_DTYPE_NAMES)}, got {self.bank_dtype!r}.")
        if self.bank_device not in BANK_DEVICES:
            raise ConfigError(f"bank_device must be one of {', '.join(BANK_DEVICES)}, got {self.bank_device!r}.")
        if self.bank_device == "cuda":
            import torch

            if self.use_cpu or not torch.cuda.is_available():
                raise ConfigError(
                    "bank_device='cuda' needs a CUDA device (and no --use_cpu); use bank_device 'auto' or 'cpu'."
                )
            if self.bank_pin_memory:
                raise ConfigError("bank_pin_memory stages a CPU bank's rows for the GPU; it needs bank_device 'cpu'.")
        if self.bank_encode_precision not in ENCODE_PRECISIONS:
            raise ConfigError(
                f"bank_encode_precision must be one of {', '.join(ENCODE_PRECISIONS)}, got "
                f"{self.bank_encode_precision!r}."
            )
        if self.faiss_threads < 0:
            raise ConfigError(f"faiss_threads must be >= 0 (0: FAISS's default), got {self.faiss_threads}.")
        self._check_sharding_options()

    def _check_sharding_options(self) -> None:
        if self.bank_sharding not in BANK_SHARDINGS:
            raise ConfigError(f"bank_sharding must be one of {', '.join(BANK_SHARDINGS)}, got {self.bank_sharding!r}.")
        if self.bank_sharding == "none":
            return
        unmergeable = next((name for name in UNSHARDABLE_INDEXES if name in self.index_factory), None)
        if unmergeable is not None:
            raise ConfigError(
                f"bank_sharding='rows' serves one index assembled from every process's part, and FAISS cannot merge "
                f"{unmergeable} indexes ({self.index_factory!r}); use a flat-code (RQ, PQ, OPQ..,PQ, SQ, Flat) or IVF "
                "factory, or bank_sharding='none'."
            )
        if self.mining_nlist:
            raise ConfigError(
                "bank_sharding='rows' does not support the mining shortlist (mining_nlist > 0): each process mines "
                "its own slice of the rows already; set mining_nlist 0 or bank_sharding='none'."
            )
