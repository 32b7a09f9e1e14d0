"""mkdocs hooks for the documentation site (mkdocs.yml: ``hooks``).

* **Repository links.** The pages under ``docs/`` link files elsewhere in the repository
  (results, figures, scripts) by their path relative to the page, so the links work when the
  Markdown is read in the repository or the sdist. mkdocs serves only ``docs/``: every file
  such a link reaches is added to the site under ``_repo/<its repository path>`` and the link is
  rewritten to it. A Markdown file reached this way becomes a page of the site itself, and its
  own links are followed the same way.
* **Layer registry.** ``<!-- layer-registry -->`` in a page is replaced by a table of the layer
  registry (``fastinfluence/layers/``): every ``register_layer(...)`` of the family files, with
  its tangent rule, K-FAC factor rule (or why not) and inference fold, read from the source
  with :mod:`ast`, so the docs build needs no torch. A registry this reader cannot find is a
  build error.
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
REGISTER = "register_layer"
LAYERS = ("fastinfluence", "layers")
NOT_FAMILIES = {"__init__.py", "registry.py", "tracing.py"}


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


def _text(node: ast.expr, constants: dict[str, ast.expr]) -> str | None:
    """A string literal (or a module-level name bound to one), else None."""
    if isinstance(node, ast.Name) and node.id in constants:
        node = constants[node.id]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _kfac_cell(node: ast.expr | None, constants: dict[str, ast.expr]) -> str:
    """``yes (`Rule`)``, ``not covered: <why>`` or ``—`` (nothing registered)."""
    if node is None:
        return "—"
    if isinstance(node, ast.Name) and node.id in constants:
        node = constants[node.id]
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "NotCovered" and node.args:
        reason = _text(node.args[0], constants)
        return f"not covered: {reason}" if reason else "not covered"
    rule = ast.unparse(node.func if isinstance(node, ast.Call) else node)
    return f"yes (`{rule}`)"


def _registrations(path: Path) -> list[tuple[ast.Call, str | None]]:
    """The ``register_layer(...)`` calls of a family file, each with the tangent rule it
    decorates or is applied to (``None``: it registers no tangent rule)."""
    found: list[tuple[ast.Call, str | None]] = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef):
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == REGISTER:
                    found.append((decorator, node.name))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            call = node.value
            if isinstance(call.func, ast.Call) and ast.unparse(call.func.func) == REGISTER:
                found.append((call.func, ast.unparse(call.args[0]) if call.args else None))
            elif ast.unparse(call.func) == REGISTER:
                found.append((call, None))
    return found


def _is_class(name: str, tree: ast.Module) -> bool:
    """Whether ``name`` is a class the family file defines (a module type of its own, such as
    attention's ``ClassTokenAndPositions``)."""
    return any(isinstance(node, ast.ClassDef) and node.name == name for node in tree.body)


def registry_rows(root: Path) -> dict[str, dict[str, str]]:
    """Per registered key (as written: ``nn.Conv2d``, ``F.gelu``, ``'relu'``): its kind,
    family, tangent rule, K-FAC cell and fold cell, in the order the family files (sorted)
    register them."""
    rows: dict[str, dict[str, str]] = {}
    for path in sorted(root.joinpath(*LAYERS).glob("*.py")):
        if path.name in NOT_FAMILIES:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                     for target in node.targets if isinstance(target, ast.Name)}
        for call, rule in _registrations(path):
            keywords = {keyword.arg: keyword.value for keyword in call.keywords}
            for key in call.args:
                shown = ast.unparse(key)
                row = rows.setdefault(shown, {
                    "kind": ("tensor method" if isinstance(key, ast.Constant)
                             else "module" if shown.startswith("nn.") or _is_class(shown, tree)
                             else "function"),
                    "family": path.stem, "tangent": "—", "kfac": "—", "fold": "—"})
                if rule is not None:
                    row["tangent"] = f"`{rule}`"
                if "kfac" in keywords:
                    row["kfac"] = _kfac_cell(keywords["kfac"], constants)
                if "folds_into" in keywords:
                    targets = keywords["folds_into"]
                    names = targets.elts if isinstance(targets, ast.Tuple | ast.List) else [targets]
                    row["fold"] = "into " + ", ".join(f"`{ast.unparse(n)}`" for n in names)
    return rows


def layer_registry_table(root: Path) -> str:
    """A Markdown table of the layer registry: per key, its tangent rule, K-FAC factors and
    inference fold."""
    rows = registry_rows(root)
    if not rows:
        # A warning fails `mkdocs build --strict`: the page would otherwise go stale silently.
        log.warning("layer registry: no %s(...) calls found in %s; update "
                    "scripts/docs_hooks.py", REGISTER, root.joinpath(*LAYERS))
        return "*(layer registry not found at build time)*"
    lines = ["| registered for | kind | family | fused tangent rule | K-FAC factors | "
             "BatchNorm fold |", "|---|---|---|---|---|---|"]
    for key, row in rows.items():
        shown = f"Tensor.{key.strip(chr(39) + chr(34))}" if row["kind"] == "tensor method" else key
        lines.append(f"| `{shown}` | {row['kind']} | `{row['family']}.py` | {row['tangent']} | "
                     f"{row['kfac']} | {row['fold']} |")
    return "\n".join(lines)
