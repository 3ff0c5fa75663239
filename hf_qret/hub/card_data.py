"""Re-exports :mod:`hf_qret.serving.card_data` (the model card is part of the artifact: the serving layer writes it, and
``QuantizedRetriever.save_pretrained`` re-renders it), where this module's names now live: every name of its
``__all__``.
"""

from ..serving.card_data import *  # noqa: F403
from ..serving.card_data import __all__  # noqa: F401
