"""The evidence protocol's pieces (docs/bench.md): experiments as data run by one small engine, the
spread over seeds and when a gap counts, the likelihood split in nats per token, and the floors that
show how much room a metric has."""

from .engine import Results, cell_key, run_grid
from .floors import floor_sets
from .likelihood import nll_split
from .stats import Spread, compare, spread

__all__ = ["Results", "Spread", "cell_key", "compare", "floor_sets", "nll_split", "run_grid", "spread"]
