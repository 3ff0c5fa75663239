"""The target bank: the trainable document rows (``TargetBank``), how they are stored (fp32/bf16/fp16,
memory-mapped files, chunked I/O) and their pretrained values (``InitialRows``).

Bottom layer with :mod:`hf_qret.index.core`: imports neither training, hub nor evaluation.
"""
