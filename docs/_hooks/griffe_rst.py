"""A griffe extension: normsam's docstrings use a few reStructuredText forms (``literal``, :class:`x`, ``.. math::``,
``.. code-block:: python``, a paragraph ending in ``::``); the site renders docstrings as Markdown, so they are
rewritten when the API reference is built. The source keeps its docstrings as they are."""

from __future__ import annotations

import re
import textwrap

from griffe import Extension

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const|func):`(~?)([^`<]+?)(?:\s*<([^>]+)>)?`")
LITERAL = re.compile(r"``((?:(?!\n\s*\n).)+?)``", re.S)  # within a paragraph
BLOCK = re.compile(r"^(\s*)(```|\$\$).*?^\1\2[^\n]*$", re.S | re.M)  # fenced code and display math
DIRECTIVE = re.compile(r"^(\s*)\.\. (math|code-block|code)::\s*(.*?)\s*$")


def _block(lines: list[str], start: int, indent: int) -> tuple[list[str], int]:
    """The indented block after a directive or a ``::`` paragraph: its lines (dedented) and where it ends."""
    i, body = start, []
    while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
        body.append(lines[i])
        i += 1
    while body and not body[-1].strip():
        body.pop()
        i -= 1
    return (textwrap.dedent("\n".join(body)).strip("\n").split("\n") if body else []), i


def rst_to_markdown(text: str) -> str:
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        directive = DIRECTIVE.match(line)
        literal = re.match(r"^(\s*)(.*\S)::$", line) if not directive else None
        if directive:
            pad = directive.group(1)
            body, i = _block(lines, i + 1, len(pad))
            if directive.group(2) == "math":
                body = [directive.group(3), *body] if directive.group(3) else body
                content = "\n".join(body)
                if "&" in content or "\\\\" in content:
                    body = ["\\begin{aligned}", *body, "\\end{aligned}"]
                out += [pad + "$$", *[pad + b for b in body], pad + "$$"]
            else:
                out += [pad + "```" + (directive.group(3) or "python"), *[pad + b for b in body], pad + "```"]
            continue
        if literal and i + 1 < len(lines) and not lines[i + 1].strip():
            pad = literal.group(1)
            body, end = _block(lines, i + 1, len(pad))
            if body:
                out += [pad + literal.group(2) + ":", "", pad + "```text", *[pad + b for b in body], pad + "```"]
                i = end
                continue
        out.append(line)
        i += 1
    text, pieces, start = "\n".join(out), [], 0
    for block in BLOCK.finditer(text):  # roles and literals outside the code blocks and the math
        pieces += [_inline(text[start:block.start()]), block.group(0)]
        start = block.end()
    return "".join([*pieces, _inline(text[start:])])


def _inline(text: str) -> str:
    """Roles and ``literals`` as Markdown code."""
    text = ROLE.sub(lambda m: "`" + (m.group(2).split(".")[-1] if m.group(1) else m.group(2)) + "`", text)
    return LITERAL.sub(lambda m: "`" + " ".join(m.group(1).split()) + "`", text)


class RstToMarkdown(Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
