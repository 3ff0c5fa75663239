"""Quantizer distillation: PQ centroids (and the OPQ rotation) learned from the flat bank's ranking, for every document.

A product-quantized index is trained to *reconstruct* the bank (k-means per sub-space), which is blind to ranking:
the documents a query should see first can swap places with their neighbours once quantized. Quantizer
distillation (after Distill-VQ, Xiao et al., SIGIR 2022) instead trains the centroids, and optionally the OPQ
rotation, so that the quantized scores ``q · x̂`` reproduce the flat scores ``q · x`` of the bank the index serves:
for each query, a KL divergence between the teacher's and the student's softmax over the query's flat top-``k`` and
randomly sampled documents. It needs no labels: the queries are training queries (their labels unused) and
pseudo-queries drawn from the corpus itself (each document's title, or its first sentence, encoded by the query
encoder), so the neighbourhood of *every* document is covered, not only that of the training positives the
JPQ-style codebook learning (:mod:`hf_qret.codebook`) sees.

It alternates like k-means: with the codes fixed, the centroids (and rotation) take gradient steps; then the bank is
re-encoded with them (nearest centroid, FAISS's own encoder), and so on for a few rounds. The learned centroids and
rotation are written into the FAISS index, so the served index stays a plain FAISS index (``faiss.write_index`` /
``read_index``, the artifact, any FAISS client).

Supported indexes: ``PQ<M>`` and ``OPQ<M>,PQ<M>`` with 8-bit codes (those :class:`~hf_qret.codebook.TrainableCodebooks`
wraps).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .codebook import TrainableCodebooks
from .config import DISTILL_QUERY_SOURCES
from .errors import ConfigError
from .index import QuantizedIndex, split_pretransform

__all__ = [
    "DistillResult",
    "distill_quantizer",
    "distillation_queries",
    "distill_from_args",
    "pseudo_query_texts",
    "ranking_agreement",
    "ranking_kl",
    "DISTILL_QUERY_SOURCES",
]

logger = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def pseudo_query_texts(corpus: Mapping[str, Mapping[str, str]], doc_ids: Sequence[str], max_chars: int = 300) -> list[str]:
    """One pseudo-query per document: its title, else its first sentence (at most ``max_chars`` characters).

    Documents with neither give no pseudo-query.

    Example:
        >>> pseudo_query_texts({"d1": {"title": "Vitamin D", "text": "..."}, "d2": {"text": "Sleep helps. More."}},
        ...                    ["d1", "d2"])
        ['Vitamin D', 'Sleep helps.']
    """
    texts = []
    for doc_id in doc_ids:
        doc = corpus[doc_id]
        text = (doc.get("title") or "").strip()
        if not text:
            body = (doc.get("text") or "").strip()
            text = _SENTENCE_END.split(body, maxsplit=1)[0] if body else ""
        if text:
            texts.append(text[:max_chars])
    return texts


@dataclass
class DistillResult:
    """What :func:`distill_quantizer` did, measured on the distillation queries (a fixed candidate sample).

    ``kl_*``: mean KL(teacher || student) over each query's flat top-``k`` plus random documents; ``overlap_*``: mean
    share of the flat top-10 that the quantized index also ranks in its top 10.
    """

    queries: int
    rounds: int
    kl_before: float
    kl_after: float
    overlap_before: float
    overlap_after: float
    best_round: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _flat_topk(vectors: np.ndarray, queries: np.ndarray, k: int, faiss: Any) -> np.ndarray:
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(queries, min(k, len(vectors)))[1]


def ranking_agreement(index: QuantizedIndex, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean share of each query's flat top-``k`` (exact inner product over ``vectors``) that ``index`` also returns
    in its top ``k``: 1.0 when the quantized ranking keeps every flat top-``k`` document.

    Example:
        >>> ranking_agreement(index, bank_vectors, query_vectors, k=10)  # doctest: +SKIP
        0.71
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    teacher = _flat_topk(vectors, queries, k, index.faiss)
    student = index.search(queries, k)[1]
    return float(np.mean([len(set(t) & set(s)) / len(t) for t, s in zip(teacher.tolist(), student.tolist())]))


def ranking_kl(
    index: QuantizedIndex, vectors: np.ndarray, queries: np.ndarray, top_k: int = 100, temperature: float = 0.05
) -> float:
    """Mean KL(softmax(flat / τ) || softmax(quantized / τ)) over each query's flat top-``top_k`` documents: how far
    the index's scores (of its decoded codes) are from the flat ranking of ``vectors``; 0 when they agree.

    Example:
        >>> ranking_kl(index, bank_vectors, query_vectors)  # doctest: +SKIP
        0.36
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows = torch.from_numpy(_flat_topk(vectors, queries, top_k, index.faiss).astype(np.int64))
    query = torch.from_numpy(queries)
    teacher = torch.einsum("bd,bcd->bc", query, torch.from_numpy(vectors)[rows])
    student = torch.einsum("bd,bcd->bc", query, torch.from_numpy(index.reconstruct_all())[rows])
    return float(_kl(teacher, student, temperature))


class _Student(torch.nn.Module):
    """Centroids (from :class:`TrainableCodebooks`) and an optional learned rotation ``Q`` applied on top of the
    index's OPQ matrix ``A``: the stored vector of codes ``c`` is ``y(c) @ (Q A)``, ``Q`` orthogonal (Cayley)."""

    def __init__(self, codebooks: TrainableCodebooks, learn_rotation: bool) -> None:
        super().__init__()
        self.codebooks = codebooks
        dim = codebooks.rotation.shape[0]
        self.learn_rotation = learn_rotation and codebooks.has_rotation
        self.skew = torch.nn.Parameter(torch.zeros(dim, dim), requires_grad=self.learn_rotation)

    def rotation(self) -> torch.Tensor:
        """``Q A`` (``A`` alone without a learned rotation; identity without OPQ)."""
        base = self.codebooks.rotation
        if not self.learn_rotation:
            return base
        skew = self.skew - self.skew.T
        eye = torch.eye(skew.shape[0], dtype=skew.dtype)
        cayley = torch.linalg.solve(eye + skew, eye - skew)  # (I + S)^-1 (I - S): orthogonal
        return cayley @ base

    def scores(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Quantized scores ``(B, C)`` of ``queries`` ``(B, d)`` against bank ``rows`` ``(B, C)``."""
        books = self.codebooks
        rotated = queries @ self.rotation().T if books.has_rotation else queries  # q . (y A') = (q A'^T) . y
        parts = rotated.reshape(rotated.shape[0], books.num_subspaces, books.sub_dim)
        tables = torch.einsum("bmd,mkd->bmk", parts, books.centroids)  # (B, M, ksub)
        codes = books.codes[rows].permute(0, 2, 1)  # (B, M, C)
        return torch.gather(tables, 2, codes).sum(dim=1)


def _kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    target = torch.log_softmax(teacher / temperature, dim=-1)
    return torch.sum(target.exp() * (target - torch.log_softmax(student / temperature, dim=-1)), dim=-1).mean()


def _write_rotation(index: QuantizedIndex, rotation: np.ndarray) -> None:
    faiss = index.faiss
    transform = split_pretransform(faiss, index.index)[0][0]
    faiss.copy_array_to_vector(np.ascontiguousarray(rotation, dtype=np.float32).reshape(-1), transform.A)


def distill_quantizer(
    index: QuantizedIndex,
    vectors: np.ndarray,
    queries: np.ndarray,
    top_k: int = 100,
    num_random: int = 100,
    temperature: float = 0.05,
    rounds: int = 3,
    epochs: int = 2,
    learning_rate: float = 1e-3,
    batch_size: int = 64,
    learn_rotation: bool = False,
    seed: int = 0,
) -> DistillResult:
    """Learns the PQ centroids (and optionally the OPQ rotation) of ``index`` from the flat ranking of ``vectors``.

    The index must already be built over ``vectors`` (row ``i`` is document ``i``). On return it holds the
    distilled centroids (and rotation) and every row re-encoded with them; the round whose KL on the distillation
    queries is lowest is kept (the index is left unchanged when no round improves on the start).

    Args:
        index: A built ``PQ<M>`` or ``OPQ<M>,PQ<M>`` index (8-bit codes) over ``vectors``.
        vectors: The flat bank (the teacher), ``(num_docs, dim)``.
        queries: Query embeddings ``(num_queries, dim)``: training queries and/or pseudo-queries (no labels).
        top_k: Flat top-``k`` documents per query in the distribution (the ranking that matters).
        num_random: Random documents added per query and epoch (the rest of the corpus).
        temperature: Softmax temperature of teacher and student scores.
        rounds: Alternations of (centroid steps, re-encoding of the bank).
        epochs: Passes over the queries per round.
        learning_rate: Adam learning rate of the centroids (and rotation).
        batch_size: Queries per step.
        learn_rotation: Also learn an orthogonal correction of the OPQ rotation.
        seed: Seed of the query order and random documents.

    Returns:
        A :class:`DistillResult` (KL and flat-top-10 overlap before and after).

    Raises:
        ConfigError: The index is not a flat ``PQ``/``OPQ,PQ`` index with 8-bit codes, or a setting is invalid.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> docs = rng.standard_normal((2000, 16)).astype("float32")
        >>> queries = docs[:300] + 0.1 * rng.standard_normal((300, 16)).astype("float32")
        >>> index = QuantizedIndex(16, "OPQ4,PQ4"); index.build(docs)
        >>> result = distill_quantizer(index, docs, queries, top_k=20, num_random=20, rounds=2)
        >>> result.kl_after <= result.kl_before
        True
    """
    if top_k < 1 or num_random < 0 or rounds < 1 or epochs < 1 or batch_size < 1:
        raise ConfigError(
            f"quantizer distillation needs top_k >= 1, num_random >= 0, rounds >= 1, epochs >= 1 and batch_size >= 1; "
            f"got {top_k}, {num_random}, {rounds}, {epochs}, {batch_size}."
        )
    if temperature <= 0 or learning_rate <= 0:
        raise ConfigError(f"quantizer distillation needs temperature > 0 and learning_rate > 0, got {temperature}, {learning_rate}.")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if index.ntotal != len(vectors):
        raise ConfigError(f"the index holds {index.ntotal} vectors but the bank has {len(vectors)}; build it first.")
    if len(queries) == 0:
        raise ConfigError("quantizer distillation got no queries; pass training queries and/or pseudo-queries.")
    codebooks = TrainableCodebooks(index)  # ConfigError for unsupported indexes
    student = _Student(codebooks, learn_rotation)
    generator = torch.Generator().manual_seed(seed)
    num_docs = len(vectors)
    top = torch.from_numpy(_flat_topk(vectors, queries, top_k, index.faiss).astype(np.int64))
    bank = torch.from_numpy(vectors)
    query_tensor = torch.from_numpy(queries)

    def candidates(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        rows = top[batch]
        if num_random:
            rows = torch.cat([rows, torch.randint(num_docs, (len(batch), num_random), generator=gen)], dim=1)
        return rows

    # A fixed evaluation sample (same random documents each time) to compare rounds.
    eval_rows = candidates(torch.arange(len(queries)), torch.Generator().manual_seed(seed + 1))
    eval_teacher = torch.einsum("bd,bcd->bc", query_tensor, bank[eval_rows])

    @torch.no_grad()
    def measure() -> float:
        total = 0.0
        for start in range(0, len(queries), 512):
            part = slice(start, start + 512)
            student_scores = student.scores(query_tensor[part], eval_rows[part])
            total += float(_kl(eval_teacher[part], student_scores, temperature)) * len(eval_rows[part])
        return total / len(queries)

    def snapshot() -> tuple[np.ndarray, np.ndarray | None]:
        rotation = student.rotation().detach().numpy().copy() if codebooks.has_rotation else None
        return codebooks.centroids.detach().numpy().copy(), rotation

    def install(state: tuple[np.ndarray, np.ndarray | None]) -> None:
        with torch.no_grad():
            codebooks.centroids.copy_(torch.from_numpy(state[0]))
            if state[1] is not None:
                _write_rotation(index, state[1])
                codebooks.rotation = torch.from_numpy(state[1].copy())
            student.skew.zero_()
        codebooks.write_back()
        index.refresh(vectors, mode="reencode")  # nearest-centroid codes under the new centroids / rotation
        if state[1] is not None and index.shortlist is not None:
            index.replace(index.index)  # the shortlist's coarse lists live in the rotated space: rebuild them
        codebooks.sync()

    overlap_before = ranking_agreement(index, vectors, queries)
    best_kl = kl_before = measure()
    best_state, best_round = snapshot(), 0
    for round_number in range(1, rounds + 1):
        params = [codebooks.centroids] + ([student.skew] if student.learn_rotation else [])
        optimizer = torch.optim.Adam(params, lr=learning_rate)
        for _ in range(epochs):
            order = torch.randperm(len(queries), generator=generator)
            for start in range(0, len(queries), batch_size):
                batch = order[start : start + batch_size]
                rows = candidates(batch, generator)
                with torch.no_grad():
                    teacher = torch.einsum("bd,bcd->bc", query_tensor[batch], bank[rows])
                loss = _kl(teacher, student.scores(query_tensor[batch], rows), temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        install(snapshot())
        kl = measure()
        logger.info("quantizer distillation round %d/%d: KL %.4f (start %.4f)", round_number, rounds, kl, kl_before)
        if kl < best_kl:
            best_kl, best_state, best_round = kl, snapshot(), round_number
    if best_round != rounds:
        install(best_state)
    return DistillResult(
        queries=len(queries),
        rounds=rounds,
        kl_before=kl_before,
        kl_after=best_kl,
        overlap_before=overlap_before,
        overlap_after=ranking_agreement(index, vectors, queries),
        best_round=best_round,
    )


def distillation_queries(
    model: torch.nn.Module,
    source: str,
    train_queries: Sequence[str],
    corpus: Mapping[str, Mapping[str, str]],
    doc_ids: Sequence[str],
    batch_size: int = 64,
) -> np.ndarray:
    """Embeddings of the distillation queries, encoded by the query encoder ``model``.

    Args:
        model: The query encoder.
        source: ``"train"`` (``train_queries``), ``"pseudo"`` (:func:`pseudo_query_texts` of the corpus) or
            ``"both"``.
        train_queries: The training queries' texts (their labels are not used).
        corpus: Document id to ``{"title", "text"}``.
        doc_ids: The bank's documents, in row order.
        batch_size: Encoding batch size.

    Example:
        >>> queries = distillation_queries(model, "both", list(train.queries.values()), train.corpus,
        ...                                train.doc_ids)  # doctest: +SKIP
    """
    from .encoder import encode_texts

    if source not in DISTILL_QUERY_SOURCES:
        raise ConfigError(f"distill_queries must be one of {', '.join(DISTILL_QUERY_SOURCES)}, got {source!r}.")
    texts = list(train_queries) if source in ("train", "both") else []
    if source in ("pseudo", "both"):
        texts += pseudo_query_texts(corpus, doc_ids)
    return encode_texts(model, texts, batch_size=batch_size, desc="Encoding distillation queries", role="query")


def distill_from_args(
    index: QuantizedIndex,
    vectors: np.ndarray,
    queries: np.ndarray,
    args: Any,
) -> DistillResult:
    """:func:`distill_quantizer` with the ``distill_*`` options of :class:`~hf_qret.config.QRetTrainingArguments`."""
    return distill_quantizer(
        index,
        vectors,
        queries,
        top_k=args.distill_top_k,
        temperature=args.distill_temperature,
        rounds=args.distill_rounds,
        epochs=args.distill_epochs,
        learning_rate=args.distill_learning_rate,
        learn_rotation=args.distill_rotation,
        seed=args.seed,
    )
