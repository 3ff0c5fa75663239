"""The Hugging Face Hub: pushing artifacts (:mod:`.push`, also used by serving), the training callback
(:mod:`.callback`), the ``hf-qret push`` / ``card`` commands (:mod:`.cli`) and the model card.
"""
