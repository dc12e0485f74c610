"""The run report: ``<run>/report.md`` and ``<run>/report.html`` (issue 10). Pure Python, no Ray.

Written at the end of every ``tsrec run`` and by ``tsrec report RUN_DIR``; it only reads the stage
folders under the run folder (``data/``, ``sids/``, ``semantics/``, ``model/``, ``sft/``, ``eval/``),
so it can be rebuilt at any time. A stage folder without a ``manifest.json`` shows as "not run" and
every section that needs it says so: a partial run still gets a report.

Sections: stages (status, time, key counts, folder), teacher records (valid/failed, two examples),
SA-Init (depth, rows initialised), SFT loss curves per task (PNG from ``sft/metrics.csv``), RL (only when
``rl/`` exists: start vs best valid NDCG@10, valid NDCG@10 by steps, ``rl/rl.png``), metrics
(the model and the baselines of ``eval/metrics.json``), example recommendations (history titles,
target title, top-5 titles with hit marks from ``eval/rankings.parquet`` + ``data/items.parquet``), and a
Sweep section per finished ``tsrec tune`` sweep in the folder (``<tune.dir>/summary.json``: the settings
table with mean and 95% interval over seeds, the best setting, ``settings.png`` and ``metric_vs_step.png``).

The Markdown file links its PNGs in ``report_files/``; the HTML twin inlines them as base64 so it
opens offline as one file.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from tsrec.artifacts import atomic_write_text

STAGES = [("data", "data"), ("sid", "sids"), ("semantics", "semantics"), ("model", "model"), ("sft", "sft"),
          ("rl", "rl"), ("eval", "eval")]
OPTIONAL = {"rl"}  # listed (stage row and RL section) only when its folder exists: not in the default pipeline
NOT_RUN = "not run"
N_EXAMPLES = 4
TOP = 5


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _manifest(stage_dir: Path) -> dict[str, Any] | None:
    return _json(stage_dir / "manifest.json")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


# --- collecting --------------------------------------------------------------------------------


def _stage_counts(name: str, stats: dict[str, Any]) -> str:
    """The few numbers a reader wants per stage, from the manifest stats."""
    pick = {
        "data": lambda s: f"{s.get('items')} items, {s.get('users')} users, "
                          + "/".join(str(v) for v in s["rows"].values()) + " " + "/".join(s["rows"]) + " rows",
        "sid": lambda s: f"{s.get('items')} items, {s.get('levels')} levels x {s.get('codebook_size')} codes"
                         + (f", {s['reassigned_items']} items reassigned to resolve collisions"
                            if "reassigned_items" in s else ""),
        "semantics": lambda s: f"{s.get('ok')} ok / {s.get('failed')} failed of {s.get('tokens_requested')} tokens "
                               f"(engine {s.get('engine')})",
        "model": lambda s: f"{s.get('sid_tokens')} SID tokens, SA-Init depth {s.get('depth')}, "
                           f"{s.get('sa_init_rows')} rows initialised",
        "sft": lambda s: f"{s.get('steps')} steps, final train loss {_fmt(s.get('final_train_loss'))}, "
                         f"final valid loss {_fmt(s.get('final_val_loss'))}",
        "rl": lambda s: f"{s.get('steps')} steps, valid NDCG@10 {_fmt(s.get('start_valid_ndcg@10'))} at the start, "
                        f"best {_fmt(s.get('best_valid_ndcg@10'))} after {s.get('best_after_steps')} steps",
        "eval": lambda s: f"{s.get('rows')} {s.get('split')} rows, beams {s.get('beams')}"
                          + "".join(f", HR@{k.split('@')[1]} {_fmt(s[k])}" for k in
                                    sorted((k for k in s if k.startswith("hr@")), key=lambda k: int(k[3:]))[-1:]),
    }.get(name)
    try:
        return pick(stats) if pick else ""
    except (TypeError, KeyError):
        return ""


def collect_stages(root: Path) -> list[dict[str, Any]]:
    """One row per pipeline stage: status, seconds, counts, folder (missing stages: "not run")."""
    pipeline = _json(root / "pipeline.json") or {}
    rows = []
    for name, folder in STAGES:
        d = root / folder
        if name in OPTIONAL and not d.exists():
            continue
        man = _manifest(d)
        if man is None:
            rows.append({"stage": name, "status": NOT_RUN, "seconds": None, "counts": "", "folder": str(d)})
            continue
        marker = _json(d / "pipeline_stage.json") or {}
        seconds = pipeline.get("timing_s", {}).get(name, marker.get("seconds", man.get("stats", {}).get("seconds")))
        skipped = bool(pipeline.get("stages", {}).get(name, {}).get("skipped"))
        seconds = f"{seconds:.1f}" if isinstance(seconds, (int, float)) else seconds
        rows.append({"stage": name, "status": "up to date (skipped)" if skipped else "done", "seconds": seconds,
                     "counts": _stage_counts(name, man.get("stats", {})), "folder": str(d)})
    return rows


def collect_teacher(root: Path) -> dict[str, Any] | None:
    d = root / "semantics"
    man = _manifest(d)
    if man is None:
        return None
    stats = man.get("stats", {})
    examples, failures = [], []
    path = d / "semantics.parquet"
    if path.exists():
        import pyarrow.parquet as pq

        t = pq.read_table(path, columns=["token", "status", "description", "keywords", "error"]).to_pylist()
        for r in t:
            kws = r.get("keywords")
            try:
                kws = json.loads(kws) if isinstance(kws, str) else kws
            except ValueError:
                pass
            rec = {"token": r["token"], "description": r.get("description") or "", "keywords": kws or [],
                   "error": r.get("error") or ""}
            (examples if r["status"] == "ok" else failures).append(rec)
    return {"engine": stats.get("engine"), "model": stats.get("model"), "ok": stats.get("ok"),
            "failed": stats.get("failed"), "requested": stats.get("tokens_requested"),
            "examples": examples[:2], "failures": failures[:2]}


def collect_sa_init(root: Path) -> dict[str, Any] | None:
    rep = _json(root / "model" / "init_report.json")
    if rep is None:
        return None
    return {k: rep.get(k) for k in ("depth", "source", "sa_init_rows", "sid_tokens", "init_kinds", "tied",
                                    "init_lm_head", "backbone", "missing_semantics")}


def collect_sft(root: Path) -> tuple[list[dict], dict[str, Any] | None]:
    d = root / "sft"
    man = _manifest(d)
    if man is None:
        return [], None
    from tsrec.train.metrics import read_metrics_csv

    return read_metrics_csv(d / "metrics.csv"), man.get("stats", {})


def collect_rl(root: Path) -> dict[str, Any] | None:
    """The RL stage's summary (``rl/manifest.json`` stats), its reward and plot; None when RL did not run."""
    man = _manifest(root / "rl")
    if man is None:
        return None
    st = dict(man.get("stats", {}))
    st["reward"] = (man.get("config") or {}).get("rl", {}).get("reward", "")
    png = root / "rl" / "rl.png"
    st["plot"] = png if png.exists() else None
    return st


def _rl_line(st: dict[str, Any]) -> str:
    start, best = st.get("start_valid_ndcg@10"), st.get("best_valid_ndcg@10")
    if not isinstance(start, float) or not isinstance(best, float):
        return f"Reward `{st.get('reward')}`, {st.get('steps')} steps; no valid evaluation."
    gain = f"+{best - start:.4f}" if best > start else "never above the start"
    return (f"Reward `{st.get('reward')}`, {st.get('steps')} steps: valid NDCG@10 **{start:.4f}** at the SFT start, best "
            f"**{best:.4f}** after {st.get('best_after_steps')} steps ({gain}); the exported model is the "
            f"{st.get('model', 'best')} one (the SFT start itself when RL never beat it on valid).")


def _rl_table(st: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    by = st.get("valid_ndcg@10_by_steps") or {}
    steps = sorted(by, key=int)
    return ["RL steps", *steps], [["valid NDCG@10", *[by[k] for k in steps]]]


def collect_metrics(root: Path) -> dict[str, Any] | None:
    m = _json(root / "eval" / "metrics.json") if _manifest(root / "eval") is not None else None
    if m is None:
        return None
    keys = [k for k in m if k.startswith(("hr@", "ndcg@"))]
    keys.sort(key=lambda k: (int(k.split("@")[1]), k.startswith("ndcg")))
    rows = [{"name": "tsrec (model)", **{k: m[k] for k in keys}}]
    base = m.get("baselines") or {}
    for name, label in BASELINE_LABELS.items():
        if isinstance(base.get(name), dict):
            rows.append({"name": label, **{k: base[name].get(k) for k in keys}})
    return {"keys": keys, "rows": rows, "split": m.get("split"), "n": m.get("rows"), "beams": m.get("beams"),
            "baselines_note": base.get("skipped"),
            "sasrec_note": _sasrec_note(_json(root / "eval" / "sasrec.json")) if "sasrec" in base else None,
            "published": _published(root, m, keys)}


def _published(root: Path, m: dict[str, Any], keys: list[str]) -> dict[str, Any] | None:
    """The published rows of the run's dataset (``eval.published`` in the eval stage's config; METHOD.md 4.1/4.3),
    on the run's cut-offs; only beside a test-split evaluation (they are test numbers)."""
    from tsrec.published import published_rows

    name = ((((_manifest(root / "eval") or {}).get("config") or {}).get("eval") or {}).get("published")) or ""
    if not name or m.get("split") != "test":
        return None
    shown = [k for k in keys if any(k in r for r in published_rows(name))]
    return {"dataset": name, "keys": shown,
            "rows": [[f"{r['name']} (published)", r["setting"], *[r.get(k) for k in shown]] for r in published_rows(name)],
            "sources": sorted({r["source"] for r in published_rows(name)})}


BASELINE_LABELS = {"popularity": "popularity (baseline)", "markov": "markov (baseline)",
                   "sasrec": "sasrec (baseline, trained here)"}


def _sasrec_note(st: dict[str, Any] | None) -> str:
    """SASRec's settings and training in one sentence (``eval/sasrec.json``, tsrec/decode/sasrec.py)."""
    if not st or not isinstance(st.get("settings"), dict):
        return "SASRec: eval/sasrec.json not found (settings and train time unknown)."
    s, curve, best = st["settings"], st.get("valid_ndcg@10") or [], st.get("best_epoch") or 0
    valid = f"{curve[best - 1]:.4f}" if 0 < best <= len(curve) else "?"
    return (f"SASRec trained here on the train split (full-softmax cross-entropy, last position), {s.get('blocks')} "
            f"block(s), hidden {s.get('hidden')}, {s.get('heads')} head(s), dropout {s.get('dropout')}, max history "
            f"{st.get('max_len')}, Adam lr {s.get('lr')}, batch {s.get('batch_size')}, seed {s.get('seed')}; epoch "
            f"{best} of {st.get('epochs_run')} kept (best valid NDCG@10 {valid}, patience {s.get('patience')}, at most "
            f"{s.get('epochs')}); trained in {st.get('train_seconds')} s on {s.get('threads')} CPU thread(s); full "
            f"ranking over all {st.get('n_items')} items, history items not excluded, target matched by item id.")


def collect_examples(root: Path, n: int = N_EXAMPLES, top: int = TOP) -> list[dict[str, Any]] | None:
    """The first ``n`` rows of ``rankings.parquet`` in titles (hits first if there are any, then misses)."""
    rank_path = root / "eval" / "rankings.parquet"
    if _manifest(root / "eval") is None or not rank_path.exists() or not (root / "data" / "items.parquet").exists():
        return None
    import pyarrow.parquet as pq

    from tsrec.data.schema import read_split
    from tsrec.sid.index import read_index

    split = (_json(root / "eval" / "metrics.json") or {}).get("split", "test")
    items = pq.read_table(root / "data" / "items.parquet", columns=["item_id", "title"]).to_pylist()
    title = {r["item_id"]: r["title"] for r in items}
    try:
        sid_to_item = {"".join(t): i for i, t in read_index(root / "sids").items.items()}
    except Exception:  # noqa: BLE001 - a missing or foreign index only loses the titles of the top-5
        sid_to_item = {}
    ranked = pq.read_table(rank_path, columns=["row", "item_id", "ranked_sids", "hit_rank"]).to_pylist()
    hits = [r for r in ranked if 0 <= r["hit_rank"] < top]
    chosen = (hits[: max(1, n // 2)] + [r for r in ranked if not 0 <= r["hit_rank"] < top])[:n]
    chosen.sort(key=lambda r: r["row"])
    hist = read_split(root / "data", split).column("history_item_ids").to_pylist()
    out = []
    for r in chosen:
        recs = []
        for pos, sid in enumerate(r["ranked_sids"][:top]):
            item = sid_to_item.get(sid)
            recs.append({"rank": pos + 1, "title": title.get(item, sid), "hit": pos == r["hit_rank"]})
        h = [title.get(i, str(i)) for i in hist[r["row"]]]
        if len(h) > TOP:  # the most recent items; the prompt holds them all
            h = [f"({len(h) - TOP} earlier)"] + h[-TOP:]
        out.append({"row": r["row"], "history": h,
                    "target": title.get(r["item_id"], str(r["item_id"])), "recs": recs,
                    "hit_rank": r["hit_rank"] + 1 if r["hit_rank"] >= 0 else None})
    return out


def loss_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per SFT task (``train/loss/<task>``), plus the total with the validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in r if k.startswith("train/loss/")})
    panels = [("total", ["train/loss", "eval/loss"])] + [(k.split("/", 2)[2], [k]) for k in keys]
    paths = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, series in panels:
        fig, ax = plt.subplots(figsize=(4.2, 2.8), dpi=90)
        drawn = False
        for k in series:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and "step" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=k, marker="o" if k == "eval/loss" else None, markersize=3)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_title(f"SFT loss: {name}", fontsize=10)
        ax.set_xlabel("optimiser step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"loss_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


SWEEP_DIR = "tune"  # tune.dir's default
SWEEP_PLOTS = ("settings.png", "metric_vs_step.png")


def find_sweeps(root: Path) -> list[Path]:
    """The finished sweeps in the run folder: every sub-folder holding a sweep's ``summary.json`` (it names the
    sweep's identity) beside its ``sweep.json``; ``tune/`` first. The report reads no config, so a sweep in
    another ``tune.dir`` is found by its files."""
    found = [d for d in sorted(root.iterdir()) if d.is_dir() and (d / "sweep.json").exists()
             and "sweep" in (_json(d / "summary.json") or {})]
    return sorted(found, key=lambda d: d.name != SWEEP_DIR)


def collect_sweep(d: Path) -> dict[str, Any]:
    """A sweep's summary as the report shows it: the metric, the settings (best first), the best setting and
    trial, the plots that exist."""
    sm = _json(d / "summary.json")
    best_params = sm.get("best_params") or {}
    return {"dir": d, "metric": sm.get("metric"), "mode": sm.get("mode"), "trials": sm.get("trials"),
            "errors": sm.get("errors"), "stopped_early": sm.get("stopped_early"),
            "settings": sm.get("settings") or [], "best_setting": sm.get("best_setting"),
            "best_trial": sm.get("best_trial"), "best_metric": sm.get("best_metric"),
            "best_seed": best_params.get("run.seed"),
            "plots": [d / f for f in SWEEP_PLOTS if (d / f).exists()]}


def _mean_interval(s: dict[str, Any], metric: str) -> str:
    """``mean ± half-width of the 95% interval`` (the mean alone for one seed)."""
    mean, lo, hi = s.get(f"mean_{metric}"), s.get("ci95_low"), s.get("ci95_high")
    if not isinstance(mean, (int, float)):
        return ""
    return f"{mean:.4f}" if lo is None or hi is None else f"{mean:.4f} ± {(hi - lo) / 2:.4f}"


def sweep_table(sw: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    m = sw["metric"]
    return (["setting", "n", f"mean {m} ± 95% interval", "std", "mark", "seeds"],
            [[s.get("setting"), s.get("n"), _mean_interval(s, m), s.get(f"std_{m}"), s.get("mark"), s.get("seeds")]
             for s in sw["settings"]])


def _sweep_title(sw: dict[str, Any]) -> str:
    return "Sweep" if sw["dir"].name == SWEEP_DIR else f"Sweep {sw['dir'].name}"


def _sweep_line(sw: dict[str, Any]) -> str:
    """The sweep in one sentence: its size, the best setting and the trial it exported."""
    head = (f"{sw['trials']} trials in {len(sw['settings'])} settings ({sw['errors']} failed, {sw['stopped_early']} "
            f"stopped early), ranked by `{sw['metric']}` ({sw['mode']}), the mean over seeds of each trial's best value. ")
    b = sw["best_setting"]
    if not b:
        return head + "No trial reported the metric."
    seed = f" (seed {sw['best_seed']})" if sw["best_seed"] is not None else ""
    return head + (f"Best setting: **{b.get('setting')}**, {_mean_interval(b, sw['metric'])} over {b.get('n')} "
                   f"trial(s); its best trial `{sw['best_trial']}`{seed}, {_fmt(sw['best_metric'])}, is the one in "
                   f"`{sw['dir'].name}/best_config.yaml` and `best_model/`.")


# --- rendering ---------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    esc = [[_fmt(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])


def metrics_table(metrics: dict[str, Any] | None) -> tuple[list[str], list[list[Any]]]:
    if metrics is None:
        return [], []
    return ["", *metrics["keys"]], [[r["name"], *[r.get(k) for k in metrics["keys"]]] for r in metrics["rows"]]


def build(root: str | Path) -> dict[str, Any]:
    """Every section's content (plain data), from the run folder."""
    root = Path(root)
    sft_rows, sft_stats = collect_sft(root)
    return {"root": str(root), "config": _json(root / "pipeline.json") is not None,
            "stages": collect_stages(root), "teacher": collect_teacher(root), "sa_init": collect_sa_init(root),
            "sft_rows": sft_rows, "sft": sft_stats, "rl": collect_rl(root), "rl_ran": (root / "rl").exists(),
            "metrics": collect_metrics(root), "examples": collect_examples(root),
            "sweeps": [collect_sweep(d) for d in find_sweeps(root)]}


def render_markdown(rep: dict[str, Any], plots: list[Path], root: Path) -> str:
    out = [f"# tsrec run report\n\nRun folder: `{rep['root']}`\n", "## Stages\n"]
    out.append(_md_table(["stage", "status", "time (s)", "key counts", "folder"],
                         [[s["stage"], s["status"], s["seconds"], s["counts"], s["folder"]] for s in rep["stages"]]))
    for sw in rep.get("sweeps", []):
        out.append(f"\n## {_sweep_title(sw)}\n")
        out.append(_sweep_line(sw) + "\n")
        out.append(_md_table(*sweep_table(sw)))
        rel = sw["dir"].relative_to(root).as_posix()
        out.append(f"\nPer-trial table: [{rel}/results.md]({rel}/results.md); mark `within seed spread`: the "
                   "setting's mean differs from the best's by less than the larger of their seed stds.\n")
        out.extend(f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in sw["plots"])
    out.append("\n## Teacher semantics\n")
    t = rep["teacher"]
    if t is None:
        out.append(f"Teacher extraction: {NOT_RUN}.")
    else:
        out.append(f"Engine `{t['engine']}`, model `{t['model']}`: **{t['ok']} valid**, **{t['failed']} failed** "
                   f"of {t['requested']} requested token records.\n")
        for e in t["examples"]:
            out.append(f"- `{e['token']}`: {e['description']}  \n  keywords: {', '.join(map(str, e['keywords']))}")
        for e in t["failures"]:
            out.append(f"- failed `{e['token']}`: {e['error']}")
    out.append("\n## SA-Init\n")
    s = rep["sa_init"]
    if s is None:
        out.append(f"Model init: {NOT_RUN}.")
    else:
        out.append(f"Depth **{s['depth']}** (source: {s['source']}): **{s['sa_init_rows']}** of {s['sid_tokens']} SID "
                   f"token rows initialised from teacher keywords; row kinds {s['init_kinds']}; tied head: {s['tied']}.")
    out.append("\n## SFT loss\n")
    if rep["sft"] is None:
        out.append(f"SFT: {NOT_RUN}.")
    elif not plots:
        out.append("SFT ran but `metrics.csv` has no loss rows.")
    else:
        st = rep["sft"]
        out.append(f"{st.get('steps')} steps; final train loss {_fmt(st.get('final_train_loss'))}, "
                   f"final validation loss {_fmt(st.get('final_val_loss'))}.\n")
        out.extend(f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in plots)
    if rep["rl_ran"]:
        out.append("\n## RL\n")
        st = rep["rl"]
        if st is None:
            out.append(f"RL: {NOT_RUN}.")
        else:
            out.append(_rl_line(st) + "\n")
            out.append(_md_table(*_rl_table(st)))
            if st["plot"] is not None:
                out.append(f"\n![rl]({st['plot'].relative_to(root).as_posix()})")
    out.append("\n## Metrics\n")
    m = rep["metrics"]
    if m is None:
        out.append(f"Evaluation: {NOT_RUN}.")
    else:
        out.append(f"{m['n']} {m['split']} rows, beam width {m['beams']}; the baselines are scored on the same rows "
                   "(popularity and first-order transitions from the train split).\n")
        out.append(_md_table(*metrics_table(m)))
        if m.get("baselines_note"):
            out.append(f"\nBaselines skipped: {m['baselines_note']}")
        if m.get("sasrec_note"):
            out.append(f"\n{m['sasrec_note']}")
        if m.get("published"):
            pub = m["published"]
            out.append(f"\nPublished results on {pub['dataset']} (not run here; {'; '.join(pub['sources'])}):\n")
            out.append(_md_table(["", "setting", *pub["keys"]], pub["rows"]))
    out.append("\n## Example recommendations\n")
    if rep["examples"] is None:
        out.append(f"Evaluation: {NOT_RUN}.")
    for e in rep["examples"] or []:
        hit = f"hit at rank {e['hit_rank']}" if e["hit_rank"] else "no hit in the beam"
        out.append(f"**Row {e['row']}** ({hit})\n\n- history: " + " → ".join(e["history"]) +
                   f"\n- target: **{e['target']}**\n- top-{len(e['recs'])}: " +
                   "; ".join(f"{r['rank']}. {r['title']}{' ✅' if r['hit'] else ''}" for r in e["recs"]) + "\n")
    return "\n".join(out) + "\n"


def _h(v: Any) -> str:
    return html.escape(_fmt(v))


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_h(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;font-size:.9em;text-align:left}
th{background:#f0f0f0}code{background:#f4f4f4;padding:0 .2em}.hit{color:#0a7d12;font-weight:bold}
.notrun{color:#999;font-style:italic}img{margin:.3em;border:1px solid #ddd;max-width:100%;height:auto}.ex{margin:.8em 0;padding:.5em;border-left:3px solid #ccc}"""


def _md_inline_html(text: str) -> str:
    """A report sentence with ``**bold**`` and ```code``` as HTML (escaped first)."""
    text = re.sub(r"[*][*](.+?)[*][*]", r"<b>\1</b>", html.escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def render_html(rep: dict[str, Any], plots: list[Path]) -> str:
    nr = f"<p class='notrun'>{NOT_RUN}</p>"
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>tsrec run report</title><style>{CSS}</style>"
           f"</head><body><h1>tsrec run report</h1><p>Run folder: <code>{_h(rep['root'])}</code></p><h2>Stages</h2>"]
    out.append(_html_table(["stage", "status", "time (s)", "key counts", "folder"],
                           [[s["stage"], s["status"], s["seconds"], s["counts"], s["folder"]] for s in rep["stages"]]))
    for sw in rep.get("sweeps", []):
        out.append(f"<h2>{_h(_sweep_title(sw))}</h2><p>{_md_inline_html(_sweep_line(sw))}</p>")
        out.append(_html_table(*sweep_table(sw)))
        out.append("<p>Mark <i>within seed spread</i>: the setting's mean differs from the best's by less than the "
                   "larger of their seed stds.</p><div>")
        out.extend(f"<img alt='{_h(p.stem)}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
                   for p in sw["plots"])
        out.append("</div>")
    out.append("<h2>Teacher semantics</h2>")
    t = rep["teacher"]
    if t is None:
        out.append(nr)
    else:
        out.append(f"<p>Engine <code>{_h(t['engine'])}</code>, model <code>{_h(t['model'])}</code>: <b>{_h(t['ok'])} "
                   f"valid</b>, <b>{_h(t['failed'])} failed</b> of {_h(t['requested'])} requested token records.</p><ul>")
        out.extend(f"<li><code>{_h(e['token'])}</code>: {_h(e['description'])}<br><small>keywords: "
                   f"{_h(', '.join(map(str, e['keywords'])))}</small></li>" for e in t["examples"])
        out.extend(f"<li>failed <code>{_h(e['token'])}</code>: {_h(e['error'])}</li>" for e in t["failures"])
        out.append("</ul>")
    out.append("<h2>SA-Init</h2>")
    s = rep["sa_init"]
    out.append(nr if s is None else
               f"<p>Depth <b>{_h(s['depth'])}</b> (source: {_h(s['source'])}): <b>{_h(s['sa_init_rows'])}</b> of "
               f"{_h(s['sid_tokens'])} SID token rows initialised from teacher keywords; row kinds "
               f"{_h(s['init_kinds'])}; tied head: {_h(s['tied'])}.</p>")
    out.append("<h2>SFT loss</h2>")
    if rep["sft"] is None:
        out.append(nr)
    else:
        st = rep["sft"]
        out.append(f"<p>{_h(st.get('steps'))} steps; final train loss {_h(st.get('final_train_loss'))}, final "
                   f"validation loss {_h(st.get('final_val_loss'))}.</p><div>")
        out.extend(f"<img alt='{_h(p.stem)}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
                   for p in plots)
        out.append("</div>")
    if rep["rl_ran"]:
        out.append("<h2>RL</h2>")
        st = rep["rl"]
        if st is None:
            out.append(nr)
        else:
            line = re.sub(r"[*][*](.+?)[*][*]", r"<b>\1</b>", html.escape(_rl_line(st)).replace("`", ""))
            out.append(f"<p>{line}</p>")
            out.append(_html_table(*_rl_table(st)))
            if st["plot"] is not None:
                out.append(f"<img alt='rl' src='data:image/png;base64,{base64.b64encode(st['plot'].read_bytes()).decode()}'>")
    out.append("<h2>Metrics</h2>")
    m = rep["metrics"]
    if m is None:
        out.append(nr)
    else:
        out.append(f"<p>{_h(m['n'])} {_h(m['split'])} rows, beam width {_h(m['beams'])}; the baselines are scored on the "
                   "same rows (popularity and first-order transitions from the train split).</p>")
        out.append(_html_table(*metrics_table(m)))
        if m.get("baselines_note"):
            out.append(f"<p>Baselines skipped: {_h(m['baselines_note'])}</p>")
        if m.get("sasrec_note"):
            out.append(f"<p>{_h(m['sasrec_note'])}</p>")
        if m.get("published"):
            pub = m["published"]
            out.append(f"<p>Published results on {_h(pub['dataset'])} (not run here; {_h('; '.join(pub['sources']))}):</p>")
            out.append(_html_table(["", "setting", *pub["keys"]], pub["rows"]))
    out.append("<h2>Example recommendations</h2>")
    if rep["examples"] is None:
        out.append(nr)
    for e in rep["examples"] or []:
        hit = f"hit at rank {e['hit_rank']}" if e["hit_rank"] else "no hit in the beam"
        recs = "".join(f"<li{' class=hit' if r['hit'] else ''}>{_h(r['title'])}{' ✔' if r['hit'] else ''}</li>"
                       for r in e["recs"])
        out.append(f"<div class='ex'><b>Row {_h(e['row'])}</b> ({hit})<br>history: {_h(' → '.join(e['history']))}<br>"
                   f"target: <b>{_h(e['target'])}</b><ol>{recs}</ol></div>")
    out.append("</body></html>")
    return "".join(out)


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``report_files/*.png`` into ``run_dir``; returns their paths."""
    root = Path(run_dir)
    if not root.is_dir():
        from tsrec.artifacts import InputError

        raise InputError(root, "run folder not found")
    rep = build(root)
    plots = loss_plots(rep["sft_rows"], root / "report_files") if rep["sft"] is not None else []
    md, page = root / "report.md", root / "report.html"
    atomic_write_text(md, render_markdown(rep, plots, root))
    atomic_write_text(page, render_html(rep, plots))
    return {"markdown": md, "html": page}


def console_summary(run_dir: str | Path) -> str:
    """The few lines ``tsrec run`` ends with: the metrics table (model vs baselines) and the report path."""
    root = Path(run_dir)
    m = collect_metrics(root)
    lines = []
    if m is None:
        lines.append(f"evaluation: {NOT_RUN}")
    else:
        header, rows = metrics_table(m)
        keys = [k for k in header[1:] if k.endswith(("@5", "@10"))] or header[1:]
        w = max([22, *(len(r["name"]) + 1 for r in m["rows"])])
        lines.append(f"{m['split']} ({m['n']} rows)".ljust(w) + "".join(k.rjust(9) for k in keys))
        for r in m["rows"]:
            lines.append(r["name"].ljust(w) + "".join(_fmt(r.get(k)).rjust(9) for k in keys))
    for sw in (collect_sweep(d) for d in find_sweeps(root)):
        b = sw["best_setting"]
        if b:
            lines.append(f"{sw['dir'].name}: best setting {b.get('setting')}, {sw['metric']} "
                         f"{_mean_interval(b, sw['metric'])} (mean ± 95% interval) over {b.get('n')} seed(s)")
    lines.append(f"report: {root / 'report.md'} (and report.html)")
    return "\n".join(lines)
