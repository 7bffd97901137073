"""Notebook ``guided-visual-pruning``: does text-guided visual-token pruning (FastV [@fastv], SparseVLM
[@sparsevlm]) keep what a question needs better than text-free [CLS] attention [@fastervlm] and uniform sampling
[@feather] at equal kept share?

Setting (:mod:`salience.guided_reader`): 2×2 grids of MNIST digits encoded once by the frozen DINOv2-S; a small
question-conditioned transformer reader trained here on the unpruned tokens; visual tokens dropped after reader block
``prune_layer`` by each rule, training-free. Gate before any pruning result counts: the unpruned reader answers at
least ``gate_accuracy`` of the test questions, and keeping only the asked quadrant beats keeping only a wrong one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from .. import evidence
from ..data import mnist_digits
from ..guided_reader import (QUADRANTS, RULES, TEXT_GUIDED, QuestionReader, digit_grids, load_reader,
                             pruned_answer, quadrant_of_patches, question_tokens, save_reader, train_reader)
from ..harness.vit_encoder import ScoreRequest, encode
from ..harness.vit_model import vit_parts
from ..params import ModelName, NotebookParams
from ..paths import REPO_ROOT
from ..scorers import get_scorer
from ..vision_tasks import to_pixels
from .vision_params import ImageSize, KeepRatios

TITLE = "Text-guided visual-token pruning: question attention vs [CLS] attention and uniform sampling"
PAPERS = ["fastv", "sparsevlm", "fastervlm", "feather"]
CLAIM = ("At equal kept share, pruning visual tokens by the question's attention (FastV) keeps what a question-"
         "conditioned reader needs better than the encoder's [CLS] attention (text-free), uniform spatial sampling "
         "and random selection.")
METRIC = "reader's probability of the true digit, mean over the judged kept shares"
JUDGED = tuple(evidence.PartSpec(
    id=f"question_beats_{name}", statement=f"question attention (FastV) keeps a better set than {text} at kept "
                                           "shares {keeps}",
    metric=METRIC, unit="question", papers=("fastv", paper)) for name, text, paper in (
        ("cls", "the encoder's [CLS] attention", "fastervlm"),
        ("uniform", "uniform spatial sampling", "feather"),
        ("random", "random selection", "fastv")))
#: questions per training step of the reader
TRAIN_BATCH = 64
#: what ``reader`` says to train the reader in the run instead of reading a stored one
TRAIN = "train"
ROLE = {"question_beats_cls": "cls_attention", "question_beats_uniform": "spatial_grid",
        "question_beats_random": "random"}


class Params(NotebookParams):
    """Parameters of ``guided-visual-pruning``; the defaults live in ``params/guided-visual-pruning.yaml``."""

    notebook = "guided-visual-pruning"

    model: ModelName = Field(description="frozen image encoder (embedded ViT name, local folder or Hugging Face id)")
    image_size: ImageSize = Field(description="side of the 2×2 grid image in pixels (multiple of 14, even patch grid)")
    train_grids: int = Field(ge=10, le=100_000, description="training grids (4 questions each) of the reader")
    test_grids: int = Field(ge=4, le=100_000, description="test grids (4 questions each: the units of every part)")
    batch_size: int = Field(ge=1, le=4096, description="grids per encoder pass")
    reader_dim: int = Field(ge=8, le=1024, description="width of the reader")
    reader_heads: int = Field(ge=1, le=32, description="attention heads of the reader")
    reader_layers: int = Field(ge=2, le=12, description="blocks of the reader")
    epochs: int = Field(ge=1, le=500, description="training epochs of the reader")
    lr: float = Field(gt=0, le=1, description="AdamW learning rate of the reader")
    prune_layer: int = Field(ge=0, description="visual tokens are dropped after this reader block (0: before any)")
    keeps: KeepRatios = Field(description="kept shares of the visual tokens, in (0, 1]")
    judged_keeps: KeepRatios = Field(description="kept shares the parts average over (a subset of keeps)")
    random_replicates: int = Field(ge=1, le=100, description="seeds of the random rule, averaged per question")
    gate_accuracy: float = Field(gt=0, le=1, description="unpruned test accuracy the reader must reach")
    reader: str = Field(description="'train' (train the reader in this run) or a reader checkpoint trained with "
                                    "these settings (path from the repository root)")
    parts: dict[str, evidence.PartRule] = Field(description="direction and smallest effect δ of each judged part")

    judged = JUDGED

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        if self.prune_layer >= self.reader_layers:
            raise ValueError(f"prune_layer ({self.prune_layer}) must be below reader_layers ({self.reader_layers})")
        if (self.image_size // 14) % 2:
            raise ValueError(f"image_size {self.image_size} gives an odd patch grid: use a multiple of 28")
        if self.reader != TRAIN and not reader_path(self.reader).is_file():
            raise ValueError(f"reader {self.reader!r} is neither {TRAIN!r} nor a file ({reader_path(self.reader)})")
        missing = sorted(set(self.judged_keeps) - set(self.keeps))
        if missing:
            raise ValueError(f"judged_keeps {missing} are not in keeps {self.keeps}")
        return self


@dataclasses.dataclass
class GridSet:
    """Encoded grids: patch tokens ``(G, P, d)``, [CLS]-attention scores ``(G, P)``, labels ``(G, 4)``, grid."""

    features: torch.Tensor
    cls_scores: torch.Tensor
    labels: torch.Tensor
    grid: tuple[int, int]


def encode_grids(vit, params: Params, split: str, n: int, progress: bool = True) -> GridSet:
    """``n`` seeded 2×2 grids from the MNIST ``split``, encoded once: output patch tokens and the last block's
    [CLS] attention to each patch."""
    images, labels = mnist_digits(n=min(4 * n, 4000 if split == "train" else 1000), seed=params.seed, split=split)
    grids, grid_labels = digit_grids(images, labels, n, seed=params.seed + (0 if split == "train" else 1))
    pixels = to_pixels(grids, params.image_size)
    request = {"cls": ScoreRequest(get_scorer("cls_attention"), layer=vit_parts(vit.model).depth)}
    feats, cls = [], []
    with torch.inference_mode():
        for start in tqdm(range(0, n, params.batch_size), desc=f"encode {split} grids", disable=not progress):
            out = encode(vit.model, pixels[start:start + params.batch_size].to(params.device), scores=request)
            feats.append(out.tokens[:, out.n_prefix:].float().cpu())
            cls.append(out.scores["cls"][:, out.n_prefix:].float().cpu())
    # float64 for the reader (see train_reader): its training then reproduces across machines
    return GridSet(torch.cat(feats).double(), torch.cat(cls).double(), torch.as_tensor(grid_labels), out.grid)


def reader_path(reader: str) -> Path:
    """A checkpoint path as given: absolute, or from the repository root."""
    path = Path(reader).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def reader_training(params: Params, test: GridSet) -> dict:
    """Every setting that defines the reader (what a stored checkpoint must match)."""
    _, patches, feature_dim = test.features.shape
    return dict(model=params.model, image_size=params.image_size, train_grids=params.train_grids, seed=params.seed,
                dim=params.reader_dim, heads=params.reader_heads, layers=params.reader_layers, epochs=params.epochs,
                lr=params.lr, batch_size=TRAIN_BATCH, patches=patches, feature_dim=feature_dim)


def accuracy(reader: QuestionReader, grids: GridSet) -> float:
    """Unpruned accuracy over every (grid, quadrant) question of ``grids``."""
    with torch.no_grad():
        hits = [(reader(grids.features, torch.tensor([question_tokens(q)]).expand(len(grids.labels), -1)).argmax(-1)
                 == grids.labels[:, q]).float() for q in range(4)]
    return float(torch.cat(hits).mean())


def get_reader(vit, params: Params, test: GridSet, output_dir: Path, progress: bool = True
               ) -> tuple[QuestionReader, str]:
    """The reader and a sentence on where it came from: trained here on ``train_grids`` fresh grids (``reader:
    train``; saved as ``reader.pt`` in the run's folder) or read from a checkpoint trained with these settings."""
    training = reader_training(params, test)
    if params.reader != TRAIN:
        reader, made = load_reader(reader_path(params.reader), training)
        return reader, (f"Reader read from {params.reader} (trained on {params.train_grids * 4} questions, train "
                        f"accuracy {made.get('train_accuracy', float('nan')):.3f}, torch {made.get('torch', '?')}).")
    train = encode_grids(vit, params, "train", params.train_grids, progress=progress)
    reader = train_reader(train.features, train.labels, dim=params.reader_dim, heads=params.reader_heads,
                          layers=params.reader_layers, epochs=params.epochs, lr=params.lr, batch_size=TRAIN_BATCH,
                          seed=params.seed, progress=progress)
    train_accuracy = accuracy(reader, train)
    path = save_reader(reader, Path(output_dir) / "reader.pt", training, train_accuracy=train_accuracy,
                       torch=str(torch.__version__))
    return reader, (f"Reader trained in this run on {params.train_grids * 4} questions (train accuracy "
                    f"{train_accuracy:.3f}), saved to {path}.")


def answers(reader, test: GridSet, params: Params, progress: bool = True) -> pd.DataFrame:
    """One row per test question × rule × kept share (+ the unpruned reader): true-class probability, correct,
    kept tokens in the asked quadrant (share) and their mean patch row (FEATHER's position check)."""
    g = test.features.shape[0]
    quadrants = quadrant_of_patches(test.grid)
    rows_of_patch = torch.arange(test.grid[0]).repeat_interleave(test.grid[1]).float()
    out = []
    with torch.no_grad():
        for q in tqdm(range(4), desc="quadrants", disable=not progress):
            question = torch.tensor([question_tokens(q)]).expand(g, -1)
            truth = test.labels[:, q]
            full = torch.softmax(reader(test.features, question), -1)
            base = dict(quadrant=QUADRANTS[q])
            for i in range(g):
                out.append({**base, "grid": i, "rule": "unpruned", "keep": 1.0, "replicate": 0,
                            "p_true": float(full[i, truth[i]]), "correct": bool(full[i].argmax() == truth[i]),
                            "in_asked": 0.25, "mean_row": float(rows_of_patch.mean())})
            for rule in RULES:
                for keep in params.keeps:
                    reps = params.random_replicates if rule in ("random", "asked_quadrant", "wrong_quadrant") else 1
                    for rep in range(reps):
                        res = pruned_answer(reader, test.features, question, test.cls_scores, rule, keep,
                                            params.prune_layer, test.grid, seed=params.seed * 1000 + rep * 10 + q)
                        prob = torch.softmax(res.logits, -1)
                        in_asked = (quadrants[res.kept] == q).float().mean(-1)
                        mean_row = rows_of_patch[res.kept].mean(-1)
                        for i in range(g):
                            out.append({**base, "grid": i, "rule": rule, "keep": keep, "replicate": rep,
                                        "p_true": float(prob[i, truth[i]]), "correct": bool(prob[i].argmax() == truth[i]),
                                        "in_asked": float(in_asked[i]), "mean_row": float(mean_row[i])})
    table = pd.DataFrame(out)
    table["question"] = table.grid * 4 + table.quadrant.map(QUADRANTS.index)
    return table


def per_question(table: pd.DataFrame, rule: str, keeps) -> pd.Series:
    rows = table[(table.rule == rule) & table.keep.isin(list(keeps))]
    if rows.empty:
        raise ValueError(f"no rows for rule {rule!r} at kept shares {list(keeps)}")
    return rows.groupby("question").p_true.mean()


def gate(table: pd.DataFrame, params: Params) -> pd.DataFrame:
    """The reader's gate: unpruned accuracy, and asked-quadrant-only vs wrong-quadrant-only at kept share 25% (or the
    nearest kept share), paired over questions with a 95% interval."""
    keep = min(params.keeps, key=lambda k: abs(k - 0.25))
    unpruned = table[table.rule == "unpruned"].correct.mean()
    asked, wrong = per_question(table, "asked_quadrant", [keep]), per_question(table, "wrong_quadrant", [keep])
    diff = (asked - wrong).to_numpy()
    lo, hi, _ = evidence.paired_interval(diff, seed=params.seed)
    return pd.DataFrame([
        dict(check=f"unpruned accuracy ≥ {params.gate_accuracy:g}", value=f"{unpruned:.3f}",
             passed=bool(unpruned >= params.gate_accuracy)),
        dict(check=f"asked quadrant only beats a wrong quadrant only (kept {keep:g}), p_true difference",
             value=evidence.fmt_interval(float(diff.mean()), lo, hi), passed=bool(lo > 0)),
    ])


def rule_table(table: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per rule × kept share: accuracy, mean true-class probability, share of kept tokens in the asked quadrant and
    their mean patch row (replicates averaged per question first)."""
    per_q = table.groupby(["rule", "keep", "question"])[["p_true", "correct", "in_asked", "mean_row"]].mean()
    summary = per_q.groupby(["rule", "keep"]).mean().reset_index()
    summary["text_guided"] = summary.rule.isin(TEXT_GUIDED)
    return summary.rename(columns={"correct": "accuracy"}).sort_values(["keep", "p_true"], ascending=[False, False])


def judge_claim(table: pd.DataFrame, params: Params) -> evidence.Claim:
    """Question attention against [CLS] attention, uniform sampling and random (better), paired over questions on
    the true-class probability averaged over ``judged_keeps``; refused when the reader fails its gate."""
    checks = gate(table, params)
    if not checks.passed.all():
        failed = "; ".join(f"{r.check}: {r.value}" for r in checks.itertuples() if not r.passed)
        raise ValueError(f"the reader fails its gate ({failed}): no pruning result counts; train longer or on more "
                         "grids (epochs, train_grids)")
    keeps = ", ".join(f"{k:g}" for k in params.judged_keeps)
    a = per_question(table, "question_attention", params.judged_keeps)
    parts = []
    for spec, rule in evidence.parts_for(JUDGED, params.parts):
        spec = dataclasses.replace(spec, statement=spec.statement.format(keeps=keeps))
        b = per_question(table, ROLE[spec.id], params.judged_keeps)
        parts.append(evidence.judge(spec, rule, a, b, seed=params.seed, detail=f"a: question_attention; b: {ROLE[spec.id]}"))
    setting = (
        f"FastV and SparseVLM prune the visual tokens of a pretrained VLM (LLaVA) inside its language model after "
        f"layer 2; FasterVLM before it. No VLM runs offline here, so the reader is a {params.reader_layers}-block "
        f"transformer (width {params.reader_dim}) trained on {params.train_grids * 4} unpruned questions about 2×2 "
        f"MNIST grids encoded by the frozen {params.model} at {params.image_size} px, and every rule prunes after "
        f"reader block {params.prune_layer} (the text-free ones could prune earlier; here all prune at the same "
        f"place, so only the choice of tokens differs). Parts are paired over {a.size} test questions, for one reader: "
        f"{'trained in this run' if params.reader == TRAIN else f'read from {params.reader}, trained once with these settings'}. "
        f"Training it is chaotic (another CPU's round-off trains another reader, as another seed would), so the "
        f"default reads a stored reader, as the papers prune one pretrained VLM.")
    notes = [f"Gate passed: {checks.value.iloc[0]} unpruned accuracy; asked-quadrant-only minus wrong-quadrant-only "
             f"true-class probability {checks.value.iloc[1]}.",
             f"Random and the quadrant rules average {params.random_replicates} seeded replicates per question."]
    return evidence.Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                          setting=setting, notes=notes, seed=params.seed)


def plot_rules(summary: pd.DataFrame):
    """Left: true-class probability vs kept share per rule; right: share of kept tokens in the asked quadrant."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = summary[summary.rule != "unpruned"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, column, label in ((axes[0], "p_true", "p(true digit)"), (axes[1], "in_asked", "kept in asked quadrant")):
        sns.lineplot(data, x="keep", y=column, hue="rule", style="text_guided", marker="o", ax=ax)
        ax.set(xscale="log", xlabel="kept share of visual tokens", ylabel=label)
    unpruned = summary[summary.rule == "unpruned"].p_true
    if len(unpruned):
        axes[0].axhline(float(unpruned.iloc[0]), ls="--", color="grey", label="unpruned")
    axes[1].axhline(0.25, ls=":", color="grey")
    axes[0].legend(fontsize=7)
    axes[1].get_legend().remove()
    fig.tight_layout()
    return fig
