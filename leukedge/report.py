"""Self-contained HTML run reports (``leukedge report RUN_DIR``).

The report is one HTML file with every plot embedded as a base64 PNG, so it opens from disk
with no server.  It is built from whatever a run directory holds, found recursively:

- ``metrics.json`` with a confusion matrix (from ``leukedge evaluate``): metrics, confusion matrix, per-subject table;
- ``history.json`` (from ``leukedge train``): training curves;
- ``*.stats.json`` (from ``leukedge infer``): throughput and latency percentiles per stage;
- ``export_report.json`` (from ``leukedge export``): PyTorch vs ONNX Runtime agreement;
- ``*.engine.json`` sidecars (from ``leukedge build-engine``);
- ``demo_summary.json`` (from ``leukedge demo``): stage timings and notes;
- PNG plots written by those stages, and ``cells_grid.png`` (raw vs stain-normalised cells).

A run made from synthetic data (any of the above says ``"synthetic": true``) gets a banner
saying so; every report says the model is not for clinical use.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ._version import __version__

_SKIP_DIRS = {"__pycache__", ".tmp"}


def _find(run_dir: Path, pattern: str) -> list[Path]:
    return sorted(p for p in run_dir.rglob(pattern) if not (set(p.parts) & _SKIP_DIRS))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _img_tag(path: Path, alt: str, width: int | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"{w}>'


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if v is None:
        return "–"
    return html.escape(str(v))


def _td(v: Any) -> str:
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    return f'<td class="num">{_fmt(v)}</td>' if num else f"<td>{_fmt(v)}</td>"


def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _rel(path: Path, run_dir: Path) -> str:
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)


def _is_synthetic(objs: Iterable[Any]) -> bool:
    for o in objs:
        if isinstance(o, dict):
            if o.get("synthetic") is True:
                return True
            if any(_is_synthetic([v]) for v in o.values() if isinstance(v, dict)):
                return True
    return False


# -- sections --------------------------------------------------------------------------------

def _metrics_section(evals: list[tuple[Path, dict]], run_dir: Path) -> str:
    if not evals:
        return ""
    parts = ['<section id="metrics"><h2>Metrics</h2>']
    for path, ev in evals:
        title = ev.get("title") or _heading(path.parent, run_dir)
        split = f" (split: {ev['split']})" if ev.get("split") else ""
        parts.append(f"<h3>{html.escape(str(title))}{html.escape(split)}</h3>")
        rows = [(label, ev.get(k)) for k, label in (("n", "cells"), ("weighted_f1", "weighted F1 (the C-NMC metric)"),
                                                    ("accuracy", "accuracy"), ("macro_f1", "macro F1"),
                                                    ("roc_auc", "ROC-AUC")) if k in ev]
        ci = ev.get("weighted_f1_ci")
        if "weighted_f1" in ev:
            rows.insert(2, ("weighted F1, 95 % interval", _ci_text(ci)))
        if ev.get("model"):
            rows.append(("model", ev["model"]))
        if ev.get("excluded_training_cells"):
            rows.append(("left out (the model was trained on them)", f"{len(ev['excluded_training_cells'])} cells"))
        parts.append(_table(["metric", "value"], rows, "kv"))
        if ev.get("subject_warning"):
            parts.append(f'<p class="warn">Warning: {html.escape(str(ev["subject_warning"]))}</p>')
        per_class = ev.get("per_class") or {}
        if per_class:
            parts.append(_table(
                ["class", "precision", "recall", "f1", "support"],
                [(c, d.get("precision"), d.get("recall"), d.get("f1"), d.get("support")) for c, d in per_class.items()],
            ))
        cm = ev.get("confusion_matrix")
        if isinstance(cm, dict):
            names, matrix = cm.get("labels") or [], cm.get("matrix") or []
        else:
            names, matrix = ev.get("class_names") or [], cm or []
        if matrix:
            names = list(names) or [str(i) for i in range(len(matrix))]
            parts.append("<h4>Confusion matrix (rows: true class, columns: predicted class)</h4>")
            parts.append(_table([""] + names, [[names[i]] + list(r) for i, r in enumerate(matrix)], "cm"))
        subjects = ev.get("per_subject") or []
        if isinstance(subjects, dict):
            subjects = [dict(subject=k, **v) for k, v in subjects.items()]
        if subjects:
            keys = list(subjects[0].keys())
            parts.append(f"<details><summary>Per-subject breakdown ({len(subjects)} subjects)</summary>")
            parts.append(_table(keys, [[s.get(k) for k in keys] for s in subjects]))
            parts.append("</details>")
    parts.append("</section>")
    return "".join(parts)


def _ci_text(ci: Any) -> str:
    if not isinstance(ci, dict):
        return "none: fewer than 2 subjects of a class, so no interval would mean anything"
    n = ci.get("n_subjects") or {}
    return (f"{ci['low']:.3f} to {ci['high']:.3f} (subject-level bootstrap, {ci.get('n_boot')} resamples of "
            f"{n.get('hem', '?')} hem + {n.get('all', '?')} all subjects)")


#: readable names of the folders and files leukedge's stages write (for headings and captions)
_FOLDER_NAMES = {"evaluate": "Evaluation", "real": "Shipped default model on real cells", "infer": "Inference",
                 "train": "Training", "bundle": "Model bundle", "onnx": "ONNX export", "engine": "Engine", "": "This run"}
_PLOT_NAMES = {"roc": "ROC curve", "confusion_matrix": "Confusion matrix", "per_subject": "Per subject: predicted blast fraction",
               "pr": "Precision-recall curves", "calibration": "Calibration (reliability diagram)",
               "threshold_sweep": "Threshold sweep", "mistakes": "Most confident mistakes", "training_curves": "Training curves",
               "cells_grid": "Raw and stain-normalised cells", "cv_folds": "Cross-validation: F1 per epoch and fold",
               "cv_per_subject": "Cross-validation: per subject", "cv_roc": "Cross-validation: out-of-fold ROC"}


def _heading(folder: Path, run_dir: Path) -> str:
    rel = _rel(folder, run_dir)
    rel = "" if rel == "." else rel
    return _FOLDER_NAMES.get(rel, rel.replace("/", " / ") or "This run")


def _caption(png: Path, run_dir: Path) -> str:
    name = _PLOT_NAMES.get(png.stem, png.stem.replace("_", " "))
    where = _heading(png.parent, run_dir)
    return name if where == "This run" else f"{name} ({where.lower() if where[:1].isupper() and ' ' in where else where})"


def _cv_section(cv: dict | None, pngs: list[Path], run_dir: Path) -> str:
    """Cross-validation (``cv.json`` from ``leukedge cv``): scores per fold, mean ± sd, per subject, plots."""
    if not isinstance(cv, dict) or "fold_runs" not in cv:
        return ""
    f1, auc = cv.get("weighted_f1") or {}, cv.get("roc_auc") or {}

    def ms(d: dict) -> str:
        return "–" if d.get("mean") is None else f"{d['mean']:.4f} ± {d.get('sd', 0.0):.4f} (n={d.get('n')})"

    parts = ['<section id="cv"><h2>Cross-validation</h2>', f"<p>{html.escape(str(cv.get('scheme', '')))}</p>",
             _table(["metric", "value"], [("weighted F1 (mean ± sd over folds)", ms(f1)), ("ROC-AUC", ms(auc)),
                                          ("pooled out-of-fold weighted F1 (over seeds)", ms(cv.get("pooled_weighted_f1") or {})),
                                          ("pooled out-of-fold weighted F1, 95 % interval (first seed)",
                                           _ci_text(cv.get("pooled_weighted_f1_ci"))),
                                          ("out-of-fold best threshold", ms(cv.get("oof_threshold") or {})),
                                          ("worst subjects", ", ".join(cv.get("worst_subjects") or []))], "kv")]
    by_tta = cv.get("weighted_f1_by_tta")
    if isinstance(by_tta, dict):
        parts.append("<h3>Weighted F1 with each test-time augmentation (same fold models)</h3>")
        parts.append(_table(["TTA", "weighted F1"], [(k, ms(v)) for k, v in by_tta.items()]))
    parts.append("<h3>Folds</h3>")

    def fold_name(r: dict) -> Any:
        return r.get("fold") if r.get("test_fold") is None else f"test on official fold {r['test_fold']}"

    rows = [(r.get("seed"), fold_name(r), r.get("n_val"), ", ".join(r.get("val_subjects") or []),
             r.get("weighted_f1"), r.get("roc_auc")) for r in cv["fold_runs"]]
    base = cv.get("baseline") if isinstance(cv.get("baseline"), dict) else None
    rows += [("baseline", fold_name(b), b.get("n_test"), base.get("name"), b.get("weighted_f1"), b.get("roc_auc"))
             for b in base.get("folds", [])] if base else []
    parts.append(_table(["seed", "fold", "val cells", "val subjects", "weighted F1", "ROC-AUC"], rows))
    if base:
        parts.append(f"<p>Baseline rows: {html.escape(str(base.get('name')))} on the same training and test cells "
                     "(the floor a model must beat; C-NMC's magnification is fixed and blasts are larger).</p>")
    subjects = cv.get("per_subject") or []
    if subjects:
        parts.append("<h3>Per subject, worst first</h3>")
        parts.append(_table(["subject", "class", "cells", "accuracy", "sd over seeds", "mean P(all)"],
                            [(r.get("subject"), r.get("true_class"), r.get("n"), r.get("accuracy"), r.get("accuracy_sd"),
                              r.get("mean_prob_all")) for r in subjects]))
    recipe = cv.get("recipe")
    if recipe:
        parts.append(f"<details><summary>Recipe</summary><pre>{html.escape(json.dumps(recipe, indent=2))}</pre></details>")
    parts.append("</section>")
    return "".join(parts) + _plots_section([p for p in pngs if p.parent == run_dir], run_dir, ("cv_",), "cv-plots",
                                           "Cross-validation plots", wide=True)


def _plots_section(pngs: list[Path], run_dir: Path, wanted: tuple[str, ...], sid: str, title: str,
                   wide: bool = False) -> str:
    chosen, seen = [], set()
    for p in pngs:
        if any(w in p.name.lower() for w in wanted) and p.name not in seen:
            seen.add(p.name)
            chosen.append(p)
    if not chosen:
        return ""
    imgs = "".join(
        f'<figure>{_img_tag(p, _caption(p, run_dir))}<figcaption>{html.escape(_caption(p, run_dir))}</figcaption></figure>'
        for p in chosen
    )
    cls = "figs wide" if wide else "figs"
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2><div class="{cls}">{imgs}</div></section>'


_STAGE_LABELS = (("preprocess", "preprocessing (Rust)"), ("h2d", "H2D copy"), ("compute", "engine compute"),
                 ("d2h", "D2H copy"), ("backend_total", "backend total"), ("end_to_end", "end to end"))


def _latency_section(stats: list[tuple[Path, dict]], run_dir: Path) -> str:
    if not stats:
        return ""
    parts = ['<section id="latency"><h2>Throughput and latency</h2>',
             "<p>Two throughputs per run: <b>end to end</b> is files per second of the whole pipelined run (Rust "
             "preprocessing of batch k+1 overlaps the model on batch k; the slower stage sets the pace); <b>alone</b> "
             "is what each stage would reach by itself (batch size / its mean time per batch).</p>"]
    models = {str(st.get("model") or st.get("backend")) for _, st in stats}
    if len(stats) > 1:
        parts.append("<p>The runs below " + ("use different models (e.g. a small demo CNN and the shipped "
                     "EfficientNet-Lite0 at 192 px), so their throughputs compare models, not machines."
                     if len(models) > 1 else "use the same model on different cells.") + "</p>")
    for path, st in stats:
        n = st.get("n_files")
        parts.append(f"<h3>{html.escape(_heading(path.parent, run_dir))}: {html.escape(str(st.get('backend', '')))}, "
                     f"batch {html.escape(str(st.get('batch', '')))}, {html.escape(str(n))} files</h3>")
        thr = st.get("stage_throughput_img_s") or {}
        head = [("backend", st.get("backend")), ("why this backend", st.get("backend_reason")),
                ("batch", st.get("batch")), ("pipelined", st.get("pipeline")), ("files", st.get("n_files")),
                ("failed files", st.get("n_error")),
                ("rejected files (not cells the model may judge; not classified)", st.get("n_rejected")),
                ("end-to-end throughput (img/s)", st.get("throughput_img_s")),
                ("preprocessing alone (img/s)", thr.get("preprocess")), ("backend alone (img/s)", thr.get("backend")),
                ("wall time (s)", st.get("wall_s"))]
        parts.append(_table(["", ""], [r for r in head if r[1] is not None], "kv"))
        lat = st.get("latency_ms") or {}
        rows = [(label, s.get("n"), s.get("mean"), s.get("p50"), s.get("p95"), s.get("p99"), s.get("max"))
                for key, label in _STAGE_LABELS if isinstance(s := lat.get(key), dict)]
        if rows:
            parts.append(_table(["stage (ms per batch)", "batches", "mean", "p50", "p95", "p99", "max"], rows))
    parts.append("</section>")
    return "".join(parts)


def _export_section(exports: list[tuple[Path, dict]], engines: list[tuple[Path, dict]], run_dir: Path) -> str:
    if not exports and not engines:
        return ""
    parts = ['<section id="deploy"><h2>Export and engines</h2>']
    for path, ex in exports:
        parts.append(f"<h3>PyTorch vs ONNX Runtime ({html.escape(_rel(path, run_dir))})</h3>")
        rows = []
        for variant, res in (ex.get("results") or {}).items():
            if not isinstance(res, dict):
                continue
            groups = [("all", res.get("all") or {})] + list((res.get("by_source") or {}).items())
            for src, m in groups:
                rows.append((variant, res.get("input_dtype"), src, m.get("n"), m.get("max_abs_logit"),
                             m.get("max_abs_prob"), m.get("top1_agreement"), m.get("pass", "")))
        if rows:
            parts.append(_table(["graph", "I/O dtype", "cells", "n", "max |Δ logit|", "max |Δ prob|", "top-1 agreement",
                                 "pass"], rows))
    for path, sc in engines:
        parts.append(f"<h3>Engine {html.escape(_rel(path, run_dir))}</h3>")
        flat = [(k, v) for k, v in sc.items() if not isinstance(v, (dict, list))]
        parts.append(_table(["field", "value"], flat, "kv"))
    parts.append("</section>")
    return "".join(parts)


def _demo_section(summary: dict | None) -> str:
    if not summary:
        return ""
    rows = [(s.get("stage"), s.get("status"), s.get("seconds"), s.get("note")) for s in summary.get("stages", [])]
    out = '<section id="stages"><h2>Pipeline stages</h2>' + _table(["stage", "status", "seconds", "note"], rows)
    rs = summary.get("real_sample")
    if isinstance(rs, dict) and rs.get("seen_files"):  # its scores are in the metrics section; here: what was left out
        out += (f"<p>Real cells the shipped model was trained on, left out of its score ({len(rs['seen_files'])}): "
                f"{html.escape(', '.join(rs['seen_files']))}</p>")
    st = summary.get("station")
    if isinstance(st, dict) and st.get("samples"):
        out += ("<h3>Microscope station: per-sample totals</h3>"
                + _table(["sample", "cells", "blasts", "blast fraction", "errors"],
                         [(s.get("sample_id"), s.get("n_cells"), s.get("n_blasts"), s.get("blast_fraction"), s.get("n_errors"))
                          for s in st["samples"]]))
    return out + "</section>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #7b4b94;padding-bottom:.2rem;margin-top:2rem}
.banner{background:#fff3cd;border:1px solid #e0b400;padding:.8rem 1rem;border-radius:6px;margin:1rem 0;font-weight:600}
.banner.clinical{background:#f8d7da;border-color:#c0392b}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem} th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f2eef5} .figs{display:flex;flex-wrap:wrap;gap:1rem} figure{margin:0} figure img{max-width:520px;border:1px solid #ddd} .wide figure img{max-width:100%}
figcaption{font-size:.8rem;color:#666} .warn{color:#8a5300;font-weight:600}
td{overflow-wrap:anywhere}
@media (max-width:700px){figure img{max-width:100%} table{font-size:.8rem;display:block;overflow-x:auto;max-width:100%} body{margin:1rem auto}} .meta{color:#666;font-size:.85rem} pre{background:#f6f6f6;padding:.5rem;overflow:auto}
"""


def build_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, title: str | None = None) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``) from whatever the run directory holds."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a directory")
    out_path = Path(out) if out else run_dir / "report.html"

    # evaluate writes metrics.json with a confusion matrix; train's metrics.json has none.
    evals = [(p, j) for p in _find(run_dir, "metrics.json")
             if isinstance(j := _load_json(p), dict) and "confusion_matrix" in j]
    histories = [(p, j) for p in _find(run_dir, "history.json") if (j := _load_json(p)) is not None]
    stats = [(p, j) for p in _find(run_dir, "*.stats.json") if isinstance(j := _load_json(p), dict)]
    exports = [(p, j) for p in _find(run_dir, "export_report.json") if isinstance(j := _load_json(p), dict)]
    engines = [(p, j) for pat in ("*.engine.json", "*.plan.json") for p in _find(run_dir, pat)
               if isinstance(j := _load_json(p), dict)]
    bundles = [(p, j) for p in _find(run_dir, "bundle.json") if isinstance(j := _load_json(p), dict)]
    caches = [(p, j) for p in _find(run_dir, "cache.json") if isinstance(j := _load_json(p), dict)]
    demo = _load_json(run_dir / "demo_summary.json")
    cv = _load_json(run_dir / "cv.json")
    pngs = [p for p in _find(run_dir, "*.png")]
    if not (evals or histories or stats or exports or engines or pngs or demo or cv):
        raise FileNotFoundError(
            f"{run_dir}: no evaluation metrics.json, history.json, *.stats.json, export_report.json or plots found; "
            "point `leukedge report` at a train, evaluate, infer or demo output directory"
        )

    synthetic = _is_synthetic([j for _, j in evals + stats + exports + bundles + caches] + [demo or {}]
                              + [cv if isinstance(cv, dict) else {}])
    banners = ['<div class="banner clinical">Research software. Not for clinical use: leukedge predictions must not '
               'be used for diagnosis or treatment decisions.</div>']
    if synthetic:
        banners.insert(0, '<div class="banner">This run used SYNTHETIC data: cells generated by '
                          '<code>leukedge data synth</code> (and, where a model was trained here, a model trained on '
                          'them). Numbers on synthetic cells say nothing about real leukemia detection.</div>')

    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title or 'leukedge report')}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title or 'leukedge run report')}</h1>",
        f"<p class='meta'>{html.escape(str(run_dir))} · generated {_dt.datetime.now().isoformat(timespec='seconds')} "
        f"· leukedge {__version__}</p>",
        *banners,
        _demo_section(demo if isinstance(demo, dict) else None),
        _cv_section(cv if isinstance(cv, dict) else None, pngs, run_dir),
        _metrics_section(evals, run_dir),
        _plots_section([p for p in pngs if not p.name.startswith("cv_")], run_dir,
                       ("roc", "confusion", "pr.png", "calibration", "threshold_sweep", "per_subject"), "plots",
                       "How the model scores: ROC, precision-recall, calibration, threshold, per subject"),
        _plots_section([p for p in pngs if not p.name.startswith("cv_")], run_dir, ("mistakes",), "mistakes",
                       "Most confident mistakes (thumbnails)", wide=True),
        _plots_section(pngs, run_dir, ("curve", "history", "training"), "training", "Training curves", wide=True),
        _latency_section(stats, run_dir),
        _plots_section(pngs, run_dir, ("latency", "throughput"), "latency-plots", "Latency plots"),
        _export_section(exports, engines, run_dir),
        _plots_section(pngs, run_dir, ("cells", "grid", "stain"), "cells", "Raw versus stain-normalised cells", wide=True),
        "</body></html>",
    ]
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text("".join(parts), encoding="utf-8")
    os.replace(tmp, out_path)
    return out_path


