"""Training: ``QRetTrainer`` and what it is built from (losses, collator, callbacks, checkpoints, row
optimizers, distributed helpers, the sentence-transformers drop-in, corpus encoding).

Nothing in serving, bank or index imports this layer.
"""
