"""Evaluation modules for Hugging Face ``evaluate``, shipped inside the package so they load offline.

``IR_RETRIEVAL_PATH`` is the folder of the ``ir_retrieval`` metric; ``evaluate.load(IR_RETRIEVAL_PATH)`` loads it
without the Hub (see :func:`hf_qret.evaluation.ir_metric.load_ir_metric`).
"""

from pathlib import Path

__all__ = ["IR_RETRIEVAL_PATH"]

#: Folder of the ``ir_retrieval`` evaluate metric (``ir_retrieval/ir_retrieval.py``).
IR_RETRIEVAL_PATH = str(Path(__file__).resolve().parent / "ir_retrieval")
