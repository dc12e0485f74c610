"""``tsrec tune``: Ray Tune sweeps over config keys, each trial an SFT ``TorchTrainer`` (STACK.md 4).

    tsrec tune --config configs/sweeps/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/tune.py --config configs/sweeps/industrial_qwen2.5-1.5b.yaml

1. The space is validated (``tsrec.tune.space``) and the concurrent trials are checked against
   ``ray.cluster_resources()`` before anything runs (:class:`TuneResourceError` names what is short).
2. Shared upstream: the pipeline's cached stages data, sid, semantics under ``run.out_dir``
   (``tsrec.orchestration.pipeline.run_stage``: skipped when up to date, as in ``tsrec run``); then one initialised model per distinct model/sa_init
   combination of the space (``<tune>/inits/``), built before the Tuner starts.
3. Per trial: a function trainable (a small CPU share) runs the SFT recipe on Ray Train through
   ``tsrec.orchestration.train.fit_trainer`` (placement, restarts and checkpoints as ``tsrec sft``) with
   the trial's config (``tsrec.tune.space.trial_config``: ``sft.valid_ranking_sample = tune.valid_sample_size``,
   ``sft.best_metric`` from ``tune.metric``, so its ``best/`` model is its best-metric step); every report goes to Tune
   through :class:`_Report` (``eval/x`` -> ``valid_x``, ``steps`` = step + 1), ASHA stops on ``tune.metric``
   with ``steps`` as its time. Each start appends a marker under ``<tune>/trial_starts/``.
4. Resume: the experiment lives in ``<tune>/ray/sweep-<identity>`` (``tsrec.tune.identity``: the resolved
   config minus where outputs go, the space, scheduler and search settings, the upstream folders'
   fingerprints); rerunning the same command restores it (``Tuner.restore``): finished trials keep their
   results, unfinished ones restart and their ``TorchTrainer`` (same name and storage) resumes from its last
   checkpoint. A changed space, base config or upstream has another identity: a new experiment in its own
   folder (the old outputs in ``<tune>/`` are removed first, so they always belong to ``<tune>/sweep.json``).
   Model inits are keyed on the model/sa_init sections, the seed and the SID and teacher-file fingerprints.
   Storage: with ``tune.storage_path`` (``s3://bucket/prefix``, ``run.storage_endpoint`` as for SFT) the experiment
   (``<storage>/ray/sweep-<identity>``) and the trials' Ray Train runs (``<storage>/trials/trial-<id>``) live
   there and are restored from there (``Tuner.restore`` with the same pyarrow filesystem); the identity does not
   depend on it. Inits, trial-start markers and the outputs stay local in ``<tune>/``; ``best_model/`` is fetched.
   The storage is checked before anything starts (``tsrec.orchestration.storage.check_storage``: ConfigError).
5. Outputs in ``<run.out_dir>/<tune.dir>/``: sweep.json, results.csv, results.md, metric_vs_step.png,
   best_by_depth_weight.png, best_config.yaml, best_model/ (HF folder; copied again only when the best
   trial or its model changed), best_test_eval/ (eval_test). Equal metrics are ranked by
   ``tsrec.tune.results.trial_rows``'s tie-break, so a rerun picks the same best trial.
6. Console: Ray's own progress and INFO lines go to ``<run.out_dir>/logs/ray.log`` (``verbose``: the console),
   as for ``tsrec run``; the sweep prints its own lines and ends with the results table.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tsrec.config import Config
from tsrec.tune.identity import (EXPERIMENT_PREFIX, experiment_dir, identity_payload, recorded_identity,
                                 sweep_identity, upstream_fingerprints)
from tsrec.tune.space import (Param, apply_params, check_resources, count_trials, init_key, init_variants,
                              parse_space, sft_best_metric, trial_config)

UPSTREAM = ("data", "sid", "semantics")
# What a sweep writes in <tune>/ besides its experiment, trials and inits: removed when the sweep changed.
OUTPUTS = ("results.csv", "results.md", "settings.csv", "metric_vs_step.png", "settings.png", "best_by_depth_weight.png",
           "best_config.yaml", "summary.json", "best_model", "best_model.json", "best_test_eval")


def run_tune(cfg: Config, log: Callable[[str], None] = print, verbose: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep of ``cfg.tune``; returns the summary written to ``<tune>/summary.json``.

    Ray's own progress and INFO lines go to ``<run.out_dir>/logs/ray.log`` unless ``verbose`` (or this process
    is already connected to Ray)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tsrec.orchestration.cluster import ensure_ray
    from tsrec.orchestration.storage import check_storage, ray_storage

    t = cfg.tune
    params = parse_space(t)
    sft_best_metric(cfg)  # metric/mode coherent with what each trial keeps as its best model
    n_trials = count_trials(params, t)
    root = Path(cfg.run.out_dir).resolve()
    tune_dir = root / t.dir
    endpoint = cfg.run.storage_endpoint
    storage = _resolve_storage(t.storage_path)  # "" = <tune>/ on local disk
    check_storage(storage, endpoint, "tune.storage_path")  # unknown scheme, unreachable bucket: before anything
    # Quiet: the trials' own lines (each trial's [sft] progress, Ray Train's controller, the actors' shutdown
    # noise) stay in Ray's session logs; the driver prints one line per finished trial (_progress_callback).
    ensure_ray(cfg, log_dir=None if verbose else root / "logs", worker_logs=verbose)
    concurrent = check_resources(t, n_trials, ray.cluster_resources())  # before anything starts
    log(f"[tsrec tune] {n_trials} trial(s), {concurrent} at once, metric {t.metric} ({t.mode}) -> {tune_dir}")

    # --- shared upstream: the pipeline's cached stages, then one init per model/sa_init combination ---
    _upstream(cfg, root, log)
    base = cfg.to_dict()
    base["run"]["out_dir"] = str(root)
    base["tune"]["storage_path"] = storage  # resolved here: the trials read it (not part of the identity)
    inputs = upstream_fingerprints(root)  # after the upstream stages: what the trials will read
    identity = sweep_identity(base, inputs)
    # The experiment: <storage>/ray/sweep-<identity>, <storage> = tune.storage_path or <tune>/; its name is the one
    # _claim gives (the identity check: a changed sweep never restores another sweep's experiment).
    exp_name = _claim(tune_dir, identity, identity_payload(base, inputs), log,
                      experiment=f"{_storage_root(base)}/ray/{EXPERIMENT_PREFIX}{identity}").name
    exp_uri = f"{_storage_root(base)}/ray/{exp_name}"
    for values in init_variants(params):
        icfg = apply_params(base, values)
        _init(icfg, root, tune_dir / "inits" / init_key(icfg, inputs), log)

    # --- the Tuner (new or restored) ---
    trainable = tune.with_resources(_make_trial_fn(base, root, tune_dir, inputs),
                                    {"CPU": t.resources.driver_cpus})
    # A custom S3 endpoint: Ray gets a pyarrow filesystem and paths inside it (ray_storage), also to restore.
    where = ray_storage(exp_uri, endpoint)
    exp_fs = where.get("storage_filesystem")
    if tune.Tuner.can_restore(where["storage_path"], storage_filesystem=exp_fs):
        log(f"[tsrec tune] resuming the sweep in {exp_uri}")
        tuner = tune.Tuner.restore(where["storage_path"], trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=exp_fs)
    else:
        max_t = t.scheduler.max_t or cfg.sft.max_steps or 10**9
        # stop_last_trials=False: a trial past the last rung runs to its own end (its final export and the
        # "finished" report complete) instead of being killed by ASHA on its report at max_t.
        scheduler = (ASHAScheduler(time_attr="steps", max_t=max_t, grace_period=t.scheduler.grace_period,
                                   reduction_factor=t.scheduler.reduction_factor, stop_last_trials=False)
                     if t.scheduler.type == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space={"params": _space(params, tune)},
            tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, scheduler=scheduler, search_alg=_searcher(cfg, concurrent),
                                        num_samples=t.num_samples,
                                        # the random/grid generator limits itself (see _searcher); Tune would
                                        # ignore the value with a console warning
                                        max_concurrent_trials=concurrent if t.search == "optuna" else None),
            run_config=tune.RunConfig(name=exp_name, **ray_storage(f"{_storage_root(base)}/ray", endpoint), verbose=0))
    # A restored Tuner keeps the run config it was saved with: the progress callback is set on it again.
    tuner._local_tuner.get_run_config().callbacks = [_progress_callback(log, n_trials, t.metric)]
    with _tune_console(verbose):
        grid = tuner.fit()

    # --- outputs ---
    trials = sorted((_record(r, base) for r in grid), key=lambda r: str(r["trial_id"]))
    return _write_outputs(cfg, base, trials, tune_dir, root, log, identity)


@contextmanager
def _tune_console(verbose: bool):
    """Around ``Tuner.fit``: Tune's new output engine prints its experiment box and "View detailed results here"
    even at ``verbose=0``; a quiet sweep uses the old engine, silent at 0 (``RAY_AIR_NEW_OUTPUT=0``, read when
    the fit starts). The variable is restored afterwards (tests run several sweeps in one process)."""
    if verbose:
        yield
        return
    old = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old


def _resolve_storage(storage_path: str) -> str:
    """``tune.storage_path`` as the trials will read it: "" stays "" (``<tune>/``), a local path absolute (the
    driver's working folder), a URI without its trailing slash."""
    s = storage_path.strip()
    if not s or "://" in s:
        return s.rstrip("/")
    return str(Path(s).resolve())


def _storage_root(base: dict[str, Any]) -> str:
    """Where the experiment (``ray/sweep-<identity>``) and the trials' Ray Train runs (``trials/trial-<id>``) live:
    ``tune.storage_path`` as :func:`run_tune` resolved it into ``base``, else ``<run.out_dir>/<tune.dir>``."""
    return base["tune"]["storage_path"] or str(Path(base["run"]["out_dir"]) / base["tune"]["dir"])


def _claim(tune_dir: Path, identity: str, payload: dict[str, Any], log, experiment: str | None = None) -> Path:
    """Make ``<tune>/`` the folder of the sweep ``identity`` and return its local Tune experiment folder
    (``<tune>/ray/sweep-<identity>``: restored if it holds a saved experiment, else created).

    When ``sweep.json`` names another sweep (or none), the outputs in ``<tune>/`` (table, plots, best config and
    model, summary) are removed, so nothing there can be read as this sweep's; the other sweep's experiment folder
    stays (rerunning that sweep restores it). Then ``sweep.json`` records this sweep and where its experiment is
    (``experiment``: a URI under ``tune.storage_path``; default the local folder). The same sweep with its
    experiment elsewhere (``tune.storage_path`` changed) keeps its outputs; ``sweep.json`` is updated and the
    driver says so (Tune restores only from the experiment's own storage)."""
    from tsrec.artifacts import atomic_write_json

    experiment = experiment or str(experiment_dir(tune_dir, identity))
    old = recorded_identity(tune_dir)
    if old is not None and old != identity:
        log(f"[tsrec tune] the sweep changed (config, space or upstream inputs): identity {old} -> {identity}; "
            f"a new experiment in {experiment_dir(tune_dir, identity)} (the old one stays in "
            f"{experiment_dir(tune_dir, old)}); removing the old sweep's outputs from {tune_dir}")
    if old != identity:
        for name in OUTPUTS:
            f = tune_dir / name
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink(missing_ok=True)
        tune_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(tune_dir / "sweep.json", json.loads(json.dumps(
            {"identity": identity, "experiment": experiment, **payload}, default=str)))
    else:
        recorded = _read_json(tune_dir / "sweep.json")
        if recorded.get("experiment") != experiment:
            log(f"[tsrec tune] the sweep's experiment is now {experiment} (was {recorded.get('experiment')}): "
                f"a sweep is restored only from its own storage (tune.storage_path)")
            atomic_write_json(tune_dir / "sweep.json", {**recorded, "experiment": experiment})
    return experiment_dir(tune_dir, identity)


def _space(params: list[Param], tune) -> dict[str, Any]:
    make = {"grid": lambda v: tune.grid_search(list(v)), "choice": lambda v: tune.choice(list(v)),
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {p.key: make[p.kind](p.values) for p in params}


def _searcher(cfg: Config, concurrent: int):
    from ray.tune.search import BasicVariantGenerator

    if cfg.tune.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
            import optuna  # noqa: F401
        except ImportError:
            from tsrec.tune.space import SweepSpaceError

            raise SweepSpaceError("tune.search=optuna needs the optuna package (pip install optuna); "
                                  "or use tune.search=random") from None
        return OptunaSearch(seed=cfg.run.seed)
    # Seeded random samples. A search algorithm passed in ignores TuneConfig.max_concurrent_trials: the
    # generator's own max_concurrent is what keeps trials (and their Train groups) within the check above.
    return BasicVariantGenerator(random_state=cfg.run.seed, max_concurrent=concurrent)


def _upstream(cfg: Config, root: Path, log) -> None:
    """data, sid, semantics as `tsrec run` runs them (the pipeline's own stage runner): skipped when their
    folders are up to date."""
    from tsrec.orchestration.pipeline import run_stage

    for name in UPSTREAM:
        if name in cfg.pipeline.stages:
            run_stage(cfg, name, root, log=log, tag="tsrec tune")


def _semantics_file(root: Path) -> Path | None:
    f = root / "semantics" / "description_keywords.json"
    return f if f.exists() else None


def _init(cfg: Config, root: Path, out: Path, log) -> Path:
    from tsrec.artifacts import is_complete
    from tsrec.model import init_model

    if not is_complete(out):
        log(f"[tsrec tune] model init (sa_init.depth={cfg.sa_init.depth}) -> {out}")
        init_model(cfg, root / "sids", _semantics_file(root), out)
    return out


def _make_trial_fn(base: dict[str, Any], root: Path, tune_dir: Path, inputs: dict[str, Any]):
    def trial(config: dict[str, Any]) -> None:
        from ray import tune

        from tsrec.orchestration.train import artifacts_uri, fit_trainer, loop_config, sft_worker

        trial_id = tune.get_context().get_trial_id()
        starts = tune_dir / "trial_starts"
        starts.mkdir(parents=True, exist_ok=True)
        (starts / f"{trial_id}.{time.time_ns()}").touch()  # one marker per start: resume is auditable
        cfg = trial_config(base, config["params"])  # ranking probe on, best/ chosen by tune.metric
        sem = _semantics_file(root) if cfg.sft.use_ts_align else None
        # <storage>/trials/trial-<id>: under tune.storage_path (a bucket) or <tune>/ (local)
        storage, name, endpoint = f"{_storage_root(base)}/trials", f"trial-{trial_id}", cfg.run.storage_endpoint
        # Same name + storage on a restored sweep: Ray Train resumes this trial from its last checkpoint.
        result = fit_trainer(
            sft_worker, loop_config(cfg, tune_dir / "inits" / init_key(cfg, inputs), root / "data", root / "sids", sem,
                                    artifacts_uri(storage, name), endpoint),
            cfg.tune.resources, name, storage, endpoint, cfg.sft.max_failures, callbacks=[_Report()],
            section="tune.resources")
        # Tells the results table this trial ran to its end (not stopped by the scheduler). Tune wants the
        # metric in every result: the last evaluation's values (the loop always evaluates its last step).
        tune.report({**_rename(result.metrics or {}), "sft_finished": 1})

    return trial


def _report_callback_class():
    from ray.tune.integration.ray_train import TuneReportCallback

    class Report(TuneReportCallback):
        """TuneReportCallback with sweep names: ``eval/ndcg@10`` -> ``valid_ndcg@10``, ``eval/loss`` ->
        ``valid_loss``, and ``steps`` (optimiser steps done) as the scheduler's time."""

        def after_report(self, run_context, metrics, checkpoint):
            # Only evaluation steps: Tune requires the metric in every result it gets.
            if metrics and "eval/loss" in metrics[0]:
                super().after_report(run_context, [_rename(m) for m in metrics], checkpoint)

    return Report


def _progress_callback(log, n_trials: int, metric: str):
    """A Tune callback that logs one line per trial as it ends: its values, its best ``metric`` and wall time,
    or its error (the trial's own lines are in Ray's session logs unless ``--verbose``)."""
    from ray.tune import Callback

    class Progress(Callback):
        def _line(self, trials, trial, what: str) -> None:
            # counted from Tune's trial states, so a resumed sweep counts the trials it restored as finished
            done = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")} | {trial.trial_id}
            values = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in (trial.config.get("params") or {}).items())
            log(f"[tsrec tune] trial {len(done)}/{n_trials} {trial.trial_id} ({values}): {what}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            value = r.get(metric)
            shown = f"{metric} {value:.4f}" if isinstance(value, (int, float)) else f"no {metric}"
            self._line(trials, trial, f"{shown} after {r.get('steps', '?')} steps, {r.get('time_total_s', 0):.0f} s")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, trial, f"ERROR {trial.error_file or ''} (the trial's own lines: Ray's session logs)")

    return Progress()


def _rename(m: dict[str, Any]) -> dict[str, Any]:
    out = {(f"valid_{k[5:]}" if k.startswith("eval/") else k): v for k, v in m.items() if not isinstance(v, dict)}
    if "step" in out:
        out["steps"] = int(out["step"]) + 1
    return out


def _Report():  # noqa: N802 - reads as the class it builds (defined lazily: Ray only on use)
    return _report_callback_class()()


def _record(result, base: dict[str, Any]) -> dict[str, Any]:
    """A plain trial record (tsrec.tune.results) from a Tune ``Result``."""
    from tsrec.orchestration.train import artifacts_uri

    df = result.metrics_dataframe
    history = []
    if df is not None and len(df):
        for row in df.to_dict("records"):
            history.append({k: (None if _isnan(v) else v) for k, v in row.items()})
    params = dict((result.config or {}).get("params", {}))
    cfg = apply_params(base, params)
    last = result.metrics or {}
    seen, points = set(), []
    for h in history:  # the final "finished" report repeats the last evaluation
        if h.get("steps") is not None and h["steps"] not in seen:
            seen.add(h["steps"])
            points.append(h)
    trial_id = last.get("trial_id") or Path(result.path).name
    return {"trial_id": trial_id, "params": params, "history": points,
            "finished": any(h.get("sft_finished") for h in history), "error": str(result.error) if result.error else None,
            "wall_s": last.get("time_total_s") or (history[-1].get("time_total_s") if history else 0.0),
            # the trial's planned length, for "stopped early": sft.max_steps, else the scheduler's max_t
            "max_steps": cfg.sft.max_steps or cfg.tune.scheduler.max_t or None, "path": result.path,
            # where its Ray Train run left its models (best/, final/): local or in tune.storage_path's bucket
            "artifacts": artifacts_uri(f"{_storage_root(base)}/trials", f"trial-{trial_id}"),
            "storage_endpoint": base["run"]["storage_endpoint"]}


def _isnan(v) -> bool:
    return isinstance(v, float) and v != v


def _write_outputs(cfg: Config, base, trials, tune_dir: Path, root: Path, log, identity: str) -> dict[str, Any]:
    from tsrec.artifacts import atomic_write_json
    from tsrec.tune.results import best_trial, settings_markdown, write_best_config, write_results

    t = cfg.tune
    rows, settings = write_results(trials, t.metric, t.mode, base, tune_dir)  # tables and plots
    best = best_trial(trials, t.metric, t.mode)  # the best trial of the best setting (mean over seeds)
    summary: dict[str, Any] = {"sweep": identity, "trials": len(trials), "metric": t.metric, "mode": t.mode,
                               "stopped_early": sum(bool(r["stopped_early"]) for r in rows),
                               "errors": sum(r["status"] == "error" for r in rows), "out": str(tune_dir),
                               "settings": settings}
    if best is not None:
        write_best_config(base, best["params"], tune_dir / "best_config.yaml")
        summary.update(best_setting=settings[0], best_trial=best["trial_id"], best_params=best["params"],
                       best_metric=next(r for r in rows if r["trial_id"] == best["trial_id"])[f"best_{t.metric}"])
        if t.export_best:
            dest, copied = _export_best(best, tune_dir)
            summary["best_model"] = str(dest)
            if t.eval_test:
                from tsrec.orchestration.evaluate import run_eval

                previous = _read_json(tune_dir / "summary.json")
                if not copied and "best_test" in previous and previous.get("best_trial") == best["trial_id"]:
                    summary["best_test"] = previous["best_test"]  # the same model was evaluated already
                else:
                    ecfg = trial_config(base, best["params"])
                    ecfg.eval.split = "test"
                    summary["best_test"] = run_eval(ecfg, dest, root / "data", root / "sids",
                                                    tune_dir / "best_test_eval")
    atomic_write_json(tune_dir / "summary.json", json.loads(json.dumps(summary, default=str)))
    log(settings_markdown(settings))  # the settings table last: trials are in results.md
    log(f"[tsrec tune] results: {tune_dir / 'results.md'}; best config: {tune_dir / 'best_config.yaml'}")
    return summary


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _export_best(best: dict[str, Any], tune_dir: Path) -> tuple[Path, bool]:
    """The best trial's ``best/`` HF folder (its best ``tune.metric`` step: ``sft.best_metric``; else its final
    one) -> ``<tune>/best_model``; returns ``(best_model, copied)``. ``<tune>/best_model.json`` names the
    trial and the source folder's fingerprint: when they still match, the folder is not copied again. The
    source is the trial record's ``artifacts`` (:func:`_record`): a local folder, or a ``tune.storage_path``
    bucket it is fetched from (fingerprint: the objects' names, sizes and modification times)."""
    from tsrec.artifacts import atomic_write_json
    from tsrec.orchestration.storage import exists, tree_fingerprint
    from tsrec.orchestration.train import copy_tree
    from tsrec.tune.identity import fingerprint

    arts = best.get("artifacts") or str(tune_dir / "trials" / f"trial-{best['trial_id']}" / "artifacts")
    endpoint = best.get("storage_endpoint") or ""
    remote = "://" in arts
    src = f"{arts}/best" if exists(f"{arts}/best/config.json", endpoint) else f"{arts}/final"
    dest = tune_dir / "best_model"
    if not exists(f"{src}/config.json", endpoint):
        raise FileNotFoundError(f"{src}: the best trial left no model folder")
    source = {"trial_id": best["trial_id"], "source": src.rsplit("/", 1)[-1],
              "fingerprint": tree_fingerprint(src, endpoint) if remote else fingerprint(src)}
    if (dest / "config.json").exists() and _read_json(tune_dir / "best_model.json") == source:
        return dest, False
    tmp = tune_dir / ".best_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if remote:
        copy_tree(src, str(tmp), endpoint)  # fetched from the bucket
    else:
        shutil.copytree(src, tmp)
    (tune_dir / "best_model.json").unlink(missing_ok=True)  # no claim while the folder is being replaced
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    atomic_write_json(tune_dir / "best_model.json", source)
    return dest, True
