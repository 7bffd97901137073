"""A run's record, written from inside a notebook: figures, tables, ``claims.json``, Findings and ``run.json``.

The runner passes ``output_dir``; an interactive session (JupyterLab, nbval) writes to
``outputs/<notebook>/interactive/``. Every file is written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from .evidence import Claim
from .params import NotebookParams
from .paths import REPO_ROOT, outputs_dir
from .reproduction import check_reproduction

#: environment variable the runner sets for ``salience run --threads N`` (torch's intra-op threads in the kernel)
THREADS_ENV = "SALIENCE_THREADS"
_VERSIONED = ("token-salience", "torch", "transformers", "triton", "numpy", "pandas", "datasets", "papermill")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=5,
        )
        commit = out.stdout.strip() or "unknown"
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


@dataclass
class Run:
    """Collects one notebook run's artefacts. Create with :func:`start_run`."""

    params: NotebookParams
    output_dir: Path
    title: str
    claim: str
    started: float = field(default_factory=time.time)
    figures: list[dict[str, str]] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)
    verdict: dict[str, str] | None = None
    findings: str | None = None
    judged: Claim | None = None  # the claim as judged by conclude()

    def _next_name(self, folder: str, stem: str, ext: str) -> str:
        count = len(self.figures) if folder == "figures" else len(self.tables)
        return f"{folder}/{count + 1:02d}-{stem}.{ext}"

    def save_figure(self, fig, stem: str, caption: str, dpi: int = 130) -> Path:
        """Save a matplotlib figure as PNG under ``figures/`` (numbered in order) and record its caption."""
        import io

        rel = self._next_name("figures", stem, "png")
        buf = io.BytesIO()
        # fixed metadata keeps the PNG bytes stable from run to run
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
        atomic_write_bytes(self.output_dir / rel, buf.getvalue())
        self.figures.append({"file": rel, "caption": caption})
        return self.output_dir / rel

    def save_table(self, df, stem: str, caption: str, key: bool = False) -> Path:
        """Save a tidy DataFrame as CSV under ``tables/``; ``key=True`` shows it in the report."""
        rel = self._next_name("tables", stem, "csv")
        atomic_write_text(self.output_dir / rel, df.to_csv(index=False))
        self.tables.append({"file": rel, "caption": caption, "key": key})
        return self.output_dir / rel

    def conclude(self, claim: Claim) -> str:
        """Record the judged claim: ``claims.json``, the Findings text rendered from it, and the verdict in run.json.

        Returns the Findings markdown (what the notebook's last cell displays)."""
        self.judged = claim
        self.verdict = {"label": claim.label, "summary": claim.summary}
        self.findings = claim.markdown()
        atomic_write_text(self.output_dir / "claims.json", json.dumps(claim.to_dict(), indent=2))
        atomic_write_text(self.output_dir / "findings.md", self.findings)
        return self.findings

    def reproduction(self) -> pd.DataFrame:
        """Per part: n, verdict, and whether it reproduces the stored run (:mod:`salience.reproduction`); what a
        notebook's nbval-checked cell displays. Call after :meth:`conclude`."""
        if self.judged is None:
            raise RuntimeError("call run.conclude(claim) before run.reproduction()")
        return check_reproduction(self.judged, self.params.model_dump(mode="json"))

    def record(self) -> dict[str, Any]:
        return {
            "notebook": self.params.notebook,
            "param_set": os.environ.get("SALIENCE_PARAM_SET", "interactive"),
            "title": self.title,
            "claim": self.claim,
            "status": "ok",
            "error": None,
            "params": self.params.model_dump(mode="json"),
            "seed": self.params.seed,
            "device": self.params.device,
            "threads": torch_threads(),
            "git_commit": git_commit(),
            "versions": package_versions(),
            "started": datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(time.time() - self.started, 2),
            "figures": self.figures,
            "tables": self.tables,
            "verdict": self.verdict,
        }

    def finish(self) -> Path:
        """Write ``run.json``; call once, at the end of the notebook."""
        path = self.output_dir / "run.json"
        atomic_write_text(path, json.dumps(self.record(), indent=2))
        return path


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def start_run(params: NotebookParams, output_dir: str | Path | None, *, title: str, claim: str) -> Run:
    """Begin recording a run: sets torch's threads when the runner asks (``salience run --threads N``), seeds every
    RNG, resolves the output folder, returns the :class:`Run`."""
    import torch

    from .seeding import seed_everything

    if os.environ.get(THREADS_ENV):
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    seed_everything(params.seed)
    folder = Path(output_dir) if output_dir else outputs_dir() / params.notebook / "interactive"
    folder.mkdir(parents=True, exist_ok=True)
    return Run(params=params, output_dir=folder, title=title, claim=claim)
