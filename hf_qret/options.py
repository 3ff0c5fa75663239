"""The values the configuration's options take, and the checks of those that need no library: the bottom layer,
below :mod:`hf_qret.config` and the modules it configures (bank, index, serving), which all import them from here.

Example:
    >>> from hf_qret.options import REFRESH_MODES
    >>> REFRESH_MODES
    ('reencode', 'retrain', 'incremental')
"""

from __future__ import annotations

from .errors import ConfigError

__all__ = ["BANK_DTYPE_NAMES", "ENCODE_PRECISIONS", "POOLINGS", "REFRESH_MODES", "check_index_options"]

#: Storage dtypes of the bank (``bank_dtype``), by their config name.
BANK_DTYPE_NAMES = ("fp32", "bf16", "fp16")
#: Precisions the encoder runs in: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (bf16 where the hardware computes
#: it natively, see :func:`hf_qret.serving.encoder.encode_autocast_dtype`).
ENCODE_PRECISIONS = ("auto", "fp32", "bf16")
#: Poolings of a plain transformers encoder (``pooling``).
POOLINGS = ("mean", "cls")
#: ``"reencode"`` keeps the trained codebooks and re-encodes every bank row; ``"retrain"`` also retrains them;
#: ``"incremental"`` re-encodes, in place, only the rows changed since the last refresh.
REFRESH_MODES = ("reencode", "retrain", "incremental")


def check_index_options(
    opq_niter: int | None, mining_nlist: int, mining_nprobe: int, rq_beam_size: int | None = None
) -> None:
    """Raises :class:`ConfigError` for an OPQ iteration count, mining-shortlist setting or residual-quantizer beam
    that cannot work.

    Example:
        >>> check_index_options(opq_niter=None, mining_nlist=0, mining_nprobe=16)  # the defaults: fine
        >>> check_index_options(opq_niter=0, mining_nlist=0, mining_nprobe=16)
        Traceback (most recent call last):
        ...
        hf_qret.errors.ConfigError: opq_niter must be at least 1 (FAISS's default is 50), got 0.
    """
    if opq_niter is not None and int(opq_niter) < 1:
        raise ConfigError(f"opq_niter must be at least 1 (FAISS's default is 50), got {opq_niter}.")
    if int(mining_nlist) < 0 or int(mining_nprobe) < 1:
        raise ConfigError(
            f"mining_nlist must be >= 0 (0: no shortlist) and mining_nprobe >= 1, got {mining_nlist} and "
            f"{mining_nprobe}."
        )
    if rq_beam_size is not None and int(rq_beam_size) < 1:
        raise ConfigError(f"rq_beam_size must be at least 1 (FAISS's default is 5), got {rq_beam_size}.")
