"""``tsrec run``: the pipeline's stages in order, on an in-process local Ray or a remote cluster.

Stages (``pipeline.stages`` in the config) write under ``run.out_dir``:

    data/       items.parquet, train/valid/test.parquet            (tsrec data prepare)
    sids/       index.json, sids.parquet, stats.json               (tsrec sid build; embeddings on Ray Data)
    semantics/  description_keywords.json, semantics.parquet       (tsrec semantics extract)
    model/      Hugging Face folder with SID tokens, SA-Init       (tsrec model init)
    sft/        model/ (HF folder), metrics.csv, loss.png          (tsrec sft, Ray Train + DeepSpeed)
    rl/         model/ (best on valid), metrics.csv, rl.png         (tsrec rl, GRPO on Ray Train + DeepSpeed)
    eval/       metrics.json, rankings.parquet                     (tsrec eval, sharded over actors)

A stage is skipped when its folder is complete (``manifest.json`` exists) and was produced with the
same resolved config; otherwise it reruns. ``--force`` reruns everything, and SFT then starts over
instead of resuming its run (a changed config gets a new SFT run identity and starts fresh anyway).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from tsrec.artifacts import atomic_write_json, is_complete, read_manifest
from tsrec.config import Config, save_config

STAGE_DIRS = {"data": "data", "sid": "sids", "semantics": "semantics", "model": "model", "sft": "sft", "rl": "rl", "eval": "eval"}


def _data(cfg: Config, root: Path) -> dict:
    from tsrec.data.prepare import prepare_data

    return prepare_data(cfg, root / "data")


def _sid(cfg: Config, root: Path) -> dict:
    if cfg.sid.method == "import":  # an existing index.json: checked and written on the driver, no Ray workers
        from tsrec.sid.imported import import_sids

        return import_sids(cfg, root / "data", root / "sids")
    from tsrec.data.schema import read_items
    from tsrec.orchestration.embed import embed_items_ray
    from tsrec.sid.build import build_sids

    embeddings = embed_items_ray(cfg, read_items(root / "data"))  # Ray Data actor pool
    return build_sids(cfg, root / "data", root / "sids", embeddings=embeddings)


def _semantics(cfg: Config, root: Path) -> dict:
    from tsrec.orchestration.semantics import extract_semantics

    return extract_semantics(cfg, root / "sids", root / "data", root / "semantics")


def _model(cfg: Config, root: Path) -> dict:
    from tsrec.model import init_model

    teacher = root / "semantics" / "description_keywords.json"
    return init_model(cfg, root / "sids", teacher if teacher.exists() else None, root / "model")


def _sft(cfg: Config, root: Path, force: bool = False) -> dict:
    from tsrec.orchestration.train import run_sft

    return run_sft(
        cfg,
        model_dir=root / "model",
        data_dir=root / "data",
        sids_dir=root / "sids",
        semantics_file=root / "semantics" / "description_keywords.json",
        out_dir=root / "sft",
        force=force,
    )


def _rl(cfg: Config, root: Path, force: bool = False) -> dict:
    from tsrec.orchestration.rl import run_rl

    return run_rl(cfg, model_dir=root / "sft" / "model", data_dir=root / "data", sids_dir=root / "sids",
                  semantics_file=root / "semantics" / "description_keywords.json", out_dir=root / "rl", force=force)


def _eval(cfg: Config, root: Path) -> dict:
    from tsrec.orchestration.evaluate import run_eval

    # The last training stage's model: RL (best on valid), else SFT, else the initialised model.
    model = (root / "rl" / "model" if "rl" in cfg.pipeline.stages
             else root / "sft" / "model" if "sft" in cfg.pipeline.stages else root / "model")
    return run_eval(cfg, model, root / "data", root / "sids", root / "eval")


STAGES: dict[str, Callable[[Config, Path], dict]] = {
    "data": _data,
    "sid": _sid,
    "semantics": _semantics,
    "model": _model,
    "sft": _sft,
    "rl": _rl,
    "eval": _eval,
}


def validate_stages(cfg: Config) -> None:
    from tsrec.config import ConfigError

    unknown = [s for s in cfg.pipeline.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"pipeline.stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
    order = [s for s in STAGES if s in cfg.pipeline.stages]
    if order != list(cfg.pipeline.stages):
        raise ConfigError(f"pipeline.stages: must follow the pipeline order {list(STAGES)}")
    if "sft" in order:
        from tsrec.train.ranking import check_best_metric

        check_best_metric(cfg.sft)


MARKER = "pipeline_stage.json"
# Stages seeded by run.upstream_seed (run.data_seed, else run.seed); the later ones by run.seed.
UPSTREAM_STAGES = ("data", "sid", "semantics")


# Config sections each stage's output depends on (its own and its upstream stages'), so changing
# eval.beams reruns only eval, while changing data.* reruns everything.
STAGE_SECTIONS = {
    "data": ["data"],
    "sid": ["embed", "sid"],
    "semantics": ["teacher"],
    "model": ["model", "sa_init"],
    "sft": ["sft", "prompts"],
    "rl": ["rl", "prompts"],
    "eval": ["eval", "prompts"],
}


def _config_hash(cfg: Config, stage: str) -> str:
    full = cfg.to_dict()
    upstream = list(STAGES)[: list(STAGES).index(stage) + 1]
    seed = cfg.run.upstream_seed if stage in UPSTREAM_STAGES else cfg.run.seed
    relevant = {"seed": seed, **{sec: full[sec] for s in upstream for sec in STAGE_SECTIONS[s]}}
    if stage not in UPSTREAM_STAGES and cfg.run.data_seed is not None:  # and the upstream it was trained on
        relevant["data_seed"] = cfg.run.data_seed
    if "sid" in upstream and cfg.sid.method == "import":
        # The imported index's content, not only its path: an edited file reruns sid and every later stage;
        # likewise the teacher file the import checks its tokens against (teacher.engine=file).
        from tsrec.sid.imported import import_fingerprints

        relevant["sid_import_inputs"] = import_fingerprints(cfg)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def _manifest_sha(stage_dir: Path) -> str | None:
    path = stage_dir / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _up_to_date(cfg: Config, stage: str, stage_dir: Path) -> bool:
    """Complete (manifest written) and produced by `tsrec run` with the same resolved config.

    The marker also pins the manifest it was written with: a stage command run by hand into the same
    folder afterwards (e.g. `tsrec sft` with another lr) replaces the outputs, so they are not skipped."""
    marker = stage_dir / MARKER
    if not is_complete(stage_dir) or not marker.exists():
        return False
    try:
        found = json.loads(marker.read_text())
    except (ValueError, OSError):
        return False
    return found.get("config_sha256") == _config_hash(cfg, stage) and found.get("manifest_sha256") == _manifest_sha(stage_dir)


def run_stage(cfg: Config, name: str, root: Path, force: bool = False, log: Callable[[str], None] = print,
              tag: str = "tsrec run") -> tuple[dict, float | None]:
    """One pipeline stage into ``root / STAGE_DIRS[name]``, skipped when up to date (:func:`_up_to_date`)
    unless ``force``. Returns its stats and its seconds (None when skipped). `tsrec run` runs every
    stage through it, `tsrec tune` the stages upstream of its trials."""
    stage_dir = root / STAGE_DIRS[name]
    if not force and _up_to_date(cfg, name, stage_dir):
        log(f"[{tag}] {name}: up to date in {stage_dir}, skipped")
        return {"skipped": True, **read_manifest(stage_dir).get("stats", {})}, None
    log(f"[{tag}] {name}: running -> {stage_dir}")
    t0 = time.perf_counter()
    # --force must not resume a half-done or finished training run: it starts that run over.
    result = (STAGES[name](cfg, root, force=True) if force and name in ("sft", "rl") else STAGES[name](cfg, root)) or {}
    seconds = round(time.perf_counter() - t0, 2)
    atomic_write_json(stage_dir / MARKER, {"stage": name, "config_sha256": _config_hash(cfg, name),
                                           "manifest_sha256": _manifest_sha(stage_dir), "seconds": seconds})
    log(f"[{tag}] {name}: done in {seconds} s")
    if name == "semantics" and result.get("tokens_requested"):  # METHOD.md 1.4 contract outcome
        log(f"[{tag}] semantics: {result['ok']}/{result['tokens_requested']} tokens with valid semantics "
            f"({result['valid_share']:.1%}); the rest are initialised without them (tsrec model init)")
    return result, seconds


def run_pipeline(cfg: Config, force: bool = False, log: Callable[[str], None] = print, verbose: bool = False) -> dict:
    """Run ``cfg.pipeline.stages`` in order; returns ``{stage: stats}`` and writes ``pipeline.json``,
    ``report.md`` / ``report.html``, and ends with the summary (metrics table, report path) on ``log``.

    Ray's own progress and INFO lines go to ``<out>/logs/ray.log`` unless ``verbose`` (when this
    process starts or joins Ray; a process already connected keeps its setup)."""
    from tsrec.orchestration.cluster import ensure_ray

    validate_stages(cfg)
    root = Path(cfg.run.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    ensure_ray(cfg, log_dir=None if verbose else root / "logs")
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for name in cfg.pipeline.stages:
        results[name], seconds = run_stage(cfg, name, root, force=force, log=log)
        if seconds is not None:
            timings[name] = seconds
    summary = {"out_dir": str(root), "stages": results, "timing_s": timings}
    atomic_write_json(root / "pipeline.json", json.loads(json.dumps(summary, default=str)))
    from tsrec.report import console_summary, write_report

    write_report(root)
    log(console_summary(root))
    return summary
