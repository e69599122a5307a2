"""mkdocs hooks (``hooks:`` in mkdocs.yml): generated pages and figures, see ``references.py`` beside this file."""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File

sys.path.insert(0, str(Path(__file__).resolve().parent))
import references  # noqa: E402


def on_files(files, config):
    """Add the generated figures to the site."""
    for uri, draw in references.FIGURES.items():
        files.append(File.generated(config, uri, content=draw()))
    return files


def on_page_markdown(markdown, page, config, files):
    """Expand the ``<!-- normsam:... -->`` markers; write links out of ``docs/`` as repository paths."""
    page_dir = Path(page.file.abs_src_path).parent if page.file.abs_src_path else references.DOCS
    markdown = references.expand_markers(markdown, page_dir)
    return references.outside_links_as_paths(markdown, page_dir)
