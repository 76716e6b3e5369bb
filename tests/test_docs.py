"""The docs checked against the code: links and anchors, the head revision, commands and options, quoted lines.

What a reader copies from README.md and docs/ must be true of this checkout: every link lands on a
file of the repository (and an anchor on a heading of it), a revision named as the head is the head,
every `flowlens-ingest …` command line names a command and options that exist and parses as its
`--help` says, and every line quoted as the service's output is one the code can print.
"""

from __future__ import annotations

import ast
import functools
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from flowlens_ingest.cli.main import cli
from flowlens_ingest.store import migrate

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "deploy").rglob("*.md")])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\s*$")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
# A command line as the docs write it: the venv's script, the script on PATH, or the module.
COMMAND = re.compile(r"^(?:\S*/)?flowlens-ingest(?=\s|$)|^python3? -m flowlens_ingest\.cli(?=\s|$)")


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _text_outside_code(text: str) -> str:
    """The Markdown without its fenced blocks (a link in a code block is not a link)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            kept.append(line)
    return "\n".join(kept)


def _code_blocks(text: str) -> Iterator[tuple[str, list[str]]]:
    """(language, lines) of each fenced block."""
    language, lines, fenced = "", [], False
    for line in text.splitlines():
        match = FENCE.match(line.strip())
        if match and not fenced:
            language, lines, fenced = match.group(1), [], True
        elif match and fenced:
            fenced = False
            yield language, lines
        elif fenced:
            lines.append(line)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


@functools.cache
def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for line in _text_outside_code(path.read_text()).splitlines():
        if line.startswith("#"):
            slug = _slug(line.lstrip("#"))
            seen = counts.get(slug, 0)
            counts[slug] = seen + 1
            anchors.add(slug if seen == 0 else f"{slug}-{seen}")
    return anchors


def _tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.stdout.splitlines()]


@pytest.mark.parametrize("doc", DOCS, ids=_relative)
def test_every_link_lands_in_the_repository(doc: Path) -> None:
    """A relative link names a file of this checkout, and its anchor a heading there; none leaves the repository."""
    problems = []
    for target in LINK.findall(_text_outside_code(doc.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue  # a web page (GitHub's docs, a project's site): not a file of ours
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif not linked.exists():
            problems.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            problems.append(f"{target}: no heading #{anchor} in {_relative(linked)}")
    assert problems == [], f"{_relative(doc)}: " + "; ".join(problems)


def test_nothing_points_outside_the_checkout() -> None:
    """No tracked file sends its reader to a folder beside the repository (a clone does not have it)."""
    outside = re.compile(r"\.\./shared\b|\.\./DESIGN\.md")
    named = [
        _relative(path)
        for path in _tracked_files()
        if path.suffix in {".md", ".py", ".cfg", ".toml", ".ini", ".yml", ".lua", ""}
        and path.is_file()
        and path.name != Path(__file__).name
        and outside.search(path.read_text(errors="replace"))
    ]
    assert named == []


# Where the docs name the schema's newest revision.
HEAD_NAMED = [
    re.compile(r"this release needs (\d{4})"),
    re.compile(r"this release: (\d{4})"),
    re.compile(r"to (\d{4}) \(head\)"),
    re.compile(r"revision (\d{4}) \(at head"),
    re.compile(r"`0001` … `(\d{4})`"),
]


def test_the_head_revision_named_is_the_head() -> None:
    """Wherever the docs say which revision is the newest, it is the one the package ships."""
    head = migrate.head()
    named = [
        (_relative(doc), match.group(1))
        for doc in DOCS
        for pattern in HEAD_NAMED
        for match in pattern.finditer(doc.read_text())
    ]
    assert named, "the docs name the head revision somewhere (operating.md does)"
    assert [(doc, revision) for doc, revision in named if revision != head] == []


def _command_lines() -> Iterator[tuple[str, str, bool]]:
    """(doc, line, in a shell block) of every `flowlens-ingest …` command the docs quote, in shell blocks and inline code."""
    for doc in DOCS:
        text = doc.read_text()
        for language, lines in _code_blocks(text):
            if language not in {"sh", "bash", "console", "shell"}:
                continue
            for line in "\n".join(lines).replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if COMMAND.match(line):
                    yield _relative(doc), line, True
        for span in INLINE_CODE.findall(_text_outside_code(text)):
            if COMMAND.match(span.strip()):
                yield _relative(doc), span.strip(), False


def _resolve(words: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """The command the words name, the path to it, and the words after it."""
    command: click.Command = cli
    path: list[str] = []
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        sub = command.get_command(click.Context(command), words[0])
        if sub is None:
            break
        path.append(words.pop(0))
        command = sub
    return command, path, words


def _synopsis(line: str) -> list[str]:
    """The words of a command line up to a pipe, a comment or a redirection; `[--x]` and `…` as options named."""
    line = re.split(r"\s(?:\||#|&&|;|>|2>)\s?", line, maxsplit=1)[0]
    line = COMMAND.sub("", line).strip()
    return [word for word in re.split(r"[\s\[\]|]+", line) if word]


@pytest.mark.parametrize("doc", sorted({doc for doc, _, _ in _command_lines()}))
def test_every_command_and_option_named_exists(doc: str) -> None:
    """`flowlens-ingest X --y` in the docs: X is a command and --y one of its options (or --help)."""
    problems = []
    for where, line, _ in _command_lines():
        if where != doc:
            continue
        command, path, rest = _resolve(_synopsis(line))
        if rest and not rest[0].startswith("-") and isinstance(command, click.Group):
            problems.append(f"{line!r}: no command {' '.join([*path, rest[0]])!r}")
            continue
        options = {name for param in command.params for name in getattr(param, "opts", [])} | {"--help"}
        unknown = [word.split("=")[0] for word in rest if word.startswith("--") and word.split("=")[0] not in options]
        if unknown:
            problems.append(f"{line!r}: {' '.join(path) or 'flowlens-ingest'} has no {', '.join(unknown)}")
    assert problems == []


def _shell_words(line: str) -> list[str] | None:
    """The arguments of a runnable command line (its variables left as words); None when it is a synopsis."""
    line = re.split(r"\s(?:\||#|&&|;|>|2>)\s?", line, maxsplit=1)[0]
    unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", "", COMMAND.sub("", line))
    if re.search(r"[\[\]…]|(?<![$\w{])[A-Z]{3,}(/[A-Z]+)?\b(?!=)", unquoted):
        return None  # a synopsis: `[--since 72h]`, `OWNER/REPO …`, `FILE`
    return shlex.split(COMMAND.sub("", line))


def test_every_quoted_command_line_parses() -> None:
    """Each command line the docs give to copy (in a shell block) is accepted as written, types and all."""
    problems, parsed = [], 0
    for doc, line, runnable in _command_lines():
        words = _shell_words(line) if runnable else None
        if words is None or "--help" in words or "--version" in words or "-V" in words:
            continue
        command, path, rest = _resolve(list(words))
        if isinstance(command, click.Group) and not rest:
            continue  # a group alone (`flowlens-ingest db`) prints its help
        try:
            command.make_context(" ".join(["flowlens-ingest", *path]), rest)
            parsed += 1
        except click.ClickException as exc:
            problems.append(f"{doc}: {line!r}: {exc.format_message()}")
    assert parsed >= 8, "the docs quote runnable command lines (README's serve, send, deliveries …)"
    assert problems == []


def _message_pattern(node: ast.JoinedStr | ast.Constant) -> str | None:
    """A regex for what a string literal or f-string of the code prints; None when it is too short to mean much."""
    parts = node.values if isinstance(node, ast.JoinedStr) else [node]
    pattern, fixed = "", 0
    for part in parts:
        if isinstance(part, ast.Constant) and isinstance(part.value, str):
            pattern += re.escape(part.value)
            fixed += len(part.value)
        else:
            pattern += ".+?"
    return pattern if fixed >= 20 else None


@functools.cache
def _printed_patterns() -> list[re.Pattern[str]]:
    """What the package's string literals and f-strings can print, as regexes."""
    patterns = []
    for source in (ROOT / "flowlens_ingest").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                pattern = _message_pattern(node)
                if pattern is not None:
                    patterns.append(re.compile(pattern, re.DOTALL))
    return patterns


# Lines the docs quote that come from a library, not from us.
FROM_LIBRARIES = re.compile(r"^(Invalid value for|cannot upgrade to '[^']*': Can't locate revision)")


def test_every_quoted_output_line_is_one_the_code_prints() -> None:
    """A `flowlens-ingest: …` line in a code block of the docs is printed by the code, not by an older release."""
    stale = []
    for doc in DOCS:
        for _, lines in _code_blocks(doc.read_text()):
            for line in lines:
                message = line.strip().removeprefix("flowlens-ingest: ")
                if message == line.strip() or FROM_LIBRARIES.match(message):
                    continue
                if not any(pattern.search(line) for pattern in _printed_patterns()):
                    stale.append(f"{_relative(doc)}: {message}")
    assert stale == []


def test_the_configuration_tables_are_the_declared_settings() -> None:
    """docs/operating.md's Configuration tables are what config.py declares (`python -m flowlens_ingest.config`)."""
    from flowlens_ingest.config import GROUPS, markdown_table

    operating = (ROOT / "docs" / "operating.md").read_text()
    for group in GROUPS:
        assert f"### {group}\n\n{markdown_table(group)}\n" in operating, (
            f"docs/operating.md's table {group!r} differs from config.py: regenerate it with"
            " `python -m flowlens_ingest.config`"
        )
