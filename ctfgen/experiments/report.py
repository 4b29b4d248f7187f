"""The bench's report, written from the results file alone (it runs nothing).

Cells are grouped into setups (everything but the side, K, the refiner shares, the compute match and
the seed) and, inside a setup, into rows (one side over its seeds). Every figure is a mean +- sd over
seeds with its sample size, and every gap goes through `stats.compare`: a gap within the spread is
called a tie. Writes BENCHMARKS.md, summary.json and PNG plots.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw

from .protocol import CELL_DEFAULTS, SCORING_DEFAULTS, Scoring, clusters_label, side_label
from .stats import Spread, compare, spread

REFINER_OPTIONS = ("refiner_reveal", "refine_steps", "refiner_features", "refiner_corrupt", "refiner_mask",
                   "stage2_mask")
# what tells rows of a setup apart
ROW_FIELDS = ("side", "k", "clustering", "refiner_size", "refiner_depth", "refiner_steps", "compute_of",
              "decode_precision") + REFINER_OPTIONS
SETUP_FIELDS_OUT = ROW_FIELDS + ("seed", "tokenizer_seed")  # a setup: every other field (a row's replicates are its
# training seeds, on each tokenizer instance where there are several: the spread then covers the tokenizer too)
MAP_FIELDS = ("codebook", "size", "steps")


@dataclass
class Row:
    """One side of a setup over its seeds."""

    cell: dict[str, Any]  # the fields the seeds share
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_ctf(self) -> bool:
        return self.cell["side"] == "ctf"

    @property
    def full_size(self) -> bool:
        """A refiner of stage 1's size at full depth and steps (with or without options)."""
        c = self.cell
        return c["refiner_size"] == c["size"] and c["refiner_depth"] == 1 and c["refiner_steps"] == 1

    @property
    def full_refiner(self) -> bool:
        """The paper's refiner at full depth and steps, no options."""
        return self.plain_refiner and self.full_size

    @property
    def plain_refiner(self) -> bool:
        """The paper's refiner at any depth and share of the steps: none of the refiner options."""
        return all(self.cell[k] == CELL_DEFAULTS[k] for k in REFINER_OPTIONS)

    def label(self, with_k: bool) -> str:
        c = self.cell
        text = side_label(c)
        if c["side"] == "ctf" and with_k:
            return f"{text}, K={self.records[0]['result']['K']}" + (" (auto)" if c["k"] == "auto" else "")
        return text

    def of(self, metric: Callable[[dict[str, Any]], float | None]) -> Spread | None:
        values = [metric(r["result"]) for r in self.records]
        return spread(values) if values and all(v is not None for v in values) else None


@dataclass
class Setup:
    fields: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    def row(self, side: str, compute_of: Any = None, full: bool = True, precision: str = "fp32") -> list[Row]:
        """Rows of one side decoded at `precision` (None: any): CTF with the paper's refiner (`full`) or any,
        the baseline given `compute_of`."""
        return [r for r in self.rows if r.cell["side"] == side and (side != "ctf" or r.full_refiner or not full)
                and (side == "ctf" or r.cell["compute_of"] == compute_of)
                and precision in (None, r.cell["decode_precision"])]

    @property
    def baseline(self) -> Row | None:
        rows = self.row("baseline")
        return rows[0] if rows else None

    @property
    def several_k(self) -> bool:
        """CTF rows at more than one K (a map's setup): each row's label names its K."""
        return len({r.cell["k"] for r in self.row("ctf", full=False)}) > 1


def group(records: list[dict[str, Any]]) -> list[Setup]:
    setups: dict[str, Setup] = {}
    for rec in records:
        cell = {**CELL_DEFAULTS, **rec["cell"]}  # records from before a field existed: its default
        fields = {k: v for k, v in cell.items() if k not in SETUP_FIELDS_OUT}
        if isinstance(fields.get("scoring"), dict):  # a measurement added to some cells does not split the setup,
            scoring = {**SCORING_DEFAULTS, **fields["scoring"]}  # nor a field that older records lack
            fields["scoring"] = {k: v for k, v in scoring.items() if k not in Scoring.ADDS_ONLY}
        setup = setups.setdefault(json.dumps(fields, sort_keys=True), Setup(fields))
        row_fields = {k: cell[k] for k in ROW_FIELDS}
        if cell["side"] == "baseline":
            row_fields["k"] = row_fields["clustering"] = None  # the baseline does not depend on the clusters
        for row in setup.rows:
            if {k: row.cell[k] for k in ROW_FIELDS} == row_fields:
                row.records.append(rec)
                break
        else:
            setup.rows.append(Row({**fields, **row_fields}, [rec]))
    return list(setups.values())


# --- the metrics of a record -------------------------------------------------------------------------

def final(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda result: result["final"].get(key)


def nll(part: str) -> Callable[[dict[str, Any]], float]:
    return lambda result: result["nll"][part]


def nll_at(part: str, k: int) -> Callable[[dict[str, Any]], float | None]:
    """A likelihood part at K clusters: the record's own split where it was made at K, else the baseline's
    split at K (`Scoring.split_ks`); None where there is none (the parts depend on the clusters)."""
    def metric(result: dict[str, Any]) -> float | None:
        if result["K"] == k:
            return result["nll"][part]
        return result["nll"].get("at_k", {}).get(str(k), {}).get(part)
    return metric


def flops(result: dict[str, Any]) -> float:
    return result["flops"]


def _s(x: Spread | None, digits: int = 2, scale: float = 1.0) -> str:
    if x is None:
        return "-"
    return f"{scale * x.mean:.{digits}f} +- {scale * x.sd:.{digits}f}" if x.n > 1 else f"{scale * x.mean:.{digits}f}"


def _words(call: str, a: str, b: str) -> str:
    return {"a better": f"{a} better", "b better": f"{b} better", "tie": "tie (within the spread)"}[call]


# --- verdict ----------------------------------------------------------------------------------------

def also_fid(name: str) -> Callable[[dict[str, Any]], float | None]:
    """The final set's FID in another extractor's features (`Scoring.also_features`), where it was scored."""
    return lambda result: result["final"].get("features", {}).get(name, {}).get("fid")


def also_features(row: Row) -> list[str]:
    return sorted(set.intersection(*(set(r["result"]["final"].get("features", {})) for r in row.records)))


def _fid_call(a: Spread | None, b: Spread | None) -> str:
    ratio = f" ({a.mean / b.mean:.2f}x)" if a is not None and b is not None and b.mean > 0 else ""
    return f"{_s(a)} vs {_s(b)}{ratio} -> {_words(compare(a, b), 'CTF', 'baseline')}"


def verdict(setup: Setup) -> list[str]:
    """Plain sentences: CTF (with the full-size refiner, plain or with an option, any refiner with a baseline
    given its own compute, and the cheapest refiner that keeps the full one's FID) against each of its
    baselines in FID (at each side's best point; in other features too where both were scored so) and NLL,
    and which refiner is that cheapest one."""
    lines, base, with_k = [], setup.baseline, setup.several_k
    fid = final("fid")

    def matched(ctf: Row) -> list[Row]:  # the baselines given this CTF's compute (counted with a V-wide head, or
        # with the member-only one that only a refiner trained within clusters has)
        return [r for r in setup.row("baseline", compute_of=[ctf.cell["refiner_depth"], ctf.cell["refiner_steps"]])
                if (ctf.cell["refiner_mask"] or not r.cell["refiner_mask"])
                and r.cell["refiner_size"] == ctf.cell["refiner_size"]]

    ctfs = setup.row("ctf", full=False)
    cheap = [(full, cheapest_refiner(full, ctfs)) for full in ctfs if full.full_size]
    for ctf in [r for r in ctfs if r.full_size or matched(r) or any(r is c for _, c in cheap)]:
        name = ctf.label(with_k)
        for other in [base] + matched(ctf):
            if other is None:
                continue
            na, nb = ctf.of(nll("nll")), other.of(nll("nll"))
            # the baseline's split depends on the clusters: compare the parts only at the same K (its splits are
            # of k-means clusters)
            k = ctf.records[0]["result"]["K"]
            coarse, within = (other.of(nll_at("coarse", k)), other.of(nll_at("within", k))) \
                if ctf.cell["clustering"] == "kmeans" else (None, None)
            where = "" if other.records[0]["result"]["K"] == k else f", the baseline split at K={k}"
            parts = (f" (coarse part {_s(ctf.of(nll('coarse')), 3)} vs {_s(coarse, 3)}, within "
                     f"{_s(ctf.of(nll('within')), 3)} vs {_s(within, 3)}{where})"
                     if coarse is not None and within is not None else "")
            also = "".join(f"; FID in {f} features (n={ctf.records[0]['result']['final']['features'][f]['n']}) "
                           f"{_fid_call(ctf.of(also_fid(f)), other.of(also_fid(f)))}"
                           for f in also_features(ctf) if f in also_features(other))
            lines.append(f"{name} against the {other.label(False)}: FID {_fid_call(ctf.of(fid), other.of(fid))}"
                         f"{also}; NLL {_s(na, 3)} vs {_s(nb, 3)} nats/token -> "
                         f"{_words(compare(na, nb), 'CTF', 'baseline')}{parts}.")
    for ctf in setup.row("ctf", full=False):
        in_passes = ctf.of(lambda r: r["nll"].get("nll_in_passes"))
        if in_passes is not None and base is not None:
            nb = base.of(nll("nll"))
            lines.append(f"{ctf.label(with_k)}, NLL scored in its {ctf.cell['refine_steps']} passes (a random order): "
                         f"{_s(in_passes, 3)} vs the {base.label(False)} {_s(nb, 3)} nats/token -> "
                         f"{_words(compare(in_passes, nb), 'CTF', 'baseline')}.")
    for row in setup.rows:  # a lower decode precision against the same side in fp32
        if row.cell["decode_precision"] == "fp32":
            continue
        same = {**row.cell, "decode_precision": "fp32"}
        exact = next((r for r in setup.rows if r.cell == same), None)
        if exact is not None:
            a, b = row.of(fid), exact.of(fid)
            lines.append(f"{row.label(with_k)} against fp32: FID {_s(a)} vs {_s(b)} -> "
                         f"{_words(compare(a, b), row.cell['decode_precision'], 'fp32')}.")
    for row in setup.rows:  # a best point at the strongest guidance scored may not be the side's best
        tops = [max(p["settings"]["cfg1"] for p in r["result"]["points"]) for r in row.records]
        edge = sum(r["result"]["final"]["settings"]["cfg1"] == top for r, top in zip(row.records, tops))
        if edge and len(row.cell["scoring"]["cfg"]) > 1:
            lines.append(f"{row.label(with_k)}: best point at the largest CFG scored ({max(tops):g}) for {edge} of "
                         f"{len(row.records)} seeds; its FID might be lower with stronger guidance.")
    for full, cheapest in cheap:
        if cheapest is full:
            lines.append(f"No smaller refiner keeps the FID of {full.label(with_k)} (beyond the spread).")
        elif cheapest is not None:
            lines.append(f"Cheapest refiner whose FID is not worse than the full one's (beyond the spread): "
                         f"{cheapest.label(with_k)}, {cheapest.of(flops).mean / full.of(flops).mean:.2f}x the training "
                         f"FLOPs of {full.label(with_k)}"
                         + (" (against the baselines: above)." if base is not None or matched(cheapest) else "."))
    return lines


def cheapest_refiner(full: Row, ctfs: list[Row]) -> Row | None:
    """Of `full` (a full-size refiner's CTF) and the CTFs with smaller refiners, the same options (an option is
    not a smaller refiner, whatever its FLOPs) and the same clusters, the one trained on the fewest FLOPs whose FID
    is not worse than full's beyond the spread; None when there is no smaller one."""
    variants = [r for r in ctfs if all(r.cell[k] == full.cell[k] for k in REFINER_OPTIONS + ("k", "clustering"))]
    if len(variants) < 2:
        return None
    keep = [r for r in variants if compare(r.of(final("fid")), full.of(final("fid"))) != "b better"]
    return min(keep, key=lambda r: r.of(flops).mean)


# --- the report -------------------------------------------------------------------------------------

def field_label(field: str, value: object) -> str:
    """A setup field as the titles write it."""
    return {"codebook": f"V={value}", "size": f"{value} models"}.get(field, f"{field}={value}")


def setup_title(setup: Setup) -> str:
    f = setup.fields
    return (f"{field_label('codebook', f['codebook'])}, {field_label('size', f['size'])}, {f['steps']} steps at batch "
            f"{f['batch_size']}, lr {f['lr']:g} (cosine to the end), dropout {f['dropout']:g}")


def setup_table(setup: Setup) -> list[str]:
    with_k = setup.several_k
    n = setup.rows[0].records[0]["result"]["final"]["n"]
    lines = [f"| side | seeds | training TFLOPs | FID at own best (n={n}) | best point (most seeds) | IS | precision | "
             "recall | class consistency | NLL coarse | NLL within | NLL | images/s |", "|" + "---|" * 13]
    for row in setup.rows:
        best = Counter(json.dumps(r["result"]["final"]["settings"]) for r in row.records).most_common(1)[0][0]
        lines.append(f"| {row.label(with_k)} | {len(row.records)} | {_s(row.of(flops), 1, 1e-12)} | "
                     f"{_s(row.of(final('fid')))} | {best} | {_s(row.of(final('is_mean')))} | "
                     f"{_s(row.of(final('precision')), 3)} | {_s(row.of(final('recall')), 3)} | "
                     f"{_s(row.of(final('class_consistency')), 3)} | {_s(row.of(nll('coarse')), 3)} | "
                     f"{_s(row.of(nll('within')), 3)} | {_s(row.of(nll('nll')), 3)} | "
                     f"{_s(row.of(final('images_per_s')), 0)} |")
    base = setup.baseline
    ks = sorted({r.records[0]["result"]["K"] for r in setup.row("ctf", full=False) if r.cell["clustering"] == "kmeans"})
    at = [(k, base.of(nll_at("coarse", k)), base.of(nll_at("within", k))) for k in ks] if base else []
    if any(c is not None for _, c, _ in at) and ks != [base.records[0]["result"]["K"]]:
        lines += ["", f"The baseline's NLL split at each CTF row's K (the table's at K={base.records[0]['result']['K']}), "
                  "coarse + within: " + "; ".join(f"K={k}: {_s(c, 3)} + {_s(w, 3)}" for k, c, w in at
                                                  if c is not None and w is not None) + "."]
    for name in sorted({f for row in setup.rows for f in also_features(row)}):
        scored = [r for r in setup.rows if name in also_features(r)]
        n = scored[0].records[0]["result"]["final"]["features"][name]["n"]
        lines += ["", f"FID in {name} features (a class-balanced {n} of each final set against as many test images): "
                  + "; ".join(f"{r.label(with_k)} {_s(r.of(also_fid(name)))}" for r in scored) + "."]
    return lines + instances_table(setup)


def tokenizer_seed(record: dict[str, Any]) -> int:
    return record["cell"].get("tokenizer_seed", 0)


def on_instance(setup: Setup, seed: int) -> Setup:
    """The setup's cells on one tokenizer instance."""
    rows = [Row(row.cell, [r for r in row.records if tokenizer_seed(r) == seed]) for row in setup.rows]
    return Setup(setup.fields, [row for row in rows if row.records])


def instances_table(setup: Setup) -> list[str]:
    """Where a setup's cells span several tokenizer instances: each row's figures per instance (over its
    training seeds), and the verdict on each, so a ratio that moves with the tokenizer shows."""
    seeds = sorted({tokenizer_seed(r) for row in setup.rows for r in row.records})
    if len(seeds) < 2:
        return []
    features = sorted({f for row in setup.rows for f in also_features(row)})
    lines = ["", "By tokenizer instance (the rows above pool them):", "",
             "| side | tokenizer seed | seeds | FID |" + "".join(f" FID in {f} |" for f in features) + " NLL |",
             "|---|---|---|---|" + "---|" * len(features) + "---|"]
    instances = {seed: on_instance(setup, seed) for seed in seeds}
    for row in setup.rows:
        for seed in seeds:
            for part in [p for p in instances[seed].rows if p.cell is row.cell]:  # (none where it has no cells there)
                lines.append(f"| {row.label(setup.several_k)} | {seed} | {len(part.records)} | {_s(part.of(final('fid')))} |"
                             + "".join(f" {_s(part.of(also_fid(f)))} |" for f in features)
                             + f" {_s(part.of(nll('nll')), 3)} |")
    lines += ["", "The verdict on each instance (over its training seeds):", ""]
    for seed in seeds:
        lines += [f"- tokenizer {seed}: {line}" for line in verdict(instances[seed])]
    return lines


def floors_table(setup: Setup) -> list[str]:
    rows = [r for r in setup.row("ctf", full=False) if "floors" in r.records[0]["result"]]
    if not rows:
        return []
    first = rows[0].records[0]["result"]["floors"]["reconstruction"]
    n, features = first["n"], sorted(first.get("features", {}))
    lines = ["", f"Floors (real test images, class-balanced, n={n} per set; mean +- sd over the CTF cells' seeds):", "",
             "| floor | from | FID | IS |" + "".join(f" FID in {f} |" for f in features),
             "|---|---|---|---|" + "---|" * len(features)]
    hierarchies: dict[tuple[int, str], Row] = {}  # the uniform member's floor: one per hierarchy (K, clustering)
    for row in rows:
        hierarchies.setdefault((row.records[0]["result"]["K"], row.cell["clustering"]), row)
    for name in ("reconstruction", "true-coarse+uniform", "true-coarse+refiner"):
        chosen = {"reconstruction": rows[:1], "true-coarse+uniform": list(hierarchies.values())}.get(name, rows)
        for row in chosen:
            fid = row.of(lambda r: r["floors"][name]["fid"])
            is_ = row.of(lambda r: r["floors"][name].get("is_mean"))
            also = [row.of(lambda r, f=f: r["floors"][name].get("features", {}).get(f, {}).get("fid")) for f in features]
            source = "tokenizer, hierarchy"
            if name.endswith("refiner"):
                source = row.label(True)
            elif len(chosen) > 1:
                source += f" (K={row.records[0]['result']['K']}, {row.cell['clustering']})"
            lines.append(f"| {name} | {source} | {_s(fid)} | {_s(is_)} |" + "".join(f" {_s(a)} |" for a in also))
    return lines


def points_table(setup: Setup) -> tuple[list[str], dict[str, tuple[list[float], list[float], list[float]]]]:
    """Mean FID at every operating point per side, and each side's (recall, FID, IS) means for the plots."""
    lines, curves = [], {}
    rows = setup.row("ctf", full=False) + [r for r in setup.rows if r.cell["side"] == "baseline"]
    for row in rows:
        points: dict[str, list[dict[str, Any]]] = {}
        for rec in row.records:
            for p in rec["result"]["points"]:
                points.setdefault(json.dumps(p["settings"]), []).append(p)
        means = {k: {m: spread([p[m] for p in ps]).mean for m in ("fid", "recall", "is_mean") if all(m in p for p in ps)}
                 for k, ps in points.items()}
        n = row.records[0]["result"]["points"][0]["n"]
        some = {k: f" ({len(ps)} of {len(row.records)} seeds)" for k, ps in points.items() if len(ps) < len(row.records)}
        lines.append(f"| {row.label(True)} | {n} | " + ", ".join(f"{k}: {v['fid']:.2f}{some.get(k, '')}"
                                                                 for k, v in means.items()) + " |")
        pts = list(means.values())  # plotted as points: they have no order
        curves[row.label(True)] = ([v.get("recall", 0.0) for v in pts], [v["fid"] for v in pts],
                                   [v.get("is_mean", 0.0) for v in pts])
    return ["| side | n per point | mean FID at each point |", "|---|---|---|"] + lines, curves


def gap(ctf: Row, base: Row, metric: Callable[[dict[str, Any]], float]) -> tuple[str, str]:
    a, b = ctf.of(metric), base.of(metric)
    if a is None or b is None:
        return "-", "-"
    return f"{a.mean - b.mean:+.2f} +- {a.sd + b.sd:.2f}", _words(compare(a, b), "CTF", "baseline")


def map_rows(setup: Setup) -> list[Row]:
    """The CTF rows a map compares: full-size refiners, the paper's or trained within clusters, at every K."""
    return [r for r in setup.row("ctf", full=False) if r.full_size
            and all(r.cell[k] == CELL_DEFAULTS[k] for k in REFINER_OPTIONS if k != "refiner_mask")]


def map_section(setups: list[Setup], out: Path) -> list[str]:
    """The map: CTF minus the baseline at equal steps for every V, size, budget and K (a table and
    `map_fid_gap.png`), and which K generates best against the one `auto` picks."""
    lines = ["## The map: CTF minus the baseline at equal steps", "",
             "Negative FID and NLL gaps favour CTF; +- is the sum of the two sides' sds.", "",
             "| V | size | steps | CTF | K | FID gap (CTF - baseline) | call | NLL gap | call |", "|" + "---|" * 9]
    choices, curves = [], {}  # curves: the FID gap at each fixed K, per V, size and budget
    for setup in setups:
        f, base, rows = setup.fields, setup.baseline, map_rows(setup)
        for ctf in rows if base is not None else ():
            fid_gap, fid_call = gap(ctf, base, final("fid"))
            nll_gap, nll_call = gap(ctf, base, nll("nll"))
            k = ctf.records[0]["result"]["K"]
            auto = " (auto)" if ctf.cell["k"] == "auto" else ""
            lines.append(f"| {f['codebook']} | {f['size']} | {f['steps']} | {ctf.label(False)} | {k}{auto} | {fid_gap} | "
                         f"{fid_call} | {nll_gap} | {nll_call} |")
            if not auto:
                name = f"V={f['codebook']}, {f['size']}, {f['steps']} steps{clusters_label(ctf.cell['clustering'])}"
                gaps = curves.setdefault(name, {})
                gaps[k] = ctf.of(final("fid")).mean - base.of(final("fid")).mean
        choices += k_choice(setup, rows)
    if curves:
        plot_lines({name: (sorted(gaps), [gaps[k] for k in sorted(gaps)]) for name, gaps in curves.items()},
                   "K (clusters)", "FID gap, CTF - baseline", out / "map_fid_gap.png", log_x=True)
        lines += ["", "Plot: `map_fid_gap.png` (the FID gap against K, one line per V, size and budget)."]
    return lines + ([""] + choices if choices else []) + [""]


def k_choice(setup: Setup, rows: list[Row]) -> list[str]:
    """K chosen by generation quality (the lowest mean FID of the fixed K, and those tied with it) against
    the K that `auto` picked (the noise-floor criterion), per refiner kind."""
    lines = []
    for kind in dict.fromkeys(r.label(False) for r in rows):
        fixed = [r for r in rows if r.label(False) == kind and r.cell["k"] != "auto"]
        auto = next((r for r in rows if r.label(False) == kind and r.cell["k"] == "auto"), None)
        if not fixed or (len(fixed) < 2 and auto is None):
            continue
        best = min(fixed, key=lambda r: r.of(final("fid")).mean)
        fid = best.of(final("fid"))
        ties = [str(r.records[0]["result"]["K"]) for r in fixed
                if r is not best and compare(r.of(final("fid")), fid) == "tie"]
        f = setup.fields
        text = (f"- V={f['codebook']}, {f['size']}, {f['steps']} steps, {kind}: best FID at K={best.records[0]['result']['K']} "
                f"({_s(fid)})" + (f", tied by K={', '.join(ties)}" if ties else ""))
        if auto is not None:
            a = auto.of(final("fid"))
            picked = sorted({r["result"]["K"] for r in auto.records})
            text += (f"; `auto` picked K={'/'.join(map(str, picked))}: FID {_s(a)} -> "
                     f"{_words(compare(a, fid), 'auto', 'the best K')}")
        lines.append(text + ".")
    return lines


def write_report(records: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> dict[str, Any]:
    """BENCHMARKS.md, summary.json and plots in `out` from the grid's records."""
    records = json.loads(json.dumps(records))  # tuples as lists, as a reloaded results file has them
    setups = group(records)
    summary: dict[str, Any] = {**meta, "setups": []}
    lines = [f"# CTF against the baseline: grid `{meta['grid']}` on {meta['data']}", "",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}", f"- date: {meta['date']}",
             f"- cells: {len(records)}, {sum(r['wall_s'] for r in records) / 60:.1f} min of cell time in all "
             "(per cell below)" + (f"; this invocation {meta['wall_s'] / 60:.1f} min" if "wall_s" in meta else ""),
             "- artifacts: " + "; ".join(sorted({f"tokenizer {r['result']['artifacts']['tokenizer']}, classifier "
                                                 f"{r['result']['artifacts']['classifier']}" for r in records})),
             "- every figure: mean +- sd over training seeds (one sampling seed per training seed; where cells span "
             "several tokenizer instances, over every training seed on each, so the spread covers the tokenizer too); "
             "a gap counts only when it exceeds the sum of the two sds with at least 2 seeds a side, else it is called "
             "a tie",
             "- FID, IS, precision, recall and class consistency use the domain classifier's features against the "
             "whole test split (where a setup says so, FID also in other features on a share of the final set); FID "
             "at each side's own best operating point, on a final set drawn with another seed",
             "- NLL in nats per token on the test codes; CTF's is exact (coarse + refiner), the baseline's is split "
             "into the mass it puts on the true cluster and the rest", "", "## Verdict", ""]
    for i, setup in enumerate(setups, 1):
        lines += [f"Setup {i} ({setup_title(setup)}):", ""] + [f"- {v}" for v in verdict(setup)] + [""]
    for i, setup in enumerate(setups, 1):
        lines += [f"## Setup {i}: {setup_title(setup)}", ""] + setup_table(setup) + floors_table(setup)
        table, curves = points_table(setup)
        lines += ["", "Operating points (mean FID over seeds at each point; the trade-off plots draw the same means):",
                  ""] + table + [""]
        if i == 1:
            plot_lines({k: (c[0], c[1]) for k, c in curves.items()}, "recall", "FID (domain features)",
                       out / "fid_vs_recall.png", lines=False)
            plot_lines({k: (c[1], c[2]) for k, c in curves.items()}, "FID (domain features)", "IS (domain features)",
                       out / "is_vs_fid.png", lines=False)
            side_by_side({r.label(True): out / r.records[0]["result"]["samples"] for r in setup.rows},
                         out / "samples.png")
            lines += ["Plots: `fid_vs_recall.png`, `is_vs_fid.png`; samples of seed 0 at each side's best point: "
                      "`samples.png`.", ""]
        summary["setups"].append({"fields": setup.fields, "verdict": verdict(setup)})
    lines += steps_section(setups, out)
    if any(len({json.dumps(s.fields[f]) for s in setups}) > 1 for f in MAP_FIELDS) or any(s.several_k for s in setups):
        lines += map_section(setups, out)
    lines += ["## Cells", "", "| side | V | K | size | steps | seed | wall s |", "|---|---|---|---|---|---|---|"]
    for r in records:
        c = r["cell"]
        lines.append(f"| {r['result']['label']} | {c['codebook']} | {r['result']['K']} | {c['size']} | {c['steps']} | "
                     f"{c['seed']}" + (f" (tokenizer {tokenizer_seed(r)})" if tokenizer_seed(r) else "")
                     + f" | {r['wall_s']:.0f} |")
    (out / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def steps_section(setups: list[Setup], out: Path) -> list[str]:
    """FID at each budget (separate runs, each decayed to its end) for each family of setups that differ only
    in steps; families told apart by the fields that differ between them (a map's V and size)."""
    grouped: dict[str, list[Setup]] = {}
    for s in setups:
        grouped.setdefault(json.dumps({k: v for k, v in s.fields.items() if k != "steps"}, sort_keys=True), []).append(s)
    families = [sorted(f, key=lambda s: s.fields["steps"]) for f in grouped.values() if len(f) > 1]
    if not families:
        return []
    differ = [k for k in families[0][0].fields if k != "steps" and len({json.dumps(f[0].fields[k]) for f in families}) > 1]
    if "size" in differ and all(f[0].fields["refiner_size"] == f[0].fields["size"] for f in families):
        differ.remove("refiner_size")  # said by the size
    curves: dict[str, tuple[list[float], list[float]]] = {}
    lines = ["## FID against the training budget", "", "Each budget is its own run, its learning rate decayed to its "
             "last step (`fid_vs_steps.png`)."]
    for family in families:
        name = ", ".join(field_label(k, family[0].fields[k]) for k in differ)
        lines += (["", f"### {name}"] if name else []) + [
            "", "| side | " + " | ".join(f"{s.fields['steps']} steps" for s in family) + " |", "|---|" + "---|" * len(family)]
        for label in dict.fromkeys(r.label(True) for s in family for r in s.rows):
            cells = [next((r for r in s.rows if r.label(True) == label), None) for s in family]
            lines.append(f"| {label} | " + " | ".join(_s(r.of(final("fid"))) if r else "-" for r in cells) + " |")
            pts = [(s.fields["steps"], r.of(final("fid")).mean) for s, r in zip(family, cells) if r]
            curves[f"{name}: {label}" if name else label] = ([p[0] for p in pts], [p[1] for p in pts])
        lines += [""] + steps_to_fid_lines(family)
    plot_lines(curves, "training steps (each its own run)", "FID (domain features)", out / "fid_vs_steps.png",
               log_x=True)
    return lines


def steps_to_fid(points: list[tuple[float, float]], target: float) -> float | None:
    """The budget at which a side's FID first reaches `target`, from (steps, FID) at increasing budgets,
    interpolated linearly in log(steps) between the two budgets around it; None if no budget reaches it."""
    for (s0, f0), (s1, f1) in zip(points, points[1:]):
        if f0 <= target:
            return s0
        if f1 <= target:
            return math.exp(math.log(s0) + (f0 - target) / (f0 - f1) * (math.log(s1) - math.log(s0)))
    return points[-1][0] if points and points[-1][1] <= target else None


def steps_to_fid_lines(family: list[Setup]) -> list[str]:
    """How many steps each full-size CTF (one line per refiner kind and K) needs to reach the FID the equal-steps
    baseline has at the largest budget, and the reverse."""
    baseline = [(s.fields["steps"], s.baseline.of(final("fid")).mean) for s in family if s.baseline is not None]
    ctfs: dict[str, list[tuple[float, float]]] = {}
    rows = [(setup, r) for setup in family for r in setup.row("ctf", full=False) if r.full_size]
    with_k = len({r.records[0]["result"]["K"] for _, r in rows}) > 1  # the same label at every budget
    for setup, r in rows:
        ctfs.setdefault(r.label(with_k), []).append((setup.fields["steps"], r.of(final("fid")).mean))
    lines = []
    for label, ctf in ctfs.items() if baseline else ():
        for (a, ours), (b, theirs) in (((label, ctf), ("the baseline", baseline)),
                                       (("the baseline", baseline), (label, ctf))):
            last_steps, target = theirs[-1]
            needed = steps_to_fid(ours, target)
            if needed is None:
                reach = "none of the budgets"
            elif needed == ours[0][0]:  # no smaller budget measured to interpolate from
                reach = (f"{needed:.0f} steps or fewer (its smallest budget measured; at most {needed / last_steps:.2f}x "
                         "as many)")
            else:
                reach = f"about {needed:.0f} steps ({needed / last_steps:.2f}x as many)"
            lines.append(f"- {a[0].upper() + a[1:]} reaches the FID {b} has at {last_steps:.0f} steps ({target:.2f}) "
                         f"in {reach}.")
    if not lines:
        return []
    return ["Steps to FID (mean FIDs, interpolated linearly in log steps between the budgets):", ""] + lines + [""]


# --- plots -----------------------------------------------------------------------------------------

def plot_lines(xs_ys: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, path: Path,
               lines: bool = True, log_x: bool = False) -> None:
    """One series per name, each with its own marker, the legend below the axes (it would hide the points);
    `lines=False` draws the points alone (operating points have no order); `log_x` spaces budgets and K that
    double evenly, ticked at the values drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_with_pil(xs_ys, xlabel, ylabel, path, lines)
        return
    fig, ax = plt.subplots(figsize=(6.0, 3.8), dpi=120)
    markers = "os^Dv<>pP*Xh"
    for i, (name, (xs, ys)) in enumerate(xs_ys.items()):
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=name, linestyle="-" if lines else "none", alpha=0.8)
    if log_x:
        ticks = sorted({x for xs, _ in xs_ys.values() for x in xs})
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16), frameon=False)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _plot_with_pil(xs_ys: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, path: Path,
                   lines: bool = True) -> None:
    """A plain line plot for machines without matplotlib."""
    w, h, m = 520, 360, 50
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    xs = [x for a, _ in xs_ys.values() for x in a] or [0, 1]
    ys = [y for _, b in xs_ys.values() for y in b] or [0, 1]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda x: m + (x - x0) / max(x1 - x0, 1e-9) * (w - 2 * m)  # noqa: E731
    sy = lambda y: h - m - (y - y0) / max(y1 - y0, 1e-9) * (h - 2 * m)  # noqa: E731
    d.rectangle([m, m, w - m, h - m], outline="black")
    d.text((m, 10), f"{ylabel} ({y0:.3g} .. {y1:.3g}) against {xlabel} ({x0:.3g} .. {x1:.3g})", fill="black")
    colors = ["blue", "red", "green", "orange", "purple", "brown"]
    for i, (name, (a, b)) in enumerate(xs_ys.items()):
        color = colors[i % len(colors)]
        pts = [(sx(x), sy(y)) for x, y in zip(a, b)]
        if lines and len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for px, py in pts:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        d.text((w - m - 200, m + 5 + 12 * i), name, fill=color)
    im.save(path)


def side_by_side(grids: dict[str, Path], path: Path) -> None:
    """Sample grids (PNG files) next to each other, each titled."""
    titled = []
    for name, file in grids.items():
        grid = Image.open(file).convert("RGB")
        canvas = Image.new("RGB", (grid.width, grid.height + 14), "white")
        canvas.paste(grid, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), name[:40], fill="black")
        titled.append(canvas)
    width = sum(g.width for g in titled) + 8 * (len(titled) - 1)
    out = Image.new("RGB", (width, max(g.height for g in titled)), "white")
    x = 0
    for g in titled:
        out.paste(g, (x, 0))
        x += g.width + 8
    out.save(path)
