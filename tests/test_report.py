"""The HTML report over run folders (salience.report): fake runs in the runner's layout, a build, checks on the HTML,
and a headless-Chromium check that every figure really loads from the file system."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from salience import report  # noqa: E402

# -- fake run folders ---------------------------------------------------------------------------------------------


def _png(path: Path, kind: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if kind == "curve":
        budgets = np.array([0.05, 0.1, 0.25, 0.5, 1.0])
        for name, off in (("kv-normalized", 0.0), ("h2o", 0.6), ("random", 2.5)):
            ax.plot(budgets, 12 + off / budgets ** 0.5 + rng.normal(0, 0.05, 5), marker="o", label=name)
        ax.set(xscale="log", xlabel="KV budget (fraction kept)", ylabel="perplexity")
        ax.legend(frameon=False)
    else:
        ax.imshow(rng.random((8, 48)), aspect="auto", cmap="viridis")
        ax.set(xlabel="token position", ylabel="head")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _notebook(path: Path, title: str, figure: Path | None, error: dict | None = None) -> None:
    v4 = nbformat.v4
    cells = [
        v4.new_markdown_cell(f"# {title}\n\nClaim under test: see the report. Math stays as source: $O(n^2)$."),
        v4.new_code_cell("budget = 0.25\nseed = 0", metadata={"tags": ["parameters"]}, execution_count=1),
        v4.new_code_cell("print('kept', 128, 'of', 512)", execution_count=2,
                         outputs=[v4.new_output("stream", name="stdout", text="kept 128 of 512\n")]),
    ]
    if figure is not None:
        png = base64.b64encode(figure.read_bytes()).decode()
        cells.append(v4.new_code_cell("plot()", execution_count=3, outputs=[
            v4.new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"})]))
    if error is not None:
        cells.append(v4.new_code_cell("run()", execution_count=4, outputs=[v4.new_output(
            "error", ename=error["ename"], evalue=error["evalue"],
            traceback=[f"\x1b[0;31m{error['ename']}\x1b[0m: {error['evalue']}"])]))
    else:
        cells.append(v4.new_markdown_cell("## Findings\n\nComputed from the numbers above."))
    nb = v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def make_run(outputs: Path, notebook: str, folder: str, *, status: str = "ok", params: dict | None = None,
             figures: tuple[str, ...] = ("01-ppl-vs-budget.png", "02-kept-tokens.png"), findings: str | None = None,
             verdict: dict | None = None, error: dict | None = None, title: str = "", claim: str = "",
             claims: dict | None = None) -> Path:
    run = outputs / notebook / folder
    figs = []
    for i, name in enumerate(figures):
        _png(run / "figures" / name, "curve" if i % 2 == 0 else "heat", seed=i)
        figs.append({"file": f"figures/{name}", "caption": f"Caption for {name}: lower is better."})
    (run / "tables").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({
        "scorer": ["kv-normalized", "h2o", "random", "full cache"],
        "budget": [0.25, 0.25, 0.25, 1.0],
        "ppl": [12.3456789, 13.0123456, 17.99999, 12.1],
        "delta_ppl": [0.2456789, 0.9123456, 5.89999, np.nan],
        "tokens_kept": [128, 128, 128, 512],
        "wall_ms": [12345.678, 9876.54321, 345.6, 0.000123456],
    }).to_csv(run / "tables" / "ppl.csv", index=False)
    pd.DataFrame({"layer": range(4), "entries": [128] * 4}).to_csv(run / "tables" / "cache_sizes.csv", index=False)
    if findings is not None:
        (run / "findings.md").write_text(findings)
    if claims is not None:
        (run / "claims.json").write_text(json.dumps(claims))
    _notebook(run / "executed.ipynb", title, run / "figures" / figures[0] if figures else None, error)
    meta = {
        "notebook": notebook, "param_set": folder.removesuffix(".failed"), "title": title, "claim": claim,
        "status": status, "error": error,
        "params": params or {"model": "smollm-135m", "budget": 0.25, "seed": 0, "data": {"name": "wikitext", "n": 32}},
        "seed": 0, "device": "cpu", "git_commit": "0123456789abcdef0123", "versions": {
            "torch": "2.13.0", "transformers": "5.23.0", "numpy": "2.3.1", "salience": "0.1.0"},
        "started": "2025-11-21T10:30:00+00:00", "wall_time_s": 83.2,
        "figures": figs,
        "tables": [{"file": "tables/ppl.csv", "caption": "Perplexity at a 25% KV budget.", "key": True},
                   {"file": "tables/cache_sizes.csv", "caption": "Cache entries per layer.", "key": False}],
        "verdict": verdict,
    }
    (run / "run.json").write_text(json.dumps(meta, indent=1))
    return run


FINDINGS = """## Findings

At a **25% KV budget** [@zipcache], KV-normalized attention keeps perplexity within 0.25 of the full cache
(95% CI 0.19–0.31 over 5 seeds), while H2O loses 0.91. UNIQUE-FINDINGS-MARKER

| scorer | Δ ppl |
|---|---|
| kv-normalized | 0.25 |
| h2o | 0.91 |
"""
KV_TITLE = "KV-normalized attention (Devoto et al., 2024)"
H2O_TITLE = "H2O heavy-hitter eviction (Zhang et al., 2023)"
ERROR = {"cell": 7, "ename": "ValueError", "evalue": "budget must be in (0, 1], got 0.0"}


def _claims() -> dict:
    """A judged claim as salience.evidence writes it: one superiority part, one equivalence part, one check."""
    from salience.evidence import Claim, PartRule, PartSpec, check, judge

    rng = np.random.default_rng(0)
    b = pd.Series(rng.normal(1.0, 0.1, 40))
    better = judge(PartSpec("normalized_vs_h2o", "NORMALIZED-BEATS-H2O", "log-ppl area", "document",
                            higher_is_better=False, papers=("zipcache", "h2o")),
                   PartRule(direction="better", smallest_effect=0.01), b - 0.05 + rng.normal(0, 0.02, 40), b)
    equal = judge(PartSpec("random_as_strong", "RANDOM-AS-STRONG", "accuracy", "image"),
                  PartRule(direction="equivalent", smallest_effect=0.01), b + rng.normal(0, 0.2, 40), b)
    grid = check(PartSpec("grid", "GRID-PASSES", "error / allowed", "case", higher_is_better=False), [True] * 6, 0.4)
    return Claim("kv-normalized-attention", KV_TITLE, "Normalization evicts better.", ["zipcache"],
                 [better, equal, grid]).to_dict()


def make_outputs(outputs: Path) -> Path:
    """One ok run, one failed run with a previous good one, one malformed run.json."""
    make_run(outputs, "kv-normalized-attention", "default", title=KV_TITLE, findings=FINDINGS, claims=_claims(),
             claim="Scoring keys by attention × value norm keeps perplexity within 0.5 at a quarter of the cache.",
             verdict={"label": "supported", "summary": "Δppl = 0.25 (CI 0.19–0.31) ≤ 0.5 at a 25% budget."})
    make_run(outputs, "h2o-heavy-hitters", "default", title=H2O_TITLE, figures=("01-ppl-vs-budget.png",),
             claim="Accumulated attention finds the heavy hitters: 20% of the cache matches the full one.",
             findings="## Findings\n\nPREVIOUS-GOOD-FINDINGS: H2O is 0.9 ppl worse at 20%.",
             verdict={"label": "inconclusive", "summary": "Seed spread overlaps the threshold."})
    make_run(outputs, "h2o-heavy-hitters", "default.failed", title=H2O_TITLE, status="failed", error=ERROR,
             figures=(), claim="Accumulated attention finds the heavy hitters: 20% of the cache matches the full one.",
             params={"model": "smollm-135m", "budget": 0.0, "seed": 0, "data": {"name": "wikitext", "n": 32}})
    bad = outputs / "cls-attention-pruning" / "default"
    bad.mkdir(parents=True)
    (bad / "run.json").write_text('{"notebook": "cls-attention-pruning", "status": "ok",')  # truncated write
    return outputs


N_FIGURES = 3  # two from the ok run, one from the last good h2o run


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    outputs = make_outputs(tmp_path_factory.mktemp("outputs"))
    index = report.build_report(outputs)
    assert index == outputs / "report" / "index.html"
    return index


def _html(index: Path) -> str:
    return index.read_text(encoding="utf-8")


# -- the HTML -----------------------------------------------------------------------------------------------------


def test_header_counts_and_contents(built):
    html = _html(built)
    assert "Token salience workbook" in html
    assert "3 runs:" in html and "1 ok" in html and "1 failed" in html and "1 broken" in html
    for anchor in ("kv-normalized-attention--default", "h2o-heavy-hitters--default", "cls-attention-pruning--default"):
        assert f'href="#{anchor}"' in html and f'id="{anchor}"' in html


def test_figures_are_relative_and_exist(built):
    html = _html(built)
    srcs = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert len(srcs) == N_FIGURES
    for src in srcs:
        assert not src.startswith(("/", "http:", "https:", "file:")), src
        assert (built.parent / src).is_file(), src
    assert "Caption for 02-kept-tokens.png" in html


def test_findings_and_verdict_rendered_as_html(built):
    html = _html(built)
    assert "UNIQUE-FINDINGS-MARKER" in html
    assert "<strong>25% KV budget</strong>" in html  # Markdown became HTML
    assert "<td>kv-normalized</td>" in html  # Markdown table
    assert "b-supported" in html and "b-inconclusive" in html


def test_citations_link_to_the_references_page(built):
    html = _html(built)
    assert re.search(r'<a class="ref" href="references.html#zipcache" title="[^"]*ZipCache[^"]*">He 2024</a>', html)
    refs = (built.parent / "references.html").read_text(encoding="utf-8")
    assert 'id="zipcache"' in refs and 'id="fastervlm"' in refs
    assert 'href="https://arxiv.org/abs/' in refs
    zip_entry = refs[refs.index('id="zipcache"'):]
    assert "Cited by" in zip_entry[: zip_entry.index("</li>")]  # the run whose claim names it


def test_claims_page_lists_every_part_with_its_interval_and_forest(built):
    page = (built.parent / "claims.html").read_text(encoding="utf-8")
    assert "3 judged parts from 1 run" in page
    for marker in ("NORMALIZED-BEATS-H2O", "RANDOM-AS-STRONG", "GRID-PASSES"):
        assert marker in page
    rows = page[page.index("<tbody>"): page.index("</tbody>")].split("<tr>")[1:]
    assert len(rows) == 3
    first = rows[0]
    assert 'href="index.html#kv-normalized-attention--default"' in first
    assert 'href="references.html#zipcache"' in first and 'href="references.html#h2o"' in first
    assert "<svg" in first and "b-supported" in first and re.search(r"[+−-]0\.\d+ \[", first)
    assert "<svg" not in rows[2] and "6/6 cases pass" in rows[2]  # a check has no interval to plot
    assert 'href="claims.html"' in _html(built)


def test_forest_svg_marks_clipped_intervals():
    from salience.report_claims import forest_svg

    inside = forest_svg(1.5, 0.5, 2.5, "supported")
    clipped = forest_svg(3.0, -6.0, 12.0, "inconclusive")
    assert inside.count("<path") == 0 and clipped.count("<path") == 2
    assert "#1a7f37" in inside and "#8a5a00" in clipped


def test_key_table_rendered_with_formatted_numbers(built):
    html = _html(built)
    block = html[html.index("Perplexity at a 25% KV budget."):]
    block = block[: block.index("</table>")]
    assert "<th" in block and "delta_ppl" in block
    assert ">12.35</td>" in block and ">0.2457</td>" in block  # 4 significant digits
    assert ">12346</td>" in block and ">0.0001235</td>" in block and ">128</td>" in block
    assert "12.3456789" not in block.split("data-v=")[0]  # shown rounded, raw value only kept for sorting
    assert "—" in block  # NaN
    # Non-key tables are linked, not rendered.
    assert "Cache entries per layer." in html and "<th class=\"n\" tabindex=\"0\" title=\"Sort\">entries" not in html
    assert (built.parent / "assets/kv-normalized-attention/default/tables/cache_sizes.csv").is_file()


def test_failure_shown_with_last_good_results(built):
    html = _html(built)
    sec = html[html.index('id="h2o-heavy-hitters--default"'):]
    sec = sec[: sec.index("</article>")]
    assert "Latest run failed in cell 7" in sec
    assert "ValueError: budget must be in (0, 1], got 0.0" in sec
    assert "h2o-heavy-hitters" in sec
    assert "Last good results" in sec and "PREVIOUS-GOOD-FINDINGS" in sec
    assert "assets/h2o-heavy-hitters/default/figures/01-ppl-vs-budget.png" in sec
    assert "<code>budget</code>" in sec  # the parameter that changed since the good run
    assert sec.index("Latest run failed") < sec.index("Last good results")
    assert 'href="notebooks/h2o-heavy-hitters--default.failed.html"' in sec


def test_malformed_run_json_is_a_broken_entry(built):
    html = _html(built)
    sec = html[html.index('id="cls-attention-pruning--default"'):]
    sec = sec[: sec.index("</article>")]
    assert "b-broken" in sec and "run.json is not valid JSON" in sec


def test_notebook_pages_render_offline(built):
    root = built.parent
    pages = sorted(p.name for p in (root / "notebooks").glob("*.html"))
    assert pages == ["h2o-heavy-hitters--default.failed.html", "h2o-heavy-hitters--default.html",
                     "kv-normalized-attention--default.html"]
    html = _html(built)
    for page in pages:
        assert f'href="notebooks/{page}"' in html
        text = (root / "notebooks" / page).read_text(encoding="utf-8")
        assert "jp-Notebook" in text and "../index.html#" in text
        assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=[\"']?(https?:)?//", text), page
        assert "cdnjs" not in text and "unpkg" not in text
    assert "ValueError" in (root / "notebooks/h2o-heavy-hitters--default.failed.html").read_text()
    assert "data:image/png;base64," in (root / "notebooks/kv-normalized-attention--default.html").read_text()
    for tag in re.findall(r"<(?:script|link|img)[^>]*>", html):
        assert "http" not in tag, tag


def test_empty_and_missing_outputs(tmp_path):
    index = report.build_report(tmp_path)
    assert "No runs yet" in _html(index)
    index = report.build_report(tmp_path / "nowhere", dest=tmp_path / "rep")
    assert "No runs yet" in _html(index) and index.parent == tmp_path / "rep"


def test_rebuild_is_atomic(tmp_path, monkeypatch):
    outputs = tmp_path / "outputs"
    make_run(outputs, "kv-normalized-attention", "default", title=KV_TITLE, findings=FINDINGS, figures=("a.png",))
    index = report.build_report(outputs)
    first = _html(index)
    index = report.build_report(outputs)  # rebuilding over an existing report
    assert "UNIQUE-FINDINGS-MARKER" in _html(index)
    assert sorted(p.name for p in outputs.iterdir()) == ["kv-normalized-attention", "report"]

    def boom(*a, **k):
        raise RuntimeError("crash mid-build")

    monkeypatch.setattr(report, "_render_notebook", boom)
    with pytest.raises(RuntimeError, match="crash mid-build"):
        report.build_report(outputs)
    assert sorted(p.name for p in outputs.iterdir()) == ["kv-normalized-attention", "report"]  # no temp folder left
    assert _html(index).replace(re.search(r"Built [^<]*", _html(index)).group(), "") == \
        first.replace(re.search(r"Built [^<]*", first).group(), "")  # the old report is untouched


def test_odd_run_json_values_do_not_crash(tmp_path):
    outputs = tmp_path / "outputs"
    run = make_run(outputs, "odd", "default", title="Odd", figures=("a.png",))
    meta = json.loads((run / "run.json").read_text())
    meta.update(figures=[{"file": "../../../etc/passwd"}, {"file": "figures/missing.png", "caption": "gone"}, 3],
                tables="nope", verdict="yes", versions=None, wall_time_s=None)
    (run / "run.json").write_text(json.dumps(meta))
    missing_keys = outputs / "odd" / "gpu"
    missing_keys.mkdir()
    (missing_keys / "run.json").write_text(json.dumps({"notebook": "odd", "status": "done"}))
    html = _html(report.build_report(outputs))
    assert "not a relative path inside the run folder" in html
    assert "Figure file missing from the run folder" in html and "figures/missing.png" in html
    assert "assets/odd/default/figures/a.png" in html  # unlisted figure on disk still shown
    assert "bad or missing keys" in html and "title (missing)" in html and "status (&#39;done&#39;" in html


def test_fmt_num():
    f = report.fmt_num
    assert [f(x) for x in (12.3456, 0.000123456, 12345.6, 3, np.int64(7), float("nan"), 1e12, 0.0, -2.5e-9)] == \
        ["12.35", "0.0001235", "12346", "3", "7", "—", "1e+12", "0", "-2.5e-09"]


# -- headless browser ---------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")


def _browser(index: Path, tmp: Path, *extra: str) -> str:
    exe = _chromium()
    if exe is None:
        pytest.skip("headless Chromium not found (/usr/bin/chromium or chromium on PATH); apt-get install chromium")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=5000",
           *extra, index.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _counts(dom: str) -> tuple[int, int]:
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:2000]
    loaded = re.search(r'data-figures-loaded="(\d+)"', body.group())
    broken = re.search(r'data-figures-broken="(\d+)"', body.group())
    assert loaded and broken, f"the load script did not run: {body.group()}"
    return int(loaded.group(1)), int(broken.group(1))


@pytest.mark.browser
def test_browser_loads_every_figure(built, tmp_path):
    dom = _browser(built, tmp_path, "--dump-dom")
    assert _counts(dom) == (N_FIGURES, 0)
    assert 'class="broken-warning"' not in dom
    shot = tmp_path / "report.png"
    _browser(built, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars")
    assert shot.is_file() and shot.stat().st_size > 20_000


@pytest.mark.browser
def test_browser_reports_a_broken_figure(built, tmp_path):
    copy = tmp_path / "report"
    shutil.copytree(built.parent, copy)
    (copy / "assets/kv-normalized-attention/default/figures/02-kept-tokens.png").unlink()
    dom = _browser(copy / "index.html", tmp_path, "--dump-dom")
    assert _counts(dom) == (N_FIGURES - 1, 1)
    assert "Figure failed to load: assets/kv-normalized-attention/default/figures/02-kept-tokens.png" in dom


@pytest.mark.browser
def test_browser_sorts_a_key_table(built, tmp_path):
    copy = tmp_path / "report"
    shutil.copytree(built.parent, copy)
    index = copy / "index.html"
    # Click the "ppl" header twice (descending), then leave the scorer order on <body> for the DOM dump.
    index.write_text(_html(index).replace("</body>", """<script>
window.addEventListener("load", function () {
  var th = Array.prototype.find.call(document.querySelectorAll("table.sortable th"), function (h) {
    return h.textContent === "ppl"; });
  th.click(); th.click();
  var rows = th.closest("table").tBodies[0].rows;
  document.body.dataset.order = Array.prototype.map.call(rows, function (r) { return r.cells[0].textContent; }).join("|");
});
</script></body>"""))
    dom = _browser(index, tmp_path, "--dump-dom")
    assert 'data-order="random|h2o|kv-normalized|full cache"' in dom


def test_interactive_runs_left_out_unless_asked(tmp_path):
    outputs = tmp_path / "outputs"
    make_run(outputs, "kv-demo", "default", title="Demo default run")
    make_run(outputs, "kv-other", "interactive", title="Demo interactive run")
    html = _html(report.build_report(outputs))
    assert "Demo default run" in html and "Demo interactive run" not in html
    html = _html(report.build_report(outputs, include_interactive=True))
    assert "Demo interactive run" in html
