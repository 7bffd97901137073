"""One module per notebook: its typed parameters and the analysis it runs, so the notebook stays thin.

``NOTEBOOKS`` maps a notebook name (file stem under ``notebooks/``) to its module; each module defines ``Params``
(a :class:`~salience.params.NotebookParams`), ``TITLE`` and ``CLAIM``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

NOTEBOOKS: dict[str, str] = {
    "kv-normalized-attention": "salience.experiments.kv_normalized_attention",
    "kernel-scored-attention": "salience.experiments.kernel_scored_attention",
    "kernel-lightning-attention": "salience.experiments.kernel_lightning_attention",
    "kv-snapkv": "salience.experiments.kv_snapkv",
    "kv-leaderboard": "salience.experiments.kv_leaderboard",
    "vit-multilayer-flow": "salience.experiments.vit_multilayer_flow",
    "vit-diversity": "salience.experiments.vit_diversity",
    "vit-cls-attention": "salience.experiments.vit_cls_attention",
    "vit-merging": "salience.experiments.vit_merging",
    "kv-sinks-and-separators": "salience.experiments.kv_sinks_and_separators",
    "kv-value-aware": "salience.experiments.kv_value_aware",
    "vit-leaderboard": "salience.experiments.vit_leaderboard",
    "centrality-lexrank": "salience.experiments.centrality_lexrank",
    "explain-attention-vs-gradients": "salience.experiments.explain_attention_vs_gradients",
    "explain-rollout-flow-globenc": "salience.experiments.explain_rollout_flow_globenc",
    "explain-eviction-scores": "salience.experiments.explain_eviction_scores",
    "speech-cross-attention": "salience.experiments.speech_cross_attention",
    "guided-visual-pruning": "salience.experiments.guided_visual_pruning",
    "guided-whisper-pruning": "salience.experiments.guided_whisper_pruning",
}


def experiment_module(notebook: str) -> ModuleType:
    try:
        return importlib.import_module(NOTEBOOKS[notebook])
    except KeyError:
        raise ValueError(f"unknown notebook {notebook!r}; available: {', '.join(sorted(NOTEBOOKS))}") from None


def params_class(notebook: str):
    return experiment_module(notebook).Params
