"""The repository resolves every paper it cites: ``references.yaml`` is complete, every ``[@key]`` in the repository's
own text names an entry, and no catalogue id (``s97``, ``**s148**``) or reference to the project's issue tracker
("issue 4") is left for a reader who has neither.

"Own text" is every text file under lib/, kernels/, benchmarks/ (not its result CSVs) and params/, README.md, the
markdown and code cells of notebooks/*.ipynb (not their outputs: a Findings text is checked where it is produced),
and references.yaml itself (its claims for citations, the whole file for ids and issue numbers).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from salience.paths import REPO_ROOT
from salience.references import REFERENCES_FILE, REQUIRED_FIELDS, cited_keys, references

SCANNED_DIRS = ("lib", "kernels", "benchmarks", "params")
SCANNED_FILES = ("README.md",)
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".j2", ".html", ".js", ".css", ".cfg", ".toml", ".txt", ".sh"}
#: the citation syntax written out in documentation (``[@key]``, ``[@key1; @key2]``), not a citation
SYNTAX_EXAMPLES = {"key", "key1", "key2"}
#: a catalogue id used as a paper id: ``(s97)``, ``**s148**``, ``s93)``, ``sinks s263, s115``, ``s# id``; not part of
#: a longer name (``dinov2-s14``, ``self.s1``), an assignment, call, index or attribute (``s1 = ...``, ``s3://``)
CATALOGUE_ID = re.compile(r"(?<![\w\-./#%])s(?:\d{1,3}|#)(?![\w\-#]|\s*[=(\[]|\.\w|:/)")
#: a reference to the project's own tracker: "issue 4", "Issue 3 §5", "issues 3 and 5", "issue #9"
ISSUE_REFERENCE = re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE)
ARXIV_ID = re.compile(r"^\d{4}\.\d{4,5}$")


@dataclass(frozen=True)
class Line:
    """One line of the repository's own text; ``where`` is ``path:line`` (``path:cell N:line`` in notebooks)."""

    where: str
    text: str


def _file_lines(path: Path, root: Path) -> Iterator[Line]:
    rel = path.relative_to(root).as_posix()
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        yield Line(f"{rel}:{number}", text)


def own_lines(root: Path = REPO_ROOT, *, include_references_file: bool = True) -> Iterator[Line]:
    """Every line of the repository's own text under ``root`` (see the module docstring)."""
    for folder in SCANNED_DIRS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
                yield from _file_lines(path, root)
    for name in SCANNED_FILES + (("references.yaml",) if include_references_file else ()):
        if (root / name).is_file():
            yield from _file_lines(root / name, root)
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        rel = path.relative_to(root).as_posix()
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
            for number, text in enumerate(cell.source.splitlines(), 1):
                yield Line(f"{rel}:cell {index}:{number}", text)


def unknown_citations(lines: Iterable[Line], known: Iterable[str]) -> list[str]:
    """``path:line: @key`` for every cited key that ``known`` does not hold."""
    known = set(known) | SYNTAX_EXAMPLES
    return [f"{line.where}: @{key}" for line in lines for key in cited_keys(line.text) if key not in known]


def pattern_hits(lines: Iterable[Line], pattern: re.Pattern) -> list[str]:
    """``path:line: match  |  the line`` for every match of ``pattern``."""
    return [f"{line.where}: {m.group(0)!r}  |  {line.text.strip()[:100]}" for line in lines
            for m in pattern.finditer(line.text)]


def _report(hits: list[str], what: str) -> str:
    return f"{len(hits)} {what}:\n" + "\n".join(hits)


# ------------------------------------------------------------------------------------------ references.yaml
ENTRIES = references()


def test_every_entry_is_complete_and_plausible():
    this_year = datetime.date.today().year
    problems = []
    for key, entry in ENTRIES.items():
        if not re.fullmatch(r"[a-z0-9_]+", key):
            problems.append(f"{key}: keys are lower-case letters, digits and underscores")
        problems += [f"{key}: {field} is missing or empty" for field in REQUIRED_FIELDS if not entry.get(field)]
        if not isinstance(entry.get("year"), int) or not 1950 <= entry["year"] <= this_year:
            problems.append(f"{key}: year {entry.get('year')!r} is not a plausible publication year")
        if "arxiv" in entry and not ARXIV_ID.match(str(entry["arxiv"])):
            problems.append(f"{key}: arxiv {entry['arxiv']!r} is not an arXiv identifier like 2405.14256")
        if not isinstance(entry.get("claim"), str):
            problems.append(f"{key}: claim must be a string ('' for work that is only cited)")
        unknown_fields = set(entry) - {*REQUIRED_FIELDS, "venue", "arxiv", "url", "claim"}
        if unknown_fields:
            problems.append(f"{key}: unknown field(s) {sorted(unknown_fields)}")
    assert not problems, "\n".join(problems)


def test_arxiv_year_is_not_after_the_entry_year_by_more_than_one():
    """An arXiv id encodes its submission year (``2405.*`` = 2024); the entry's year is that or the venue's year."""
    wrong = [f"{k}: arxiv {e['arxiv']} vs year {e['year']}" for k, e in ENTRIES.items() if "arxiv" in e
             and not 2000 + int(str(e["arxiv"])[:2]) <= e["year"] <= 2000 + int(str(e["arxiv"])[:2]) + 1
             and k != "lexrank"]  # LexRank (2004) was posted to arXiv in 2011
    assert not wrong, "\n".join(wrong)


# ------------------------------------------------------------------------------------------ the repository's text
def test_every_citation_in_the_repository_resolves():
    lines = list(own_lines(include_references_file=False))
    lines += [Line(f"references.yaml: {key}.claim", e["claim"]) for key, e in ENTRIES.items()]
    unknown = unknown_citations(lines, ENTRIES)
    assert not unknown, _report(unknown, "citations of keys that references.yaml does not define")


def test_no_catalogue_ids_remain():
    hits = pattern_hits(own_lines(), CATALOGUE_ID)
    assert not hits, _report(hits, "catalogue ids (cite the paper's key from references.yaml as [@key] instead)")


def test_no_references_to_the_issue_tracker():
    hits = pattern_hits(own_lines(), ISSUE_REFERENCE)
    assert not hits, _report(hits, "references to issue numbers (a reader has no access to the tracker)")


# ------------------------------------------------------------------------------------------ the scanners can fail
def test_an_unknown_key_in_a_new_file_is_reported(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "good.py").write_text('"""Normalised attention [@zipcache; @h2o]."""\n')
    (tmp_path / "lib" / "bad.py").write_text('"""Docstring.\n\nA made-up method [@nosuchpaper2099]."""\n')
    found = unknown_citations(own_lines(tmp_path), ENTRIES)
    assert found == ["lib/bad.py:3: @nosuchpaper2099"]


def test_notebook_cells_are_scanned_but_not_their_outputs(tmp_path):
    (tmp_path / "notebooks").mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Title\n\nZipCache (s97) [@zipcach]"),
                nbformat.v4.new_code_cell("x = 1", outputs=[nbformat.v4.new_output("stream", text="issue 4 s97")])]
    nbformat.write(nb, tmp_path / "notebooks" / "demo.ipynb")
    lines = list(own_lines(tmp_path))
    assert unknown_citations(lines, ENTRIES) == ["notebooks/demo.ipynb:cell 0:3: @zipcach"]
    assert [h.split(":")[0:3] for h in pattern_hits(lines, CATALOGUE_ID)] == [["notebooks/demo.ipynb", "cell 0", "3"]]
    assert pattern_hits(lines, ISSUE_REFERENCE) == []


@pytest.mark.parametrize("text", ["ZipCache (s97): accumulated", "**s148** in methods.md", "SnapKV s93)",
                                  "the s# id of the paper", "sinks s263, s115", "baseline s280, s276)",
                                  "as ZipCache s97.", "(LexRank s1 as a KV scorer"])
def test_catalogue_id_pattern_catches_the_forms_in_use(text):
    assert CATALOGUE_ID.search(text)


@pytest.mark.parametrize("text", ["dinov2-s14", "self.s1 = 2", "s1 = torch.zeros(3)", "s_h = decay", "fp16 ms 10s",
                                  "s3://bucket", "ops/s2", "%s#%d", "f(s2[0])", "slopes(h)"])
def test_catalogue_id_pattern_leaves_ordinary_identifiers(text):
    assert not CATALOGUE_ID.search(text)


@pytest.mark.parametrize("text,found", [("the GPU targets of issue 4", True), ("Issue 3 §5: per step", True),
                                        ("issues 3 and 5", True), ("see issue #9", True),
                                        ("this issue is known", False), ("tissue 3", False)])
def test_issue_pattern(text, found):
    assert bool(ISSUE_REFERENCE.search(text)) is found


def test_the_references_file_is_the_one_the_library_reads():
    assert REFERENCES_FILE == REPO_ROOT / "references.yaml"
