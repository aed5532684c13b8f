"""Graph rewrites, one per module, all with the :class:`passes.base.Pass` shape.

``PASSES`` maps each pass's recipe name to its class, so a saved recipe can be replayed.
"""
from .activation import ActivationRemoval
from .attention import AttentionRemoval
from .base import Pass, PassError, PassResult
from .cleanup import Cleanup
from .manager import PassFailure, PassManager
from .merging import TokenMerging
from .tokens import TokenPruning
from .width import WidthPruning

PASSES: dict[str, type[Pass]] = {
    cls.name: cls for cls in (WidthPruning, AttentionRemoval, ActivationRemoval, TokenPruning, TokenMerging, Cleanup)
}

__all__ = ["PASSES", "ActivationRemoval", "AttentionRemoval", "Cleanup", "Pass", "PassError", "PassFailure",
           "PassManager", "PassResult", "TokenMerging", "TokenPruning", "WidthPruning"]
