"""Statistics over seeds and the paper's claims: which arm plays each role, paired differences, verdicts.

Part of ``normsam report`` (see :mod:`normsam.analysis.report`); the tests themselves are in
:mod:`normsam.analysis.stats`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from normsam.analysis import stats
from normsam.analysis._format import markdown_table, md, pm, value_text
from normsam.analysis.grouping import Group
from normsam.analysis.run_sharpness import SETTINGS as SHARPNESS_SETTINGS
from normsam.optim.scopes import MASK_SCOPES
from normsam.train.config_help import SAM_KEYS

__all__ = [
    "CLAIMS_FILE", "DEFAULT_MARGIN", "ROLE_SCOPES", "ACCURACY", "ClaimsSelection", "load_claims_selection",
    "find_claims_file", "RoleChoice", "Context", "analyse", "arm_rows", "paired_rows", "claim_rows",
    "statistics_markdown",
]


#: A file in a folder given to the report that chooses the arms of the claims and the margin δ (see make_report).
CLAIMS_FILE = "claims.yaml"

#: δ, in test-accuracy points, of the claims "at least as good", "no better" and "about as good".
DEFAULT_MARGIN = 0.2

#: The scope of the arms that can play each role of the claims.
ROLE_SCOPES = {"sgd": "none", "sam-all": "all", "sam-on": "norm", "no-norm": "no-norm", "random": "random",
               "ssam-f": "ssam-f"}

#: Settings that make runs incomparable in the claims (data, model, optimizer, …): everything but the SAM ones.
_ARM_KEYS = frozenset({"scope", "perturbation", "rho"}) | SAM_KEYS

#: The accuracy the claims compare (and the report's per-arm figures show): the final test accuracy.
ACCURACY = "final_test_acc"

#: memorization: the accuracy on the training examples whose labels were flipped, against the flipped labels
#: (``memorization=true``, the default with label noise); how much of the noise an arm fitted.
_STAT_METRICS = (("final_test_acc", "test acc. (%)", 2), ("final_val_acc", "val. acc. (%)", 2),
                 ("sharpness", "sharpness", 4), ("final_flipped_acc", "memorization (%)", 2))


@dataclass
class ClaimsSelection:
    """The arms named for the roles (role → point names or arm labels, one per context) and the margin δ."""

    arms: dict[str, list[str]] = field(default_factory=dict)
    margin: float = DEFAULT_MARGIN
    source: str | None = None
    #: further evaluations of the claims: label → {role → arms}; those roles are played by the named arms
    also: dict[str, dict[str, list[str]]] = field(default_factory=dict)


def load_claims_selection(source: str | Path | Mapping[str, Any] | None) -> ClaimsSelection:
    """Read a claims selection: a YAML file or its content as a mapping::

        arms:                          # role -> the arm that plays it (default: chosen as make_report says)
          sam-on: scope=norm,rho=0.5   # a sweep point (the folder above seed=…) or an arm label from arms.csv
          sam-all:                     # a list: one per context (a block list: the names hold commas)
            - scope=all,rho=0.1
            - scope=all,rho=0.1,data=cifar10
        margin: 0.2                    # δ in test-accuracy points
        also:                          # the claims again, with other arms in some roles (each under a label)
          with the warm-up:
            sam-on: scope=norm,rho_warmup_epochs=6,rho=0.6
            sam-all: scope=all,rho_warmup_epochs=6,rho=0.4

    Roles: sgd, sam-all, sam-on, no-norm, random, ssam-f. Under ``also:`` each label's claims are those with a
    part played by one of its roles and every role played by some arm (``C1 (with the warm-up)``); its other
    roles are the main evaluation's.
    """
    if source is None:
        return ClaimsSelection()
    described = None
    if not isinstance(source, Mapping):
        described = str(source)
        try:
            source = yaml.safe_load(Path(source).read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{described} is not valid YAML: {err}") from None
    where = described or "the claims selection"
    if not isinstance(source, Mapping):
        raise ValueError(f"{where} must be a mapping with the keys arms and margin, got {type(source).__name__}.")
    unknown = [key for key in source if key not in ("arms", "margin", "also")]
    if unknown:
        raise ValueError(f"Unknown key {unknown[0]!r} in {where}; valid keys are arms, margin and also.")
    selection = ClaimsSelection(margin=source.get("margin", DEFAULT_MARGIN), source=described)
    selection.arms = _role_arms(source.get("arms") or {}, f"arms in {where}")
    also = source.get("also") or {}
    if not isinstance(also, Mapping):
        raise ValueError(f"also in {where} must map labels to roles and arms, e.g. also: {{with the warm-up: "
                         "{sam-on: scope=norm,rho_warmup_epochs=6,rho=0.6}}.")
    for label, arms in also.items():
        selection.also[str(label)] = _role_arms(arms, f"also: {label} in {where}")
        if not selection.also[str(label)]:
            raise ValueError(f"also: {label} in {where} names no arm; name the arms of its roles, e.g. "
                             "sam-on: scope=norm,rho=0.5.")
    margin = selection.margin
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
        raise ValueError(f"margin in {where} must be a number >= 0 (test-accuracy points), got {margin!r}.")
    selection.margin = float(margin)
    return selection


def _role_arms(arms: Any, where: str) -> dict[str, list[str]]:
    """role → the arm names given for it (one per context), from ``{role: name or [names]}``."""
    if not isinstance(arms, Mapping):
        raise ValueError(f"{where} must map roles to arms, e.g. {{sam-on: scope=norm,rho=0.5}}.")
    out = {}
    for role, names in arms.items():
        if role not in ROLE_SCOPES:
            raise ValueError(f"Unknown role {role!r} in {where}; valid roles are {', '.join(ROLE_SCOPES)}.")
        out[role] = [str(n) for n in (names if isinstance(names, list) else [names])]
    return out


def find_claims_file(paths: Sequence[str | Path]) -> Path | None:
    """The :data:`CLAIMS_FILE` in the first of ``paths`` (folders given to the report) that has one, or None."""
    for path in paths:
        if (Path(path) / CLAIMS_FILE).is_file():
            return Path(path) / CLAIMS_FILE
    return None


@dataclass
class RoleChoice:
    """The arm that plays a role in one context (None: none does), and how it was chosen (or why none)."""

    role: str
    group: Group | None
    how: str


@dataclass
class Context:
    """Arms that can be compared (same data, model, base optimizer, …), the arm of each role, the claims."""

    title: str
    groups: list[Group]
    roles: dict[str, RoleChoice] = field(default_factory=dict)
    claims: list[tuple[stats.Claim, str, list[stats.PartResult]]] = field(default_factory=list)
    #: the roles of each further evaluation (``also:`` in the selection) that has an arm in this context
    also: dict[str, dict[str, RoleChoice]] = field(default_factory=dict)

    def roles_of(self, group: Group) -> list[str]:
        return [role for role, choice in self.roles.items() if choice.group is group]

    def heading(self) -> str:
        return self.title or "all runs"


def _contexts(groups: Sequence[Group], keys: Sequence[str]) -> list[Context]:
    """The groups split by the settings other than the SAM ones; titled by those that differ."""
    context_keys = [k for k in keys if k not in _ARM_KEYS]
    split: dict[str, list[Group]] = {}
    for g in groups:
        split.setdefault(json.dumps([g.columns.get(k) for k in context_keys]), []).append(g)
    def value(members: list[Group], key: str) -> str:
        return value_text(members[0].columns.get(key))

    varying = [k for k in context_keys if len({value(members, k) for members in split.values()}) > 1]
    return [Context(", ".join(f"{k}={value(members, k)}" for k in varying), members) for members in split.values()]


def _plain(g: Group) -> bool:
    """An arm without a late/early SAM window, an ascent every k steps or the momentum ascent (those are
    variants of a role)."""
    s = g.settings
    return (not s.get("sam_start") and s.get("sam_end") is None and (s.get("ascent_interval") or 1) <= 1
            and s.get("ascent", "gradient") == "gradient")


def _choose(role: str, groups: Sequence[Group], named: Sequence[str], source: str) -> RoleChoice:
    """The arm of ``role`` among ``groups`` (one context): the one named, else the documented automatic pick."""
    scope = ROLE_SCOPES[role]
    named_arm = _named_arm(role, groups, named, source)
    if named_arm:
        return RoleChoice(role, named_arm, f"named in {source}")
    of_scope = [g for g in groups if g.columns.get("scope") == scope]
    candidates = [g for g in of_scope if _plain(g)]
    if not candidates:
        if of_scope:
            return RoleChoice(role, None, f"only variants ({', '.join(g.label for g in of_scope)}); name one under "
                                          f"arms: in {CLAIMS_FILE}")
        return RoleChoice(role, None, f"no arm with scope {scope}")
    notes = []
    if scope in MASK_SCOPES:  # the claims are about a mask as sparse as SAM-ON's, so the sparsest one
        top = max(g.settings.get("sparsity") or 0.0 for g in candidates)
        if any((g.settings.get("sparsity") or 0.0) != top for g in candidates):
            notes.append(f"highest sparsity ({top:g}), the closest to SAM-ON's")
        candidates = [g for g in candidates if (g.settings.get("sparsity") or 0.0) == top]
    if len(candidates) == 1:
        notes.append("the only candidate")
        return RoleChoice(role, candidates[0], "; ".join(notes))
    val = [g.stat("final_val_acc")[0] for g in candidates]
    if all(v is not None for v in val):
        best = max(range(len(candidates)), key=lambda i: val[i])  # the first of equals
        notes.append(f"best mean validation accuracy ({val[best]:.2f}) of {len(candidates)} arms")
    else:
        test = [g.stat(ACCURACY)[0] for g in candidates]
        best = max(range(len(candidates)), key=lambda i: test[i])
        notes.append(f"best mean TEST accuracy of {len(candidates)} arms, because some have no validation accuracy "
                     f"(val_split=0): an optimistic choice; name the arm under arms: in {CLAIMS_FILE}")
    return RoleChoice(role, candidates[best], "; ".join(notes))


def _claim_arm(g: Group | None, sharpness_missing: str | None) -> stats.Arm | None:
    if g is None:
        return None
    missing = {"sharpness": sharpness_missing} if sharpness_missing else {}
    if not sharpness_missing and not g.per_seed("sharpness"):
        missing["sharpness"] = f"no sharpness for {g.label} (`normsam sharpness RUN_DIR` or sharpness_at_end=true)"
    return stats.Arm(g.label, {ACCURACY: g.per_seed(ACCURACY), "sharpness": g.per_seed("sharpness")}, missing)


def _sharpness_mismatch(a: Group | None, b: Group | None) -> str | None:
    """Why the sharpness of two arms cannot be compared (measured with other settings), or None."""
    measured = [r.sharpness for g in (a, b) if g for r in g.runs if r.sharpness]
    settings = {json.dumps({k: m.get(k) for k in SHARPNESS_SETTINGS}, sort_keys=True) for m in measured}
    if len(settings) > 1:
        return (f"the sharpness of {a.label} and {b.label} was measured with different settings (see runs.csv); "
                "measure both alike")
    return None


def analyse(groups: Sequence[Group], keys: Sequence[str], selection: ClaimsSelection) -> list[Context]:
    """The contexts with the arm of each role and the verdicts of the claims.

    Raises:
        ValueError: the selection names an arm that is not among the groups, or one of another scope.
    """
    source = selection.source or "the claims selection"
    for role, names in [item for arms in (selection.arms, *selection.also.values()) for item in arms.items()]:
        for name in names:
            matches = [g for g in groups if name in (g.point, g.label)]
            if not matches:
                known = sorted({g.point for g in groups if g.point} | {g.label for g in groups})
                raise ValueError(f"{source}: no arm {name!r} for {role}; use a sweep point or an arm label: "
                                 f"{', '.join(known)}.")
            for g in matches:
                if g.columns.get("scope") != ROLE_SCOPES[role]:
                    raise ValueError(f"{source}: {name!r} ({g.label}) cannot be {role}, whose scope is "
                                     f"{ROLE_SCOPES[role]}; name an arm with that scope.")
    contexts = _contexts(groups, keys)
    for ctx in contexts:
        ctx.roles = {role: _choose(role, ctx.groups, selection.arms.get(role, []), source) for role in ROLE_SCOPES}
        ctx.claims = _evaluate(ctx.roles, selection.margin)
        for label, named in selection.also.items():
            roles = {role: _named_here(role, ctx.groups, names, source, label) for role, names in named.items()}
            if not any(choice.group for choice in roles.values()):
                continue  # none of its arms is in this context
            ctx.also[label] = roles
            merged = {**ctx.roles, **roles}
            for claim, outcome, parts in _evaluate(merged, selection.margin):
                claim_roles = {p.a for p in claim.parts} | {p.b for p in claim.parts}
                # a claim none of whose roles changed would repeat a main row; one with a role no arm plays here
                # is "not tested" in the main rows already
                if claim_roles & set(roles) and all(merged[role].group for role in claim_roles):
                    ctx.claims.append((replace(claim, name=f"{claim.name} ({label})"), outcome, parts))
    return contexts


def _evaluate(roles: Mapping[str, RoleChoice], margin: float) -> list[tuple[stats.Claim, str, list[stats.PartResult]]]:
    chosen = {role: choice.group for role, choice in roles.items()}
    mismatch = _sharpness_mismatch(chosen["sam-on"], chosen["sam-all"])
    return stats.evaluate_claims({role: _claim_arm(g, mismatch) for role, g in chosen.items()}, margin)


def _named_here(role: str, groups: Sequence[Group], named: Sequence[str], source: str, label: str) -> RoleChoice:
    """The arm named for ``role`` under ``also: label`` among one context's groups (never an automatic pick)."""
    named_arm = _named_arm(role, groups, named, source, f" under also: {label}")
    if named_arm:
        return RoleChoice(role, named_arm, f"named under also: {label} in {source}")
    return RoleChoice(role, None, f"none of the arms named under also: {label} is in this context")


def _named_arm(role: str, groups: Sequence[Group], named: Sequence[str], source: str, where: str = "") -> Group | None:
    """The one group of a context whose point or label is among ``named`` (None: none is); several are refused."""
    chosen = [g for g in groups if g.point in named or g.label in named]
    if len(chosen) > 1:
        raise ValueError(f"{source} names several {role} arms of one context{where} "
                         f"({', '.join(g.label for g in chosen)}); name one per context.")
    return chosen[0] if chosen else None


def _interval_row(prefix: str, interval: stats.Interval) -> dict[str, Any]:
    return {f"{prefix}_n": interval.n, f"{prefix}_mean": interval.mean, f"{prefix}_std": interval.std,
            f"{prefix}_ci_low": interval.lo, f"{prefix}_ci_high": interval.hi}


def arm_rows(contexts: Sequence[Context], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per arm for ``arms.csv``: its settings, the roles it plays, mean/std/95% CI of each metric."""
    rows = []
    for ctx in contexts:
        for g in ctx.groups:
            roles = ctx.roles_of(g)
            row = {"context": ctx.title, "arm": g.label, "point": g.point,
                   **{k: value_text(g.columns[k]) for k in keys}, "roles": " ".join(roles),
                   "chosen_by": " | ".join(ctx.roles[r].how for r in roles), "seeds": " ".join(map(str, g.seeds))}
            for key, _, _ in _STAT_METRICS:
                row.update(_interval_row(key, g.interval(key)))
            rows.append(row)
    return rows


#: The roles every arm is paired with, by seed, in paired.csv and the report.
_REFERENCES = ("sgd", "sam-all", "sam-on")


def _paired_with(ctx: Context) -> list[tuple[Group, str, Group, str, stats.Paired]]:
    """(arm, reference role, reference arm, metric, paired differences) against the SGD, SAM-all and SAM-ON arms."""
    out = []
    for ref_role in _REFERENCES:
        ref = ctx.roles[ref_role].group
        if ref is None:
            continue
        for g in ctx.groups:
            if g is ref:
                continue
            for metric in (ACCURACY, "sharpness"):
                pairs = stats.paired(g.per_seed(metric), ref.per_seed(metric))
                if pairs.seeds:
                    out.append((g, ref_role, ref, metric, pairs))
    return out


def paired_rows(contexts: Sequence[Context]) -> list[dict[str, Any]]:
    """One row per (arm, reference, metric) for ``paired.csv``: arm − reference over the seeds both have."""
    rows = []
    for ctx in contexts:
        for g, ref_role, ref, metric, pairs in _paired_with(ctx):
            rows.append({"context": ctx.title, "arm": g.label, "reference_role": ref_role, "reference": ref.label,
                         "metric": metric, "seeds": " ".join(map(str, pairs.seeds)),
                         **_interval_row("diff", pairs.interval)})
    return rows


def claim_rows(contexts: Sequence[Context]) -> list[dict[str, Any]]:
    """One row per part of each claim for ``claims.csv``."""
    rows = []
    for ctx in contexts:
        for claim, outcome, parts in ctx.claims:
            for p in parts:
                interval = p.paired.interval if p.paired else stats.describe([])
                rows.append({
                    "context": ctx.title, "claim": claim.name, "statement": claim.statement, "claim_verdict": outcome,
                    "test": p.test, "arm_a": p.arm_a, "arm_b": p.arm_b, "metric": p.part.metric,
                    "relation": p.part.relation, "margin": p.margin,
                    "seeds": " ".join(map(str, p.paired.seeds)) if p.paired else "",
                    **_interval_row("diff", interval), "verdict": p.verdict, "seeds_needed": p.seeds_needed,
                    "note": p.note,
                })
    return rows


def statistics_markdown(contexts: Sequence[Context], margin: float,
                        figures: Sequence[tuple[str, Path, str]], selection_source: str | None) -> str:
    """The *Statistics* and *Claims* sections of report.md: per context the arms' intervals and the paired
    differences, the ``figures`` ((title, path, caption) of the per-arm figures), then the arms of the roles and
    each claim's parts with their verdicts; ``margin`` is δ, ``selection_source`` the claims file that set it
    (None: the default)."""
    lines = ["## Statistics", "",
             "Per arm (a method with its settings, over its seeds): mean, sample standard deviation and the 95% "
             "t-interval of the mean (mean ± t₀.₉₇₅,ₙ₋₁ · s/√n); n/a with one seed. Paired differences are taken "
             "seed by seed over the seeds both arms have; the interval is the t-interval of those differences. "
             "Tables: [arms.csv](arms.csv), [paired.csv](paired.csv).", ""]
    for ctx in contexts:
        if len(contexts) > 1:
            lines += [f"### {md(ctx.heading())}", ""]
        memorized = any(g.interval("final_flipped_acc").n for g in ctx.groups)  # only runs with label noise have it
        rows = []
        for g in ctx.groups:
            acc = g.interval(ACCURACY)
            rows.append([md(g.label), ", ".join(stats.ROLE_NAMES[r] for r in ctx.roles_of(g)), str(acc.n),
                         pm(acc.mean, acc.std, 2), acc.ci_text(2),
                         g.interval("final_val_acc").text(2), g.interval("sharpness").text(4),
                         *([g.interval("final_flipped_acc").text(2)] if memorized else [])])
        lines += [markdown_table(["arm", "role", "n", "test acc. mean ± std (%)", "test acc. 95% CI",
                                  "val. acc. mean [95% CI]", "sharpness mean [95% CI]",
                                  *(["memorization of the flipped labels (%) mean [95% CI]"] if memorized else [])],
                                 rows, numeric_from=2), ""]
        refs = [(role, ctx.roles[role].group) for role in _REFERENCES if ctx.roles[role].group]
        if refs:
            diffs = {(id(g), role): pairs for g, role, _, metric, pairs in _paired_with(ctx) if metric == ACCURACY}
            header = ["arm"] + [f"− {md(ref.label)}: mean [95% CI]" for _, ref in refs]
            rows = []
            for g in ctx.groups:
                cells = [md(g.label)]
                for role, ref in refs:
                    pairs = diffs.get((id(g), role))
                    cells.append(f"{pairs.interval.text(2, signed=True)} (n={pairs.interval.n})" if pairs
                                 else "–" if g is ref else "no common seed")
                rows.append(cells)
            lines += ["Paired differences in test accuracy (points), arm − reference:", "",
                      markdown_table(header, rows, numeric_from=1), ""]
    for title, path, caption in figures:
        lines += [f"### {title}", "", f"![{title}]({path.name})", "", caption, ""]

    lines += ["## Claims", "",
              f"Each claim compares the arms that play its roles, by paired differences a − b over common seeds and "
              f"their 95% t-interval [lo, hi]; δ = {margin:g} test-accuracy points"
              + (f" (from {md(selection_source)})" if selection_source else
                 f" (default; set `margin:` in a {CLAIMS_FILE})") + ". Table: [claims.csv](claims.csv).", ""]
    for ctx in contexts:
        if len(contexts) > 1:
            lines += [f"### {md(ctx.heading())}", ""]
        rows = [[stats.ROLE_NAMES[role] + (f" ({md(label)})" if label else ""), md(c.group.label) if c.group else "–",
                 md(c.how)]
                for label, roles in [("", ctx.roles), *ctx.also.items()] for role, c in roles.items()]
        lines += ["Arms of the roles:", "", markdown_table(["role", "arm", "chosen by"], rows, numeric_from=3), ""]
        rows = []
        for claim, outcome, parts in ctx.claims:
            for i, p in enumerate(parts):
                interval = p.paired.interval if p.paired else None
                rule = stats.RULES[p.part.relation][1].replace("δ", f"{p.margin:g}")
                rows.append([
                    f"**{claim.name}**" if i == 0 else "", md(claim.statement) if i == 0 else "",
                    f"**{outcome}**" if i == 0 else "", md(p.test),
                    md(f"{p.arm_a or '–'} − {p.arm_b or '–'}"),
                    interval.text(4 if p.part.metric == "sharpness" else 2, signed=True) if interval else "",
                    str(interval.n) if interval else "", md(rule), p.verdict, _seeds_needed_text(p), md(p.note),
                ])
        header = ["claim", "statement", "verdict", "test", "a − b", "mean [95% CI]", "n", "rule", "part verdict",
                  "seeds to decide", "note"]
        lines += [markdown_table(header, rows, numeric_from=len(header)), ""]
    lines += ["Rules (lo, hi: the 95% interval of a − b): "
              + "; ".join(f"“{sign}” ({what}): {rule}" for sign, (what, rule) in stats.RULES.items())
              + ". δ applies to accuracy only; sharpness is compared strictly. A claim is contradicted if a part is, "
              "not tested if a part is (an arm missing), supported if every part is, else inconclusive (an interval "
              "across the bounds, or n/a with one common seed). *Seeds to decide*, for an inconclusive part: the "
              "fewest paired seeds whose 95% interval, with the observed mean difference and paired standard "
              "deviation, would clear the bound (`scipy.stats.t`); a large number says the effect is small against "
              "the seed-to-seed spread, not only that seeds are missing; “–” where it cannot be said (one seed, "
              "a mean on the bound, or more than 10,000 seeds).",
              "",
              "Arms of the roles, unless named under `arms:` in a " + CLAIMS_FILE + " in a folder given to the report: "
              "SGD = the runs without SAM, SAM-all/SAM-ON/no-norm/random mask/SSAM-F = the arms of that scope with SAM "
              "over the whole training and an ascent every step; among several, random mask and SSAM-F keep the "
              "highest sparsity, then the arm with the best mean validation accuracy is taken (the best mean test "
              "accuracy, marked as such, when there is no validation split).", ""]
    return "\n".join(lines)


def _seeds_needed_text(p: stats.PartResult) -> str:
    """The *seeds to decide* cell: blank unless the part is inconclusive."""
    if p.verdict != stats.INCONCLUSIVE:
        return ""
    return "–" if p.seeds_needed is None else str(p.seeds_needed)
