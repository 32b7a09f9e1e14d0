"""mkdocs hooks for the documentation site (mkdocs.yml: ``hooks``).

* **Repository links.** The pages under ``docs/`` link files elsewhere in the repository
  (results, figures, scripts) by their path relative to the page, so the links work when the
  Markdown is read in the repository or the sdist. mkdocs serves only ``docs/``: every file
  such a link reaches is added to the site under ``_repo/<its repository path>`` and the link is
  rewritten to it. A Markdown file reached this way becomes a page of the site itself, and its
  own links are followed the same way.
* **Layer registry.** ``<!-- layer-registry -->`` in a page is replaced by a table of the rules
  the fused tangent pass registers (``MODULE_RULES``, ``FUNCTION_RULES``, ``METHOD_RULES`` of
  ``fastinfluence/tangent.py``), read from the source with :mod:`ast`, so the docs build needs
  no torch. A registry this reader cannot find is a build error.
"""

from __future__ import annotations

import ast
import logging
import posixpath
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mkdocs.structure.files import Files

log = logging.getLogger("mkdocs.hooks.fastinfluence")

REPO_PREFIX = "_repo"
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
REGISTRY_MARK = "<!-- layer-registry -->"
REGISTRIES = {"MODULE_RULES": "module", "FUNCTION_RULES": "function",
              "METHOD_RULES": "tensor method"}


def _repo_root(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def _targets(markdown: str) -> list[str]:
    """The relative link targets of a Markdown text (fenced code left out)."""
    text = FENCE.sub("", markdown)
    found = []
    for match in LINK.finditer(text):
        target = match.group(2).split("#", 1)[0]
        if target and "://" not in target and not target.startswith(("/", "mailto:")):
            found.append(target)
    return found


def _resolve(source: Path, target: str, root: Path) -> Path | None:
    """The repository file a link of ``source`` reaches, or None outside the repository."""
    path = (source.parent / target).resolve()
    if not path.is_file() or not path.is_relative_to(root):
        return None
    return path


def on_files(files: Files, config) -> Files:
    """Adds every repository file outside docs/ that a page links, transitively."""
    from mkdocs.structure.files import File  # here, so tests can read the registry without mkdocs

    root, docs = _repo_root(config), Path(config["docs_dir"]).resolve()
    pending = [Path(f.abs_src_path) for f in files.documentation_pages()]
    seen = set(pending)
    while pending:
        source = pending.pop()
        for target in _targets(source.read_text(encoding="utf-8")):
            path = _resolve(source, target, root)
            if path is None or path.is_relative_to(docs) or path in seen:
                continue
            seen.add(path)
            uri = posixpath.join(REPO_PREFIX, path.relative_to(root).as_posix())
            files.append(File.generated(config, uri, abs_src_path=str(path)))
            if path.suffix == ".md":
                pending.append(path)
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    """Rewrites links out of docs/ to the added copies; fills in the layer registry."""
    root, docs = _repo_root(config), Path(config["docs_dir"]).resolve()
    source = Path(page.file.abs_src_path)
    here = posixpath.dirname(page.file.src_uri)

    from_repo_page = page.file.src_uri.startswith(REPO_PREFIX + "/")

    def rewrite(match: re.Match) -> str:
        target, _, anchor = match.group(2).partition("#")
        path = _resolve(source, target, root) if target else None
        if path is None or (path.is_relative_to(docs) and not from_repo_page):
            return match.group(0)  # mkdocs resolves links between pages of docs/ itself
        uri = (path.relative_to(docs).as_posix() if path.is_relative_to(docs)
               else posixpath.join(REPO_PREFIX, path.relative_to(root).as_posix()))
        new = posixpath.relpath(uri, here or ".") + (f"#{anchor}" if anchor else "")
        return match.group(1) + new + match.group(3)

    pieces, start = [], 0
    for fence in FENCE.finditer(markdown):  # links inside fenced code stay as written
        pieces += [LINK.sub(rewrite, markdown[start:fence.start()]), fence.group(0)]
        start = fence.end()
    markdown = "".join(pieces) + LINK.sub(rewrite, markdown[start:])
    if REGISTRY_MARK in markdown:
        markdown = markdown.replace(REGISTRY_MARK, layer_registry_table(root))
    return markdown


def _registry_entries(tree: ast.Module) -> dict[str, list[tuple[str, str]]]:
    """Each registry's (key, rule) pairs: its dict literal, then ``NAME[key] = rule`` lines."""
    entries: dict[str, list[tuple[str, str]]] = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            for target in targets:
                if (isinstance(target, ast.Name) and target.id in REGISTRIES
                        and isinstance(node.value, ast.Dict)):
                    entries[target.id] = [(ast.unparse(k), ast.unparse(v))
                                          for k, v in zip(node.value.keys, node.value.values,
                                                          strict=True)]
                elif (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                        and target.value.id in entries):
                    entries[target.value.id].append((ast.unparse(target.slice),
                                                     ast.unparse(node.value)))
    return entries


def layer_registry_table(root: Path) -> str:
    """A Markdown table of the tangent pass's registered rules."""
    source = root / "fastinfluence" / "tangent.py"
    entries = _registry_entries(ast.parse(source.read_text(encoding="utf-8")))
    missing = [name for name in REGISTRIES if name not in entries]
    if missing:
        # A warning fails `mkdocs build --strict`: the page would otherwise go stale silently.
        log.warning("layer registry: %s not found as dict literals in %s; update "
                    "scripts/docs_hooks.py", ", ".join(missing), source)
        return "*(layer registry not found at build time)*"
    rows = ["| kind | registered for | rule |", "|---|---|---|"]
    for name, kind in REGISTRIES.items():
        for key, rule in entries[name]:
            shown = key.strip("'\"") if name == "METHOD_RULES" else key
            rows.append(f"| {kind} | `{shown}` | `{rule}` |")
    return "\n".join(rows)
