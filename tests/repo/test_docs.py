"""The documentation holds together: the README is a front door (at most 200 lines) that links
every page of docs/; every relative link and anchor in them resolves; each page says who it
is for; docs/configuration.md lists exactly the flags of ``tokensvc serve`` with their
environment variables and defaults; the code's citations of doc sections name sections that
exist; and no file cites the out-of-tree product map."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from tokensvc.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CONFIGURATION = DOCS / "configuration.md"

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)
ANCHOR = re.compile(r'<a id="([^"]+)"')
ROW = re.compile(r"^\| `(--[a-z0-9-]+)` \|(.*)$", re.M)
HELP = re.compile(r"\[env (TOKENSVC_\w+); default (.+)\]$", re.S)
#: "(docs/design.md, Refresh families)", several sections joined by "; "
CITATION = re.compile(r"docs/([a-z_]+\.md), ([^)]+)\)")
SKIPPED_DIRS = {
    ".git",
    ".venv",
    ".tools",
    ".tokensvc",
    "node_modules",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
}


def _prose(path: Path) -> str:
    """The Markdown of ``path`` without its fenced code blocks."""
    return FENCE.sub("", path.read_text())


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _prose(path)
    slugs: set[str] = set()
    for heading in HEADING.findall(text):
        slug = base = _slug(heading)
        n = 0
        while slug in slugs:
            n += 1
            slug = f"{base}-{n}"
        slugs.add(slug)
    return slugs | set(ANCHOR.findall(text))


def _headings(path: Path) -> set[str]:
    return {h.replace("`", "").strip().lower() for h in HEADING.findall(_prose(path))}


def _repository_files() -> list[Path]:
    files = []
    for top, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        files.extend(Path(top) / name for name in names)
    return files


def test_readme_is_a_front_door_linking_every_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200)"
    assert PAGES, "docs/ has no pages"
    linked = {
        (README.parent / target.split("#")[0]).resolve() for target in LINK.findall(_prose(README))
    }
    missing = [page.name for page in PAGES if page.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("doc", [README, *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path):
    for target in LINK.findall(_prose(doc)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        assert resolved.exists(), f"{doc.name}: link to missing {target}"
        if anchor:
            assert resolved.suffix == ".md", f"{doc.name}: anchor into non-Markdown {target}"
            assert anchor in _anchors(resolved), f"{doc.name}: no section #{anchor} in {path}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_each_page_says_who_it_is_for(page: Path):
    title, *rest = [line for line in page.read_text().splitlines() if line.strip()]
    assert title.startswith("# ")
    assert rest and rest[0].startswith("*For "), f"{page.name}: start with '*For <reader>...*'"


def _serve_flags() -> dict[str, tuple[str, str]]:
    """flag -> (environment variable, default as ``--help`` shows it) of ``tokensvc serve``."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {}
    for action in commands.choices["serve"]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        match = HELP.search(action.help or "")
        assert match, f"{action.option_strings}: help lacks [env ...; default ...]"
        flags[action.option_strings[0]] = (match[1], match[2])
    return flags


def _documented_flags() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for flag, rest in ROW.findall(_prose(CONFIGURATION)):
        assert flag not in rows, f"{flag} is listed twice"
        rows[flag] = [cell.strip() for cell in rest.rstrip().rstrip("|").split(" | ")]
    return rows


def test_configuration_lists_every_serve_flag_and_nothing_else():
    flags = _serve_flags()
    rows = _documented_flags()
    missing = [
        f"| `{flag}` | `{env}` | `{default}` | ... |"
        for flag, (env, default) in flags.items()
        if flag not in rows
    ]
    assert not missing, "docs/configuration.md lacks rows:\n" + "\n".join(missing)
    unknown = sorted(set(rows) - set(flags))
    assert not unknown, f"docs/configuration.md lists flags serve does not have: {unknown}"
    for flag, (env, default) in flags.items():
        env_cell, default_cell, meaning = rows[flag]
        assert env_cell == f"`{env}`", f"{flag}: environment variable is {env}"
        shown = default_cell.replace("`", "")
        expected = "unset" if default == "None" else default
        assert shown == expected or shown.startswith(expected + " "), (
            f"{flag}: default is {expected!r} (as --help shows it), the page says {shown!r}"
        )
        assert meaning, f"{flag}: no meaning"


def test_configuration_check_catches_an_undocumented_flag(monkeypatch):
    """The check above can fail: a flag added to serve without a row is reported."""
    original = build_parser

    def with_extra_flag() -> argparse.ArgumentParser:
        parser = original()
        (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        commands.choices["serve"].add_argument(
            "--brand-new", help="x [env TOKENSVC_BRAND_NEW; default 1]"
        )
        return parser

    monkeypatch.setitem(globals(), "build_parser", with_extra_flag)
    with pytest.raises(AssertionError, match="TOKENSVC_BRAND_NEW"):
        test_configuration_lists_every_serve_flag_and_nothing_else()


def test_code_citations_name_existing_sections():
    cited = 0
    for path in _repository_files():
        if path.suffix not in (".py", ".js", ".toml", ".yml", ".yaml", ".lua", ".proto"):
            continue
        for page, sections in CITATION.findall(path.read_text(errors="replace")):
            headings = _headings(DOCS / page) if (DOCS / page).exists() else set()
            for section in " ".join(sections.replace('"', "").split()).split("; "):
                cited += 1
                assert section.lower() in headings, (
                    f"{path.relative_to(ROOT)} cites docs/{page}, {section!r}: no such section"
                )
    assert cited >= 10


def test_no_file_cites_the_product_map():
    name = "SPEC" + ".md"  # spelled apart so this file does not cite it either
    offenders = [
        str(path.relative_to(ROOT))
        for path in _repository_files()
        if name.encode() in path.read_bytes()
    ]
    assert not offenders, f"{name} is cited in {offenders}"
