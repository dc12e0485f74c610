"""Joining or starting Ray: the one place that decides which cluster a stage runs on."""

from __future__ import annotations

import logging
import os
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path

import ray

from tsrec.config import Config


def ray_address(cfg: Config) -> str:
    """``resources.ray_address``, else ``RAY_ADDRESS`` (set under `ray job submit`), else "local".

    A bare ``ray.init()`` would join whatever cluster ``/tmp/ray/ray_current_cluster`` names, possibly
    another user's on a shared machine; "local" always starts a fresh in-process cluster.
    ``resources.ray_address=auto`` joins the running one on purpose.
    """
    return cfg.resources.ray_address or os.environ.get("RAY_ADDRESS") or "local"


def ensure_ray(cfg: Config, log_dir: Path | None = None, worker_logs: bool = True) -> None:
    """Connect unless this process is already connected (tests and `tsrec run` connect once).

    With ``log_dir`` (``tsrec run`` without ``--verbose``), Ray's own progress and INFO lines go to
    ``<log_dir>/ray.log`` instead of the console (:func:`quiet_console`). ``worker_logs=False``: the workers'
    stdout/stderr stay in Ray's session logs instead of reaching this console (``tsrec tune``'s quiet console).
    """
    if not ray.is_initialized():
        local = ray_address(cfg) == "local"
        if local:
            # Ray Train's PreemptionWatcher watches for node preemption (spot instances); a local
            # in-process cluster has none, and creating it logs core_worker's max_restarts ERROR line.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        if log_dir is not None:
            quiet_console(log_dir)  # before ray.init: a local cluster's workers inherit the environment
        with _local_state_api(local) as init_kwargs:
            # Never pass num_cpus when joining a cluster (STACK.md 3.4).
            ray.init(address=ray_address(cfg), configure_logging=False, log_to_driver=worker_logs, **init_kwargs)


_API_ENV = "RAY_API_SERVER_ADDRESS"


@contextmanager
def _local_state_api(local: bool):
    """Around ``ray.init`` of a local cluster: pin its dashboard (Ray's State API server) to a free port
    (the ``ray.init`` keywords it yields) and name it in ``RAY_API_SERVER_ADDRESS``, which every process of
    the cluster inherits; afterwards this process gets its own value back, so a later connection (another
    cluster, `ray job submit`) is not sent to this cluster's dashboard. Joining a cluster: nothing.

    Ray Train's PlacementGroupCleaner actor asks the State API every few seconds whether the run's
    controller still lives. Without an address it reads ``/tmp/ray/ray_current_cluster``, which an
    in-process local cluster does not write: it then dials whichever cluster ran there before, times out
    and prints a 25-line ``RpcError`` traceback per trainer into the console of a healthy run (or, with an
    address of another live cluster, would not find the controller and remove the run's placement group).
    """
    if not local:
        yield {}
        return
    with socket.socket() as s:  # a free port now; Ray binds it a moment later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = os.environ.get(_API_ENV)
    os.environ[_API_ENV] = f"http://127.0.0.1:{port}"
    try:
        yield {"dashboard_port": port}
    finally:
        if saved is None:
            os.environ.pop(_API_ENV, None)
        else:
            os.environ[_API_ENV] = saved


# Ray 2.60 no longer sets CUDA_VISIBLE_DEVICES="" for a task or actor that holds no GPU (ray-project/ray#54868,
# ray/_private/accelerators/accelerator.py): it sees every GPU of its node, and torch's "auto" device puts it
# on cuda:0 beside the workers that own that GPU. Every zero-GPU actor tsrec starts gets this runtime_env.
HIDE_GPUS = {"CUDA_VISIBLE_DEVICES": ""}


def cpu_only_runtime_env(runtime_env: dict | None = None) -> dict:
    """``runtime_env`` (a Ray runtime_env dict, not modified) plus ``CUDA_VISIBLE_DEVICES=""``: for actors with no GPU."""
    out = dict(runtime_env or {})
    out["env_vars"] = {**dict(out.get("env_vars") or {}), **HIDE_GPUS}
    return out


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster: those it has now, or the most its autoscaler can add (KubeRay
    worker groups scaled to zero report their max GPUs to the GCS), whichever is larger. The autoscaler's
    view is what Ray Train reads for the same question (``get_max_resources_from_cluster_config``)."""
    import ray

    now = float(ray.cluster_resources().get("GPU", 0))
    try:
        from ray._private.state import state

        most = (state.get_max_resources_from_cluster_config() or {}).get("GPU", 0)
    except Exception:  # noqa: BLE001  # pragma: no cover - no autoscaler config (a local cluster) or another Ray version
        most = 0
    return max(now, float(most or 0))


# Ray Data's actor pools default to max_restarts=-1 and hand every actor its map function and the
# DataContext as object refs, so Ray core logs an ERROR line per pool ("core_worker.cc: ... has
# constructor arguments in the object store and max_restarts > 0", ray-project/ray#53727). Our pools
# hold model replicas doing idempotent work that is either short (embedding) or resumable (teacher
# parts/), so a dead actor fails the stage and a rerun continues, instead of a silent restart.
DATA_ACTOR_POOL_ARGS = {"max_restarts": 0}
# Ray 2.60 has no named map_batches parameter for max_restarts, only the deprecated **ray_remote_args
# (removed in Ray 2.64: revisit DATA_ACTOR_POOL_ARGS when upgrading), so its warning would replace the
# ERROR line with another alarming one. Only that message is silenced.
warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated", category=DeprecationWarning)

# Set in this process before a local Ray starts, so the workers inherit them: no tqdm bars from
# transformers / huggingface_hub (weight loading, GGUF conversion) and no transformers advisory
# warnings (deprecations inside libraries, nothing a user can act on). Errors still print.
# Ray Train's print patch also sends every print of a worker to its logger, so each [sft] line
# reached the console twice.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
             # Read by Ray Train workers (quiet_train_worker): Train's LoggingConfig reaches its controller,
             # but each worker still logs "Reporting training result ..." at INFO to the console.
             "TSREC_QUIET": "1"}
_quiet = False


def quiet_train_worker() -> None:
    """In a Ray Train worker of a quiet run: keep Ray Train's per-report INFO lines off the console."""
    import logging as _logging

    if os.environ.get("TSREC_QUIET") == "1":
        _logging.getLogger("ray.train").setLevel(_logging.WARNING)
        # Ray 2.60 logs each worker's "Reporting training result ..." through a logger named by the
        # module's file path (logging.getLogger(__file__)), outside the ray.train hierarchy.
        try:
            from ray.train.v2._internal.execution import context as _train_context

            _logging.getLogger(_train_context.__file__).setLevel(_logging.WARNING)
        except ImportError:  # pragma: no cover - another Ray version
            pass
        # DeepSpeed 0.19's ZeRO-2 calls torch's deprecated all_gather_into_tensor: one FutureWarning per
        # worker and stage on the console, about library internals a user cannot act on.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                                category=FutureWarning)


def train_logging_config():
    """Ray Train's ``LoggingConfig``: WARNING in a quiet run (its INFO lines are in the run's Ray session
    logs), else Ray's default. A sweep trial builds its trainer in a Tune actor, which inherits the quiet
    driver's environment (``TSREC_QUIET``) but not its module state."""
    from ray.train.v2.api.config import LoggingConfig

    quiet = _quiet or os.environ.get("TSREC_QUIET") == "1"
    return LoggingConfig(log_level="WARNING") if quiet else LoggingConfig()
# Ray log records that are expected in a quiet run and say nothing to act on.
BENIGN_RAY_MESSAGES = ("Progress bars disabled",)


class _DropBenign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(BENIGN_RAY_MESSAGES)


def quiet_console(log_dir: Path) -> Path:
    """Route Ray's INFO lines and progress to ``<log_dir>/ray.log``; warnings and errors stay on the console.

    Ray Data's progress (bars on a terminal, INFO lines otherwise) is turned off on the console and its
    logger, like Ray core's and Ray Train's, keeps only WARNING and above on the console; everything
    from INFO up also goes to the file. Returns the log file's path.
    """
    import ray.data

    global _quiet
    _quiet = True
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    try:  # this process may have imported transformers already (env vars are read at import)
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    ray.data.DataContext.get_current().enable_progress_bars = False
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "ray.log"
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logger = logging.getLogger(name)
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(max(h.level, logging.WARNING))
                h.addFilter(_DropBenign())
        if name in ("ray", "ray.data") and not any(getattr(h, "baseFilename", None) == str(path.resolve())
                                                   for h in logger.handlers):
            logger.addHandler(file_handler)  # ray.data does not propagate to "ray"
    return path
