"""Needle-in-a-haystack (passkey retrieval) prompts: a fact planted at a chosen depth of real text.

The builder counts tokens with the caller's tokenizer, so the returned token span is exact for that tokenizer and a
scorer's kept set can be checked against it: did the compression keep the needle?
"""

from __future__ import annotations

import bisect
import math
import random
import re
from dataclasses import dataclass
from typing import NamedTuple

from ..seeding import unit_seed

# End of a sentence: terminal punctuation (plus closing quotes/brackets) followed by a line break, or by spaces and
# something that starts a sentence. Requiring the capital skips most "e.g. foo" false boundaries; the
# lookbehinds skip initials ("Sergei K. Krikalev") and common title abbreviations.
_SENTENCE_END = re.compile(
    r"(?<!\b[A-Z])(?<!\bMr)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bvs)(?<!\bNo)(?<!\bMrs)(?<!\bJr)(?<!\bSr)"
    r"[.!?][\"')\]]*(?=\s*\n|\s+[\"'(\[]?[A-Z0-9])"
)
_WORD_END = re.compile(r"\S(?=\s)")
# Characters of haystack looked at per requested token before tokenizing: avoids tokenizing a whole book for a
# 512-token prompt. English averages ~4-5 characters per token; the full text is used if this is not enough.
_CHARS_PER_TOKEN_CAP = 16
# With end_at_sentence, the haystack is cut back to its last full sentence when that costs at most this share of it.
_MAX_SENTENCE_TRIM = 0.1


@dataclass(frozen=True)
class NeedlePrompt:
    """A haystack context with a planted needle.

    ``context_ids`` is ``context`` tokenized without special tokens; ``context_ids[slice(*needle_token_span)]``
    covers the needle. ``depth`` is where the needle really landed, as its start token over the haystack tokens.
    """

    context: str
    question: str
    answer: str
    needle_token_span: tuple[int, int]
    context_ids: list[int]
    needle: str = ""
    depth: float = 0.0


class Passkey(NamedTuple):
    """A needle sentence with its question and answer; unpacks into ``build_needle_prompt``'s arguments."""

    needle: str
    question: str
    answer: str


def random_passkey(seed: int = 0, digits: int = 5) -> Passkey:
    """A seeded random passkey: ``Passkey("The secret passkey is 68391.", "What is the secret passkey?", "68391")``."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    key = str(random.Random(seed).randrange(10 ** (digits - 1), 10**digits))
    return Passkey(f"The secret passkey is {key}.", "What is the secret passkey?", key)


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of ``text`` without special tokens, plus character offsets when the tokenizer can give them."""
    # verbose=False: haystacks are longer than an encoder's max length on purpose; the warning would be noise.
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]), None


def _count(tokenizer, text: str) -> int:
    return len(_encode(tokenizer, text)[0])


def _truncate(tokenizer, text: str, ids: list[int], offsets, n_tokens: int) -> str:
    """The prefix of ``text`` that holds its first ``n_tokens`` tokens."""
    if n_tokens >= len(ids):
        return text
    if offsets is not None:
        return text[: offsets[n_tokens - 1][1]]
    return tokenizer.decode(ids[:n_tokens], skip_special_tokens=True)


def _boundaries(text: str) -> list[int]:
    """Character positions where a sentence may be inserted: start, after each sentence, end."""
    cuts = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not cuts:  # no sentence structure (lower-cased or one long sentence): fall back to word ends
        cuts = [m.end() for m in _WORD_END.finditer(text)]
    return sorted({0, len(text), *cuts})


def _tokens_before(tokenizer, text: str, offsets, positions: list[int]) -> list[int]:
    """For each character position, how many tokens of ``text`` start before it."""
    if offsets is not None:
        starts = [start for start, _ in offsets]
        return [bisect.bisect_left(starts, pos) for pos in positions]
    return [_count(tokenizer, text[:pos]) for pos in positions]


def _insert(text: str, position: int, needle: str) -> tuple[str, int]:
    """``text`` with ``needle`` as a sentence at ``position``; returns the context and the needle's start char."""
    if position == 0:
        return f"{needle} {text.lstrip()}", 0
    head = text[:position].rstrip()
    # Keep the whitespace that followed the boundary (a paragraph break stays a paragraph break).
    return f"{head} {needle}{text[position:]}", len(head) + 1


def _needle_span(tokenizer, context: str, offsets, start: int, end: int) -> tuple[int, int]:
    if offsets is not None:
        first = next(i for i, (_, e) in enumerate(offsets) if e > start)
        last = max(i for i, (s, _) in enumerate(offsets) if s < end)
        return first, last + 1
    # Slow tokenizers give no offsets: count the tokens of the text before and through the needle.
    return _count(tokenizer, context[:start].rstrip()), _count(tokenizer, context[:end])


def build_needle_prompt(
    tokenizer,
    haystack_text: str,
    needle: str,
    question: str,
    answer: str,
    depth: float,
    context_tokens: int,
    end_at_sentence: bool = True,
) -> NeedlePrompt:
    """Plant ``needle`` at relative ``depth`` of ``haystack_text`` truncated so the context has ``context_tokens``.

    ``depth`` 0 puts the needle first, 1 last, values between at the sentence boundary nearest that fraction of the
    haystack's tokens. The context holds at most ``context_tokens`` tokens of ``tokenizer`` (without special tokens).
    With ``end_at_sentence`` (default) the haystack is cut back to its last complete sentence when that drops at most
    10% of it, so the context reads naturally and holds between ~0.9 and 1.0 x ``context_tokens`` tokens; with
    ``end_at_sentence=False`` it is cut at a token boundary and holds ``context_tokens`` tokens (give or take one
    where tokens merge at a junction), its last sentence possibly incomplete.

    Returns a :class:`NeedlePrompt`; ``question`` and ``answer`` pass through unchanged.
    Raises ValueError for ``depth`` outside [0, 1], or a ``context_tokens`` that cannot hold the needle plus some
    haystack, or that exceeds what the haystack can fill; the message names the allowed range.
    """
    if not isinstance(depth, (int, float)) or isinstance(depth, bool) or math.isnan(depth) or not 0 <= depth <= 1:
        raise ValueError(f"depth must be a number in [0, 1] (0 = start, 1 = end), got {depth!r}")
    needle = " ".join(needle.split())
    if not needle:
        raise ValueError("needle must be a non-empty sentence")
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int):
        raise ValueError(f"context_tokens must be an integer, got {context_tokens!r}")
    # The needle may tokenize one token longer after a space (byte-level BPE); reserve the larger count.
    needle_tokens = max(_count(tokenizer, needle), _count(tokenizer, " " + needle))
    minimum = needle_tokens + 1
    if context_tokens < minimum:
        raise ValueError(
            f"context_tokens={context_tokens} cannot hold the needle ({needle_tokens} tokens) and any haystack: "
            f"use context_tokens >= {minimum}"
        )

    haystack = haystack_text.strip()
    capped = haystack[: context_tokens * _CHARS_PER_TOKEN_CAP]
    hay_ids, hay_offsets = _encode(tokenizer, capped)
    if len(hay_ids) < context_tokens and len(capped) < len(haystack):
        capped = haystack
        hay_ids, hay_offsets = _encode(tokenizer, capped)
    budget = context_tokens - needle_tokens
    if len(hay_ids) < budget:
        raise ValueError(
            f"the haystack has only {len(hay_ids)} tokens: context_tokens must be in "
            f"[{minimum}, {len(hay_ids) + needle_tokens}] for this haystack and needle (or pass a longer haystack)"
        )

    # Junctions can merge or split a token or two, so shrink the haystack until the context fits.
    for _ in range(16):
        hay = _truncate(tokenizer, capped, hay_ids, hay_offsets, budget)
        cuts = _boundaries(hay)
        cut_tokens = _tokens_before(tokenizer, hay, _encode(tokenizer, hay)[1], cuts)
        if end_at_sentence and budget < len(hay_ids):
            keep = [i for i in range(1, len(cuts) - 1) if cut_tokens[i] >= (1 - _MAX_SENTENCE_TRIM) * cut_tokens[-1]]
            if keep:
                hay, cuts, cut_tokens = hay[: cuts[keep[-1]]], cuts[: keep[-1] + 1], cut_tokens[: keep[-1] + 1]
        target = depth * cut_tokens[-1]
        best = min(range(len(cuts)), key=lambda i: (abs(cut_tokens[i] - target), i))
        context, start = _insert(hay, cuts[best], needle)
        context_ids, offsets = _encode(tokenizer, context)
        if len(context_ids) <= context_tokens or budget <= 1:
            break
        budget = max(1, budget - (len(context_ids) - context_tokens))
    if len(context_ids) > context_tokens:
        raise ValueError(f"could not fit the needle into context_tokens={context_tokens}; use a larger value")

    span = _needle_span(tokenizer, context, offsets, start, start + len(needle))
    n_span = span[1] - span[0]
    realized = span[0] / max(1, len(context_ids) - n_span)
    return NeedlePrompt(
        context=context,
        question=question,
        answer=answer,
        needle_token_span=span,
        context_ids=context_ids,
        needle=needle,
        depth=float(min(1.0, realized)),
    )


def wikipedia_haystack(min_chars: int = 40_000, seed: int = 0) -> str:
    """Real prose to hide needles in: bodies of Wikipedia articles in a seeded order, joined until ``min_chars``.

    Around 4-5 characters per token for English, so the default covers ~8k-token contexts.
    """
    from .text import wikipedia_articles

    articles = wikipedia_articles(seed=seed)
    order = random.Random(seed).sample(range(len(articles)), len(articles))
    parts, total = [], 0
    for i in order:
        parts.append(articles[i]["body"])
        total += len(parts[-1]) + 2
        if total >= min_chars:
            return "\n\n".join(parts)
    raise ValueError(f"min_chars must be <= {total} (all Wikipedia bodies together), got {min_chars}")


def passkey_prompts(tokenizer, depths, n_passkeys: int, context_tokens: int, seed: int = 0) -> list[NeedlePrompt]:
    """``n_passkeys`` × ``len(depths)`` passkey prompts of ``context_tokens`` tokens: prompt ``i`` plants its own
    seeded passkey (:func:`random_passkey`) in its own seeded Wikipedia haystack, so the prompts are separate units
    (different prose, different key), ordered passkey by passkey, depth by depth."""
    if n_passkeys < 1 or not list(depths):
        raise ValueError(f"need n_passkeys >= 1 and at least one depth, got {n_passkeys} and {list(depths)}")
    prompts = []
    for s in range(n_passkeys):
        for d in depths:
            i = len(prompts)
            hay = wikipedia_haystack(min_chars=max(20_000, 16 * context_tokens), seed=unit_seed(seed, i))
            prompts.append(build_needle_prompt(tokenizer, hay, *random_passkey(seed=unit_seed(seed, i)), depth=d,
                                               context_tokens=context_tokens))
    return prompts
