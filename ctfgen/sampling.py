"""Sampling from the transformers: KV-cache decoding, classifier-free guidance (CFG),
temperature / top-k / top-p, the two-stage CTF sampler and the baseline sampler.

Every function takes the models and a `torch.Generator` and draws all of its randomness from
that generator (uniforms for inverse-CDF sampling, see `draw`) (on the models' device), so the same seed gives the same tokens. The coarse AR
model and the baseline go through the same function, `sample_causal`; CTF adds one refiner pass
(`refine`). See docs/sampling.md.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
from tqdm.auto import tqdm

from .errors import CtfgenError
from .transformer.model import KVCache, Transformer, cluster_members, row_slots


@dataclass(frozen=True)
class StageSettings:
    """How one stage turns logits into tokens.

    cfg: guidance scale s, logits = uncond + s * (cond - uncond); 1.0 = plain conditional sampling.
    temperature: logits are divided by it before top-k / top-p.
    top_k: keep the k most likely tokens; 0 = off.
    top_p: keep the smallest set of tokens whose probability reaches p; 1.0 = off.
    """

    cfg: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def guided(self) -> bool:
        return self.cfg != 1.0

    def validate(self, model: Transformer, stage: int) -> None:
        """ValueError naming the CLI flag (--t1, --top-k2, ...) of the first bad setting."""
        vocab = model.config.head_size
        if not self.temperature > 0:
            raise CtfgenError(f"--t{stage}: temperature must be > 0, got {self.temperature}")
        if not 0 <= self.top_k <= vocab:
            raise CtfgenError(f"--top-k{stage}: top-k must be in 0..{vocab} (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise CtfgenError(f"--top-p{stage}: top-p must be in (0, 1], got {self.top_p}")
        if self.guided and model.config.class_dropout_prob <= 0:
            raise CtfgenError(f"--cfg{stage}: guidance scale {self.cfg} needs a model trained with class-label "
                              f"dropout, but the stage-{stage} model has class_dropout_prob=0 (use --cfg{stage} 1)")


def check_class_labels(class_labels: torch.Tensor, num_classes: int) -> None:
    if class_labels.dim() != 1 or class_labels.dtype.is_floating_point:
        raise CtfgenError(f"class labels must be a 1-D integer tensor, got {tuple(class_labels.shape)} {class_labels.dtype}")
    bad = class_labels[(class_labels < 0) | (class_labels >= num_classes)]
    if bad.numel():
        raise CtfgenError(f"--classes: class id {int(bad[0])} is out of range; the model knows classes 0..{num_classes - 1}")


# --- logits -> tokens ----------------------------------------------------------------------------

def apply_guidance(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits of a doubled batch [cond; uncond] -> uncond + scale * (cond - uncond)."""
    cond, uncond = logits.chunk(2)
    return uncond + scale * (cond - uncond)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the k largest logits of each row to -inf (k = 0: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches p (p = 1: unchanged)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # the most likely token always has 0 before it, so it stays
    drop = torch.empty_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before >= p)  # unsort
    return logits.masked_fill(drop, float("-inf"))


def token_probs(logits: torch.Tensor, settings: StageSettings) -> torch.Tensor:
    """The distribution a token is drawn from: logits [..., V] (guidance applied) after temperature,
    top-k and top-p; probabilities [N, V], one row per token."""
    flat = logits.reshape(-1, logits.shape[-1]) / settings.temperature
    return filter_top_p(filter_top_k(flat, settings.top_k), settings.top_p).softmax(dim=-1)


def sample_tokens(logits: torch.Tensor, settings: StageSettings, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row of logits [..., V] (guidance already applied); long [...]."""
    return draw(token_probs(logits, settings), generator).view(logits.shape[:-1])


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of probs [N, V], by inverting the CDF at a uniform draw: long [N].

    Same distribution as torch.multinomial(probs, 1), about 10x faster on the CPU for the refiner's
    N = B * T rows. The CDF is summed in float64 so the boundaries stay exact over 16k codewords;
    `right=True` never lands on a zero-probability token (its CDF equals its predecessor's).
    """
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)


# --- helpers ------------------------------------------------------------------------------------

@contextmanager
def inference_mode(*models: Transformer) -> Iterator[None]:
    """eval() (no class dropout, no dropout), no_grad and bf16 autocast on CUDA; restores train() after."""
    was_training = [m.training for m in models]
    device = models[0].head.weight.device
    try:
        for m in models:
            m.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            yield
    finally:
        for m, training in zip(models, was_training):
            m.train(training)


def decode_cache(model: Transformer, rows: int, spare: int = 0) -> KVCache:
    """A KV cache for sampling `rows` sequences (and `spare` slots past the grid): bf16 on GPUs (half the
    memory traffic), else fp32, whatever the weights: attention runs in the cache's dtype, and on the CPU
    torch's bf16 attention over one new token is ~5x slower than its fp32 one (docs/sampling.md)."""
    on_gpu = model.head.weight.device.type == "cuda"
    return model.make_cache(rows, torch.bfloat16 if on_gpu else torch.float32, spare)


def with_null_labels(model: Transformer, class_labels: torch.Tensor) -> torch.Tensor:
    """[labels; null, ..., null]: the doubled batch of classifier-free guidance."""
    return torch.cat([class_labels, torch.full_like(class_labels, model.null_class)])


# --- the two stages -----------------------------------------------------------------------------

def sample_causal(model: Transformer, class_labels: torch.Tensor, settings: StageSettings,
                  generator: torch.Generator | None = None, *, guidance: bool | None = None,
                  logits_out: list[torch.Tensor] | None = None, hidden_out: list[torch.Tensor] | None = None,
                  draft: Transformer | CountDraftLike | None = None, lookahead: int = 4,
                  stats_out: dict[str, int] | None = None) -> torch.Tensor:
    """Raster-order AR sampling of one full grid per label with the KV cache: long [B, seq_len].

    Used for both the coarse model (tokens are coarse labels) and the baseline (fine codes).
    guidance: run the doubled [cond; null] batch; None means "when settings.cfg != 1".
    logits_out: if given, receives the guided logits [B, V] each token was drawn from (for tests).
    hidden_out: if given, receives the conditional hidden state [B, dim] each token's logits came from
    (what a refiner with `feature_dim` reads; `Transformer.hidden_states` computes the same teacher-forced).
    draft: a smaller model of the same vocabulary, or counts (`count_draft.CountDraft`): sample speculatively
    (`sample_speculative`; the same distribution, fewer passes of `model`), `lookahead` tokens proposed a pass;
    stats_out gets its counts.
    """
    if not model.config.causal:
        raise CtfgenError(f"sample_causal needs a causal model, got role {model.config.role!r}")
    guided = settings.guided if guidance is None else guidance
    if draft is not None:
        if logits_out is not None:
            raise CtfgenError("logits_out is for plain sampling")
        return sample_speculative(model, draft, class_labels, settings, generator, guided=guided, lookahead=lookahead,
                                  hidden_out=hidden_out, stats_out=stats_out)
    device = model.head.weight.device
    class_labels = class_labels.to(device)
    batch, seq_len = class_labels.shape[0], model.config.seq_len
    inputs = with_null_labels(model, class_labels) if guided else class_labels
    codes = torch.empty(batch, seq_len, dtype=torch.long, device=device)
    with inference_mode(model):
        cache = decode_cache(model, inputs.shape[0])
        want_hidden = hidden_out is not None
        out = model.prefill(inputs, cache, with_hidden=want_hidden)
        for t in range(seq_len):
            if t > 0:
                previous = codes[:, t - 1:t]
                out = model.step(previous.repeat(2, 1) if guided else previous, cache, with_hidden=want_hidden)
            logits, hidden = out if want_hidden else (out, None)
            logits = logits[:, -1]
            if hidden is not None:
                hidden_out.append(hidden[:batch, -1])  # the conditional half under guidance
            next_logits = apply_guidance(logits, settings.cfg) if guided else logits
            if logits_out is not None:
                logits_out.append(next_logits)
            codes[:, t] = sample_tokens(next_logits, settings, generator)
    return codes


def check_draft(model: Transformer, draft: Transformer | CountDraftLike, settings: StageSettings,
                lookahead: int) -> None:
    """The draft must propose what the model reads: the same role, vocabulary, grid and classes."""
    c, d = model.config, draft.config
    for name in ("role", "vocab_size", "grid_h", "grid_w", "num_classes"):
        if getattr(c, name) != getattr(d, name):
            raise CtfgenError(f"--draft: the draft has {name}={getattr(d, name)!r} but the model it drafts for has "
                              f"{getattr(c, name)!r}")
    if settings.guided and isinstance(draft, Transformer) and d.class_dropout_prob <= 0:
        raise CtfgenError("--draft: the draft was trained without class-label dropout, so it cannot be guided")
    if lookahead < 1:
        raise CtfgenError(f"--lookahead must be >= 1, got {lookahead}")


class CountDraftLike(Protocol):
    """What a draft other than a transformer offers (`count_draft.CountDraft`): a config with the fields
    `check_draft` compares, and a proposer for a batch of class labels."""

    config: Any

    def proposer(self, class_labels: torch.Tensor, settings: StageSettings) -> Any: ...


class ModelProposer:
    """A smaller transformer as draft: it proposes tokens one pass at a time from its own KV cache.
    Its cache holds at least tokens 0..t-3 of a row at the start of a round; it reads tokens t-2 and t-1
    again (after the first token, only that one)."""

    def __init__(self, draft: Transformer, inputs: torch.Tensor, settings: StageSettings, guided: bool, spare: int):
        self.draft, self.settings, self.guided = draft, settings, guided
        self.cache = decode_cache(draft, inputs.shape[0], spare)
        draft.prefill(inputs, self.cache)
        self.first = True

    def propose(self, codes: torch.Tensor, t: torch.Tensor, n: int,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """n tokens a row for positions t .. t + n - 1 and the distributions they came from: long [B, n], [B, n, V]."""
        fed = functools.partial(doubled, self.guided)
        back = 1 if self.first else 2
        self.first = False
        self.cache.pos = fed(t - back + 1)
        logits = self.draft.step(fed(codes.gather(1, row_slots(t - back, back))), self.cache)[:, -1:]
        proposals, q = [], []
        for i in range(n):
            q.append(guided_probs(logits, self.settings, self.guided)[:, 0])
            proposals.append(draw(q[-1], generator))
            if i < n - 1:
                logits = self.draft.step(fed(proposals[-1][:, None]), self.cache)
        return torch.stack(proposals, 1), torch.stack(q, 1)


def doubled(guided: bool, rows: torch.Tensor) -> torch.Tensor:
    """Tokens or positions of the B rows -> the model's rows ([rows; rows] under guidance)."""
    return torch.cat([rows, rows]) if guided else rows


def guided_probs(logits: torch.Tensor, settings: StageSettings, guided: bool) -> torch.Tensor:
    """Logits of the model's rows [rows, n, V] -> the guided, filtered distributions [B, n, V]."""
    logits = apply_guidance(logits, settings.cfg) if guided else logits
    return token_probs(logits, settings).view(logits.shape[0], -1, logits.shape[-1])


def sample_speculative(model: Transformer, draft: Transformer | CountDraftLike, class_labels: torch.Tensor,
                       settings: StageSettings, generator: torch.Generator | None = None, *, guided: bool,
                       lookahead: int = 4, hidden_out: list[torch.Tensor] | None = None,
                       stats_out: dict[str, int] | None = None) -> torch.Tensor:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): long [B, seq_len], distributed exactly
    as `sample_causal` draws from `model`, guidance, temperature, top-k and top-p included.

    Each round the draft (a smaller transformer, or counts: `count_draft.CountDraft`) proposes `lookahead`
    tokens one by one, `model` reads them all in one pass, and each row keeps its proposals while
    u < p(x) / q(x); at its first refusal it draws from max(p - q, 0), renormalised; a row that keeps every
    proposal draws one more from p. Each row moves on by its own count (the KV cache holds a position per row),
    so a refusal in one row costs the others nothing; rows that are done ride along in spare slots past the
    grid until the last one is.
    Invariant at the start of a round, for a row with t tokens decided: `model`'s cache holds the class token
    and tokens 0..t-2 (token t-1 is fed with the proposals).
    stats_out: gets "proposed" and "accepted" (summed over the rows not yet done), "rounds" (passes of `model`
    after the first: the batch's, so tokens / (rounds + 1) is the batch's tokens per pass) and "tokens" (per row).
    """
    check_draft(model, draft, settings, lookahead)
    device = model.head.weight.device
    class_labels = class_labels.to(device)
    batch, seq_len, n = class_labels.shape[0], model.config.seq_len, lookahead
    inputs = with_null_labels(model, class_labels) if guided else class_labels
    codes = torch.zeros(batch, seq_len + n + 1, dtype=torch.long, device=device)  # a round writes n + 1 past t
    proposed_count = accepted_count = torch.zeros((), dtype=torch.long, device=device)  # read once, at the end
    rounds = 0
    fed = functools.partial(doubled, guided)
    drafts = (draft,) if isinstance(draft, Transformer) else ()

    with inference_mode(model, *drafts):
        cache = decode_cache(model, inputs.shape[0], n + 1)
        logits, hidden = model.prefill(inputs, cache, with_hidden=True)
        proposer = (ModelProposer(draft, inputs, settings, guided, n + 1) if drafts
                    else draft.proposer(class_labels, settings))
        codes[:, 0] = draw(guided_probs(logits, settings, guided)[:, 0], generator)
        states = None
        if hidden_out is not None:
            states = hidden.new_zeros(batch, codes.shape[1], hidden.shape[-1])
            states[:, 0] = hidden[:batch, 0]
        t = torch.ones(batch, dtype=torch.long, device=device)
        while int(t.min()) < seq_len:
            proposed, q = proposer.propose(codes, t, n, generator)  # [B, n], [B, n, V]
            cache.pos = fed(t)
            logits, hidden = model.step(fed(torch.cat([codes.gather(1, t[:, None] - 1), proposed], 1)), cache,
                                        with_hidden=True)
            p = guided_probs(logits, settings, guided)  # [B, n + 1, V]: positions t .. t + n of each row
            p_of = p[:, :n].gather(2, proposed[..., None])[..., 0]
            q_of = q.gather(2, proposed[..., None])[..., 0]
            u = torch.rand(batch, n, generator=generator, device=device, dtype=p.dtype)
            refused = u * q_of >= p_of
            kept = torch.where(refused.any(1), refused.float().argmax(1), n)  # [B]
            # the token after the kept ones: from max(p - q, 0) at a refusal; from p after all n (q is 0 there)
            at = kept[:, None, None].expand(-1, 1, p.shape[-1])
            p_next = p.gather(1, at)[:, 0]
            residual = (p_next - torch.cat([q, torch.zeros_like(q[:, :1])], 1).gather(1, at)[:, 0]).clamp_(min=0)
            residual = torch.where(residual.sum(1, keepdim=True) > 0, residual, p_next)  # p == q: guard the division
            tokens = torch.cat([proposed, proposed[:, :1]], 1).scatter_(
                1, kept[:, None], draw(residual / residual.sum(1, keepdim=True), generator)[:, None])
            slots = row_slots(t, n + 1)  # what lies past t + kept is overwritten next round (or past the grid)
            codes.scatter_(1, slots, tokens)
            if states is not None:
                states[torch.arange(batch, device=device)[:, None], slots] = hidden[:batch]
            going = t < seq_len
            proposed_count = proposed_count + n * going.sum()
            accepted_count = accepted_count + (kept * going).sum()
            rounds += 1
            t = torch.where(going, t + kept + 1, t).clamp_(max=seq_len)
    if hidden_out is not None:
        hidden_out.extend(states[:, i] for i in range(seq_len))
    if stats_out is not None:
        stats = {"proposed": int(proposed_count), "accepted": int(accepted_count), "rounds": rounds, "tokens": seq_len}
        for key, value in stats.items():
            stats_out[key] = stats_out.get(key, 0) + value
    return codes[:, :seq_len]


def decided_after(step: int, steps: int, hidden: torch.Tensor) -> torch.Tensor:
    """How many of `hidden` undecided positions are decided once `step` of `steps` steps are done: MaskGIT's
    cosine schedule (few early, when the refiner has least to go on; all after the last)."""
    if step >= steps:
        return hidden
    return torch.ceil(hidden * (1 - math.cos(math.pi / 2 * step / steps))).long().clamp(max=hidden)


@functools.lru_cache(maxsize=4)
def members_of(member_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`cluster_members` of a mask, computed once per mask object: a pipeline passes its hierarchy's mask batch
    after batch, and listing the members of K x V booleans costs more than a small refiner's pass at batch 1
    (1.3 ms at 512 x 4096 against 1.0 ms, one thread). A mask must not be changed in place once used."""
    return cluster_members(member_mask)


def refine(refiner: Transformer, coarse: torch.Tensor, class_labels: torch.Tensor, settings: StageSettings,
           generator: torch.Generator | None = None, member_mask: torch.Tensor | None = None,
           *, guidance: bool | None = None, steps: int = 1, revealed: torch.Tensor | None = None,
           features: torch.Tensor | None = None, states_out: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Stage 2: refiner passes over coarse codes [B, T] -> sampled fine codes [B, T].

    steps = 1 is the paper's refiner: one pass draws every position. With steps S > 1 (a refiner trained
    with `reveal`), each pass draws every undecided position and keeps the most confident ones (the drawn
    token's probability), as many as the cosine schedule says, and the next pass reads them.
    revealed: fine codes already known, long [B, T] with `hidden_id` elsewhere; they are never changed.
    features: the coarse model's hidden states [B, T, dim] (a refiner with `feature_dim` needs them).
    member_mask (bool [K, V]): restrict each position to the codewords of its cluster: the draw is among
    the cluster's members (`cluster_members`), the same distribution as masking the V logits, at a
    fraction of the cost. It is applied after guidance, since uncond + s * (cond - uncond) of two -inf
    logits is NaN.
    states_out: if given, receives the fine codes after each pass (for tests).
    """
    if refiner.config.role != "refiner":
        raise CtfgenError(f"refine needs a refiner, got role {refiner.config.role!r}")
    if steps < 1:
        raise CtfgenError(f"--refine-steps must be >= 1, got {steps}")
    if (steps > 1 or revealed is not None) and not refiner.config.reveal:
        raise CtfgenError("--refine-steps > 1 needs a refiner trained with --reveal (it reads the codes decided so far)")
    guided = settings.guided if guidance is None else guidance
    device = refiner.head.weight.device
    coarse, class_labels = coarse.to(device), class_labels.to(device)
    hidden_id = refiner.config.hidden_id
    fine = torch.full_like(coarse, hidden_id) if revealed is None else revealed.to(device).clone()
    undecided_at_start = (fine == hidden_id).sum(1)
    members, is_member = (t.to(device) for t in members_of(member_mask)) if member_mask is not None else (None, None)
    with inference_mode(refiner):
        for step in range(1, steps + 1):
            reads = {"fine": fine} if refiner.config.reveal else {}
            if features is not None:
                reads["features"] = features.to(device)
            codes, labels = coarse, class_labels
            if guided:
                reads = {k: torch.cat([v, v]) for k, v in reads.items()}
                codes, labels = coarse.repeat(2, 1), with_null_labels(refiner, class_labels)
            hidden = refiner.refiner_states(codes, labels, **reads)
            # masked: only each position's cluster members get logits (the head's rows for M, not V, codewords)
            logits = refiner.head_logits(hidden) if members is None else refiner.member_logits(hidden, codes, members)
            if guided:
                logits = apply_guidance(logits, settings.cfg)
            if members is not None:  # padding after guidance: uncond + s * (cond - uncond) of two -inf is NaN
                logits = logits.masked_fill_(~is_member[coarse], float("-inf"))
            probs = token_probs(logits, settings)
            drawn = draw(probs, generator)
            confidence = probs.gather(1, drawn[:, None]).view(coarse.shape)
            drawn = drawn.view(coarse.shape) if members is None else members[coarse].gather(2, drawn.view(*coarse.shape, 1))[..., 0]
            undecided = fine == hidden_id
            wanted = decided_after(step, steps, undecided_at_start) - (undecided_at_start - undecided.sum(1))
            # rank the undecided positions by confidence; decided ones rank last and are never picked
            order = confidence.masked_fill(~undecided, -1.0).argsort(dim=1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=device).expand_as(order))
            pick = undecided & (rank < wanted[:, None])
            fine = torch.where(pick, drawn, fine)
            if states_out is not None:
                states_out.append(fine.clone())
    return fine


def check_stages_fit(coarse_model: Transformer, refiner: Transformer) -> None:
    """The refiner must read what the coarse model writes, on the same grid and classes."""
    c, r = coarse_model.config, refiner.config
    if c.role != "coarse" or r.role != "refiner":
        raise CtfgenError(f"expected a coarse model and a refiner, got roles {c.role!r} and {r.role!r}")
    for name in ("vocab_size", "grid_h", "grid_w", "num_classes"):
        if getattr(c, name) != getattr(r, name):
            raise CtfgenError(f"the coarse model has {name}={getattr(c, name)} but the refiner has {getattr(r, name)}")
    if r.feature_dim and r.feature_dim != c.dim:
        raise CtfgenError(f"the refiner reads stage-1 features of width {r.feature_dim}, the coarse model's are {c.dim}")


def sample_ctf(coarse_model: Transformer, refiner: Transformer, class_labels: torch.Tensor,
               stage1: StageSettings, stage2: StageSettings, generator: torch.Generator | None = None,
               member_mask: torch.Tensor | None = None, refine_steps: int = 1,
               draft: Transformer | CountDraftLike | None = None, lookahead: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-stage sampling: (coarse codes [B, T], fine codes [B, T]); stage 2 in `refine_steps` passes; stage 1
    speculative with a `draft` (a coarse model or counts of coarse labels)."""
    check_stages_fit(coarse_model, refiner)
    check_class_labels(class_labels, coarse_model.config.num_classes)
    stage1.validate(coarse_model, 1)
    stage2.validate(refiner, 2)
    hidden: list[torch.Tensor] | None = [] if refiner.config.feature_dim else None
    coarse = sample_causal(coarse_model, class_labels, stage1, generator, hidden_out=hidden, draft=draft,
                           lookahead=lookahead)
    features = torch.stack(hidden, dim=1) if hidden is not None else None
    return coarse, refine(refiner, coarse, class_labels, stage2, generator, member_mask, steps=refine_steps,
                          features=features)


def sample_baseline(model: Transformer, class_labels: torch.Tensor, stage1: StageSettings,
                    generator: torch.Generator | None = None, draft: Transformer | CountDraftLike | None = None,
                    lookahead: int = 4) -> torch.Tensor:
    """The baseline: the same AR sampler over fine codes (speculative with a `draft`), no stage 2. long [B, T]."""
    if model.config.role != "baseline":
        raise CtfgenError(f"expected a baseline model, got role {model.config.role!r}")
    check_class_labels(class_labels, model.config.num_classes)
    stage1.validate(model, 1)
    return sample_causal(model, class_labels, stage1, generator, draft=draft, lookahead=lookahead)


def in_batches(fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], class_labels: torch.Tensor,
               batch_size: int, progress: bool = True, desc: str = "sampling") -> tuple[torch.Tensor, ...]:
    """Run fn over slices of class_labels (with a tqdm bar over batches) and concatenate its outputs."""
    if batch_size < 1:
        raise CtfgenError(f"--batch-size must be >= 1, got {batch_size}")
    parts = [fn(chunk) for chunk in tqdm(class_labels.split(batch_size), desc=desc, unit="batch", disable=not progress)]
    return tuple(torch.cat(outputs) for outputs in zip(*parts))


__all__ = [
    "StageSettings", "apply_guidance", "check_class_labels", "check_stages_fit", "filter_top_k", "filter_top_p",
    "decided_after", "draw", "in_batches", "inference_mode", "members_of", "refine", "sample_baseline", "sample_causal",
    "sample_ctf", "sample_speculative", "sample_tokens", "token_probs", "with_null_labels",
]
