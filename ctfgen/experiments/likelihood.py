"""The likelihood split: where CTF wins or loses against the baseline, in nats per token.

CTF's exact negative log-likelihood of a fine token is the coarse model's loss on its cluster plus
the refiner's loss on the token given the true coarse grid (with the cluster mask the sampler uses,
or without). The baseline's splits the same way: -log of its probability mass on the true cluster
(its implied coarse prediction) plus the rest, the choice inside the cluster.
"""

from __future__ import annotations

from ..data.codes import CodeDataset
from ..hierarchy import Hierarchy
from ..training import evaluate
from ..transformer.model import Transformer


def nll_split(codes: CodeDataset, hierarchy: Hierarchy, *, coarse: Transformer | None = None,
              refiner: Transformer | None = None, baseline: Transformer | None = None, masked: bool = True,
              limit: int = 1000, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """{"ctf": {"coarse", "within", "nll"}, "baseline": {...}} in nats per token on the first `limit` items
    (CTF needs both its models; either side may be left out)."""
    out: dict[str, dict[str, float]] = {}
    if coarse is not None and refiner is not None:
        c = evaluate(coarse, codes, "coarse", hierarchy, limit, batch_size)
        r = evaluate(refiner, codes, "refiner", hierarchy, limit, batch_size, stage1=coarse)
        within = r["loss_masked" if masked else "loss"]
        out["ctf"] = {"coarse": c["loss"], "within": within, "nll": c["loss"] + within, "items": c["items"]}
    if baseline is not None:
        b = evaluate(baseline, codes, "baseline", hierarchy, limit, batch_size)
        out["baseline"] = {"coarse": b["loss_coarse"], "within": b["loss_within"], "nll": b["loss"], "items": b["items"]}
    return out
