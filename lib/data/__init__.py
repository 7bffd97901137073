"""Offline data loaders: every data set ships inside an installed wheel (the text and image modules name them).

Text loaders return ``datasets.Dataset``; image loaders return NumPy arrays. All take ``n`` (None = everything, else
a seeded subset kept in source order) and ``seed``; bad arguments raise ValueError naming the allowed range.

- text: :func:`wikipedia_articles`, :func:`news_documents`, :func:`kjv_verses`, :func:`sentiment_sentences`,
  :func:`newsgroups_posts`, :func:`python_docs`, and :func:`load_text_dataset` to pick one by name.
- images: :func:`mnist_digits`, :func:`sklearn_digits`, :func:`photos`, plus a seeded :func:`train_test_split`.
- needle-in-a-haystack prompts: :func:`build_needle_prompt`, :func:`random_passkey`, :func:`wikipedia_haystack`.
"""

import os

# No hub: `datasets` must never try the network for these in-memory tables (read when `datasets` is imported).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from .images import PHOTO_NAMES, mnist_digits, photos, sklearn_digits, train_test_split  # noqa: E402
from .needle import NeedlePrompt, Passkey, build_needle_prompt, random_passkey, wikipedia_haystack  # noqa: E402
from .text import (  # noqa: E402
    TEXT_LOADERS,
    kjv_verses,
    load_text_dataset,
    news_documents,
    newsgroups_posts,
    python_docs,
    sentiment_sentences,
    wikipedia_articles,
)

TEXT_DATASETS = tuple(TEXT_LOADERS)

__all__ = [
    "PHOTO_NAMES",
    "TEXT_DATASETS",
    "NeedlePrompt",
    "Passkey",
    "build_needle_prompt",
    "kjv_verses",
    "load_text_dataset",
    "mnist_digits",
    "news_documents",
    "newsgroups_posts",
    "photos",
    "python_docs",
    "random_passkey",
    "sentiment_sentences",
    "sklearn_digits",
    "train_test_split",
    "wikipedia_articles",
    "wikipedia_haystack",
]
