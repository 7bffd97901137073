"""Sentence graphs the LexRank paper [@lexrank] could not have: from sentence embeddings and from an LM's attention.

* :func:`embed_sentences` — MiniLM [@minilm] sentence embeddings (sentence-transformers' mean pooling,
  L2-normalised [@sentence_bert]); :func:`salience.centrality.cosine_graph` turns them into a weighted graph.
* :func:`attention_sentence_graph` — a causal LM reads the document in windows of whole sentences (at most
  ``window`` tokens each); its attention, averaged over layers and heads, is summed from the tokens of sentence ``i``
  to those of sentence ``j`` and divided by the tokens of ``i`` (how much of ``i``'s attention goes to ``j``). Three
  choices, all stated here: attention to each window's first token (the attention sink [@streamingllm]) is left out
  and rows renormalised; a sentence's attention to itself is left out (the graph links sentences); and the causal
  graph only points back in time, so it is symmetrised (``W + Wᵀ``) before a walk, which would otherwise pool its
  mass on the first sentences. Sentences in different windows have no edge. This is the sentence-level
  counterpart of the ``attention_pagerank`` token scorer.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from .models import ModelBundle
from .models.minilm import mean_pool


def embed_sentences(bundle: ModelBundle, sentences: list[str], batch_size: int = 64, max_tokens: int = 128,
                    ) -> np.ndarray:
    """``(S, hidden)`` L2-normalised mean-pooled embeddings from a text encoder (e.g. ``minilm-l6``)."""
    if bundle.kind != "text-encoder":
        raise ValueError(f"embed_sentences needs a text-encoder model, got {bundle.name!r} ({bundle.kind})")
    if not sentences:
        raise ValueError("embed_sentences needs at least one sentence")
    device = next(bundle.model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            batch = bundle.processor(sentences[start:start + batch_size], padding=True, truncation=True,
                                     max_length=max_tokens, return_tensors="pt").to(device)
            hidden = bundle.model(**batch).last_hidden_state
            out.append(mean_pool(hidden, batch["attention_mask"]).float().cpu())
    return torch.cat(out).numpy().astype(np.float64)


def sentence_windows(lengths: list[int], window: int) -> list[list[int]]:
    """Consecutive sentences grouped so that each group's tokens fit in ``window`` (a longer sentence is alone in
    its group and is cut by the caller)."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    groups: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if groups[-1] and used + n > window:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def attention_sentence_graph(bundle: ModelBundle, sentences: list[str], window: int = 512) -> np.ndarray:
    """``(S, S)`` symmetric, non-negative sentence graph from a causal LM's attention (module docstring)."""
    if bundle.kind != "causal-lm":
        raise ValueError(f"attention_sentence_graph needs a causal-lm model, got {bundle.name!r} ({bundle.kind})")
    if getattr(bundle.model.config, "_attn_implementation", "eager") != "eager":
        raise ValueError("attention_sentence_graph needs attention weights: load the model with "
                         "attn_implementation='eager'")
    tokenizer = bundle.processor
    ids = [tokenizer(" " + s, add_special_tokens=False)["input_ids"][:window] for s in sentences]
    graph = np.zeros((len(sentences), len(sentences)))
    device = next(bundle.model.parameters()).device
    for group in sentence_windows([len(x) for x in ids], window):
        owner = torch.tensor([i for i in group for _ in ids[i]])
        tokens = torch.tensor([[t for i in group for t in ids[i]]], device=device)
        with torch.inference_mode():
            attentions = bundle.model(input_ids=tokens, output_attentions=True).attentions
        attn = torch.stack([a[0].float().mean(0) for a in attentions]).mean(0).cpu()  # (T, T)
        attn[:, 0] = 0.0  # the window's first token: the attention sink
        attn = attn / attn.sum(-1, keepdim=True).clamp_min(1e-12)
        members = torch.tensor(group)
        onehot = (owner[:, None] == members[None, :]).float()  # (T, G)
        block = onehot.T @ attn @ onehot / onehot.sum(0)[:, None]  # (G, G): mean over i's tokens, sum over j's
        graph[np.ix_(group, group)] = block.numpy()
    np.fill_diagonal(graph, 0.0)
    return graph + graph.T


def attention_graphs(bundle: ModelBundle, documents: list[list[str]], window: int, progress: bool = True,
                     ) -> list[np.ndarray]:
    """:func:`attention_sentence_graph` of every document, with a progress bar."""
    return [attention_sentence_graph(bundle, doc, window)
            for doc in tqdm(documents, desc="attention graphs", disable=not progress)]
