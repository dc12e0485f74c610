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
from tsrec.tune.identity import (experiment_dir, identity_payload, recorded_identity, sweep_identity,
                                 upstream_fingerprints)
from tsrec.tune.space import (Param, apply_params, check_resources, count_trials, init_key, init_variants,
                              parse_space, sft_best_metric, trial_config)

UPSTREAM = ("data", "sid", "semantics")
# What a sweep writes in <tune>/ besides its experiment, trials and inits: removed when the sweep changed.
OUTPUTS = ("results.csv", "results.md", "metric_vs_step.png", "best_by_depth_weight.png", "best_config.yaml",
           "summary.json", "best_model", "best_model.json", "best_test_eval")


def run_tune(cfg: Config, log: Callable[[str], None] = print, verbose: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep of ``cfg.tune``; returns the summary written to ``<tune>/summary.json``.

    Ray's own progress and INFO lines go to ``<run.out_dir>/logs/ray.log`` unless ``verbose`` (or this process
    is already connected to Ray)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tsrec.orchestration.cluster import ensure_ray

    t = cfg.tune
    params = parse_space(t)
    sft_best_metric(cfg)  # metric/mode coherent with what each trial keeps as its best model
    n_trials = count_trials(params, t)
    root = Path(cfg.run.out_dir).resolve()
    tune_dir = root / t.dir
    ensure_ray(cfg, log_dir=None if verbose else root / "logs")
    concurrent = check_resources(t, n_trials, ray.cluster_resources())  # before anything starts
    log(f"[tsrec tune] {n_trials} trial(s), {concurrent} at once, metric {t.metric} ({t.mode}) -> {tune_dir}")

    # --- shared upstream: the pipeline's cached stages, then one init per model/sa_init combination ---
    _upstream(cfg, root, log)
    base = cfg.to_dict()
    base["run"]["out_dir"] = str(root)
    inputs = upstream_fingerprints(root)  # after the upstream stages: what the trials will read
    identity = sweep_identity(base, inputs)
    exp_path = _claim(tune_dir, identity, identity_payload(base, inputs), log)
    for values in init_variants(params):
        icfg = apply_params(base, values)
        _init(icfg, root, tune_dir / "inits" / init_key(icfg, inputs), log)

    # --- the Tuner (new or restored) ---
    trainable = tune.with_resources(_make_trial_fn(base, root, tune_dir, inputs),
                                    {"CPU": t.resources.driver_cpus})
    storage = exp_path.parent
    if tune.Tuner.can_restore(str(exp_path)):
        log(f"[tsrec tune] resuming the sweep in {exp_path}")
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
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
            run_config=tune.RunConfig(name=exp_path.name, storage_path=str(storage), verbose=0))
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


def _claim(tune_dir: Path, identity: str, payload: dict[str, Any], log) -> Path:
    """Make ``<tune>/`` the folder of the sweep ``identity`` and return its Tune experiment folder
    (``<tune>/ray/sweep-<identity>``: restored if it holds a saved experiment, else created).

    When ``sweep.json`` names another sweep (or none), the outputs in ``<tune>/`` (table, plots, best config and
    model, summary) are removed, so nothing there can be read as this sweep's; the other sweep's experiment folder
    stays (rerunning that sweep restores it). Then ``sweep.json`` records this sweep."""
    from tsrec.artifacts import atomic_write_json

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
            {"identity": identity, "experiment": str(experiment_dir(tune_dir, identity)), **payload}, default=str)))
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
        storage, name, endpoint = str(tune_dir / "trials"), f"trial-{trial_id}", cfg.run.storage_endpoint
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


def _rename(m: dict[str, Any]) -> dict[str, Any]:
    out = {(f"valid_{k[5:]}" if k.startswith("eval/") else k): v for k, v in m.items() if not isinstance(v, dict)}
    if "step" in out:
        out["steps"] = int(out["step"]) + 1
    return out


def _Report():  # noqa: N802 - reads as the class it builds (defined lazily: Ray only on use)
    return _report_callback_class()()


def _record(result, base: dict[str, Any]) -> dict[str, Any]:
    """A plain trial record (tsrec.tune.results) from a Tune ``Result``."""
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
    return {"trial_id": last.get("trial_id") or Path(result.path).name, "params": params, "history": points,
            "finished": any(h.get("sft_finished") for h in history), "error": str(result.error) if result.error else None,
            "wall_s": last.get("time_total_s") or (history[-1].get("time_total_s") if history else 0.0),
            # the trial's planned length, for "stopped early": sft.max_steps, else the scheduler's max_t
            "max_steps": cfg.sft.max_steps or cfg.tune.scheduler.max_t or None, "path": result.path}


def _isnan(v) -> bool:
    return isinstance(v, float) and v != v


def _write_outputs(cfg: Config, base, trials, tune_dir: Path, root: Path, log, identity: str) -> dict[str, Any]:
    from tsrec.artifacts import atomic_write_json
    from tsrec.tune.results import (best_trial, plot_heatmap, plot_metric_vs_step, trial_rows, write_best_config,
                                    write_tables)

    t = cfg.tune
    rows = trial_rows(trials, t.metric, t.mode)
    write_tables(rows, tune_dir)
    plot_metric_vs_step(trials, t.metric, tune_dir / "metric_vs_step.png")
    plot_heatmap(rows, t.metric, t.mode, base, tune_dir / "best_by_depth_weight.png")
    best = best_trial(trials, t.metric, t.mode)
    summary: dict[str, Any] = {"sweep": identity, "trials": len(trials), "metric": t.metric, "mode": t.mode,
                               "stopped_early": sum(bool(r["stopped_early"]) for r in rows),
                               "errors": sum(r["status"] == "error" for r in rows), "out": str(tune_dir)}
    if best is not None:
        write_best_config(base, best["params"], tune_dir / "best_config.yaml")
        summary.update(best_trial=best["trial_id"], best_params=best["params"],
                       best_metric=rows[0][f"best_{t.metric}"])
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
    log((tune_dir / "results.md").read_text())
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
    trial and the source folder's fingerprint: when they still match, the folder is not copied again."""
    from tsrec.artifacts import atomic_write_json
    from tsrec.tune.identity import fingerprint

    arts = tune_dir / "trials" / f"trial-{best['trial_id']}" / "artifacts"
    src = arts / "best" if (arts / "best" / "config.json").exists() else arts / "final"
    dest = tune_dir / "best_model"
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src}: the best trial left no model folder")
    source = {"trial_id": best["trial_id"], "source": src.name, "fingerprint": fingerprint(src)}
    if (dest / "config.json").exists() and _read_json(tune_dir / "best_model.json") == source:
        return dest, False
    tmp = tune_dir / ".best_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    (tune_dir / "best_model.json").unlink(missing_ok=True)  # no claim while the folder is being replaced
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    atomic_write_json(tune_dir / "best_model.json", source)
    return dest, True
