"""The documentation runs as written (README.md and every page under docs/).

- Every ```python block runs. The blocks of one page share a namespace and a scratch folder (the working
  directory while they run), in page order, like a notebook.
- Every `normsam ...` line of a ```bash / ```sh / ```console block is checked against the CLI's parser; a
  `normsam train` line's config keys and values against the config classes and by its `--dry-run` plan, a
  sweep's or study's file by loading it; the blocks marked `run` are run, in-process, with their tiny settings.
- A directive on the line before a block says how it is tested (an HTML comment, invisible on the site):
  `<!-- docs-test: skip "why" -->` (not run; the reason is shown in the test report), `<!-- docs-test: run -->`
  (a shell block whose normsam commands are run), `<!-- docs-test: config FILE -->` and
  `<!-- docs-test: sweep FILE -->` (a YAML block written to FILE in the scratch folder and validated).
- The references the site generates (CLI, config keys, API) cover every command, option, key and public name,
  and every code example in the docstrings of the public API runs.

`mkdocs build --strict` (broken links and anchors) runs in `make test` and `make docs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import os
import re
import shlex
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_hooks"))
import references  # noqa: E402  (docs/_hooks/references.py: what the site generates)

DIRECTIVE = re.compile(r'^<!-- docs-test: (skip|run|config|sweep)(?: (".*"|\S+))? -->$')
FENCE = re.compile(r"^```(\w*)")
SHELL = ("bash", "sh", "console", "shell")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    action: str = ""  # "", skip, run, config, sweep
    arg: str = ""

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def doc_pages() -> list[Path]:
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    return [p for p in pages if "_hooks" not in p.parts]


def blocks_of(page: Path) -> list[Block]:
    lines, blocks, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        directive = DIRECTIVE.match(lines[start - 1]) if start else None
        action, arg = (directive.group(1), (directive.group(2) or "").strip('"')) if directive else ("", "")
        blocks.append(Block(page, start + 1, fence.group(1), "\n".join(body) + "\n", action, arg))
        i += 1
    return blocks


ALL_BLOCKS = [b for page in doc_pages() for b in blocks_of(page)]
PYTHON = [b for b in ALL_BLOCKS if b.lang == "python"]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL]


# --- one page's state: namespace, scratch folder, steps run so far -----------------------------------------


@contextlib.contextmanager
def working_directory(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@dataclass
class PageState:
    folder: Path
    namespace: dict = field(default_factory=lambda: {"__name__": "__docs__"})
    done: int = 0  # steps run
    failed: str | None = None


_PAGES: dict[Path, PageState] = {}


def page_steps(page: Path) -> list[Block]:
    """The blocks that change a page's state, in order: Python blocks, `run` shell blocks, config/sweep files."""
    return [b for b in blocks_of(page) if b.action != "skip"
            and (b.lang == "python" or b.action in ("run", "config", "sweep"))]


def run_page_until(block: Block, tmp_path_factory) -> None:
    """Run the page's steps before ``block`` (once), then ``block`` itself."""
    state = _PAGES.get(block.page)
    if state is None:
        state = _PAGES[block.page] = PageState(tmp_path_factory.mktemp(block.page.stem.replace(".", "_")))
    steps = page_steps(block.page)
    target = next(i for i, s in enumerate(steps) if s.line == block.line)
    if state.failed is not None and state.done <= target:
        pytest.fail(f"an earlier block of {block.page.name} failed ({state.failed}), so this one cannot run")
    while state.done <= target:
        step = steps[state.done]
        try:
            with working_directory(state.folder):
                run_step(step, state)
        except BaseException:
            state.failed = step.id
            raise
        finally:
            state.done += 1


def run_step(step: Block, state: PageState) -> None:
    if step.lang == "python":
        source = "\n" * step.line + step.code  # line numbers in tracebacks are the page's
        exec(compile(source, str(step.page), "exec"), state.namespace)
    elif step.action in ("config", "sweep"):
        Path(step.arg).write_text(step.code)
        check_yaml_file(step.action, Path(step.arg))
    else:
        for argv in normsam_commands(step.code):
            from normsam.cli import main

            code = main(argv)
            assert code == 0, f"`normsam {shlex.join(argv)}` exited with {code}"


def check_yaml_file(kind: str, path: Path) -> None:
    if kind == "config":
        from normsam.train.config import load_config

        load_config(str(path))
    else:
        from normsam.analysis.sweep import load_sweep

        load_sweep(path)


# --- shell lines ------------------------------------------------------------------------------------------


def shell_lines(code: str) -> list[str]:
    """Logical lines (continuations joined, console prompts and comments dropped)."""
    text = code.replace("\\\n", " ")
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        elif line.startswith("...") or line.startswith("'"):  # console output
            continue
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def command_of(line: str) -> tuple[list[str], int | None] | None:
    """The argv of a normsam invocation on a shell line (`normsam ...`, `python -m normsam ...`, `torchrun ...
    -m normsam ...`) and torchrun's number of processes, or None."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    if words and words[0] == "normsam":
        return words[1:], None
    if "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "normsam":
        nproc = re.search(r"--nproc[_-]per[_-]node[= ](\d+)", line)
        return words[words.index("-m") + 2:], int(nproc.group(1)) if nproc else None
    return None


def normsam_commands(code: str) -> list[list[str]]:
    return [found[0] for line in shell_lines(code) if (found := command_of(line)) is not None]


def normsam_invocations(code: str) -> list[tuple[list[str], int | None]]:
    return [found for line in shell_lines(code) if (found := command_of(line)) is not None]


def scripts_of(code: str) -> list[str]:
    """Scripts of the repository that a shell line runs (`python x.py`, `torchrun ... x.py`, `bash x.sh`)."""
    found = []
    for line in shell_lines(code):
        words = shlex.split(line, comments=True)
        if words and words[0] in ("python", "python3", "torchrun", "bash"):
            found += [w for w in words[1:] if w.endswith((".py", ".sh"))][:1]
    return found


def make_targets_of(code: str) -> list[str]:
    """The targets of `make ...` lines."""
    return [word for line in shell_lines(code) if line.startswith("make ")
            for word in shlex.split(line, comments=True)[1:] if not word.startswith("-") and "=" not in word]


def resolve(name: str, page_folder: Path | None) -> Path | None:
    """A file named on a command line: in the page's scratch folder, else in the repository."""
    for base in (page_folder, ROOT):
        if base is not None and (base / name).is_file():
            return base / name
    return None


def produced_or_placeholder(name: str) -> bool:
    """A file that an earlier command writes (under runs/, e.g. a study's phase sweep or a run's config) or a
    placeholder such as RUN_DIR/config.yaml: its name is checked, not its content."""
    return name.startswith(("runs/", "$")) or re.search(r"\b[A-Z][A-Z_]{2,}\b", name) is not None


def check_command(argv: list[str], page_folder: Path | None, world_size: int | None = None) -> None:
    """`normsam ARGV` parses, and what it names is valid: a `train` line's config (keys, values, and the plan of
    its --dry-run: data, steps, model, memory; `world_size` processes under torchrun), a sweep or study file."""
    from normsam.cli import build_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"`normsam {shlex.join(argv)}` does not parse ({exit_.code}): {stderr.getvalue().strip()}")
    if args.command == "train" and not args.resume:
        from normsam.train.config import load_config, parse_overrides
        from normsam.train.config_help import check_overrides_take_effect

        config = args.config
        if config is not None and config.endswith((".yaml", ".yml")):
            path = resolve(config, page_folder)
            if path is None and produced_or_placeholder(config):
                config = None  # the overrides are still checked
            else:
                assert path is not None, f"`normsam {shlex.join(argv)}`: no config file {config}"
                config = str(path)
        check_overrides_take_effect(parse_overrides(args.overrides))
        with working_directory(ROOT):
            cfg = load_config(config, args.overrides)
            if cfg.model not in HEAVY_MODELS:
                from normsam.train.plan import plan_run

                assert "Plan:" in plan_run(cfg, world_size=args.world_size or world_size).text()
    elif args.command == "sweep":
        from normsam.analysis.sweep import load_sweep
        from normsam.train.config import sweep_file

        path = resolve(args.sweep_file, page_folder)
        if path is None and produced_or_placeholder(args.sweep_file):
            return
        with working_directory(ROOT):  # a sweep's preset path is relative to the repository
            load_sweep(sweep_file(str(path) if path else args.sweep_file))
    elif args.command == "study":
        from normsam.analysis.study import load_study

        path = resolve(args.study_file, page_folder)
        assert path is not None, f"`normsam {shlex.join(argv)}`: no study file {args.study_file}"
        with working_directory(ROOT):
            load_study(path)


#: Models whose --dry-run plan takes long to build on a CPU (their lines are still parsed and their configs checked).
HEAVY_MODELS = {"wrn28-10"}


# --- the tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.id)
def test_python_block_runs(block: Block, tmp_path_factory):
    if block.action == "skip":
        pytest.skip(f"{block.id}: {block.arg}")
    run_page_until(block, tmp_path_factory)


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.action in ("config", "sweep")], ids=lambda b: b.id)
def test_config_block_is_valid(block: Block, tmp_path_factory):
    run_page_until(block, tmp_path_factory)


@pytest.mark.parametrize("block", [b for b in SHELL_BLOCKS if b.action or normsam_commands(b.code) or scripts_of(b.code)
                                   or make_targets_of(b.code)], ids=lambda b: b.id)
def test_cli_block(block: Block, tmp_path_factory):
    """Every normsam line parses and names valid keys and files; a `run` block runs; scripts and make targets
    exist."""
    for script in scripts_of(block.code):
        assert (ROOT / script).is_file(), f"{block.id}: no script {script}"
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for target in make_targets_of(block.code):
        assert target in targets, f"{block.id}: no make target {target}"
    if block.action == "run":
        run_page_until(block, tmp_path_factory)  # runs every command (after the page's earlier steps)
        return
    state = _PAGES.get(block.page)
    for argv, world_size in normsam_invocations(block.code):
        check_command(argv, state.folder if state else None, world_size)
    if block.action == "skip":
        checked = "checked against the parser, the config and the --dry-run plan; " if normsam_commands(block.code) else ""
        pytest.skip(f"{block.id}: {checked}not run: {block.arg}")


def test_every_directive_is_understood():
    """A misspelt directive would silently leave a block untested."""
    for page in doc_pages():
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if line.startswith("<!-- docs-test"):
                assert DIRECTIVE.match(line), f"{page}:{number}: unknown directive {line}"
                following = lines[number] if number < len(lines) else ""
                assert following.startswith("```"), f"{page}:{number}: a directive must stand right before a block"


def test_the_documentation_has_code_that_runs():
    """Most blocks run: a page where everything is skipped is documentation that can rot."""
    ran = [b for b in PYTHON if b.action != "skip"]
    assert len(ran) >= 35 and len(ran) >= 4 * len([b for b in PYTHON if b.action == "skip"])
    assert len([b for b in SHELL_BLOCKS if b.action == "run"]) >= 6


def test_a_bad_cli_example_is_caught():
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check_command(["train", "--no-such-flag"], None)
    with pytest.raises(ValueError, match="Unknown config key|unknown"):
        check_command(["train", "rhoo=0.5"], None)


# --- what the site generates ------------------------------------------------------------------------------


def test_cli_reference_covers_every_command_and_option():
    from normsam.cli import build_parser

    text = references.cli_reference()
    commands, _ = references._subcommands(build_parser())
    for name, sub in commands.items():
        assert f"## normsam {name}\n" in text
        for action in sub._actions:
            if isinstance(action, __import__("argparse")._HelpAction):
                continue
            for option in action.option_strings:
                assert f"`{option}`" in text, f"normsam {name} {option} is missing from the CLI reference"


def test_config_reference_covers_every_key_with_its_meaning():
    from normsam.train.config import TrainConfig
    from normsam.train.config_help import DESCRIPTIONS

    text = references.config_reference()
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{f.name}`" in text
        assert DESCRIPTIONS.get(f.name), f"config key {f.name} has no meaning in normsam.train.config_help"
    assert "## Data" in text and "## SAM" in text and "## Scale" in text


def test_api_reference_covers_every_public_name():
    import normsam

    text = references.api_blocks("normsam")
    assert references.public_names("normsam") == list(normsam.__all__)
    for name in normsam.__all__:
        assert f"::: normsam.{name}\n" in text
    assert "Other public names" not in text, "a new public name: give it a group in references.API_GROUPS"
    for module in ("normsam.integrations.transformers", "normsam.integrations.lightning"):
        for name in references.public_names(module):
            assert f"::: {module}.{name}" in references.api_blocks(module)
    for page in ("reference/api.md", "reference/integrations.md", "reference/cli.md", "reference/config.md"):
        assert references.MARKER.search((DOCS / page).read_text()), page


def test_outside_links_become_repository_paths():
    page_dir = DOCS / "results" / "study-regime"
    text = "[amp](../../../src/normsam/optim/amp.py), [report](report/report.md), `[x](../../../nope.py)`"
    out = references.outside_links_as_paths(text, page_dir)
    assert out.startswith("amp (`src/normsam/optim/amp.py` in the repository), [report](report/report.md)")


def test_the_rho_cliff_study_is_linked_once_its_record_exists(monkeypatch, tmp_path):
    text = references.expand_markers("see <!-- normsam:rho-cliff -->", DOCS / "guide")
    assert ("running" in text) != references.RHO_CLIFF.exists()
    record = tmp_path / "README.md"
    record.write_text("# the study")
    monkeypatch.setattr(references, "RHO_CLIFF", record)
    assert references.expand_markers("<!-- normsam:rho-cliff -->", DOCS / "guide") == \
        "[the ρ-cliff study](../results/study-rho-cliff/README.md)"


def test_the_step_cost_figure_is_drawn_from_the_benchmark_json():
    png = references.step_cost_figure()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from normsam.analysis.figures import step_cost_rows

    rows = dict((name, ratio) for name, ratio, _, _ in step_cost_rows(
        __import__("json").loads(references.STEP_COST_JSON.read_text())))
    assert rows["SGD"] == 1.0 and 1.5 < rows["SAM-ON (cheap ascent)"] < rows["SAM-all"]


def test_inspect_plot_highlights_the_perturbed_layers(tmp_path, capsys):
    from normsam.cli import main

    assert main(["inspect", "resnet8", "--image-size", "8", "--plot", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert f"Figure: {tmp_path / 'f.png'}" in capsys.readouterr().out
    assert main(["inspect", "resnet8", "--plot", str(tmp_path / "f.png" / "x.png")]) == 2  # not a folder


# --- docstring examples of the public API -----------------------------------------------------------------

EXAMPLE = re.compile(r"^(?P<pad>[ \t]*)```python[^\n]*\n(?P<code>.*?)^(?P=pad)```", re.S | re.M)
RST_EXAMPLE = re.compile(r"^(?P<pad>[ \t]*)\.\. code-block:: python\n\n(?P<code>(?:(?P=pad)[ \t]+.*\n|[ \t]*\n)+)", re.M)


def public_objects() -> list[tuple[str, object]]:
    """What the API reference renders: normsam.__all__ and the integrations, with their public members."""
    import normsam

    found = []
    modules = [("normsam", normsam.__all__)]
    for module in ("normsam.integrations.transformers", "normsam.integrations.lightning"):
        modules.append((module, references.public_names(module)))
    for module_name, names in modules:
        module = importlib.import_module(module_name)
        for name in names:
            obj = getattr(module, name)
            found.append((f"{module_name}.{name}", obj))
            if inspect.isclass(obj):
                for member, value in vars(obj).items():
                    if not member.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)):
                        found.append((f"{module_name}.{name}.{member}", value))
    return found


def docstring_examples(doc: str) -> list[str]:
    examples = [textwrap.dedent(m.group("code")) for m in EXAMPLE.finditer(doc)]
    return examples + [textwrap.dedent(m.group("code")) for m in RST_EXAMPLE.finditer(doc)]


def _examples() -> list[tuple[str, str]]:
    out = []
    for name, obj in public_objects():
        doc = obj.__doc__ if isinstance(obj, property) else inspect.getdoc(obj)
        for i, code in enumerate(docstring_examples(doc or "")):
            out.append((f"{name}#{i + 1}", code))
    return out


EXAMPLES = _examples()


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_docstring_example_runs(name: str, code: str, tmp_path):
    with working_directory(tmp_path):
        exec(compile(code, f"<docstring of {name}>", "exec"), {"__name__": "__docs__"})


def test_docstring_examples_exist_and_a_wrong_one_fails():
    assert len(EXAMPLES) >= 6
    assert {"normsam.SAM", "normsam.SAMOptions", "normsam.measure_sharpness"} <= {n.split("#")[0] for n, _ in EXAMPLES}
    wrong = docstring_examples('"""A function.\n\nExample:\n    ```python\n    import normsam\n    normsam.SAM()\n    ```\n"""')
    assert len(wrong) == 1
    with pytest.raises(TypeError):
        exec(compile(wrong[0], "<wrong example>", "exec"), {})


@pytest.fixture(autouse=True)
def _one_thread():
    """The blocks are tiny; threads only add contention on a busy machine (conftest sets 1 as well)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
