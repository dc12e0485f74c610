"""The ``tune.space`` section: dotted config keys -> distributions, validated against the schema.

    space:
      sa_init.depth: {grid: [0, 3]}
      sft.tasks.ts_align.loss_weight: {choice: [0.0, 1.0]}
      sft.lr: {loguniform: [1.0e-4, 3.0e-3]}
      run.seed: {grid: [42, 1, 2]}         # seeds as a dimension: every setting runs once per seed

Every key must be a leaf of :class:`tsrec.config.Config` and every grid/choice value must pass the
schema's type check for that key, so a typo fails before any trial starts (:class:`SweepSpaceError`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import typing
from dataclasses import dataclass
from typing import Any

from tsrec.config import Config, ConfigError, TuneConfig, from_dict

KINDS = ("grid", "choice", "uniform", "loguniform")
# Sections built once for all trials (the pipeline's cached stages): a sweep cannot change them.
UPSTREAM_SECTIONS = ("data", "embed", "sid", "teacher")
# Sections that decide the initialised model (`tsrec model init`): one init per distinct combination.
INIT_SECTIONS = ("model", "sa_init")
# Sections the sweep driver itself owns.
FORBIDDEN_SECTIONS = ("tune", "resources", "pipeline", "run")
# The one driver key a sweep may vary: repeating each setting over seeds is how a sweep measures its noise
# (tsrec.tune.results groups trials into settings by every other key). Model init reads it too.
SEED_KEY = "run.seed"


class SweepSpaceError(ConfigError):
    """A ``tune.space`` entry is malformed, names an unknown key or cannot be swept."""


class TuneResourceError(RuntimeError):
    """The sweep's concurrent trials need more CPUs/GPUs than the Ray cluster has; the message says what is short."""


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    values: tuple  # grid/choice: the values; uniform/loguniform: (lo, hi)


def parse_space(tune: TuneConfig) -> list[Param]:
    """Validate ``tune.space`` against the schema; returns the parameters in file order.

    Raises:
        SweepSpaceError: unknown key (with the known keys at that level), an upstream/driver section,
        a spec that is not exactly one of grid/choice/uniform/loguniform, an empty or ill-typed value
        list, a bad range, or a non-grid entry under ``tune.search=grid``; for ``run.seed`` (the one ``run``
        key a sweep may vary) anything but a grid of distinct seeds with every other key a grid entry and
        ``tune.num_samples`` 1 (:func:`_check_seed_sweep`).
    """
    if not tune.space:
        raise SweepSpaceError("tune.space: empty; give at least one key, e.g. sa_init.depth: {grid: [0, 3]}")
    params = []
    for key, spec in tune.space.items():
        where = f"tune.space.{key}"
        tp = leaf_type(str(key))
        if str(key).split(".")[0] in UPSTREAM_SECTIONS:
            raise SweepSpaceError(f"{where}: {key.split('.')[0]}.* is built once and shared by all trials "
                                  f"(sections {', '.join(UPSTREAM_SECTIONS)} cannot be swept)")
        if str(key).split(".")[0] in FORBIDDEN_SECTIONS and key != SEED_KEY:
            raise SweepSpaceError(f"{where}: the sweep driver sets {key.split('.')[0]}.*; it cannot be swept")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise SweepSpaceError(f"{where}: expected one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [lo, hi]}}, "
                                  f"{{loguniform: [lo, hi]}}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise SweepSpaceError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
        if kind in ("grid", "choice"):
            values = [_check_value(key, v, f"{where}.{kind}[{i}]") for i, v in enumerate(values)]
        else:
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise SweepSpaceError(f"{where}.{kind}: expected [lo, hi] numbers, got {values!r}")
            lo, hi = float(values[0]), float(values[1])
            if tp is not float:
                raise SweepSpaceError(f"{where}.{kind}: {key} is not a float key; use grid or choice")
            if not lo < hi or (kind == "loguniform" and lo <= 0):
                raise SweepSpaceError(f"{where}.{kind}: need 0 < lo < hi for loguniform, lo < hi for uniform; got {values!r}")
            values = [lo, hi]
        if key == SEED_KEY:
            _check_seed_entry(kind, values, tune, where)
        if key.split(".")[0] in INIT_SECTIONS and kind not in ("grid", "choice"):
            # Inits are built before the Tuner starts, one per distinct value: the values must be known.
            raise SweepSpaceError(f"{where}: model/sa_init keys decide the initialised model; use grid or choice")
        if tune.search == "grid" and kind != "grid":
            raise SweepSpaceError(f"{where}: tune.search=grid needs grid entries only (use tune.search=random for {kind})")
        if tune.search == "optuna" and kind == "grid":
            raise SweepSpaceError(f"{where}: tune.search=optuna samples; use choice instead of grid")
        params.append(Param(str(key), kind, tuple(values)))
    _check_seed_sweep(params, tune)
    return params


def _check_seed_entry(kind: str, values: list, tune: TuneConfig, where: str) -> None:
    """``run.seed`` must be a grid (distinct values: :func:`_check_seed_sweep`): a sampled seed could run one
    setting twice with the same seed, and the settings table would count two identical runs as two independent
    samples. Optuna takes no grid entries, so it cannot sweep seeds."""
    if tune.search == "optuna":
        raise SweepSpaceError(f"{where}: tune.search=optuna samples every key; seeds need tune.search=grid or random")
    if kind != "grid":
        raise SweepSpaceError(f"{where}: seeds are a grid dimension (every setting runs once per seed); "
                              f"use run.seed: {{grid: [...]}}, not {kind}")


def _check_seed_sweep(params: list[Param], tune: TuneConfig) -> None:
    """With ``run.seed`` swept, every seed of a setting must run the same values, once. Tune's random generator
    draws the sampled keys afresh for every grid point (seeds included), and num_samples or a repeated grid
    value repeats each seed: they would leave settings of one trial each, or identical repeats counted as
    independent seeds, instead of one trial per seed."""
    if not any(p.key == SEED_KEY for p in params):
        return
    sampled = [p.key for p in params if p.kind != "grid"]
    if sampled:
        raise SweepSpaceError(f"tune.space.{SEED_KEY}: with seeds swept, {', '.join(sampled)} would be drawn anew "
                              "for every seed; give them as grid entries")
    if tune.num_samples > 1:
        raise SweepSpaceError(f"tune.space.{SEED_KEY}: tune.num_samples={tune.num_samples} would repeat every seed; "
                              "add seeds to the run.seed grid instead")
    repeated = [p.key for p in params if len(set(p.values)) != len(p.values)]
    if repeated:
        raise SweepSpaceError(f"tune.space.{SEED_KEY}: {', '.join(repeated)} repeat a value, which would run a setting "
                              "twice with each seed; list each value once")


def leaf_type(key: str) -> Any:
    """The schema type of dotted ``key``; SweepSpaceError naming the known keys where it is unknown."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise SweepSpaceError(f"unknown sweep key {key!r}: {'.'.join(parts[:i])} is not a section")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "<root>"
            raise SweepSpaceError(f"unknown sweep key {key!r} (known at {where}: {', '.join(sorted(hints))})")
        cls = hints[part]
    if dataclasses.is_dataclass(cls):
        raise SweepSpaceError(f"sweep key {key!r} is a section; name one of its keys")
    return cls


def _check_value(key: str, value: Any, where: str) -> Any:
    raw: dict[str, Any] = {}
    set_dotted(raw, key, value)
    try:
        cfg = from_dict(Config, raw, prefix="")
    except ConfigError as e:
        raise SweepSpaceError(f"{where}: {e}") from None
    return get_dotted(cfg.to_dict(), key)


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    for part in key.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[key.split(".")[-1]] = value


def get_dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node[part]
    return node


def apply_params(base: dict[str, Any], values: dict[str, Any]) -> Config:
    """The trial's config: the base config dict (``Config.to_dict()``) with ``values`` set, validated.

    A trial that sets ``run.seed`` keeps the base's upstream seed (``run.data_seed``): the sweep built data, SIDs
    and semantics once with it, every seed trains on them, and the trial's best_config.yaml reuses them."""
    raw = copy.deepcopy(base)
    if SEED_KEY in values and raw["run"].get("data_seed") is None:
        raw["run"]["data_seed"] = raw["run"]["seed"]
    for key, value in values.items():
        set_dotted(raw, key, value)
    return from_dict(Config, raw, prefix="")


def sft_best_metric(cfg: Config) -> str:
    """The ``sft.best_metric`` that makes a trial keep (and export) the model ``tune.metric`` ranks best.

    ``valid_loss`` (mode min) -> ``"loss"``; ``valid_hr@K`` / ``valid_ndcg@K`` (mode max) -> ``"hr@K"`` /
    ``"ndcg@K"``, K one of the probe's cut-offs within ``sft.valid_ranking_beams``. Anything else would let
    the sweep rank trials by one number while each trial keeps its model by another: SweepSpaceError.
    """
    from tsrec.train.ranking import KS, ranking_metric_names

    t = cfg.tune
    ranking = ["valid_" + m for m in ranking_metric_names(k for k in KS if k <= cfg.sft.valid_ranking_beams)]
    if t.metric == "valid_loss":
        if t.mode != "min":
            raise SweepSpaceError("tune.metric=valid_loss is lower-is-better: set tune.mode=min")
        return "loss"
    if t.metric not in ranking:
        raise SweepSpaceError(f"tune.metric={t.metric!r}: expected valid_loss or one of {', '.join(ranking)} "
                              f"(cut-offs up to sft.valid_ranking_beams={cfg.sft.valid_ranking_beams})")
    if t.mode != "max":
        raise SweepSpaceError(f"tune.metric={t.metric} is higher-is-better: set tune.mode=max")
    if t.valid_sample_size <= 0:
        raise SweepSpaceError(f"tune.metric={t.metric} needs the valid ranking probe: set tune.valid_sample_size > 0")
    return t.metric[len("valid_"):]


def trial_config(base: dict[str, Any], values: dict[str, Any]) -> Config:
    """A trial's complete config: the base with ``values`` set, the valid ranking probe on
    (``tune.valid_sample_size`` rows) and ``sft.best_metric`` from ``tune.metric``, so the trial's ``best/``
    model is the one at its best ``tune.metric`` step. ``resources.sft`` takes the trial's Ray Train group
    (``tune.resources``): best_config.yaml is this config too, and `tsrec run` must train it on the same world
    size (the batch split and the ZeRO shards depend on it)."""
    cfg = apply_params(base, values)
    r = cfg.tune.resources
    cfg.resources.sft.workers, cfg.resources.sft.cpus_per_worker = r.workers, r.cpus_per_worker
    cfg.resources.sft.gpus_per_worker = r.gpus_per_worker
    cfg.resources.sft.placement_strategy, cfg.resources.sft.restart_wait_s = r.placement_strategy, r.restart_wait_s
    cfg.sft.valid_ranking_sample = cfg.tune.valid_sample_size
    cfg.sft.best_metric = sft_best_metric(cfg)
    return cfg


def count_trials(params: list[Param], tune: TuneConfig) -> int:
    """Trials the sweep will run: the grid product times num_samples (Tune's BasicVariantGenerator)."""
    grid = math.prod(len(p.values) for p in params if p.kind == "grid")
    return grid * max(1, tune.num_samples)


def init_variants(params: list[Param]) -> list[dict[str, Any]]:
    """Every distinct combination of the model/sa_init values and the seeds in the space (``[{}]`` if none is
    swept). The seed is in: model init draws the tiny model's weights and the resized rows from ``run.seed``, and
    :func:`init_key` names an init by it, so a trial of each seed finds its own init."""
    keys = [p for p in params if p.key.split(".")[0] in INIT_SECTIONS or p.key == SEED_KEY]
    return [dict(zip([p.key for p in keys], combo)) for combo in itertools.product(*[p.values for p in keys])]


def init_key(cfg: Config, inputs: dict[str, Any] | None) -> str:
    """The name of the shared init a trial's config needs: a hash of everything the init is built from, its
    model + sa_init sections, ``run.seed`` and the fingerprints of the SID folder and the teacher file
    (``inputs``: ``tsrec.tune.identity.upstream_fingerprints``, its ``sids`` and ``teacher_file``), so new
    SIDs or semantics make a new init instead of reusing one built from the old ones."""
    full = cfg.to_dict()
    inputs = inputs or {}
    payload = ({s: full[s] for s in INIT_SECTIONS} | {"seed": full["run"]["seed"]}
               | {"inputs": {k: inputs.get(k) for k in ("sids", "teacher_file")}})
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"depth{cfg.sa_init.depth}-{digest}"


def check_resources(tune: TuneConfig, n_trials: int, cluster: dict[str, float]) -> int:
    """How many trials run at once; :class:`TuneResourceError` if that many do not fit ``cluster``.

    ``max_concurrent_trials`` 0 = as many as fit (at least one must). Each trial takes
    ``driver_cpus + workers x cpus_per_worker`` CPUs and ``workers x gpus_per_worker`` GPUs.
    """
    r = tune.resources
    if r.workers < 1 or r.cpus_per_worker < 0 or r.gpus_per_worker < 0 or r.driver_cpus <= 0:
        raise SweepSpaceError("tune.resources: need workers >= 1, cpus/gpus per worker >= 0 and driver_cpus > 0 "
                              "(a zero driver share is refused by Ray Tune)")
    cpu = r.driver_cpus + r.workers * r.cpus_per_worker
    gpu = r.workers * r.gpus_per_worker
    have_cpu, have_gpu = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if tune.max_concurrent_trials > 0:
        concurrent = min(tune.max_concurrent_trials, n_trials)
    else:
        fits = [math.floor(have_cpu / cpu + 1e-9)] + ([math.floor(have_gpu / gpu + 1e-9)] if gpu > 0 else [])
        concurrent = max(1, min(n_trials, *fits))
    short = []
    if concurrent * cpu > have_cpu + 1e-9:
        short.append(f"CPU: need {concurrent * cpu:g}, cluster has {have_cpu:g}")
    if concurrent * gpu > have_gpu + 1e-9:
        short.append(f"GPU: need {concurrent * gpu:g}, cluster has {have_gpu:g}")
    if short:
        raise TuneResourceError(
            f"tune: {concurrent} concurrent trial(s) x ({r.workers} worker(s) x {r.cpus_per_worker:g} CPU"
            f"{f' + {r.gpus_per_worker:g} GPU' if r.gpus_per_worker else ''} + {r.driver_cpus:g} driver CPU) do not fit "
            f"the Ray cluster; short of {'; '.join(short)}. Lower tune.max_concurrent_trials or tune.resources.*")
    return concurrent
