"""Retrieval data in the BEIR layout: loading, validation, dev-split carving and training pairs.

A BEIR folder holds ``corpus.jsonl`` (``{"_id", "title", "text"}``), ``queries.jsonl`` (``{"_id", "text"}``) and
``qrels/<split>.tsv`` (``query-id<TAB>corpus-id<TAB>score`` with a header row). Each file may also be gzip-compressed
(``corpus.jsonl.gz``).

Training data in sentence-transformers' text-pair convention lives in :mod:`hf_qret.text_pairs` (``TextColumns``,
``text_columns``, ``pairs_from_texts``, ``texts_of``), re-exported here.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .text_pairs import TextColumns, pairs_from_texts, text_columns, texts_of

__all__ = [
    "BeirData",
    "load_beir",
    "load_qrels",
    "doc_text",
    "carve_dev_split",
    "build_pairs_dataset",
    "write_qrels",
    "TextColumns",
    "text_columns",
    "pairs_from_texts",
    "texts_of",
]


@dataclass
class BeirData:
    """A retrieval data set: a corpus, queries and relevance judgements (qrels) of one split.

    Attributes:
        corpus: Document id to ``{"title": str, "text": str}``, in file order.
        queries: Query id to query text (only the queries that have qrels in ``split``).
        qrels: Query id to ``{document id: relevance}``.
        split: The name of the qrels split.
        path: The folder the data was read from.

    Example:
        >>> BeirData({"d1": {"title": "Cats", "text": "purr."}}, {"q1": "do cats purr?"}, {"q1": {"d1": 1}}).doc_texts()
        ['Cats purr.']
    """

    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    split: str = "test"
    path: str = ""
    doc_ids: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.doc_ids = list(self.corpus)

    def doc_texts(self) -> list[str]:
        """The texts to encode, one per document, in ``doc_ids`` order."""
        return [doc_text(self.corpus[d]) for d in self.doc_ids]


def doc_text(doc: dict[str, str]) -> str:
    """Joins a BEIR document's title and text with a space, the convention of BEIR's dense-retrieval models.

    Example:
        >>> doc_text({"title": "Cats", "text": "Cats purr."}), doc_text({"title": "", "text": "No title."})
        ('Cats Cats purr.', 'No title.')
    """
    return f"{doc.get('title') or ''} {doc.get('text') or ''}".strip()


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        with _open_text(path) as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{line_no}: malformed JSON ({exc.msg}); fix or remove that line.") from None
                if not isinstance(record, dict) or "_id" not in record:
                    raise DataError(f'{path}:{line_no}: each line must be a JSON object with an "_id" field.')
                yield line_no, record
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); check that the file is complete and UTF-8 text.") from None


def _load_corpus(path: Path) -> dict[str, dict[str, str]]:
    corpus: dict[str, dict[str, str]] = {}
    for line_no, record in _read_jsonl(path):
        doc_id = str(record["_id"])
        if doc_id in corpus:
            raise DataError(f"{path}:{line_no}: duplicate corpus id {doc_id!r}; every document needs a unique _id.")
        corpus[doc_id] = {"title": str(record.get("title") or ""), "text": str(record.get("text") or "")}
    if not corpus:
        raise DataError(f"{path}: the corpus is empty; it needs one JSON object per document.")
    return corpus


def _load_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for line_no, record in _read_jsonl(path):
        query_id = str(record["_id"])
        if query_id in queries:
            raise DataError(f"{path}:{line_no}: duplicate query id {query_id!r}; every query needs a unique _id.")
        text = str(record.get("text") or "").strip()
        if not text:
            raise DataError(f"{path}:{line_no}: query {query_id!r} has an empty text; give it a text or remove it.")
        queries[query_id] = text
    if not queries:
        raise DataError(f"{path}: there are no queries; it needs one JSON object per query.")
    return queries


def load_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Reads a BEIR qrels TSV (``query-id, corpus-id, score`` with a header row).

    Args:
        path: The ``.tsv`` (or ``.tsv.gz``) file.

    Returns:
        Query id to ``{document id: relevance}``.

    Example:
        >>> qrels = load_qrels("recipes/data/scifact/qrels/dev.tsv")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such qrels file; pass the qrels/<split>.tsv of a BEIR folder.")
    qrels: dict[str, dict[str, int]] = {}
    with _open_text(path) as handle:
        for line_no, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row or not "".join(row).strip():
                continue
            if line_no == 1 and not row[-1].strip().lstrip("-").isdigit():
                continue  # header
            if len(row) < 3:
                raise DataError(f"{path}:{line_no}: expected 'query-id<TAB>corpus-id<TAB>score', got {row!r}.")
            try:
                score = int(float(row[2]))
            except ValueError:
                raise DataError(f"{path}:{line_no}: the score {row[2]!r} is not a number.") from None
            qrels.setdefault(row[0].strip(), {})[row[1].strip()] = score
    if not qrels:
        raise DataError(f"{path}: the qrels file is empty; it needs one 'query-id, corpus-id, score' row per pair.")
    return qrels


def write_qrels(qrels: dict[str, dict[str, int]], path: str | os.PathLike) -> None:
    """Writes qrels in the BEIR TSV layout (with header), atomically.

    Example:
        >>> import pathlib, tempfile; path = pathlib.Path(tempfile.mkdtemp(), "qrels", "dev.tsv")
        >>> write_qrels({"q1": {"d1": 1, "d2": 2}}, path)
        >>> load_qrels(path)
        {'q1': {'d1': 1, 'd2': 2}}
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for query_id, docs in qrels.items():
            for doc_id, score in docs.items():
                handle.write(f"{query_id}\t{doc_id}\t{score}\n")
    os.replace(tmp, path)


def _resolve_folder(path_or_repo: str | os.PathLike, revision: str | None) -> Path:
    folder = Path(path_or_repo).expanduser()
    if folder.is_dir():
        return folder
    text = str(path_or_repo)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not os.path.exists(text)
    if looks_like_repo and not os.environ.get("HF_HUB_OFFLINE"):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

        try:
            return Path(
                snapshot_download(
                    text,
                    repo_type="dataset",
                    revision=revision,
                    allow_patterns=["*.jsonl", "*.jsonl.gz", "qrels/*", "*.md"],
                )
            )
        except (RepositoryNotFoundError, HfHubHTTPError, OSError) as exc:
            raise DataError(
                f"{text}: not a local folder and not a downloadable Hub dataset ({exc.__class__.__name__}); "
                "pass a BEIR folder with corpus.jsonl, queries.jsonl and qrels/."
            ) from None
    raise DataError(f"{text}: no such data folder; pass a BEIR folder with corpus.jsonl, queries.jsonl and qrels/.")


def load_beir(
    path_or_repo: str | os.PathLike,
    split: str = "test",
    revision: str | None = None,
    extra_doc_ids: Collection[str] = (),
) -> BeirData:
    """Loads and validates a BEIR-layout data set from a local folder or a Hub dataset repository.

    Validation happens before anything heavy: missing files, malformed JSON lines (file and line), duplicate ids,
    empty queries and qrels that name documents or queries that do not exist are each reported in one message.

    Args:
        path_or_repo: A local folder, or a Hub dataset id (``"user/name"``) laid out the same way.
        split: Which ``qrels/<split>.tsv`` to read.
        revision: Hub revision when ``path_or_repo`` is a repository id.
        extra_doc_ids: Ids of documents without a text (rows from precomputed embeddings) that qrels may name too.

    Returns:
        The corpus, the queries that have judgements in ``split`` and those judgements.

    Raises:
        DataError: The folder or one of its files is missing, malformed or inconsistent.

    Example:
        >>> data = load_beir("recipes/data/scifact", split="dev")  # doctest: +SKIP
        >>> len(data.corpus), len(data.queries)  # doctest: +SKIP
        (5183, 162)
    """
    folder = _resolve_folder(path_or_repo, revision)
    corpus_path = _find(folder, "corpus.jsonl")
    queries_path = _find(folder, "queries.jsonl")
    qrels_path = _find(folder / "qrels", f"{split}.tsv")
    for name, found in (("corpus.jsonl", corpus_path), ("queries.jsonl", queries_path)):
        if found is None:
            raise DataError(f"{folder}: no {name} (or {name}.gz); a BEIR folder needs corpus, queries and qrels/.")
    if qrels_path is None:
        available = (
            sorted(p.name.split(".")[0] for p in (folder / "qrels").glob("*.tsv*"))
            if (folder / "qrels").is_dir()
            else []
        )
        raise DataError(
            f"{folder}: no qrels/{split}.tsv; available splits: {', '.join(available) or 'none'}. "
            "Pick one of them or add the file."
        )
    corpus = _load_corpus(corpus_path)
    all_queries = _load_queries(queries_path)
    qrels = load_qrels(qrels_path)
    missing_queries = [q for q in qrels if q not in all_queries]
    if missing_queries:
        raise DataError(
            f"{qrels_path}: {len(missing_queries)} query id(s) are not in {queries_path.name} "
            f"(first: {missing_queries[0]!r}); fix the qrels or add the queries."
        )
    extra = set(extra_doc_ids)
    missing_docs = sorted({d for docs in qrels.values() for d in docs if d not in corpus and d not in extra})
    if missing_docs:
        raise DataError(
            f"{qrels_path}: {len(missing_docs)} document id(s) are not in {corpus_path.name} "
            f"(first: {missing_docs[0]!r}); fix the qrels or add the documents."
        )
    queries = {q: all_queries[q] for q in qrels}
    return BeirData(corpus=corpus, queries=queries, qrels=qrels, split=split, path=str(folder))


def carve_dev_split(
    qrels: dict[str, dict[str, int]], dev_fraction: float = 0.2, seed: int = 13
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Splits qrels by query into a training part and a held-out dev part.

    Args:
        qrels: Query id to ``{document id: relevance}``.
        dev_fraction: Share of queries that go to the dev part.
        seed: Seed of the shuffle, so the split is reproducible.

    Returns:
        ``(train_qrels, dev_qrels)``, disjoint in queries.

    Example:
        >>> [len(part) for part in carve_dev_split({f"q{i}": {"d1": 1} for i in range(10)}, dev_fraction=0.2)]
        [8, 2]
    """
    if not 0.0 < dev_fraction < 1.0:
        raise DataError(f"dev_fraction must lie strictly between 0 and 1, got {dev_fraction}.")
    query_ids = sorted(qrels)
    random.Random(seed).shuffle(query_ids)
    n_dev = max(1, round(len(query_ids) * dev_fraction))
    dev = set(query_ids[:n_dev])
    return ({q: qrels[q] for q in qrels if q not in dev}, {q: qrels[q] for q in qrels if q in dev})


def build_pairs_dataset(data: BeirData, min_relevance: int = 1):
    """Builds the training pairs: one row per (query, relevant document).

    A query's other positives are its other rows: the trainer's collator masks them instead of treating them as
    negatives (:func:`~hf_qret.training.collator.positives_by_query` groups the rows by ``query_id``). The rows do
    not list them again: a ``positive_ids`` list per row would hold the sum over queries of (positives)^2 ids,
    quadratic in the positives of a query (NFCorpus train: 30.7M ids for 110,575 pairs, about 2 GB while the table
    is built and 0.4 GB after).

    Args:
        data: The loaded split.
        min_relevance: Smallest qrels score that counts as relevant.

    Returns:
        A :class:`datasets.Dataset` with columns ``query_id``, ``query`` and ``positive_id``.

    Example:
        >>> build_pairs_dataset(BeirData({"d1": {"text": "a"}}, {"q1": "a query"}, {"q1": {"d1": 1}}))[0]
        {'query_id': 'q1', 'query': 'a query', 'positive_id': 'd1'}
    """
    from datasets import Dataset

    rows: dict[str, list] = {"query_id": [], "query": [], "positive_id": []}
    for query_id, docs in data.qrels.items():
        for doc_id, score in docs.items():
            if score >= min_relevance:
                rows["query_id"].append(query_id)
                rows["query"].append(data.queries[query_id])
                rows["positive_id"].append(doc_id)
    if not rows["query"]:
        raise DataError(
            f"{data.path}: split {data.split!r} has no relevant (score >= {min_relevance}) pairs to train on."
        )
    return Dataset.from_dict(rows)
