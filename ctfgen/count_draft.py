"""A draft without a network: the next token's counts in the training codes given its class, position and
neighbours, for speculative sampling (`sampling.sample_speculative`).

Speculative sampling keeps the large model's distribution exactly whatever the draft proposes; the draft
only decides how often a proposal is kept. A small transformer as draft costs a pass per proposed token,
which on a CPU is nearly a large model's step at these sizes (docs/sampling.md). Counts cost a few index
lookups. Over a small K of coarse labels (64) they propose what a trained coarse model draws about as often
as a small transformer draft does; over K = 512, and over the baseline's V codewords, the same training codes
fill each context too thinly: the small vocabulary is where this pays (docs/sampling.md gives the acceptance
rates).

The estimate interpolates three context orders, most general first: (class, position), then also the token
to the left (the previous one in raster order), then also the token above. Each order is mixed with the one
below by Witten-Bell: q(x | h) = (c(h, x) + u(h) q_lower(x)) / (c(h) + u(h)), c the counts after context h and
u(h) the number of distinct tokens seen after it; below the first order, uniform, so no token has q = 0.
Each order is stored sparsely (sorted context keys, CSR rows of the tokens seen after each), so V = 16384 costs
memory in proportion to the training codes, not to V^3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .artifacts import CONFIG_NAME, ArtifactError, load_artifact, read_json, save_artifact
from .errors import CtfgenError
from .hierarchy import Hierarchy, check_compatible
from .sampling import StageSettings, token_probs

DRAFT_KIND = "count-draft"
CONTEXTS = (("class", "pos"), ("class", "pos", "left"), ("class", "pos", "left", "up"))  # each extends the one before


@dataclass(frozen=True)
class CountDraftConfig:
    """What the counts propose: the same fields `sampling.check_draft` compares with the model's config."""

    role: str  # "coarse": tokens are coarse labels; "baseline": codewords
    vocab_size: int
    grid_h: int
    grid_w: int
    num_classes: int

    @property
    def seq_len(self) -> int:
        return self.grid_h * self.grid_w


@dataclass
class ContextCounts:
    """One context order: `keys` (sorted, int64) name the contexts seen; the tokens seen after keys[i] and their
    counts are tokens[starts[i]:starts[i + 1]], counts[...] (numpy: the draft reads them on the CPU)."""

    keys: np.ndarray
    starts: np.ndarray
    tokens: np.ndarray
    counts: np.ndarray

    FIELDS = ("keys", "starts", "tokens", "counts")


def context_keys(values: dict, config: CountDraftConfig) -> list:
    """Each context order's key (one per CONTEXTS entry) as one mixed-radix number, of ints or elementwise of
    tensors or arrays: `values` maps each name to its value, `left` and `up` being `vocab_size` (an id of their
    own) where a position has none. Each order is the one before with one more name, so its key extends that one."""
    radix = {"class": config.num_classes, "pos": config.seq_len, "left": config.vocab_size + 1,
             "up": config.vocab_size + 1}
    key, keys = 0, []
    for length, name in enumerate(CONTEXTS[-1], start=1):
        key = key * radix[name] + values[name]
        if length == len(CONTEXTS[len(keys)]):
            keys.append(key)
    return keys


def count_contexts(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], config: CountDraftConfig) -> list[ContextCounts]:
    """The counts of every context order in chunks of token grids (codes [n, T] long, class labels [n]), merged
    chunk by chunk, so memory follows the distinct (context, token) pairs, not the number of grids."""
    V, W = config.vocab_size, config.grid_w
    merged = [(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)) for _ in CONTEXTS]
    for c, y in chunks:
        none = torch.full_like(c, V)
        values = {"class": y[:, None], "pos": torch.arange(c.shape[1]),
                  "left": torch.cat([none[:, :1], c[:, :-1]], 1), "up": torch.cat([none[:, :W], c[:, :-W]], 1)}
        for i, key in enumerate(context_keys(values, config)):
            pairs = key * V + c  # (context, token) as one number
            new, n = torch.unique(pairs.flatten(), return_counts=True)
            entries, counts = merged[i]
            entries, inverse = torch.unique(torch.cat([entries, new]), return_inverse=True)
            merged[i] = entries, torch.zeros(len(entries), dtype=torch.long).index_add_(0, inverse, torch.cat([counts, n]))
    orders = []
    for entries, counts in merged:
        keys, per_key = torch.unique_consecutive(entries // V, return_counts=True)
        starts = torch.cat([per_key.new_zeros(1), per_key.cumsum(0)])
        orders.append(ContextCounts(keys.numpy(), starts.numpy(), (entries % V).numpy(), counts.double().numpy()))
    return orders


class CountDraft:
    """Counts that propose tokens for speculative sampling: `sample_causal(..., draft=CountDraft)`."""

    def __init__(self, config: CountDraftConfig, orders: list[ContextCounts], info: dict | None = None):
        if len(orders) != len(CONTEXTS):
            raise ArtifactError(f"a count draft has {len(CONTEXTS)} context orders, got {len(orders)}")
        self.config, self.orders, self.info = config, orders, dict(info or {})
        # Every order in one sorted table, so one search finds each row's context of every order: order o's keys
        # shifted past the key ranges of the orders before it; a last key above every context's, which a search
        # beyond all of them lands on, has no tokens. Witten-Bell's weights are computed once:
        # q(x | h) = kept[h] q_lower(x) + share[h, x], kept = u(h) / (c(h) + u(h)), share = c(h, x) / (c(h) + u(h)).
        ranges = [config.num_classes * config.seq_len * (config.vocab_size + 1) ** o for o in range(len(CONTEXTS))]
        self.offsets = np.cumsum([0, *ranges[:-1]])[:, None]
        ends = np.cumsum([0, *(len(o.tokens) for o in orders)])
        self.keys = np.concatenate([*(o.keys + off for o, off in zip(orders, self.offsets[:, 0])), [np.iinfo(np.int64).max]])
        self.starts = np.concatenate([*(o.starts[:-1] + end for o, end in zip(orders, ends)), [ends[-1], ends[-1]]])
        seen = np.diff(self.starts)
        scale = np.concatenate([*(np.add.reduceat(o.counts, o.starts[:-1]) for o in orders if len(o.keys)), [1]]) + seen
        self.kept, self.tokens = seen / scale, np.concatenate([o.tokens for o in orders])
        self.share = np.concatenate([o.counts for o in orders]) / np.repeat(scale, seen)

    @classmethod
    def count(cls, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], config: CountDraftConfig,
              info: dict | None = None) -> "CountDraft":
        """Count chunks of token grids (codes [n, T], class labels [n]): e.g. `[(codes, labels)]`."""
        V = config.vocab_size
        if config.num_classes * config.seq_len * (V + 1) ** 2 * V >= 2 ** 63:
            raise CtfgenError(f"a count draft numbers (context, token) pairs in 64 bits: {config.num_classes} classes x "
                              f"{config.seq_len} positions x V = {V} do not fit")
        def checked(chunk: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            codes, labels = chunk
            if codes.dim() != 2 or codes.shape[1] != config.seq_len:
                raise CtfgenError(f"codes must be [N, {config.seq_len}] token grids, got {tuple(codes.shape)}")
            if len(codes) and (codes.min() < 0 or codes.max() >= V):
                raise CtfgenError(f"tokens must lie in [0, {V}), got [{int(codes.min())}, {int(codes.max())}]")
            return codes.long(), labels.long()

        orders = count_contexts(map(checked, chunks), config)
        if not len(orders[0].keys):
            raise CtfgenError("no codes to count")
        return cls(config, orders, info)

    def probs(self, codes: np.ndarray, pos: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """q(next token) of each row b at position pos[b] of its grid codes[b] (codes [B, > max(pos)], decided
        before pos[b]; class labels[b]): float64 [B, V]. Numpy on the CPU, the whole batch in some thirty array
        operations, so over a small vocabulary 64 rows cost about twice what one does (docs/sampling.md)."""
        V, W = self.config.vocab_size, self.config.grid_w
        pos, rows = np.asarray(pos, dtype=np.int64), np.arange(len(pos))
        values = {"class": np.asarray(labels, dtype=np.int64), "pos": pos,
                  "left": np.where(pos >= 1, codes[rows, pos - 1], V), "up": np.where(pos >= W, codes[rows, pos - W], V)}
        wanted = np.stack(context_keys(values, self.config)) + self.offsets  # [orders, B]
        i = np.searchsorted(self.keys, wanted)
        found = self.keys[i] == wanted  # if not, a longer context is not found either
        kept, first = np.where(found, self.kept[i], 1.0), self.starts[i]
        # unrolled over the orders: q = uniform x every order's kept + each order's share x the kept of those above
        above = np.concatenate([np.cumprod(kept[:0:-1], 0)[::-1], np.ones_like(kept[:1])])  # [orders, B]
        n = np.where(found, self.starts[i + 1] - first, 0).ravel()  # each row's entries in each order
        entry = np.repeat(first.ravel() - np.cumsum(n) + n, n) + np.arange(n.sum())  # all, one flat run
        at = np.repeat(np.tile(rows, len(CONTEXTS)) * V, n) + self.tokens[entry]
        q = np.bincount(at, self.share[entry] * np.repeat(above.ravel(), n), minlength=len(rows) * V).reshape(-1, V)
        return q + (kept.prod(0) / V)[:, None]

    def proposer(self, class_labels: torch.Tensor, settings: StageSettings) -> "CountProposer":
        return CountProposer(self, class_labels, settings)

    # --- the artifact -----------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        tensors = {f"{i}.{f}": torch.from_numpy(getattr(o, f)) for i, o in enumerate(self.orders)
                   for f in ContextCounts.FIELDS}
        save_artifact(folder, {"kind": DRAFT_KIND, **asdict(self.config), "contexts": [list(c) for c in CONTEXTS],
                               **self.info}, tensors)

    @classmethod
    def load(cls, folder: str | Path) -> "CountDraft":
        raw, tensors = load_artifact(folder, DRAFT_KIND)
        if [tuple(c) for c in raw.get("contexts", [])] != list(CONTEXTS):
            raise ArtifactError(f"{folder}: counts of contexts {raw.get('contexts')}; this version reads {CONTEXTS}")
        try:
            config = CountDraftConfig(**{f: raw[f] for f in CountDraftConfig.__dataclass_fields__})
            orders = [ContextCounts(*(tensors[f"{i}.{f}"].numpy() for f in ContextCounts.FIELDS))
                      for i in range(len(CONTEXTS))]
        except KeyError as e:
            raise ArtifactError(f"{folder}: the count draft lacks {e}") from None
        info = {k: v for k, v in raw.items() if k not in {"kind", "contexts", *CountDraftConfig.__dataclass_fields__}}
        return cls(config, orders, info)


class CountProposer:
    """One batch's proposals: `propose` draws n tokens a row, one after another, each reading the ones before."""

    def __init__(self, draft: CountDraft, class_labels: torch.Tensor, settings: StageSettings):
        self.draft, self.labels, self.settings = draft, class_labels.cpu().numpy().astype(np.int64), settings
        self.plain = settings.temperature == 1 and settings.top_k == 0 and settings.top_p == 1

    def propose(self, codes: torch.Tensor, t: torch.Tensor, n: int,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens for positions t .. t + n - 1 of each row (codes [B, >= t + n]: decided before t) and the
        distributions they came from (the stage's temperature, top-k and top-p applied to q, as to the model's
        logits): long [B, n], float [B, n, V] on codes' device. Rows past the grid's end propose from its last
        position (what they propose is never kept)."""
        work = codes.cpu().numpy().copy()  # proposals become the next proposal's context
        rows, V, last = np.arange(len(work)), self.draft.config.vocab_size, self.draft.config.seq_len - 1
        starts = t.cpu().numpy()
        q = np.empty((len(rows), n, V))
        proposals = np.empty((len(rows), n), dtype=np.int64)
        u = torch.rand(len(rows), n, generator=generator, device=generator.device if generator else "cpu",
                       dtype=torch.float64).cpu().numpy()
        for i in range(n):
            q[:, i] = self.draft.probs(work, np.minimum(starts + i, last), self.labels)
            if not self.plain:
                q[:, i] = token_probs(torch.from_numpy(np.log(q[:, i])), self.settings).numpy()
            cdf = np.cumsum(q[:, i], axis=1)
            # the inverse CDF at u: the first token whose CDF exceeds u (never one of probability 0)
            proposals[:, i] = np.minimum((cdf <= (u[:, i] * cdf[:, -1])[:, None]).sum(1), V - 1)
            work[rows, starts + i] = proposals[:, i]
        return (torch.from_numpy(proposals).to(codes.device),
                torch.from_numpy(q).to(device=codes.device, dtype=torch.float32))


def count_draft_from_codes(codes_dir: str | Path, hierarchy: Hierarchy | None = None,
                           chunk: int = 20000) -> CountDraft:
    """Count a codes folder's training grids (view 0 of each item, read `chunk` items at a time): over coarse
    labels when `hierarchy` is given (a draft for CTF's stage 1), else over the codewords (a draft for the
    baseline)."""
    from .data.codes import CodeDataset

    data = CodeDataset(codes_dir)
    grid = data.grid
    info = {"codes": str(codes_dir), "items": data.items, "tokenizer_fingerprint": data.fingerprint}
    if hierarchy is not None:
        check_compatible(hierarchy, data.fingerprint, data.codebook_size, source=f"the codes in {codes_dir}")
        config = CountDraftConfig("coarse", hierarchy.K, grid[0], grid[1], data.num_classes)
    else:
        config = CountDraftConfig("baseline", data.codebook_size, grid[0], grid[1], data.num_classes)

    def chunks():
        for start in range(0, data.items, chunk):
            end = min(start + chunk, data.items)
            codes = torch.from_numpy(np.asarray(data.codes[start:end]).astype(np.int64)).flatten(1)
            labels = torch.from_numpy(data.labels[start:end].astype(np.int64))
            yield (hierarchy.coarse_of[codes] if hierarchy is not None else codes), labels

    return CountDraft.count(chunks(), config, info)


def load_draft(folder: str | Path, device: str | torch.device = "cpu"):
    """A draft folder: a count draft (`ctfgen count-draft`; its counts stay on the CPU) or a trained transformer
    (`ctfgen train`, loaded onto `device`)."""
    from .transformer.model import load_model

    kind = read_json(Path(folder) / CONFIG_NAME).get("kind") if Path(folder).is_dir() else None
    return CountDraft.load(folder) if kind == DRAFT_KIND else load_model(folder, device)
