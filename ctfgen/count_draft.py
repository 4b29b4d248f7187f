"""A draft without a network: the next token's counts in the training codes given its class, position and
neighbours, for speculative sampling (`sampling.sample_speculative`).

Speculative sampling keeps the large model's distribution exactly whatever the draft proposes; the draft
only decides how often a proposal is kept. A small transformer as draft costs a pass per proposed token,
which on a CPU is nearly a large model's step at these sizes (docs/sampling.md). Counts cost a few index
lookups. Over CTF's coarse labels (K of 32 to 512) they are dense enough to propose what a trained coarse
model draws about as often as a transformer draft does; over the baseline's V codewords they are sparser:
the small vocabulary is where this pays (docs/sampling.md gives the acceptance rates).

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
CONTEXTS = (("class", "pos"), ("class", "pos", "left"), ("class", "pos", "left", "up"))


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

    def __post_init__(self) -> None:
        self.totals = np.add.reduceat(self.counts, self.starts[:-1]) if len(self.keys) else np.zeros(0)


def context_key(names: tuple[str, ...], values: dict, config: CountDraftConfig):
    """A context as one mixed-radix number, of Python ints or elementwise of tensors: `values` maps each name to
    its value, `left` and `up` being `vocab_size` (an id of their own) where a position has none."""
    radix = {"class": config.num_classes, "pos": config.seq_len, "left": config.vocab_size + 1,
             "up": config.vocab_size + 1}
    key = 0
    for name in names:
        key = key * radix[name] + values[name]
    return key


def count_contexts(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], config: CountDraftConfig) -> list[ContextCounts]:
    """The counts of every context order in chunks of token grids (codes [n, T] long, class labels [n]), merged
    chunk by chunk, so memory follows the distinct (context, token) pairs, not the number of grids."""
    V, W = config.vocab_size, config.grid_w
    merged = [(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)) for _ in CONTEXTS]
    for c, y in chunks:
        none = torch.full_like(c, V)
        values = {"class": y[:, None], "pos": torch.arange(c.shape[1]),
                  "left": torch.cat([none[:, :1], c[:, :-1]], 1), "up": torch.cat([none[:, :W], c[:, :-W]], 1)}
        for i, names in enumerate(CONTEXTS):
            pairs = context_key(names, values, config) * V + c  # (context, token) as one number
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

    def probs(self, codes: np.ndarray, pos: int, label: int) -> np.ndarray:
        """q(next token) at position `pos` of one grid, codes [>= pos] (decided before pos): float64 [V].

        Plain numpy on the CPU, one row at a time: a draft proposes at batch 1 to 8, where a dozen vectorised
        torch operations per order would cost more than the lookups (~10x, measured)."""
        V, W = self.config.vocab_size, self.config.grid_w
        values = {"class": label, "pos": pos,
                  "left": int(codes[pos - 1]) if pos >= 1 else V, "up": int(codes[pos - W]) if pos >= W else V}
        q = np.full(V, 1.0 / V)
        for names, order in zip(CONTEXTS, self.orders):
            key = context_key(names, values, self.config)
            i = int(np.searchsorted(order.keys, key))
            if i == len(order.keys) or order.keys[i] != key:
                return q  # a longer context seen is a shorter one seen, so no higher order has it either
            a, b = order.starts[i], order.starts[i + 1]
            seen, total = b - a, order.totals[i]
            q *= seen / (total + seen)
            q[order.tokens[a:b]] += order.counts[a:b] / (total + seen)
        return q

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
        self.draft, self.labels, self.settings = draft, class_labels.tolist(), settings
        self.plain = settings.temperature == 1 and settings.top_k == 0 and settings.top_p == 1

    def propose(self, codes: torch.Tensor, t: torch.Tensor, n: int,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens for positions t .. t + n - 1 of each row (codes [B, >= t + n]: decided before t) and the
        distributions they came from (the stage's temperature, top-k and top-p applied to q, as to the model's
        logits): long [B, n], float [B, n, V] on codes' device. Rows past the grid's end propose from its last
        position (what they propose is never kept)."""
        work = codes.cpu().numpy().copy()  # proposals become the next proposal's context
        rows, V, last = len(work), self.draft.config.vocab_size, self.draft.config.seq_len - 1
        starts = t.tolist()
        q = np.empty((rows, n, V))
        proposals = np.empty((rows, n), dtype=np.int64)
        u = torch.rand(rows, n, generator=generator, device=generator.device if generator else "cpu",
                       dtype=torch.float64).cpu().numpy()
        for i in range(n):
            for r in range(rows):
                pos = min(starts[r] + i, last)
                q[r, i] = self.draft.probs(work[r], pos, self.labels[r])
                if not self.plain:
                    q[r, i] = token_probs(torch.from_numpy(np.log(q[r, i])), self.settings).numpy()[0]
                cdf = np.cumsum(q[r, i])
                proposals[r, i] = min(int(np.searchsorted(cdf, u[r, i] * cdf[-1], side="right")), V - 1)
                work[r, starts[r] + i] = proposals[r, i]
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
