"""sentence-transformers evaluators, scored the way the artifact is served.

An ``InformationRetrievalEvaluator`` encodes its corpus with the model it evaluates; an hf-qret artifact serves the
trained *bank* through the *quantized index*, so that number would measure a system nobody deploys. Passed to
:class:`~hf_qret.training.trainer.QRetTrainer` as ``evaluator``, one (or a ``SequentialEvaluator`` of them) becomes a
:class:`~hf_qret.evaluation.evaluator.RetrievalEvaluator` over the bank: its queries are encoded with the model, its corpus ids
are mapped to bank rows (by id, else by text) and its metrics are reported for the flat bank and the quantized index,
named after the evaluator (``eval_dev_quantized_ndcg@10``, ``eval_dev_flat_mrr@10``...).

Its queries are encoded with the model's query prompt, the one training and the retriever use; an evaluator whose
explicit ``query_prompt`` / ``query_prompt_name`` (or corpus prompt) names another text is refused
(:func:`check_prompts`) rather than scored on a query encoding nobody serves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..evaluation.evaluator import RetrievalEvaluator
from ..serving.embedding import model_prompts, prompt_for

__all__ = ["EvaluatorGroup", "check_evaluator", "check_prompts", "evaluator_documents", "adapt_evaluator"]

#: Maps an evaluator document (id, text or ``None``) to its bank id, ``None`` when the bank does not hold it.
Resolver = Callable[[str, "str | None"], "str | None"]


def _ir_class() -> type | None:
    try:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:  # pragma: no cover - older sentence-transformers layouts
        try:
            from sentence_transformers.evaluation import InformationRetrievalEvaluator
        except ImportError:
            return None
    return InformationRetrievalEvaluator


def _sequential_class() -> type | None:
    try:
        from sentence_transformers.base.evaluation.sequential import SequentialEvaluator
    except ImportError:  # pragma: no cover
        try:
            from sentence_transformers.evaluation import SequentialEvaluator
        except ImportError:
            return None
    return SequentialEvaluator


def _is(evaluator: Any, cls: type | None) -> bool:
    return cls is not None and isinstance(evaluator, cls)


def _leaves(evaluator: Any) -> Iterator[Any]:
    if _is(evaluator, _sequential_class()):
        for child in evaluator.evaluators:
            yield from _leaves(child)
    else:
        yield evaluator


def check_evaluator(evaluator: Any) -> None:
    """Raises at construction, not at the first evaluation, for an evaluator the trainer cannot score.

    Accepted: :class:`~hf_qret.evaluation.evaluator.RetrievalEvaluator` (or anything with its call signature, as an
    :class:`EvaluatorGroup`), sentence-transformers' ``InformationRetrievalEvaluator``, and a ``SequentialEvaluator``
    of those.

    Raises:
        ConfigError: Another sentence-transformers evaluator (its metrics need the model to embed both sides), or an
            ``InformationRetrievalEvaluator`` with ``truncate_dim`` (the index holds full-dimension vectors).

    Example:
        >>> from sentence_transformers.evaluation import InformationRetrievalEvaluator
        >>> check_evaluator(InformationRetrievalEvaluator({"q1": "cats?"}, {"d1": "Cats purr."}, {"q1": {"d1"}}))  # accepted
        >>> check_evaluator(object())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hf_qret.errors.ConfigError: QRetTrainer cannot score a object: ...
    """
    if evaluator is None or isinstance(evaluator, (RetrievalEvaluator, EvaluatorGroup)):
        return
    ir_class = _ir_class()
    for leaf in _leaves(evaluator):
        if isinstance(leaf, (RetrievalEvaluator, EvaluatorGroup)):
            continue
        if not _is(leaf, ir_class):
            raise ConfigError(
                f"QRetTrainer cannot score a {type(leaf).__name__}: it evaluates retrieval through the bank and the "
                "quantized index, so it takes an InformationRetrievalEvaluator (or a SequentialEvaluator of them) or "
                "an hf_qret.RetrievalEvaluator; run other evaluators on the saved model yourself."
            )
        if getattr(leaf, "truncate_dim", None) is not None:
            raise ConfigError(
                f"InformationRetrievalEvaluator {leaf.name!r} has truncate_dim={leaf.truncate_dim}, but the index "
                "holds full-dimension vectors; drop truncate_dim."
            )


def evaluator_documents(evaluator: Any) -> dict[str, str]:
    """``{doc_id: text}`` of every ``InformationRetrievalEvaluator`` corpus inside ``evaluator`` (first text wins).

    Example:
        >>> from sentence_transformers.evaluation import InformationRetrievalEvaluator
        >>> evaluator_documents(InformationRetrievalEvaluator({"q1": "cats?"}, {"d1": "Cats purr."}, {"q1": {"d1"}}))
        {'d1': 'Cats purr.'}
    """
    docs: dict[str, str] = {}
    if evaluator is None:
        return docs
    ir_class = _ir_class()
    for leaf in _leaves(evaluator):
        if _is(leaf, ir_class):
            for doc_id, text in zip(leaf.corpus_ids, leaf.corpus):
                docs.setdefault(str(doc_id), str(text))
    return docs


class EvaluatorGroup:
    """Several retrieval evaluators run as one; their metrics are merged (a ``SequentialEvaluator``'s counterpart).

    Example:
        >>> group = EvaluatorGroup([RetrievalEvaluator(q1, r1, name="dev"), RetrievalEvaluator(q2, r2, name="test")])  # doctest: +SKIP
        >>> sorted(group(model, bank, index))[:2]  # doctest: +SKIP
        ['dev_flat_mrr@10', 'dev_flat_ndcg@10']
    """

    def __init__(self, evaluators: list[Any]) -> None:
        self.evaluators = list(evaluators)

    def __call__(self, model: nn.Module, bank: Any, index: Any, tokenizer: Any = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for evaluator in self.evaluators:
            out.update(evaluator(model, bank, index, tokenizer=tokenizer))
        return out


def _metrics_of(evaluator: Any) -> tuple[str, ...]:
    names: list[str] = []
    for base, attribute in (("ndcg", "ndcg_at_k"), ("mrr", "mrr_at_k"), ("map", "map_at_k")):
        names += [f"{base}@{k}" for k in getattr(evaluator, attribute, None) or []]
    for k in getattr(evaluator, "precision_recall_at_k", None) or []:
        names += [f"recall@{k}", f"precision@{k}"]
    return tuple(dict.fromkeys(names)) or ("ndcg@10", "recall@100", "mrr@10")


def _explicit_prompt(evaluator: Any, model: nn.Module | None, side: str) -> str | None:
    """The prompt an evaluator asks for explicitly (``{side}_prompt`` or ``{side}_prompt_name``), else ``None``."""
    prompt = getattr(evaluator, f"{side}_prompt", None)
    if prompt is not None:
        return str(prompt)
    name = getattr(evaluator, f"{side}_prompt_name", None)
    if not name:
        return None
    prompts, _ = model_prompts(model)
    if name not in prompts:
        raise ConfigError(
            f"InformationRetrievalEvaluator {evaluator.name!r} asks for the {side} prompt {name!r}, which the model "
            f"does not define (its prompts: {sorted(prompts)}); add it to model.prompts or pass {side}_prompt."
        )
    return prompts[name]


def check_prompts(evaluator: Any, model: nn.Module | None) -> None:
    """Refuses an ``InformationRetrievalEvaluator`` whose explicit query (or corpus) prompt differs from the one
    training uses (the model's query / document prompt, :func:`hf_qret.serving.embedding.prompt_for`).

    The trainer scores an evaluator with the queries encoded as they are trained and served, and its corpus as the
    bank's rows, which were encoded with the document prompt: a metric over another query encoding would measure a
    model nobody serves. An evaluator without explicit prompts uses the model's, as sentence-transformers' does
    (``encode_query`` / ``encode_document``).

    Raises:
        ConfigError: The prompts differ; the message names both.

    Example:
        >>> from sentence_transformers.evaluation import InformationRetrievalEvaluator
        >>> ir = InformationRetrievalEvaluator({"q1": "cats?"}, {"d1": "Cats purr."}, {"q1": {"d1"}}, query_prompt="query: ")
        >>> check_prompts(ir, None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hf_qret.errors.ConfigError: InformationRetrievalEvaluator '' encodes its queries with the query prompt 'query: ', but training encodes queries with '' ...
    """
    for side, role, what in (("query", "query", "queries"), ("corpus", "document", "documents")):
        asked = _explicit_prompt(evaluator, model, side)
        used = prompt_for(model, role) if model is not None else ""
        if asked is not None and asked != used:
            raise ConfigError(
                f"InformationRetrievalEvaluator {evaluator.name!r} encodes its {what} with the {side} prompt "
                f"{asked!r}, but training encodes {what} with {used!r} (the model's {role} prompt, "
                f"model.prompts={model_prompts(model)[0]!r}); the metric would score an encoding that is neither "
                f"trained nor served. Drop {side}_prompt / {side}_prompt_name from the evaluator, or set the model's "
                f"{role!r} prompt (model.prompts[{role!r}] = {asked!r}) before training."
            )


def _adapt_ir(evaluator: Any, resolve: Resolver, model: nn.Module | None) -> RetrievalEvaluator:
    texts = dict(zip((str(d) for d in evaluator.corpus_ids), (str(t) for t in evaluator.corpus)))
    mapped: dict[str, str] = {}
    missing: list[str] = []
    for doc_id, text in texts.items():
        found = resolve(doc_id, text)
        if found is None:
            missing.append(doc_id)
        else:
            mapped[doc_id] = found
    if missing:
        raise ConfigError(
            f"InformationRetrievalEvaluator {evaluator.name!r}: {len(missing)} of its {len(texts)} corpus documents "
            f"are not in the bank, by id or by text (first: {missing[0]!r}). Build the bank from them (pass "
            "corpus= and leave bank= out: the evaluator's documents are added) or add them to the bank you pass."
        )
    qrels: dict[str, dict[str, int]] = {}
    for query_id in evaluator.queries_ids:
        relevant = evaluator.relevant_docs.get(query_id) or ()
        docs = {}
        for doc_id in relevant:
            doc_id = str(doc_id)
            docs[mapped.get(doc_id) or resolve(doc_id, None) or doc_id] = 1
        qrels[str(query_id)] = docs
    check_prompts(evaluator, model)  # the queries are encoded with the model's query prompt, as trained
    queries = {str(q): str(text) for q, text in zip(evaluator.queries_ids, evaluator.queries)}
    cutoffs = [int(m.partition("@")[2]) for m in _metrics_of(evaluator)]
    return RetrievalEvaluator(
        queries,
        qrels,
        batch_size=int(getattr(evaluator, "batch_size", 64) or 64),
        k=max([100, *cutoffs]),
        metrics=_metrics_of(evaluator),
        name=str(evaluator.name or ""),
    )


def adapt_evaluator(evaluator: Any, resolve: Resolver, model: nn.Module | None = None) -> Any:
    """The trainer-side evaluator of ``evaluator`` (see the module docstring); hf-qret evaluators pass through.

    Args:
        evaluator: A :class:`~hf_qret.evaluation.evaluator.RetrievalEvaluator`, an ``InformationRetrievalEvaluator`` or a
            ``SequentialEvaluator`` of them.
        resolve: Maps an evaluator document (id, text) to its bank id; ``None`` when the bank lacks it.
        model: The model: its prompts are checked against the evaluator's (:func:`check_prompts`).

    Returns:
        A :class:`~hf_qret.evaluation.evaluator.RetrievalEvaluator` or an :class:`EvaluatorGroup` of them, called as
        ``evaluator(model, bank, index, tokenizer=...)``.

    Raises:
        ConfigError: An evaluator it cannot score (:func:`check_evaluator`) or corpus documents the bank lacks.

    Example:
        >>> ir = InformationRetrievalEvaluator(queries, corpus, relevant_docs, name="dev")  # doctest: +SKIP
        >>> adapt_evaluator(ir, lambda doc_id, text: doc_id if doc_id in bank_ids else None)  # doctest: +SKIP
    """
    check_evaluator(evaluator)
    if evaluator is None or isinstance(evaluator, (RetrievalEvaluator, EvaluatorGroup)):
        return evaluator
    if _is(evaluator, _sequential_class()):
        return EvaluatorGroup([adapt_evaluator(child, resolve, model) for child in evaluator.evaluators])
    return _adapt_ir(evaluator, resolve, model)


def bank_resolver(bank_ids: Mapping[str, Any] | Any, id_of_text: Callable[[str], str | None] | None) -> Resolver:
    """A :data:`Resolver` over a bank: by id when the bank holds it, else by text through ``id_of_text``.

    Example:
        >>> resolve = bank_resolver({"d1": 0, "d2": 1}, {"Cats purr.": "d2"}.get)
        >>> resolve("d1", None), resolve("other-id", "Cats purr."), resolve("other-id", "unknown text")
        ('d1', 'd2', None)
    """

    def resolve(doc_id: str, text: str | None) -> str | None:
        if doc_id in bank_ids:
            return doc_id
        if text is not None and id_of_text is not None:
            return id_of_text(text)
        return None

    return resolve
