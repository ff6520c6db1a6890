"""The evaluation report: one self-contained HTML page (PNG plots embedded, and also written beside it) built from
the suites' results on disk and the pipeline's metric curves from MLflow.

Plots: retrieval accuracy heatmaps (context length x depth) dense vs DSA per long-context task; cost per million
tokens against context position, dense vs DSA (efficiency); held-out loss dense vs sparse (lm); pass rates (code,
reasoning, agentic); training and reward curves by metric name (`eval.report_metrics`).
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def heatmaps(rows: list[dict], out: Path) -> list[Path]:
    """One figure per task: accuracy over (length, depth), dense | sparse side by side."""
    plt = _plt()
    paths = []
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        lengths = sorted({r["length"] for r in mine})
        depths = sorted({r["depth"] for r in mine})
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True, layout="constrained")
        for ax, mode in zip(axes, ("dense", "sparse")):
            grid = [[_mean([r["correct"] for r in mine if r["mode"] == mode and r["length"] == n and r["depth"] == d])
                     for n in lengths] for d in depths]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
            ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_title(f"{task}: {'dense' if mode == 'dense' else 'DSA (top-k)'}")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if v == v:
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        axes[0].set_ylabel("needle depth")
        fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy")
        paths.append(_save(fig, out / f"longctx_{task}.png"))
    return paths


def cost_curves(rows: list[dict], out: Path) -> list[Path]:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for ax, phase in zip(axes, ("prefill", "decode")):
        for mode, style in (("dense", "o-"), ("sparse", "s-")):
            pts = sorted((r["position"], r["usd_per_mtok"]) for r in rows if r["phase"] == phase and r["mode"] == mode)
            if pts:
                ax.plot([_tokens(p) for p, _ in pts], [c for _, c in pts], style,
                        label="dense MLA" if mode == "dense" else "DSA")
        ax.set_title(f"{phase}: cost per million tokens")
        ax.set_xlabel("token position")
        ax.set_ylabel("USD / M tokens")
        ax.legend()
    return [_save(fig, out / "efficiency_cost.png")]


def bars(title: str, values: dict[str, float], out: Path, name: str, ylabel: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(values) + 2), 3), layout="constrained")
    ax.bar(list(values), list(values.values()), color="#4878a8")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    return _save(fig, out / f"{name}.png")


def curves(histories: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> list[Path]:
    """One panel per metric name, one line per stage that logged it."""
    plt = _plt()
    names = sorted({m for per in histories.values() for m in per})
    if not names:
        return []
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names):
        for stage, per in histories.items():
            if name in per and per[name]:
                ax.plot([s for s, _ in per[name]], [v for _, v in per[name]], label=stage)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return [_save(fig, out / "training_curves.png")]


def build(out_dir: Path, histories: Optional[dict] = None, title: str = "dsaforge evaluation",
          about: Optional[dict] = None) -> Path:
    """Write out_dir/report/index.html (+ PNGs) from out_dir/<suite>/ results; returns the report directory."""
    out_dir = Path(out_dir)
    rep = out_dir / "report"
    rep.mkdir(parents=True, exist_ok=True)
    sections = []
    for suite_dir in sorted(p for p in out_dir.iterdir() if (p / "summary.json").is_file()):
        suite = suite_dir.name
        summary = json.loads((suite_dir / "summary.json").read_text())
        rows = pq.read_table(suite_dir / "results.parquet").to_pylist()
        figs = []
        s = summary["summary"]
        if suite == "long-context" and rows:
            figs = heatmaps(rows, rep)
        elif suite == "efficiency" and rows:
            figs = cost_curves(rows, rep)
        elif suite == "lm":
            figs = [bars("held-out loss", {m: s[f"{m}/loss"] for m in ("dense", "sparse")}, rep, "lm_loss",
                         "nats / token")]
        else:
            rates = {k: v for k, v in s.items() if (k.endswith("pass_at_1") or k.endswith("mean_score"))
                     and isinstance(v, (int, float)) and v == v}
            if rates:
                figs = [bars(f"{suite}: pass@1 / mean score", rates, rep, f"{suite}_rates", "rate")]
        sections.append((suite, s, figs, {k: v for k, v in summary.items() if k not in ("suite", "summary")}))
    training = curves(histories or {}, rep)
    (rep / "index.html").write_text(_html(title, sections, training, about or {}))
    return rep


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _html(title: str, sections, training: list[Path], about: dict) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
             "font-size:13px;text-align:left}img{max-width:100%;margin:.5em 0}h2{border-bottom:1px solid #ddd}"
             f"</style></head><body><h1>{html.escape(title)}</h1>"]
    if about:
        parts.append("<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                                         for k, v in about.items()) + "</table>")
    for suite, summary, figs, info in sections:
        parts.append(f"<h2>{html.escape(suite)}</h2>")
        parts += [_img(f) for f in figs]
        parts.append("<table><tr><th>metric</th><th>value</th></tr>" + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in summary.items()) + "</table>")
        if info:
            settings = html.escape(json.dumps(info, indent=1, default=str))
            parts.append(f"<details><summary>settings</summary><pre>{settings}</pre></details>")
    if training:
        parts.append("<h2>training and reward curves</h2>" + "".join(_img(f) for f in training))
    parts.append("</body></html>")
    return "\n".join(parts)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)
