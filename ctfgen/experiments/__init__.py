"""The evidence protocol's pieces (docs/bench.md): the spread over seeds and when a gap counts,
the likelihood split in nats per token, and the floors that show how much room a metric has."""

from .floors import floor_sets
from .likelihood import nll_split
from .stats import Spread, compare, spread

__all__ = ["Spread", "compare", "floor_sets", "nll_split", "spread"]
