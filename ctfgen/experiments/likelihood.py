"""The likelihood split: where CTF wins or loses against the baseline, in nats per token.

CTF's exact negative log-likelihood of a fine token is the coarse model's loss on its cluster plus
the refiner's loss on the token given the true coarse grid (with the cluster mask the sampler uses,
or without). The baseline's splits the same way: -log of its probability mass on the true cluster
(its implied coarse prediction) plus the rest, the choice inside the cluster.

A refiner that reads decided codes (`reveal`) defines another exact likelihood for each number of
passes S: the positions are split into S groups in a random order, as many per group as the
sampler's schedule decides per pass, and each group is scored given the codes of the groups before
it (`within_in_passes`). It is the NLL of a sampler that picks positions at random rather than by
confidence, which this one cannot score exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.codes import CodeDataset
from ..hierarchy import Hierarchy
from ..sampling import decided_after
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


@torch.no_grad()
def within_in_passes(refiner: Transformer, codes: CodeDataset, hierarchy: Hierarchy, passes: int, limit: int = 1000,
                     batch_size: int = 64, stage1: Transformer | None = None, seed: int = 0) -> float:
    """Nats per token of the fine codes given the true coarse grid, scored in `passes` groups of positions
    in a random order (seeded), each given the groups before it, with the cluster mask (see above).
    passes = 1 is the refiner's one-pass masked loss."""
    if passes > 1 and not refiner.config.reveal:
        raise ValueError("scoring in several passes needs a refiner that reads decided codes (reveal)")
    device = refiner.head.weight.device
    generator = torch.Generator().manual_seed(seed)
    mask = hierarchy.member_mask.to(device)
    was_training = refiner.training
    refiner.eval()
    total, tokens = 0.0, 0
    n = min(limit, len(codes))
    for start in range(0, n, batch_size):
        fine, labels = codes.batch(torch.arange(start, min(n, start + batch_size)))
        fine, labels = fine.to(device), labels.to(device)
        coarse = hierarchy.to_coarse(fine)
        features = stage1.hidden_states(coarse, labels) if refiner.config.feature_dim else None
        batch, length = fine.shape
        rank = torch.rand(batch, length, generator=generator).argsort(dim=1).argsort(dim=1).to(device)  # random order
        everyone = torch.full((batch,), length)
        shown = torch.full_like(fine, refiner.config.hidden_id)
        for p in range(1, passes + 1):
            before, after = decided_after(p - 1, passes, everyone), decided_after(p, passes, everyone)
            group = (rank >= before[:, None].to(device)) & (rank < after[:, None].to(device))
            reads = {"fine": shown} if refiner.config.reveal else {}
            logits = refiner(coarse, labels, mask, features=features, **reads)
            total += F.cross_entropy(logits[group], fine[group], reduction="sum").item()
            shown = torch.where(group, fine, shown)
        tokens += fine.numel()
    refiner.train(was_training)
    return total / tokens
