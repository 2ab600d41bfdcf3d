"""The docs stay true: every relative link and anchor resolves, every Python example compiles and
names only what the package has, and every `engram` command line uses real commands and options."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import engram_cli
import pytest
import typer
from engram_cli.cli.app import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?:[^\]]*)\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`]*`")


def split_page(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Prose lines outside fenced blocks, and the fenced blocks as (info string, body)."""
    prose, blocks, fence, info, body = [], [], None, "", []
    for line in text.splitlines():
        marker = FENCE.match(line.strip())
        if fence is None and marker:
            fence, info, body = marker.group(1), line.strip()[3:].strip(), []
        elif fence is not None and line.strip().startswith(fence):
            blocks.append((info, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append(line)
    assert fence is None, "unclosed code fence"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_page(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    prose, _ = split_page(path.read_text(encoding="utf-8"))
    return [target for line in prose for target in LINK.findall(CODE_SPAN.sub("", line))]


def python_blocks(path: Path) -> list[str]:
    return [body for info, body in split_page(path.read_text(encoding="utf-8"))[1] if info == "python"]


def shell_lines(path: Path) -> list[str]:
    """`engram ...` command lines of the unlabelled (shell) blocks, continuation lines joined."""
    lines = []
    for info, body in split_page(path.read_text(encoding="utf-8"))[1]:
        if info:
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        lines += [line.strip() for line in joined.splitlines() if line.strip().startswith("engram ")]
    return lines


def test_docs_exist_and_index_lists_every_page():
    assert DOCS.is_dir()
    index = DOCS / "index.md"
    listed = {Path(t.split("#")[0]).name for t in links(index)}
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "index.md" and p.name not in listed]
    assert not missing, f"docs/index.md does not link {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_resolve(page):
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, "\n".join(bad)


def test_slug_follows_github():
    assert slug("Init algorithm `engram-ctr-v1`") == "init-algorithm-engram-ctr-v1"
    assert slug("`engram compress-vocab`: the vocab projection") == "engram-compress-vocab-the-vocab-projection"
    assert slug("DCP: training checkpoint") == "dcp-training-checkpoint"
    assert slug("Reading an inference export: `EngramTables`") == "reading-an-inference-export-engramtables"


def test_readme_quickstart_is_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1]
    _, blocks = split_page(section)
    assert blocks[0][1].split("\n") == ["make demo", "make test"]


def _engram_names(tree: ast.AST) -> set[str]:
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "engram"
    }


def _imports(tree: ast.AST) -> list[tuple[str, str | None]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engram_cli"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("engram_cli")]
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_examples_compile_and_name_real_things(page):
    for n, code in enumerate(python_blocks(page)):
        tree = compile(code, f"{page.name}[python block {n}]", "exec", ast.PyCF_ONLY_AST)
        compile(tree, f"{page.name}[python block {n}]", "exec")
        for name in _engram_names(tree):
            assert hasattr(engram_cli, name), f"{page.name}: engram.{name} does not exist"
        for module, name in _imports(tree):
            imported = importlib.import_module(module)
            assert name is None or hasattr(imported, name), f"{page.name}: {module}.{name} does not exist"


def test_readme_and_python_api_have_python_examples():
    assert python_blocks(ROOT / "README.md")
    assert len(python_blocks(DOCS / "python-api.md")) >= 5


def _options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    return {
        name: {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for name, command in group.commands.items()
    }


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_command_lines_use_real_commands_and_options(page):
    options = _options()
    for line in shell_lines(page):
        words = line.split("#", 1)[0].split()
        command = words[1]
        assert command in options, f"{page.name}: unknown command in {line!r}"
        for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", " ".join(words[2:])):
            assert flag in options[command], f"{page.name}: engram {command} has no option {flag} ({line!r})"
