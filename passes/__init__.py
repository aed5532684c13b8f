"""Graph rewrites, one per module, all with the :class:`passes.base.Pass` shape.

``PASSES`` maps each pass's recipe name to its class, so a saved recipe can be replayed.
"""
from .base import Pass, PassError, PassResult
from .width import WidthPruning

PASSES: dict[str, type[Pass]] = {cls.name: cls for cls in (WidthPruning,)}

__all__ = ["PASSES", "Pass", "PassError", "PassResult", "WidthPruning"]
from .attention import AttentionRemoval; PASSES[AttentionRemoval.name] = AttentionRemoval  # noqa: E402,E702
from .activation import ActivationRemoval; PASSES[ActivationRemoval.name] = ActivationRemoval  # noqa: E402,E702
from .tokens import TokenPruning; PASSES[TokenPruning.name] = TokenPruning  # noqa: E402,E702
