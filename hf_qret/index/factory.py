"""What a FAISS factory string needs to be trained, checked before FAISS trains: some samples too small for a
factory do not raise, they kill the process inside FAISS's k-means (SIGABRT, ``invalid cluster assignment``, or
SIGSEGV), where Python cannot catch it. :func:`fit_factory` adapts the factory (with the reason, for the log) or
raises a :class:`~hf_qret.errors.ConfigError` naming what would work.
"""

from __future__ import annotations

import math
import re

from ..errors import ConfigError
from ..options import check_index_options

__all__ = ["fit_factory", "check_index_options", "OPQ_MIN_ROWS"]

#: Fewest training rows for an ``OPQ`` stage. Its rotation is trained with an internal 8-bit PQ (256 centroids per
#: sub-quantizer, whatever the factory's PQ) whose hot-started k-means kills the process (SIGABRT / SIGSEGV inside
#: FAISS, ``invalid cluster assignment``) on small samples: measured with faiss 1.15.1 on all-MiniLM-L6-v2 rows,
#: 256-351 rows abort, 400-1,024 rows (three random samples each) train. Below this many rows the OPQ stage is
#: dropped (same code size), with a logged reason.
OPQ_MIN_ROWS = 512
#: A product (PQ), residual (RQ) or local-search (LSQ) quantizer stage: kind, M, nbits (default 8), suffix.
_QUANTIZER_PART = re.compile(r"(PQ|RQ|LSQ)(\d+)(?:x(\d+))?([_A-Za-z0-9]*)")
_OPQ_PART = re.compile(r"OPQ\d+(?:_\d+)?")
_IVF_PART = re.compile(r"IVF(\d+)")


def fit_factory(factory: str, num_rows: int) -> tuple[str, str]:
    """The factory string FAISS can train on ``num_rows`` rows, and why it differs from ``factory`` (``""``: it
    does not). Checked before every training (FAISS cannot be stopped safely once it aborts).

    * an ``OPQ`` stage needs :data:`OPQ_MIN_ROWS` rows; below that it is dropped (``OPQ16,PQ16`` → ``PQ16``: the
      same bytes per vector);
    * a ``PQ<M>x<nbits>`` stage (``nbits`` 8 by default) needs ``2**nbits`` rows (one per centroid); below that it
      gets the most bits the rows allow (200 rows: ``PQ16`` → ``PQ16x7``, 2 bytes less per vector);
    * a residual / local-search quantizer (``RQ<M>x<nbits>``, ``LSQ<M>x<nbits>``) likewise needs ``2**nbits``
      rows; below that it gets the most bits the rows allow;
    * an ``IVF<nlist>`` stage needs ``nlist`` rows; below that it is an error (choose fewer lists).

    Raises:
        ConfigError: nothing close to ``factory`` trains on ``num_rows`` rows.

    Example:
        >>> fit_factory("OPQ16,PQ16", 351)[0]
        'PQ16'
        >>> fit_factory("IVF16,PQ16", 200)[0]
        'IVF16,PQ16x7'
        >>> fit_factory("RQ16x8", 100)[0]
        'RQ16x6'
        >>> fit_factory("OPQ16,PQ16", 5183)
        ('OPQ16,PQ16', '')
    """
    num_rows = int(num_rows)
    parts, reasons = [], []
    for part in factory.split(","):
        name = part.strip()
        if _OPQ_PART.fullmatch(name) and num_rows < OPQ_MIN_ROWS:
            reasons.append(
                f"{name} rotation training needs at least {OPQ_MIN_ROWS} rows (FAISS aborts the process on fewer), "
                "so the index has no OPQ stage"
            )
            continue
        quantizer = _QUANTIZER_PART.fullmatch(name)
        if quantizer is not None:
            kind, count, suffix = quantizer.group(1), quantizer.group(2), quantizer.group(4)
            nbits = int(quantizer.group(3) or 8)
            if num_rows < 2**nbits:
                bits = int(math.floor(math.log2(max(num_rows, 1))))
                if "fs" in suffix or bits < 1:
                    raise ConfigError(
                        f"--index_factory {factory!r} cannot be trained on {num_rows} rows: its {name} stage needs "
                        f"{2**nbits} (one per centroid); use a factory without it (e.g. 'Flat' or 'SQ8') or a "
                        "larger corpus."
                    )
                name = f"{kind}{count}x{bits}{suffix}"
                parts_of = "sub-quantizers" if kind == "PQ" else "codebooks"
                reasons.append(
                    f"{part.strip()} needs {2**nbits} rows (one per centroid of its {nbits}-bit {parts_of}), so "
                    f"it is {name} ({bits} bits each)"
                )
        ivf = _IVF_PART.match(name)
        if ivf is not None and num_rows < int(ivf.group(1)):
            nlist = max(1, num_rows // 39)
            raise ConfigError(
                f"--index_factory {factory!r} cannot be trained on {num_rows} rows: IVF{ivf.group(1)} needs at "
                f"least {ivf.group(1)} rows (one per list, FAISS recommends 39); use e.g. "
                f"{factory.replace(ivf.group(0), f'IVF{nlist}', 1)!r} or a flat 'PQ'/'OPQ,PQ' index."
            )
        parts.append(name)
    fitted = ",".join(parts)
    return fitted, "; ".join(reasons)
