"""What a compression produces: the result object, and the report every face reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx


@dataclass
class CompressResult:
    """The compressed graph, its report (JSON-able), the recipe that replays it, where the original
    came from, and the input size it was captured at."""

    model: fx.GraphModule
    report: dict[str, Any]
    recipe: list[dict[str, Any]] = field(default_factory=list)
    source: dict[str, Any] | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
