"""The smallest honest question-conditioned visual reader: text-guided visual-token pruning without an offline VLM.

Task: a 2×2 grid of MNIST digits, a question "which digit is in the <row>-<col> quadrant?" (three text tokens:
``[ASK] [TOP|BOTTOM] [LEFT|RIGHT]``), answer one of 10 digits. The image side is the frozen embedded DINOv2-S: its
output patch tokens (and its last block's [CLS] attention, the text-free FasterVLM score [@fastervlm]) are computed
once per grid. The reader (:class:`QuestionReader`) is a small pre-LN transformer trained here from scratch on the
unpruned ``[text tokens; visual tokens]`` sequence, read out at the mean of the text tokens: the analogue of an LLM
reading visual tokens. Pruning is training-free: after reader block ``layer``, only the kept visual tokens go on.

Training the reader is chaotic: features that differ in the 14th digit (another CPU's float64 kernels) train a
reader whose pruning effects differ by up to ~0.02 of probability, as a new seed would. So a notebook reads a
stored reader by default, like the pretrained VLM the papers prune, and :func:`save_reader` / :func:`load_reader`
keep what it was trained with beside its weights; a reader trained with other settings is refused on load.

Rules that choose the visual tokens kept (:data:`RULES`):

* ``question_attention`` — FastV [@fastv], text-guided: attention the question tokens pay to each visual token at
  the pruning layer (mean over heads and question rows).
* ``text_raters`` — SparseVLM [@sparsevlm], text-guided: only the question tokens that attend to the image more
  than the average question token ("raters") vote, with their attention.
* ``cls_attention`` — FasterVLM, text-free: the encoder's [CLS] attention to each patch (last block).
* ``spatial_grid`` — uniform spatial sampling (FEATHER [@feather]'s control), coarse to fine.
* ``random`` — seeded uniform ranking.
* ``asked_quadrant`` (oracle) — the patches of the asked quadrant first, then seeded random; ``wrong_quadrant`` —
  another quadrant's first (the gate's control).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .scorers import get_scorer
from .scorers.base import AttentionView
from .validation import check_keep

QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
#: text vocabulary: [ASK], the row word, the column word
ASK, TOP, BOTTOM, LEFT, RIGHT = range(5)
TEXT_TOKENS = 3
RULES = ("question_attention", "text_raters", "cls_attention", "spatial_grid", "random", "asked_quadrant",
         "wrong_quadrant")
TEXT_GUIDED = ("question_attention", "text_raters")


def question_tokens(quadrant: int | str) -> list[int]:
    """``[ASK, row, col]`` of a quadrant given by index (0..3) or name; a quadrant that does not exist is an error."""
    index = QUADRANTS.index(quadrant) if isinstance(quadrant, str) and quadrant in QUADRANTS else quadrant
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(QUADRANTS):
        raise ValueError(f"no quadrant {quadrant!r}: ask about one of {', '.join(QUADRANTS)} (or 0..3)")
    return [ASK, BOTTOM if index >= 2 else TOP, RIGHT if index % 2 else LEFT]


def digit_grids(images: np.ndarray, labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 2×2 grids of distinct random digits: images ``(n, 2h, 2w)`` and labels ``(n, 4)`` in quadrant order."""
    if len(images) < 4:
        raise ValueError("digit_grids needs at least 4 digit images")
    rng = np.random.default_rng(seed)
    h, w = images.shape[1:3]
    grids = np.zeros((n, 2 * h, 2 * w), dtype=images.dtype)
    grid_labels = np.zeros((n, 4), dtype=np.int64)
    for i in range(n):
        pick = rng.choice(len(images), size=4, replace=False)
        for q, j in enumerate(pick):
            r, c = divmod(q, 2)
            grids[i, r * h:(r + 1) * h, c * w:(c + 1) * w] = images[j]
            grid_labels[i, q] = labels[j]
    return grids, grid_labels


def quadrant_of_patches(grid: tuple[int, int]) -> torch.Tensor:
    """``(P,)`` quadrant index of every patch in raster order (the grid's sides must be even)."""
    rows, cols = grid
    if rows % 2 or cols % 2:
        raise ValueError(f"the patch grid {grid} must have even sides to split into quadrants")
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    return (r >= rows // 2).long() * 2 + (c >= cols // 2).long()


class _Block(nn.Module):
    """Pre-LN transformer block with explicit attention probabilities (so a rule can read them)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)  # (B, H, N, N)
        x = x + self.out((probs @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x)), probs


class QuestionReader(nn.Module):
    """``[3 question tokens; P visual tokens]`` → digit logits (10), read at the mean of the question tokens.

    ``features (B, P, F)`` are frozen encoder patch tokens, projected to ``dim`` and given a learned position per
    patch; ``question (B, 3)`` token ids (:func:`question_tokens`).
    """

    def __init__(self, feature_dim: int, patches: int, dim: int = 128, heads: int = 4, layers: int = 3):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.visual = nn.Linear(feature_dim, dim)
        self.position = nn.Parameter(torch.randn(patches, dim) * 0.02)
        self.text = nn.Embedding(5, dim)
        self.text_position = nn.Parameter(torch.randn(TEXT_TOKENS, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def embed(self, features: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.text(question) + self.text_position, self.visual(features) + self.position], dim=1)

    def forward(self, features: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        x = self.embed(features, question)
        for block in self.blocks:
            x, _ = block(x)
        return self.head(self.norm(x[:, :TEXT_TOKENS]).mean(1))


@dataclass(frozen=True)
class PrunedAnswer:
    """What a pruned forward pass gives: ``logits (B, 10)``, ``kept (B, k)`` patch indices kept (raster order of the
    patch grid) and ``tokens_per_block`` (sequence length each block saw: asserted)."""

    logits: torch.Tensor
    kept: torch.Tensor
    tokens_per_block: list[int]


def rule_scores(rule: str, probs: torch.Tensor, question: torch.Tensor, cls_scores: torch.Tensor,
                quadrants: torch.Tensor, grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``(B, P)`` scores of one rule (higher kept first) from the pruning block's attention ``probs (B, H, N, N)``."""
    b, p = cls_scores.shape
    if rule == "question_attention":
        return probs[:, :, :TEXT_TOKENS, TEXT_TOKENS:].mean(dim=(1, 2))
    if rule == "text_raters":
        rows = probs[:, :, :TEXT_TOKENS, TEXT_TOKENS:].mean(1)  # (B, 3, P)
        relevance = rows.sum(-1)  # how much each question token looks at the image
        raters = (relevance >= relevance.mean(-1, keepdim=True)).float()
        return (rows * raters[..., None]).sum(1) / raters.sum(-1, keepdim=True)
    if rule == "cls_attention":
        return cls_scores
    if rule == "spatial_grid":
        rows, cols = grid
        coords = torch.stack([torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)], -1)
        # the same ranking for every example: score one (the view's batch of one is set by a placeholder hidden state)
        view = AttentionView(key_positions=torch.arange(p)[None], patch_coords=coords, hidden=torch.zeros(1, p, 1))
        return get_scorer("spatial_grid")(view).reshape(1, p).expand(b, p)
    noise = torch.rand(b, p, generator=generator)
    if rule == "random":
        return noise
    asked = (question[:, 1] == BOTTOM).long() * 2 + (question[:, 2] == RIGHT).long()  # inverse of question_tokens
    if rule == "asked_quadrant":
        target = asked
    elif rule == "wrong_quadrant":
        target = (asked + 1 + torch.randint(0, 3, (b,), generator=generator)) % 4
    else:
        raise ValueError(f"unknown rule {rule!r}; rules: {', '.join(RULES)}")
    return (quadrants[None, :] == target[:, None]).float() + noise * 0.5


def pruned_answer(reader: QuestionReader, features: torch.Tensor, question: torch.Tensor, cls_scores: torch.Tensor,
                  rule: str, keep: float, layer: int, grid: tuple[int, int], seed: int = 0) -> PrunedAnswer:
    """Run the reader, drop visual tokens after block ``layer`` (0: before the first block) keeping
    ``round(keep · P)`` (at least 1) chosen by ``rule``, and finish the pass on what is kept."""
    check_keep(float(keep))
    if not 0 <= layer < len(reader.blocks):
        raise ValueError(f"layer must be in 0..{len(reader.blocks) - 1} (prune before a later block), got {layer}")
    b, p, _ = features.shape
    n_keep = max(1, round(keep * p))
    generator = torch.Generator().manual_seed(seed)
    x = reader.embed(features, question)
    seen, probs = [], None
    for i, block in enumerate(reader.blocks):
        if i == layer:
            if probs is None:  # pruning before any block: text-guided rules read the first block's attention
                _, probs = block(x)
            scores = rule_scores(rule, probs, question, cls_scores, quadrant_of_patches(grid), grid, generator)
            kept = scores.topk(n_keep, dim=-1, sorted=False).indices.sort(dim=-1).values
            visual = x[:, TEXT_TOKENS:].gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :TEXT_TOKENS], visual], dim=1)
        seen.append(x.shape[1])
        x, probs = block(x)
    expected = [TEXT_TOKENS + p] * layer + [TEXT_TOKENS + n_keep] * (len(reader.blocks) - layer)
    if seen != expected:
        raise AssertionError(f"blocks saw {seen} tokens, expected {expected}")
    return PrunedAnswer(reader.head(reader.norm(x[:, :TEXT_TOKENS]).mean(1)), kept, seen)


def train_reader(features: torch.Tensor, grid_labels: torch.Tensor, *, dim: int, heads: int, layers: int,
                 epochs: int, lr: float, batch_size: int, seed: int, progress: bool = True) -> QuestionReader:
    """Train a :class:`QuestionReader` on every (grid, quadrant) question of the training grids, unpruned (AdamW,
    cross-entropy, seeded shuffles), in the dtype of ``features``: float64 features give a reader whose training
    does not amplify float32 round-off (which differs between CPUs and memory layouts) into a different reader."""
    torch.manual_seed(seed)
    g, p, f = features.shape
    reader = QuestionReader(f, p, dim=dim, heads=heads, layers=layers).to(features.dtype)
    questions = torch.tensor([question_tokens(q) for q in range(4)])
    grid_idx = torch.arange(g).repeat_interleave(4)
    quad_idx = torch.arange(4).repeat(g)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    reader.train()
    for _ in tqdm(range(epochs), desc="reader epochs", disable=not progress):
        order = torch.randperm(len(grid_idx), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            logits = reader(features[grid_idx[batch]], questions[quad_idx[batch]])
            loss = nn.functional.cross_entropy(logits, grid_labels[grid_idx[batch], quad_idx[batch]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return reader.eval()


#: version of the checkpoint layout written by :func:`save_reader`
READER_FORMAT = 1


def save_reader(reader: QuestionReader, path: str | Path, training: dict, **provenance) -> Path:
    """Write ``reader``'s weights with ``training`` (every setting that defines the reader: encoder, image size,
    training grids, seed, width, heads, blocks, epochs, learning rate, batch size) and free-form ``provenance``
    (accuracies, versions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": READER_FORMAT, "training": dict(training), "provenance": dict(provenance),
                "state_dict": {k: v.detach().cpu() for k, v in reader.state_dict().items()}}, path)
    return path


def load_reader(path: str | Path, training: dict) -> tuple[QuestionReader, dict]:
    """``(reader, provenance)`` from a :func:`save_reader` file, refused (ValueError naming each difference) unless
    it was trained with exactly ``training``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reader checkpoint at {path}: train one (reader: train) or give its path")
    stored = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(stored, dict) or stored.get("format") != READER_FORMAT:
        raise ValueError(f"{path} is not a reader checkpoint of format {READER_FORMAT}")
    differ = {k: (stored["training"].get(k), v) for k, v in training.items() if stored["training"].get(k) != v}
    if differ:
        detail = "; ".join(f"{k}: stored {a!r}, asked {b!r}" for k, (a, b) in sorted(differ.items()))
        raise ValueError(f"the reader in {path} was trained with other settings ({detail}): set reader: train to "
                         "train one with these")
    t = stored["training"]
    state = stored["state_dict"]
    reader = QuestionReader(t["feature_dim"], t["patches"], dim=t["dim"], heads=t["heads"], layers=t["layers"])
    reader = reader.to(state["visual.weight"].dtype)
    reader.load_state_dict(state)
    return reader.eval(), stored["provenance"]
