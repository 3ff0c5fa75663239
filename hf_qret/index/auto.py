"""The default index, chosen from the corpus size: ``index_factory="auto"``.

Below :data:`AUTO_SWITCH_ROWS` rows the measured-best 16-byte index for small corpora, ``RQ16x8`` (a residual
quantizer: the best 16-byte nDCG@10 on SciFact and NFCorpus, ``benchmarks/results/ablation.md``). Its search decodes
every code, so its queries/s fall as ``1 / rows``; from :data:`AUTO_SWITCH_ROWS` rows on, an inverted-file product
quantizer behind an OPQ rotation, ``OPQ16,IVF<nlist>,PQ16`` searched with ``nprobe=16``, which visits 16 of the
``nlist`` lists instead. The switch point is below the size where ``RQ16x8`` (served with the decoded cosine) stops
serving :data:`SERVING_TARGET_QPS` queries/s at k = 10 on a 2-core AMD EPYC (``benchmarks/switch_point.py``, real
SciFact rows plus the haystack's distractors; ``benchmarks/results/switch_point.json``).

The choice is resolved once, when the number of bank rows is known (the recipe, ``QRetTrainer``), logged once and
recorded in ``qret_config.json`` (``index_choice``) and the model card. An explicit ``index_factory`` is always kept.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "AUTO",
    "AUTO_SWITCH_ROWS",
    "LARGE_FACTORY",
    "SERVING_TARGET_QPS",
    "IndexChoice",
    "choose_index",
    "resolve_auto_index",
]

logger = logging.getLogger("hf_qret")

#: The ``index_factory`` value that asks for :func:`choose_index`.
AUTO = "auto"
#: Serving speed the default index must keep at k = 10 on 2 CPU cores (the goal of the million-document haystack).
SERVING_TARGET_QPS = 1000
#: Bank rows from which ``auto`` serves ``OPQ16,IVF<nlist>,PQ16`` instead of ``RQ16x8``: below where ``RQ16x8``'s
#: serving speed with the decoded cosine (k = 10, real SciFact rows plus haystack distractors, 2-core AMD EPYC)
#: crosses :data:`SERVING_TARGET_QPS`: 46,860 rows on 1 thread, 48,388 on both
#: (``benchmarks/results/switch_point.json``, docs/scale.md "The default index").
AUTO_SWITCH_ROWS = 45_000
#: The small-corpus and the large-corpus index.
SMALL_FACTORY = "RQ16x8"
LARGE_FACTORY = "OPQ16,IVF{nlist},PQ16"
LARGE_NPROBE = 16


@dataclass(frozen=True)
class IndexChoice:
    """What ``index_factory="auto"`` resolved to, and why (recorded in ``qret_config.json`` as ``index_choice``).

    Attributes:
        factory: The FAISS factory string.
        search_params: Its runtime parameters (``"nprobe=16"``), or ``None``.
        rows: The bank rows the choice was made for.
        switch_rows: :data:`AUTO_SWITCH_ROWS`.
        faiss_gpu: Whether FAISS saw a GPU.
        reason: One sentence for the log and the model card.

    Example:
        >>> choose_index(5183).factory
        'RQ16x8'
    """

    factory: str
    search_params: str | None
    rows: int
    switch_rows: int
    faiss_gpu: bool
    reason: str

    def record(self) -> dict[str, Any]:
        """The JSON record of the choice.

        Example:
            >>> choose_index(5183).record()["requested"]
            'auto'
        """
        return {"requested": AUTO, **asdict(self)}


def ivf_lists(rows: int) -> int:
    """Inverted lists of the large-corpus index: the power of two nearest ``sqrt(rows)``, between 256 and 4,096
    (1,024 at a million rows, the size measured in ``benchmarks/results/index_scale_1m.md``).

    Example:
        >>> ivf_lists(100_000), ivf_lists(1_000_000), ivf_lists(10_000_000)
        (256, 1024, 4096)
    """
    return int(min(4096, max(256, 2 ** round(math.log2(math.sqrt(max(rows, 1)))))))


def faiss_sees_gpu() -> bool:
    """Whether the installed FAISS has a GPU to use (``faiss.get_num_gpus() > 0``; always ``False`` for faiss-cpu).

    Example:
        >>> isinstance(faiss_sees_gpu(), bool)
        True
    """
    from .faiss_ops import import_faiss

    faiss = import_faiss()
    return bool(getattr(faiss, "get_num_gpus", lambda: 0)() > 0)


def choose_index(rows: int, gpu: bool = False) -> IndexChoice:
    """The default index for a bank of ``rows`` rows.

    ``gpu`` does not move the switch point: ``RQ16x8`` has no FAISS GPU implementation (it is searched on the CPU
    either way, and the artifact is served where it is loaded), and ``OPQ16,IVF,PQ16`` runs on both. It is recorded.

    Example:
        >>> choose_index(5183).factory, choose_index(1_000_000).factory, choose_index(1_000_000).search_params
        ('RQ16x8', 'OPQ16,IVF1024,PQ16', 'nprobe=16')
    """
    rows = int(rows)
    if rows < AUTO_SWITCH_ROWS:
        reason = (
            f"{rows:,} rows < {AUTO_SWITCH_ROWS:,}: {SMALL_FACTORY}, the best measured 16-byte index for small "
            f"corpora (it serves >= {SERVING_TARGET_QPS:,} queries/s below that size on 2 CPU cores)"
        )
        return IndexChoice(SMALL_FACTORY, None, rows, AUTO_SWITCH_ROWS, gpu, reason)
    factory = LARGE_FACTORY.format(nlist=ivf_lists(rows))
    reason = (
        f"{rows:,} rows >= {AUTO_SWITCH_ROWS:,}: {factory} with nprobe={LARGE_NPROBE} ({SMALL_FACTORY} decodes every "
        f"code per query and falls below {SERVING_TARGET_QPS:,} queries/s at this size on 2 CPU cores)"
    )
    return IndexChoice(factory, f"nprobe={LARGE_NPROBE}", rows, AUTO_SWITCH_ROWS, gpu, reason)


def resolve_auto_index(args: Any, rows: int) -> IndexChoice | None:
    """Resolves ``args.index_factory == "auto"`` in place for a bank of ``rows`` rows (``args``: the training
    arguments), logs the choice once and keeps it in ``args.index_choice``; an explicit factory is left alone
    (returns ``None``). ``index_search_params`` given with ``auto`` are kept.

    Example:
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(index_factory="auto", index_search_params=None)
        >>> resolve_auto_index(args, 2_000_000).factory, args.index_factory, args.index_search_params
        ('OPQ16,IVF1024,PQ16', 'OPQ16,IVF1024,PQ16', 'nprobe=16')
    """
    if str(getattr(args, "index_factory", "")).lower() != AUTO:
        return None
    choice = choose_index(rows, gpu=faiss_sees_gpu())
    args.index_factory = choice.factory
    if not getattr(args, "index_search_params", None):
        args.index_search_params = choice.search_params
    args.index_choice = choice
    logger.info("index_factory auto: %s", choice.reason)
    return choice
