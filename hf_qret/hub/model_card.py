"""Re-exports :mod:`hf_qret.serving.model_card` (the model card is part of the artifact: the serving layer writes it, and
``QuantizedRetriever.save_pretrained`` re-renders it), where this module's names now live: every name of its
``__all__``, which includes :mod:`hf_qret.serving.card_data`'s.
"""

from ..serving.model_card import *  # noqa: F403
from ..serving.model_card import __all__  # noqa: F401
