"""Codebooks fitted to the ranking: the flat index's ranking distilled into a residual quantizer's codebooks.

A 16-byte ``RQ16x8`` index keeps the right documents in its top 100 but loses their order among near neighbours
(docs/experiments.md, "Documents training never touches"). Its codebooks were fitted by k-means to reconstruct the
rows; :func:`distill_codebooks` refits them to *rank* like the float rows: for each query (the training queries
through the trained query encoder, and a sample of the bank's own rows as queries, so every region of the corpus is
covered, not only the documents training touched), the flat top ``candidates`` rows and their float scores are the
teacher; the student scores the same rows through their decoded codes (the decoded vector's cosine when the index
serves with ``normalize_decoded``); the codebooks (not the codes) take Adam steps on the listwise KL divergence
between the two softmaxes (temperature ``temperature``). A held-out 5 % of the queries (at most
:data:`HELD_OUT_MAX`) is scored before and after: the new codebooks are kept only if its KL fell. The codes stay as they are, so the index keeps its bytes per
row and the rows that no query reached move with the shared codebooks. This is the codebook half of JPQ /
Distill-VQ, with the flat ranking as the teacher.

Measured on the trained InsuranceQA artifact (dev, 2,000 questions, 1,921 with no relevant answer seen in training):
16-byte nDCG@10 0.387 -> 0.404 (flat 0.420); see docs/experiments.md.

Only additive quantizers with 8-bit codebooks and no stored norm (``RQ<M>x8``, ``LSQ<M>x8``, inner product) are
distilled; any other index is left alone, with the reason returned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .exact import ExactSearch
from .faiss_ops import as_float32

__all__ = ["CodebookDistillation", "distill_codebooks", "distillable"]

logger = logging.getLogger("hf_qret")

#: At most this many of the queries (5 % of them) are held out to decide whether the distilled codebooks are kept.
HELD_OUT_MAX = 2000


@dataclass(frozen=True)
class CodebookDistillation:
    """What :func:`distill_codebooks` did (recorded in ``qret_config.json`` as ``codebook_distillation``).

    Attributes:
        epochs: Passes over the queries.
        queries: Queries distilled (training queries plus bank rows as queries).
        candidates: Flat top rows per query the ranking is distilled over.
        kl_first: Mean KL divergence over the first epoch.
        kl_last: Mean KL divergence over the last epoch.
        seconds: Wall time, teacher search included.
        held_out_kl_before: KL on the held-out queries (a 5 % slice, at most 2,000) before.
        held_out_kl_after: The same after the epochs.
        kept: Whether the new codebooks were kept (the held-out KL fell); else the index keeps its codebooks.

    Example:
        >>> CodebookDistillation(2, 100, 50, 0.1, 0.05, 1.5, 0.1, 0.06, True).record()["kl_last"]
        0.05
    """

    epochs: int
    queries: int
    candidates: int
    kl_first: float
    kl_last: float
    seconds: float
    held_out_kl_before: float
    held_out_kl_after: float
    kept: bool

    def record(self) -> dict[str, Any]:
        """The JSON record.

        Example:
            >>> sorted(CodebookDistillation(1, 10, 5, 0.2, 0.2, 0.1, 0.2, 0.3, False).record())[:3]
            ['candidates', 'epochs', 'held_out_kl_after']
        """
        return asdict(self)


def distillable(faiss: Any, index: Any) -> str:
    """Why ``index`` (a CPU FAISS index) cannot have its codebooks distilled, or ``""`` when it can.

    Example:
        >>> from hf_qret.index.faiss_ops import import_faiss
        >>> faiss = import_faiss()
        >>> distillable(faiss, faiss.index_factory(32, "PQ4", faiss.METRIC_INNER_PRODUCT))
        'a IndexPQ is not an additive quantizer (RQ/LSQ)'
        >>> distillable(faiss, faiss.index_factory(32, "RQ4x8", faiss.METRIC_INNER_PRODUCT))
        ''
    """
    top = faiss.downcast_index(index)
    if not isinstance(top, faiss.IndexAdditiveQuantizer):
        return f"a {type(top).__name__} is not an additive quantizer (RQ/LSQ)"
    aq = top.aq
    nbits = [int(b) for b in faiss.vector_to_array(aq.nbits)]
    if any(b != 8 for b in nbits) or int(top.code_size) != int(aq.M):
        return "only 8-bit codebooks without a stored norm (e.g. RQ16x8) are distilled"
    if top.metric_type != faiss.METRIC_INNER_PRODUCT:
        return "only inner-product indexes are distilled"
    return ""


def distill_codebooks(
    index: Any,
    bank: np.ndarray,
    queries: np.ndarray,
    *,
    cosine: bool = True,
    epochs: int = 4,
    candidates: int = 100,
    batch_size: int = 128,
    learning_rate: float = 1e-4,
    temperature: float = 0.05,
    seed: int = 0,
) -> CodebookDistillation | str:
    """Refits the codebooks of ``index`` so that its decoded scores rank like the float ``bank`` (see the module).

    Args:
        index: A trained :class:`~hf_qret.index.core.QuantizedIndex` (or a CPU FAISS index) whose row ``i`` is
            ``bank[i]``.
        bank: The float rows, ``(ntotal, dim)``: an array, or anything whose slices are float32 arrays (a
            :class:`~hf_qret.bank.storage.Float32Rows`); read in chunks, never copied whole.
        queries: The queries to distill over, ``(n, dim)`` float32 (training queries, bank rows...).
        cosine: Score decoded rows by their cosine (an index serving with ``normalize_decoded``).
        epochs: Passes over ``queries``.
        candidates: The flat top rows per query (teacher and student score the same rows).
        batch_size: Queries per Adam step.
        learning_rate: Adam's rate on the codebook entries.
        temperature: Softmax temperature of both rankings.
        seed: Order of the queries.

    Returns:
        A :class:`CodebookDistillation`, or the reason the index was left alone (a string).

    Example:
        >>> import numpy as np
        >>> from hf_qret.index.core import QuantizedIndex
        >>> rng = np.random.default_rng(0)
        >>> bank = rng.standard_normal((2000, 16)).astype("float32")
        >>> index = QuantizedIndex(16, "RQ4x8"); index.build(bank)
        >>> report = distill_codebooks(index, bank, bank[:256], epochs=3, candidates=20, learning_rate=1e-3)
        >>> report.kl_last < report.kl_first, report.kept, report.held_out_kl_after < report.held_out_kl_before
        (True, True, True)
    """
    import torch

    from .faiss_ops import import_faiss

    faiss = import_faiss()
    owner = index if hasattr(index, "_changed") else None
    raw = owner.index if owner is not None else index
    reason = distillable(faiss, raw)
    if reason:
        return reason
    start = time.perf_counter()
    top = faiss.downcast_index(raw)
    aq = top.aq
    num_books, dim = int(aq.M), int(aq.d)
    queries = as_float32(np.asarray(queries))
    if len(bank) != top.ntotal:
        raise ValueError(f"the bank has {len(bank)} rows and the index {top.ntotal}; distill the index of this bank.")
    candidates = int(min(candidates, len(bank)))
    # the teacher: exact float scores of each query's flat top rows, read chunk by chunk (no copy of the bank)
    teacher_scores, teacher_rows = ExactSearch(bank).search(queries, candidates)
    codes = faiss.vector_to_array(top.codes).reshape(top.ntotal, num_books).astype(np.int64)
    codes += np.arange(num_books, dtype=np.int64) * 256  # offsets into the stacked codebooks
    codes_t = torch.from_numpy(codes)
    books = torch.nn.Parameter(
        torch.from_numpy(faiss.vector_to_array(aq.codebooks).reshape(num_books * 256, dim).copy())
    )
    initial = books.detach().clone()
    optimizer = torch.optim.Adam([books], lr=learning_rate)
    queries_t, teacher_t = torch.from_numpy(queries), torch.from_numpy(teacher_scores) / temperature
    rows_t = torch.from_numpy(teacher_rows)
    generator = torch.Generator().manual_seed(seed)
    # a held-out slice of the queries decides whether the new codebooks are kept
    order = torch.randperm(len(queries), generator=generator)
    held = order[: min(HELD_OUT_MAX, len(queries) // 20)]
    fitted = order[len(held) :]

    def kl(picked: Any) -> Any:
        decoded = torch.nn.functional.embedding_bag(codes_t[rows_t[picked].reshape(-1)], books, mode="sum")
        decoded = decoded.view(len(picked), candidates, dim)
        if cosine:
            decoded = decoded / decoded.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        student = torch.einsum("bd,bkd->bk", queries_t[picked], decoded) / temperature
        return torch.nn.functional.kl_div(
            student.log_softmax(-1), teacher_t[picked].log_softmax(-1), log_target=True, reduction="batchmean"
        )

    def held_out_kl() -> float:
        if len(held) == 0:
            return float("nan")
        with torch.no_grad():
            parts = [
                float(kl(held[i : i + batch_size])) * len(held[i : i + batch_size])
                for i in range(0, len(held), batch_size)
            ]
        return sum(parts) / len(held)

    kl_before = held_out_kl()
    epoch_kl: list[float] = []
    for _ in range(int(epochs)):
        shuffled = fitted[torch.randperm(len(fitted), generator=generator)]
        total, steps = 0.0, 0
        for begin in range(0, len(shuffled), batch_size):
            loss = kl(shuffled[begin : begin + batch_size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        epoch_kl.append(total / max(steps, 1))
    kl_after = held_out_kl()
    kept = not (kl_after >= kl_before)  # NaN (no held-out queries): kept
    final = books.detach() if kept else initial
    faiss.copy_array_to_vector(final.numpy().astype(np.float32).ravel(), aq.codebooks)
    if hasattr(aq, "compute_codebook_tables"):
        aq.compute_codebook_tables()  # the cross products RQ's beam search encodes new rows with
    if owner is not None:
        owner._changed()
    report = CodebookDistillation(
        epochs=int(epochs),
        queries=len(queries),
        candidates=candidates,
        kl_first=round(epoch_kl[0], 5) if epoch_kl else 0.0,
        kl_last=round(epoch_kl[-1], 5) if epoch_kl else 0.0,
        seconds=round(time.perf_counter() - start, 2),
        held_out_kl_before=round(kl_before, 5),
        held_out_kl_after=round(kl_after, 5),
        kept=bool(kept),
    )
    logger.info(
        "distilled the flat ranking into the index's codebooks: %d queries x %d candidates, %d epochs, held-out KL "
        "%.4f -> %.4f (%s), %.1fs", report.queries, candidates, report.epochs, report.held_out_kl_before,
        report.held_out_kl_after, "kept" if report.kept else "not lower: the codebooks stay as they were",
        report.seconds,
    )  # fmt: skip
    return report
