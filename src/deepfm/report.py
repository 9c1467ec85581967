"""Plots and the self-contained HTML report of ``deepfm compare`` (deepfm.compare).

Three PNG figures (matplotlib's Agg canvas, no global backend switch): validation AUC per epoch, ROC curves
and reliability (calibration) curves on the test set, each averaged over seeds. ``report.html`` is one file:
the images are embedded as base64 data URIs and the style sheet is inline, so it opens anywhere, offline.
Needs the ``report`` extra (``pip install 'deepfm[report]'``); without matplotlib the report is written
without plots and says so.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("deepfm.report")  # no handler configured: Python prints warnings to stderr as is

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]
PLOTS = {"validation_auc.png": "Validation AUC per epoch", "roc.png": "ROC curves on the test set",
         "calibration.png": "Calibration (reliability) curves on the test set"}


def _figure(size: tuple[float, float] = (7.5, 5.2)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, layout="constrained")
    return fig, fig.add_subplot()


def _style(i: int) -> dict[str, Any]:
    return {"color": COLORS[i % len(COLORS)], "marker": MARKERS[i % len(MARKERS)]}


def _done_by_model(outcome: Any) -> list[tuple[int, str, str, list[dict[str, Any]]]]:
    """(style index, model, display name, completed records) per model with at least one completed run."""
    out = []
    for i, row in enumerate(outcome.rows):
        recs = [r.record for r in outcome.runs if r.model == row["model"] and r.record is not None]
        if recs:
            out.append((i, row["model"], row["name"], recs))
    return out


def plot_validation(outcome: Any, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    for i, _, name, recs in _done_by_model(outcome):
        by_epoch: dict[int, list[float]] = {}
        for rec in recs:
            for h in rec["history"]:
                if h.get("valid_auc") is not None and np.isfinite(h["valid_auc"]):
                    by_epoch.setdefault(int(h["epoch"]), []).append(float(h["valid_auc"]))
        if not by_epoch:
            continue
        ep = np.array(sorted(by_epoch))
        mean = np.array([np.mean(by_epoch[e]) for e in ep])
        std = np.array([np.std(by_epoch[e]) for e in ep])
        st = _style(i)
        ax.plot(ep, mean, label=f"{name} ({len(recs)} seed{'s' if len(recs) > 1 else ''})", linewidth=1.8,
                markersize=6, **st)
        if len(recs) > 1:
            ax.fill_between(ep, mean - std, mean + std, color=st["color"], alpha=0.15, linewidth=0)
    ax.set_title("Validation AUC per epoch (mean over seeds, band = ±1 std)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation AUC")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.savefig(path, format="png")
    return path


def plot_roc(outcome: Any, path: Path) -> Path:
    fig, ax = _figure((7.5, 6.6))
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1, label="chance (AUC 0.5)")
    for i, model, name, recs in _done_by_model(outcome):
        curves = [np.asarray(r["roc_tpr"], dtype=np.float64) for r in recs if r.get("roc_tpr")]
        if not curves:
            continue
        tpr = np.r_[0.0, np.mean(curves, axis=0)]
        fpr = np.r_[0.0, np.linspace(0.0, 1.0, len(curves[0]))]
        row = next(r for r in outcome.rows if r["model"] == model)
        st = _style(i)
        ax.plot(fpr, tpr, color=st["color"], linewidth=1.8,
                label=f"{name} (AUC {row['auc_mean']:.4f} ± {row['auc_std']:.4f})")
    ax.set_title("ROC on the test set (mean TPR over seeds)")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.005)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.savefig(path, format="png")
    return path


def plot_calibration(outcome: Any, path: Path) -> Path:
    fig, ax = _figure((7.5, 6.6))
    top = 0.0
    curves = []
    for i, _, name, recs in _done_by_model(outcome):
        cal = [r["calibration"] for r in recs if r.get("calibration")]
        n_bins = len(cal[0]["predicted"]) if cal else 0
        cal = [c for c in cal if len(c["predicted"]) == n_bins]
        if not cal:
            continue
        pred = np.mean([c["predicted"] for c in cal], axis=0)
        obs = np.mean([c["observed"] for c in cal], axis=0)
        top = max(top, float(pred.max()), float(obs.max()))
        curves.append((i, name, pred, obs, n_bins))
    top = min(1.0, top * 1.05) or 1.0
    ax.plot([0, top], [0, top], linestyle="--", color="#999999", linewidth=1, label="perfectly calibrated")
    for i, name, pred, obs, _ in curves:
        ax.plot(pred, obs, linewidth=1.6, markersize=5, label=name, **_style(i))
    bins = curves[0][4] if curves else 0
    ax.set_title(f"Calibration on the test set ({bins} equal-frequency bins, mean over seeds)", fontsize=11)
    ax.set_xlabel("mean predicted click probability (bin)")
    ax.set_ylabel("observed click rate (bin)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.savefig(path, format="png")
    return path


# ------------------------------------------------------------------------------------------- HTML
CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; color: #1d1d1f;
       max-width: 1040px; margin: 24px auto; padding: 0 20px; background: #fff; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 32px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 10px 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f2f4f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.missing td { color: #a00; background: #fff4f4; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 10px; overflow-x: auto; white-space: pre-wrap;
      word-break: break-all; font-size: 13px; }
code { font-size: 13px; } code.path { white-space: nowrap; }
.note { color: #555; font-size: 13px; } .warn { color: #a00; font-weight: 600; }
figure { margin: 18px 0 26px; } figure img { max-width: 100%; height: auto;
  border: 1px solid #eee; display: block; }
figcaption { color: #555; font-size: 13px; margin-top: 4px; }
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _num(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and np.isfinite(v) else "–"


def _kv(rows: list[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def result_cells(r: dict[str, Any]) -> tuple[str, str, str]:
    """A table row's AUC, logloss (mean ± std) and RelaImpr, as shown in table.md and report.html."""
    if not r["runs"]:
        return "not run", "not run", ""
    rel = "" if r["relaimpr"] is None else f"{r['relaimpr']:+.2f}%"
    if r["runs"] == 1:  # one seed has no spread: "± 0.0000" would claim one
        return f"{r['auc_mean']:.4f} (1 seed)", f"{r['logloss_mean']:.5f} (1 seed)", rel
    return f"{r['auc_mean']:.4f} ± {r['auc_std']:.4f}", f"{r['logloss_mean']:.5f} ± {r['logloss_std']:.5f}", rel


def _results_table(outcome: Any) -> str:
    has_lr = any(r["model"] == "lr" for r in outcome.rows)
    head = ("<tr><th>Model</th><th>Test AUC (mean ± std)</th><th>Test Logloss (mean ± std)</th>"
            "<th>RelaImpr (AUC vs LR)</th><th>seeds</th></tr>")
    body = []
    for r in outcome.rows:
        auc, ll, rel = result_cells(r)
        cls = "" if r["runs"] else ' class="missing"'
        body.append(f"<tr{cls}><td>{_e(r['name'])}</td><td class=num>{auc}</td><td class=num>{ll}</td>"
                    f"<td class=num>{rel}</td><td class=num>{r['runs']}</td></tr>")
    note = ("RelaImpr = ((AUC<sub>model</sub> − 0.5) / (AUC<sub>LR</sub> − 0.5) − 1) × 100%, from the mean test "
            "AUCs." if has_lr else "<span class=warn>RelaImpr needs lr among --models</span> (it is measured "
            "against LR); the column is left blank.")
    return (f"<table>{head}{''.join(body)}</table><p class=note>Mean ± std over the completed seeds "
            f"(population std, ddof=0, as BARS reports). {note}</p>")


# What each model reads of ModelConfig: LR has no embeddings and no DNN, FM no DNN; the report lists only
# the options that shape the model it describes.
_DNN_OPTIONS = ("hidden", "dropout", "batch_norm", "activation", "net_l2")
_NOT_READ = {"lr": (*_DNN_OPTIONS, "embed_dim", "init_std"), "fm": _DNN_OPTIONS}


def _model_options(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _NOT_READ.get(cfg.get("model", ""), ())}


def _epochs_cell(d: dict[str, Any], cap: int | None) -> str:
    """best epoch / epochs run, flagged when the run kept its last epoch at the cap: it was still improving."""
    best, ran = d.get("best_epoch"), d.get("epochs")
    text = f"{_e(best)} / {_e(ran)}"
    if cap is not None and best is not None and best == ran == cap:
        text += " <span class=warn title='the last epoch was the best: more epochs may help'>at the cap, " \
                "still improving (raise --epochs)</span>"
    return text


def _runs_table(outcome: Any) -> str:
    head = ("<tr><th>model</th><th>seed</th><th>test AUC</th><th>test logloss</th><th>valid AUC</th>"
            "<th>best epoch / epochs</th><th>train (s)</th><th>parameters</th><th>status</th><th>bundle</th></tr>")
    body = []
    status = {"trained": "trained now", "reused": "reused"}
    for r in outcome.runs:
        d = r.record
        if d is None:
            body.append(f'<tr class="missing"><td>{_e(r.model)}</td><td class=num>{r.seed}</td>'
                        + "<td>–</td>" * 6 + "<td>missing</td><td></td></tr>")
            continue
        t, v = d["metrics"]["test"], d["metrics"].get("valid", {})
        body.append(f"<tr><td>{_e(r.model)}</td><td class=num>{r.seed}</td>"
                    f"<td class=num>{_num(t['auc'])}</td><td class=num>{_num(t['logloss'], 5)}</td>"
                    f"<td class=num>{_num(v.get('auc'))}</td><td class=num>{_epochs_cell(d, r.train_cfg.epochs)}"
                    f"</td><td class=num>{_num(d.get('train_seconds'), 1)}</td>"
                    f"<td class=num>{d.get('parameters', 0):,}</td><td>{_e(status.get(r.status, r.status))}"
                    f"{' (from a checkpoint)' if d.get('resumed') else ''}</td>"
                    f"<td><code class=path>{_e(d.get('bundle'))}</code></td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def render(outcome: Any, command: str, settings: dict[str, Any], machine: dict[str, Any],
           versions: dict[str, str], images: dict[str, bytes], plot_error: str | None) -> str:
    runs, missing = outcome.runs, outcome.missing
    done = len(runs) - len(missing)
    status = f"{done} of {len(runs)} runs complete"
    if missing:
        status = (f"<span class=warn>{status}; missing: {_e(', '.join(r.id for r in missing))}</span>"
                  + (f"<br>{_e(outcome.budget_note)}" if outcome.budget_note else
                     "<br>rerun the same command to complete them"))
    d = outcome.data
    figs = []
    for name, title in PLOTS.items():
        if name in images:
            b64 = base64.b64encode(images[name]).decode()
            figs.append(f'<figure><img alt="{_e(title)}" src="data:image/png;base64,{b64}">'
                        f"<figcaption>{_e(title)} (<code>{_e(name)}</code>)</figcaption></figure>")
    plots = ("".join(figs) if figs else
             f"<p class=warn>No plots: {_e(plot_error or 'no run has completed yet')}</p>")
    valid = (f"<code>{_e(d.get('valid'))}</code>" if d.get("valid") else
             f"seeded {_e(d.get('valid_fraction'))} of <code>--train</code> (split seed {_e(d.get('split_seed'))}), "
             "the same rows for every run")
    data_rows = [("format", _e(d.get("format"))), ("train file", f"<code>{_e(d.get('train'))}</code>"),
                 ("validation", valid), ("test file", f"<code>{_e(d.get('test'))}</code>"),
                 ("rows (train / valid / test)", f"{d.get('train_rows', 0):,} / {d.get('valid_rows', 0):,} / "
                                                 f"{d.get('test_rows', 0):,}"),
                 ("fields", f"{d.get('fields', '–')} ({_e(', '.join(d.get('field_names', [])))})"),
                 ("vocabulary (embedding table) rows", f"{d.get('vocab_rows', 0):,}"),
                 ("test CTR", _num(d.get("test_ctr"))), ("bad rows skipped", _e(d.get("skipped_rows", 0))),
                 ("encoded data", "shards on disk (--streaming)" if d.get("streaming") else "one in-memory store")]
    data_html = _kv(data_rows) if d else "<p class=warn>The data has not been read yet (no run was started).</p>"
    configs = {}
    for r in runs:
        configs.setdefault(r.model, _model_options(r.model_cfg.to_dict()))
    train_cfg = {k: v for k, v in runs[0].train_cfg.to_dict().items() if k != "seed"} if runs else {}
    cfg_rows = [("preset", _e(settings.get("preset"))),
                ("overrides", _e(" ".join(settings.get("overrides") or []) or "none")),
                ("seeds", f"1..{settings.get('seeds')} (per run: initialisation, shuffling, dropout)"),
                ("training (all models)", f"<code>{_e(json.dumps(train_cfg))}</code>")]
    cfg_rows += [(f"model {m}", f"<code>{_e(json.dumps(c))}</code>") for m, c in configs.items()]
    env_rows = [("date", _e(time.strftime("%Y-%m-%d %H:%M:%S %Z"))), ("CPU", _e(machine.get("cpu"))),
                ("cores", f"{machine.get('logical_cores')} logical, {machine.get('usable_cores')} usable by this "
                          "process"),
                ("platform", _e(f"{machine.get('platform')}, Python {machine.get('python')}")),
                ("packages", _e(", ".join(f"{k} {v}" for k, v in versions.items())))]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>deepfm compare: {_e(', '.join(r['name'] for r in outcome.rows))}</title><style>{CSS}</style></head>
<body>
<h1>Model comparison (DeepFM paper, Table 2 protocol)</h1>
<p class=note>Generated {_e(time.strftime("%Y-%m-%d %H:%M"))} by <code>deepfm compare</code>; {status}.</p>
<pre>{_e(command)}</pre>
<h2>Test-set results</h2>
{_results_table(outcome)}
<h2>Plots</h2>
{plots}
<p class=note>Runs stop early at different epochs, so the later points of the validation curve average fewer
seeds. ROC: the true-positive rate on a fixed false-positive-rate grid, averaged over seeds. Calibration: each
run's test rows sorted by prediction and cut into equal-frequency bins; the bins are averaged over seeds.</p>
<h2>Runs</h2>
{_runs_table(outcome)}
<h2>Data</h2>
{data_html}
<p class=note>Preprocessing is fitted once on the training rows and the encoded data is shared by every run.</p>
<h2>Configuration</h2>
{_kv(cfg_rows)}
<h2>Environment</h2>
{_kv(env_rows)}
</body></html>
"""


def write(outcome: Any, command: str, settings: dict[str, Any], machine: dict[str, Any],
          versions: dict[str, str]) -> list[Path]:
    """Write the PNGs and report.html into ``outcome.out``; returns the paths written."""
    out = outcome.out
    written: list[Path] = []
    images: dict[str, bytes] = {}
    plot_error = None
    if any(r.record is not None for r in outcome.runs):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plot_error = "matplotlib is not installed (pip install 'deepfm[report]')"
            log.warning(f"warning: {plot_error}; writing the report without plots")
        else:
            for name, fn in (("validation_auc.png", plot_validation), ("roc.png", plot_roc),
                             ("calibration.png", plot_calibration)):
                path = fn(outcome, out / name)
                images[name] = path.read_bytes()
                written.append(path)
    else:
        for name in PLOTS:  # stale figures of another configuration would contradict the table
            (out / name).unlink(missing_ok=True)
    page = render(outcome, command, settings, machine, versions, images, plot_error)
    report = out / "report.html"
    tmp = report.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, report)
    return [*written, report]
