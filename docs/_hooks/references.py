"""What the site generates from the code when it is built, so that it cannot drift from it.

- :func:`cli_reference`: every ``normsam`` command, its usage and its arguments, from the argparse parser
  (``normsam.cli.build_parser``);
- :func:`config_reference`: every config key of ``normsam train``, with its type, default and meaning, from
  ``TrainConfig`` and ``normsam.train.config_help.DESCRIPTIONS``;
- :func:`api_blocks`: one mkdocstrings block per public name of a module (its ``__all__``, read statically);
- :data:`FIGURES`: figures drawn from the code and the records (what SAM-ON perturbs on ResNet-20, the step
  cost of the regime study's benchmark).

``docs/_hooks/mkdocs_hooks.py`` puts them into the pages (a marker ``<!-- normsam:NAME ARG -->`` in a page is
replaced) and into the site's files; ``tests/test_docs.py`` checks them without building the site.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _cell(text: object) -> str:
    """Text for a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


# --- the CLI --------------------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> tuple[dict[str, argparse.ArgumentParser], dict[str, str]]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices), {a.dest: a.help or "" for a in action._choices_actions}


def _argument_row(action: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
    if action.option_strings and action.nargs != 0:
        names += f" `{action.metavar or action.dest.upper()}`"
    default = action.default
    shown = "" if default in (None, False, [], argparse.SUPPRESS) or not action.option_strings else f"`{default}`"
    helptext = action.help or ""
    if "%(" in helptext:
        helptext = helptext % {**vars(action), "prog": ""}
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        helptext += (" " if helptext else "") + "(one of: " + ", ".join(f"`{c}`" for c in action.choices) + ")"
    return f"| {names} | {shown} | {_cell(helptext)} |"


def cli_reference() -> str:
    """Markdown: a table of the commands, then per command its usage and a table of its arguments."""
    from normsam.cli import build_parser

    parser = build_parser()
    commands, helps = _subcommands(parser)
    out = [f"`normsam` has {len(commands)} commands. This page is generated from the command's argparse parser "
           "(`normsam.cli.build_parser()`) each time the site is built; `normsam COMMAND --help` prints the same.",
           "", "| command | what it does |", "|---|---|"]
    out += [f"| [`normsam {name}`](#normsam-{name}) | {_cell(helps.get(name, ''))} |" for name in commands]
    for name, sub in commands.items():
        out += ["", f"## normsam {name}", "", _cell(helps.get(name, "")) + ("." if helps.get(name) else ""), ""]
        if sub.description:
            out += [sub.description, ""]
        usage = " ".join(sub.format_usage().split())  # one line; the table below has the details
        out += ["```text", usage.removeprefix("usage: "), "```", ""]
        rows = [_argument_row(a) for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        if rows:
            out += ["| argument | default | meaning |", "|---|---|---|", *rows]
        if name == "train":
            out += ["", "The `key=value` overrides are the config keys of the [config reference](config.md)."]
    return "\n".join(out) + "\n"


# --- the config keys ------------------------------------------------------------------------------------


def _sections(cls: type) -> dict[str, str]:
    """Field name -> the ``# section`` comment above it in the dataclass's source."""
    sections, current = {}, "other"
    for line in inspect.getsource(cls).splitlines():
        comment = re.match(r"^    # (?!\()(.+)$", line)
        field = re.match(r"^    (\w+)\s*:", line)
        if comment:
            current = re.split(r" \(|;|:", comment.group(1))[0].strip()
        elif field:
            sections[field.group(1)] = current
    return sections


def _type_name(hint: object) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def config_reference() -> str:
    """Markdown: one table per section of ``TrainConfig`` (key, type, default, meaning)."""
    from normsam.train.config import PRESETS, TrainConfig
    from normsam.train.config_help import DESCRIPTIONS, SAM_KEYS, default_text

    hints = typing.get_type_hints(TrainConfig)
    sections = _sections(TrainConfig)
    fields = dataclasses.fields(TrainConfig)
    out = [f"`normsam train` has {len(fields)} config keys. This page is generated from `TrainConfig` (the keys, "
           "their types and defaults) and `normsam.train.config_help.DESCRIPTIONS` (their meaning) each time the "
           "site is built; `normsam train --help` prints the same list. A key marked † only matters with a SAM "
           "scope: given together with `scope=none` on the command line it is refused.",
           "", f"Presets for `--config`: {', '.join(f'`{p}`' for p in PRESETS)}.", ""]
    current = None
    for f in fields:
        section = sections.get(f.name, "other")
        if section != current:
            current = section
            out += ["", f"## {section[0].upper()}{section[1:]}", "", "| key | type | default | meaning |",
                    "|---|---|---|---|"]
        mark = " †" if f.name in SAM_KEYS else ""
        out.append(f"| `{f.name}`{mark} | {_cell(_type_name(hints[f.name]))} | `{default_text(f)}` | "
                   f"{_cell(DESCRIPTIONS.get(f.name, ''))} |")
    return "\n".join(out) + "\n"


# --- the API --------------------------------------------------------------------------------------------

#: How the API page groups ``normsam.__all__``; a public name not listed here still gets its block, under
#: "Other public names".
API_GROUPS: dict[str, list[str]] = {
    "The optimizer": ["SAM", "SAMOptions"],
    "Variants": ["GSAM", "WSAM", "LookSAM", "FriendlySAM", "GCSAM", "BSAM"],
    "ρ schedules": ["RhoSchedule", "RhoWarmup", "RhoLambda", "RhoFollowsLR"],
    "Scopes and parameter groups": ["param_groups", "describe_scope", "is_norm_layer", "ParamInfo", "ScopeReport",
                                    "frozen_running_stats", "register_momentum_state"],
    "Sharpness": ["measure_sharpness", "SharpnessResult"],
    "Constants": ["PERTURBATIONS", "SCOPES", "PARAMETER_SCOPES", "MASK_SCOPES", "BN_POLICIES", "ASCENTS",
                  "__version__"],
}


def public_names(module: str) -> list[str]:
    """The module's ``__all__``, read from its source (no import: an integration's framework need not be
    installed to build the site)."""
    path = ROOT / "src" / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts]
    raise ValueError(f"{module} has no __all__")


def api_blocks(module: str) -> str:
    """Markdown with one ``::: module.name`` block per public name (grouped for ``normsam``)."""
    names = public_names(module)
    groups = API_GROUPS if module == "normsam" else {}
    grouped = {n for members in groups.values() for n in members}
    out = []
    for title, members in [*groups.items(), ("Other public names" if groups else "", [n for n in names if n not in grouped])]:
        present = [n for n in members if n in names]
        if not present:
            continue
        if title:
            out += [f"## {title}", ""]
        for name in present:
            out += [f"::: {module}.{name}", ""]
    return "\n".join(out)


# --- figures --------------------------------------------------------------------------------------------

#: The benchmark whose step costs the site draws (the regime study's, with its command in the study's README).
STEP_COST_JSON = DOCS / "results" / "study-regime" / "step_time.json"


def _png(draw: Callable[[Path], object]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "figure.png"
        draw(path)
        return path.read_bytes()


def sam_on_figure() -> bytes:
    """What ``normsam inspect resnet20 --plot FILE.png`` draws."""
    from normsam.analysis.figures import plot_scope
    from normsam.train.models import build_model

    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=32, norm=None)
    return _png(lambda path: plot_scope(model, path, "norm"))


def step_cost_figure() -> bytes:
    from normsam.analysis.figures import plot_step_costs

    return _png(lambda path: plot_step_costs(STEP_COST_JSON, path))


#: Site path -> what draws it.
FIGURES: dict[str, Callable[[], bytes]] = {
    "assets/generated/sam-on-resnet20.png": sam_on_figure,
    "assets/generated/step-cost-regime.png": step_cost_figure,
}


# --- markers and links ----------------------------------------------------------------------------------

MARKER = re.compile(r"<!-- normsam:([\w-]+)(?: ([\w.]+))? -->")
RHO_CLIFF = DOCS / "results" / "study-rho-cliff" / "README.md"


def rho_cliff(page_dir: Path) -> str:
    if RHO_CLIFF.exists():
        link = Path(*[".."] * len(page_dir.relative_to(DOCS).parts), "results", "study-rho-cliff", "README.md")
        return f"[the ρ-cliff study]({link.as_posix()})"
    return "the ρ-cliff study (running; its record will be linked here)"


GENERATORS: dict[str, Callable[..., str]] = {
    "cli": lambda page_dir, arg: cli_reference(),
    "config": lambda page_dir, arg: config_reference(),
    "api": lambda page_dir, arg: api_blocks(arg),
    "rho-cliff": lambda page_dir, arg: rho_cliff(page_dir),
}


def expand_markers(markdown: str, page_dir: Path) -> str:
    return MARKER.sub(lambda m: GENERATORS[m.group(1)](page_dir, m.group(2)), markdown)


LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\(([^)\s#]+)(#[^)\s]*)?\)")


def outside_links_as_paths(markdown: str, page_dir: Path) -> str:
    """A link from a page into the repository outside ``docs/`` (a record's link to ``src/...`` or
    ``configs/...``) becomes its text and the path in the repository: the site holds only ``docs/``. Links in
    fenced code are left alone."""
    parts = re.split(r"(^```.*?^```)", markdown, flags=re.S | re.M)

    def replace(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^[a-z]+:", target) or target.startswith("/"):
            return m.group(0)
        resolved = (page_dir / target).resolve()
        if resolved.is_relative_to(DOCS) or not resolved.exists():
            return m.group(0)
        path = resolved.relative_to(ROOT).as_posix() + ("/" if resolved.is_dir() else "")
        text = m.group(1)
        return f"`{path}`" if text.strip("`") in (path, target) else f"{text} (`{path}` in the repository)"

    return "".join(part if i % 2 else LINK.sub(replace, part) for i, part in enumerate(parts))
