"""The Hugging Face Hub: pushing artifacts and checkpoints (:mod:`.push`), the training callback (:mod:`.callback`),
the ``hf-qret push`` / ``card`` commands (:mod:`.cli`) and the model card (:mod:`.model_card`). The artifact's upload
and model card are the serving layer's (:mod:`hf_qret.serving.upload`, :mod:`hf_qret.serving.model_card`), which
``QuantizedRetriever`` uses; :mod:`.push` and :mod:`.model_card` re-export them.
"""
