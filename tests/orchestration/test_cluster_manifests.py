"""KubeRay manifests in cluster/ validate against the KubeRay v1 CRD schemas (no API server here), strictly.

The CRDs do not forbid unknown fields (no ``additionalProperties: false``), so plain JSON-schema
validation lets a misspelled ``replicaz`` through, and the API server would silently prune it. Like
``kubectl apply --validate=strict``, ``unknown_fields`` walks the CRD's openAPIV3Schema beside the
document and reports every field the schema does not declare:
- an object with ``properties`` accepts only those keys (plus any key when it also has
  ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields: true``);
- an object with only ``additionalProperties`` is a map (labels, rayStartParams, resources): any key,
  each value checked against that schema;
- the embedded core types (pod templates: PodSpec, Container, Volume, ...) are fully spelled out in
  KubeRay's CRDs, so they are walked like the rest; only the root ``metadata`` is a bare
  ``type: object`` (the API server validates it as ObjectMeta), checked here against ObjectMeta's
  field list.
"""

from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from shared_data import SHARED_DATA, require_shared

REPO = Path(__file__).resolve().parents[2]
CRDS = SHARED_DATA / "kuberay"
MANIFESTS = sorted((REPO / "cluster").glob("ray*.yaml"))
# metav1.ObjectMeta's fields (k8s.io/apimachinery, v1.31); maps of strings where Kubernetes has them.
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {"type": "object", "properties": {
    "name": {}, "generateName": {}, "namespace": {}, "selfLink": {}, "uid": {}, "resourceVersion": {},
    "generation": {}, "creationTimestamp": {}, "deletionTimestamp": {}, "deletionGracePeriodSeconds": {},
    "labels": _STR_MAP, "annotations": _STR_MAP, "ownerReferences": {"x-kubernetes-preserve-unknown-fields": True},
    "finalizers": {}, "managedFields": {"x-kubernetes-preserve-unknown-fields": True}}}  # fmt: skip
# Keys of a Ray runtime_env that tsrec's manifests may use (RayJob.spec.runtimeEnvYAML is a string).
RUNTIME_ENV_KEYS = {"working_dir", "excludes", "env_vars", "pip", "py_modules", "uv", "conda", "container", "config"}


class UnknownFieldError(ValueError):
    """A manifest field the CRD schema does not declare (what `kubectl apply --validate=strict` rejects)."""


def crd_schema(kind: str) -> dict:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        pytest.skip(f"CRD not found: {path}")
    return _load_schema(path)


@lru_cache(maxsize=None)
def _load_schema(path: Path) -> dict:
    """Parsed once per session: the CRDs are 1-1.4 MB of YAML (read-only here, never mutated)."""
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def _branches(schema: dict) -> list[dict]:
    """The schema and its allOf/anyOf/oneOf branches (KubeRay uses anyOf for int-or-string)."""
    out = [schema]
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, []):
            out.extend(_branches(sub))
    return out


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Dotted paths of every field in ``value`` that ``schema`` does not declare."""
    branches = _branches(schema)
    if isinstance(value, list):
        items = next((b["items"] for b in branches if isinstance(b.get("items"), dict)), None)
        if items is None:
            return []
        return [p for i, v in enumerate(value) for p in unknown_fields(v, items, f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    props = {k: v for b in branches for k, v in b.get("properties", {}).items()}
    extra = next((b["additionalProperties"] for b in branches if "additionalProperties" in b), None)
    preserve = any(b.get("x-kubernetes-preserve-unknown-fields") for b in branches)
    found = []
    for key, sub in value.items():
        where = f"{path}.{key}" if path else key
        if key in props:
            found += unknown_fields(sub, props[key], where)
        elif isinstance(extra, dict):
            found += unknown_fields(sub, extra, where)
        elif not (extra is True or preserve):
            found.append(where)
    return found


def validate_strict(doc: dict) -> None:
    """JSON-schema validation (types, enums, required) plus unknown-field errors; raises on the first problem."""
    import jsonschema

    schema = crd_schema(doc["kind"])
    jsonschema.Draft7Validator(schema).validate(doc)
    schema = {**schema, "properties": {**schema["properties"], "metadata": OBJECT_META}}
    unknown = unknown_fields(doc, schema)
    if doc["kind"] == "RayJob" and "runtimeEnvYAML" in doc.get("spec", {}):
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) or {}
        unknown += [f"spec.runtimeEnvYAML.{k}" for k in env if k not in RUNTIME_ENV_KEYS]
    if unknown:
        raise UnknownFieldError(f"{doc['kind']} {doc['metadata'].get('name')}: unknown field(s) {', '.join(unknown)}")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly_against_crd(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    validate_strict(doc)
    if doc["kind"] == "RayJob":
        assert doc["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
        entry = doc["spec"]["entrypoint"].split()
        assert (REPO / entry[1]).exists(), f"entrypoint script {entry[1]} missing"


def _cluster_spec(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


# Each misspelling at a different depth: worker group, head group, container of the pod template.
MISSPELLINGS = {
    "replicaz": (lambda s: _rename(s["workerGroupSpecs"][0], "replicas", "replicaz"), "workerGroupSpecs[0].replicaz"),
    "rayStartParam": (lambda s: _rename(s["headGroupSpec"], "rayStartParams", "rayStartParam"),
                      "headGroupSpec.rayStartParam"),
    "imagee": (lambda s: _rename(s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0], "image", "imagee"),
               "workerGroupSpecs[0].template.spec.containers[0].imagee"),
}  # fmt: skip


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
@pytest.mark.parametrize("typo", sorted(MISSPELLINGS))
def test_misspelled_field_is_an_error(path, typo):
    doc = yaml.safe_load(path.read_text())
    edit, where = MISSPELLINGS[typo]
    edit(_cluster_spec(doc))
    prefix = "spec.rayClusterSpec." if doc["kind"] == "RayJob" else "spec."
    with pytest.raises(UnknownFieldError, match=rf"unknown field\(s\) {prefix}{where}$".replace("[", r"\[").replace("]", r"\]")):
        validate_strict(doc)


def test_maps_and_metadata_accept_any_key_but_not_typos():
    doc = yaml.safe_load((REPO / "cluster" / "raycluster.yaml").read_text())
    doc["metadata"]["labels"] = {"team": "recsys"}
    doc["spec"]["headGroupSpec"]["rayStartParams"]["object-store-memory"] = "1000000000"  # a map: any key
    validate_strict(doc)
    doc["metadata"]["lables"] = {"team": "recsys"}
    with pytest.raises(UnknownFieldError, match=r"metadata\.lables"):
        validate_strict(doc)


def test_runtime_env_yaml_of_the_rayjob_is_checked():
    doc = yaml.safe_load((REPO / "cluster" / "rayjob-sft.yaml").read_text())
    doc["spec"]["runtimeEnvYAML"] += "env_var:\n  X: '1'\n"
    with pytest.raises(UnknownFieldError, match=r"spec\.runtimeEnvYAML\.env_var"):
        validate_strict(doc)


def test_runtime_env_is_valid():
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert set(env) <= RUNTIME_ENV_KEYS
    assert ".venv" in env["excludes"]
    # tests/orchestration/test_jobs.py submits a job with exactly this file (`--runtime-env`).
    assert "cluster/runtime_env.yaml" in (REPO / "tests" / "orchestration" / "test_jobs.py").read_text()


# RayJobs per entry point (issue 13): one-shot clusters with token auth, shared storage and GPU worker
# groups sized from `tsrec plan` (the plan command is the manifest's tsrec.dev/plan annotation).
PLANNED_JOBS = ["rayjob-pipeline.yaml", "rayjob-sft.yaml", "rayjob-rl.yaml", "rayjob-tune.yaml", "rayjob-sft-7b.yaml",
                "rayjob-sft-7b-rdma.yaml"]


@pytest.mark.parametrize("name", PLANNED_JOBS)
def test_rayjob_is_one_shot_authenticated_shared_and_sized_from_plan(name, capsys):
    import json
    import shlex

    from tsrec.cli import main
    from tsrec.config import load_config

    doc = yaml.safe_load((REPO / "cluster" / name).read_text())
    validate_strict(doc)
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # every pod sees the shared volume where outputs and checkpoints go
        claims = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "tsrec-shared"}
        assert any(m["mountPath"] == "/mnt/shared" and m["name"] in claims for m in pod["containers"][0]["volumeMounts"])
    entry = shlex.split(spec["entrypoint"])
    overrides = [t for t in entry if "=" in t and not t.startswith("-")]
    cfg = load_config(REPO / entry[entry.index("--config") + 1], overrides)
    assert cfg.run.out_dir.startswith("/mnt/shared/")
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in cluster["workerGroupSpecs"])

    plan = shlex.split(doc["metadata"]["annotations"]["tsrec.dev/plan"])
    assert plan[:2] == ["tsrec", "plan"]
    capsys.readouterr()
    main([*plan[1:], "--json"])
    cands = json.loads(capsys.readouterr().out)
    flag = lambda f: plan[plan.index(f) + 1]  # noqa: E731
    stage = "rl" if entry[1] == "jobs/rl.py" else "sft"
    if "pipeline.stages" in " ".join(overrides) or entry[1] == "jobs/pipeline.py":
        assert "sft" in cfg.pipeline.stages
    train = getattr(cfg, stage)
    if entry[1] == "jobs/tune.py":  # concurrent one-GPU trials share the cluster
        res = cfg.tune.resources
        assert gpus >= cfg.tune.max_concurrent_trials * res.workers * res.gpus_per_worker
        assert int(flag("--gpus-per-node")) * int(flag("--nodes")) == res.workers * res.gpus_per_worker
    else:
        res = getattr(cfg.resources, stage)
        assert gpus == int(flag("--gpus-per-node")) * int(flag("--nodes")) == res.workers * res.gpus_per_worker
        assert getattr(train, "storage_path").startswith(("/mnt/shared/", "s3://"))
    chosen = [c for c in cands if (c["zero_stage"], c["offload_optimizer"], c["offload_params"], c["lora"],
                                   c["gradient_checkpointing"]) == (train.zero_stage, train.offload_optimizer,
                                                                    train.offload_params, train.lora.enabled,
                                                                    train.gradient_checkpointing)]
    assert chosen and chosen[0]["fits"], (name, chosen)



# --------------------------------------------------------------------------------------------------
# Issue 19: every job fits its worker groups (CPUs and GPUs), reads only inputs its pods have, RDMA is
# requested where NCCL is told to use it, token auth everywhere, and the shared volume and its staging.
# --------------------------------------------------------------------------------------------------

JOBS = sorted((REPO / "cluster").glob("rayjob*.yaml"))
SHARED_MOUNT = "/mnt/shared"


def _stage_inputs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("stage_inputs", REPO / "cluster" / "stage_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _entry_and_config(doc):
    import shlex

    from tsrec.config import load_config

    entry = shlex.split(doc["spec"]["entrypoint"])
    overrides = [t for t in entry if "=" in t and not t.startswith("-")]
    return entry, load_config(REPO / entry[entry.index("--config") + 1], overrides)


def _flag(entry, name):
    return entry[entry.index(name) + 1] if name in entry else None


def worker_nodes(doc) -> list[dict]:
    """One ``{"CPU", "GPU"}`` capacity per worker pod at the group's fixed size (maxReplicas when autoscaling):
    Ray's num-cpus/num-gpus start params, else the container's limits (what KubeRay passes to `ray start`)."""
    nodes = []
    for g in _cluster_spec(doc)["workerGroupSpecs"]:
        params = g.get("rayStartParams") or {}
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpu_limit = str(limits.get("cpu", "0"))
        cpu = float(params.get("num-cpus", float(cpu_limit[:-1]) / 1000 if cpu_limit.endswith("m") else cpu_limit))
        gpu = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        nodes += [{"CPU": cpu, "GPU": gpu} for _ in range(int(g.get("maxReplicas", g["replicas"])))]
    return nodes


def _bundles(n: int, cpus: float, gpus: float) -> list[dict]:
    return [{"CPU": float(cpus), "GPU": float(gpus)} for _ in range(max(0, int(n)))]


def job_demands(entry, cfg) -> dict[str, list[dict]]:
    """What each step of the job holds at once, as Ray resource bundles (the steps run one after another)."""
    script = entry[1]
    res = cfg.resources
    eval_gpus = 1.0 if res.eval.gpus_per_worker is None else res.eval.gpus_per_worker

    def stage(name: str) -> list[dict]:
        if name == "sid":
            return _bundles(res.embed.workers, res.embed.cpus_per_worker, res.embed.gpus_per_worker)
        if name == "semantics" and cfg.teacher.engine == "hf":
            return _bundles(cfg.teacher.concurrency, res.teacher.cpus_per_worker, res.teacher.gpus_per_worker)
        if name == "semantics" and cfg.teacher.engine == "vllm":
            return _bundles(cfg.teacher.concurrency, 1, cfg.teacher.tensor_parallel_size)
        if name in ("sft", "rl"):
            r = getattr(res, name)
            return _bundles(r.workers, r.cpus_per_worker, r.gpus_per_worker)
        if name == "eval":
            return _bundles(res.eval.workers, res.eval.cpus_per_worker, eval_gpus)
        return []  # data, model, file teacher: the driver

    if script == "jobs/sft.py":
        return {"sft": stage("sft")}
    if script == "jobs/rl.py":
        return {"rl": stage("rl")}
    if script == "jobs/pipeline.py":
        return {s: stage(s) for s in cfg.pipeline.stages}
    if script == "jobs/tune.py":  # upstream stages, then the concurrent trials, then the best model's test eval
        t = cfg.tune.resources
        trial = [{"CPU": t.driver_cpus, "GPU": 0.0}, *_bundles(t.workers, t.cpus_per_worker, t.gpus_per_worker)]
        out = {s: stage(s) for s in cfg.pipeline.stages if s not in ("sft", "rl", "eval")}
        out["trials"] = trial * max(1, cfg.tune.max_concurrent_trials)
        if cfg.tune.eval_test:
            out["eval"] = stage("eval")
        return out
    raise AssertionError(f"unknown entrypoint {script}")


def unplaced(bundles: list[dict], nodes: list[dict]) -> list[dict]:
    """Bundles that do not fit (first fit, largest first) into the nodes' CPUs and GPUs."""
    free = [dict(n) for n in nodes]
    left = []
    for b in sorted(bundles, key=lambda b: (-b["GPU"], -b["CPU"])):
        node = next((n for n in free if n["CPU"] + 1e-9 >= b["CPU"] and n["GPU"] + 1e-9 >= b["GPU"]), None)
        if node is None:
            left.append(b)
        else:
            node["CPU"] -= b["CPU"]
            node["GPU"] -= b["GPU"]
    return left


def check_fits(doc) -> None:
    entry, cfg = _entry_and_config(doc)
    nodes = worker_nodes(doc)
    for step, bundles in job_demands(entry, cfg).items():
        left = unplaced(bundles, nodes)
        if left:
            need = {k: sum(b[k] for b in bundles) for k in ("CPU", "GPU")}
            have = {k: sum(n[k] for n in nodes) for k in ("CPU", "GPU")}
            raise AssertionError(f"{doc['metadata']['name']}: step {step} needs {need} in {len(bundles)} bundles, "
                                 f"the worker groups have {have}: {len(left)} bundle(s) never placed, e.g. {left[0]}")


def job_inputs(entry, cfg) -> dict[str, str]:
    """Paths the job reads before it writes anything: its flags, else `tsrec`'s defaults under run.out_dir, and
    the config's inputs of the stages it runs."""
    script, out = entry[1], cfg.run.out_dir.rstrip("/")
    if script in ("jobs/sft.py", "jobs/rl.py"):
        model = "sft/model" if script == "jobs/rl.py" else "model"
        return {"--model": _flag(entry, "--model") or f"{out}/{model}", "--data": _flag(entry, "--data") or f"{out}/data",
                "--sids": _flag(entry, "--sids") or f"{out}/sids",
                "--semantics": _flag(entry, "--semantics") or f"{out}/semantics/description_keywords.json"}
    stages = cfg.pipeline.stages
    found = {}
    if "data" in stages and cfg.data.source != "synthetic":
        found["data.input"] = cfg.data.input
    if "semantics" in stages:
        if cfg.teacher.engine == "file":
            found["teacher.file"] = cfg.teacher.file
        elif cfg.teacher.model:
            found["teacher.model"] = cfg.teacher.model
    if "model" in stages and not cfg.model.tiny:
        found["model.backbone"] = cfg.model.backbone
    return found


def produced_paths() -> set[str]:
    """What the pipeline jobs write: run.out_dir/<stage folder> for each of their stages (+ sft/model, rl/model)."""
    from tsrec.orchestration.pipeline import STAGE_DIRS

    out = set()
    for path in JOBS:
        entry, cfg = _entry_and_config(yaml.safe_load(path.read_text()))
        if entry[1] != "jobs/pipeline.py":
            continue
        root = cfg.run.out_dir.rstrip("/")
        out |= {f"{root}/{STAGE_DIRS[s]}" for s in cfg.pipeline.stages}
    return out


def check_inputs(doc) -> None:
    """Every input is an absolute path on a PVC that every pod mounts, and something puts it there: the staging job
    (cluster/stage_inputs.py) or a pipeline RayJob's output."""
    entry, cfg = _entry_and_config(doc)
    cluster = _cluster_spec(doc)
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    mounts = None
    for pod in pods:
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        here = {m["mountPath"].rstrip("/") for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in claims}
        mounts = here if mounts is None else mounts & here
    staged = [f"{SHARED_MOUNT}/{d}" for d in _stage_inputs().STAGED_DIRS]
    produced = produced_paths()
    name = doc["metadata"]["name"]
    for what, path in job_inputs(entry, cfg).items():
        assert path.startswith("/"), f"{name}: {what}={path!r} is relative: the job's working directory is a temporary copy"
        assert any(path == m or path.startswith(m + "/") for m in mounts), \
            f"{name}: {what}={path} is on no volume that every pod mounts ({sorted(mounts)})"
        assert any(path == p or path.startswith(p + "/") for p in staged + sorted(produced)), \
            f"{name}: {what}={path}: neither staged (cluster/stage_inputs.py STAGED_DIRS) nor written by a pipeline RayJob"


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_rayjob_fits_its_worker_groups(path):
    check_fits(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_rayjob_reads_only_inputs_on_its_volumes(path):
    check_inputs(yaml.safe_load(path.read_text()))


def _with_override(doc, override: str):
    doc["spec"]["entrypoint"] += f" {override}"
    return doc


def test_a_sweep_that_needs_more_cpus_than_the_cluster_is_an_error():
    """The shipped sweep before issue 19: 8 trials x (0.5 driver + 8 CPUs) = 68 CPUs on a 64-CPU group."""
    doc = _with_override(yaml.safe_load((REPO / "cluster" / "rayjob-tune.yaml").read_text()), "tune.resources.cpus_per_worker=8")
    with pytest.raises(AssertionError, match=r"step trials needs \{'CPU': 68\.0, 'GPU': 8\.0\}.*'CPU': 64\.0"):
        check_fits(doc)


def test_a_job_needing_more_gpus_than_its_groups_is_an_error():
    doc = _with_override(yaml.safe_load((REPO / "cluster" / "rayjob-pipeline.yaml").read_text()), "resources.eval.workers=9")
    with pytest.raises(AssertionError, match=r"step eval needs .*'GPU': 9\.0"):
        check_fits(doc)


@pytest.mark.parametrize("override, message", [
    ("data.input=../shared/data/amazon/Industrial_and_Scientific", "is relative"),
    ("model.backbone=/models/Qwen2.5-1.5B", "is on no volume"),
    ("teacher.file=/mnt/shared/data/elsewhere/teacher.json", "neither staged"),
])  # fmt: skip
def test_an_input_no_volume_holds_is_an_error(override, message):
    doc = _with_override(yaml.safe_load((REPO / "cluster" / "rayjob-pipeline.yaml").read_text()), override)
    with pytest.raises(AssertionError, match=message):
        check_inputs(doc)


def _env(doc) -> dict:
    return (yaml.safe_load(doc["spec"]["runtimeEnvYAML"]) or {}).get("env_vars", {})


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_rdma_is_requested_exactly_where_nccl_uses_it(path):
    """NCCL over InfiniBand (NCCL_IB_HCA, or NCCL_IB_DISABLE=0) needs an RDMA device and IPC_LOCK on every worker
    pod; a job without them must not point NCCL at the HCAs."""
    doc = yaml.safe_load(path.read_text())
    env = _env(doc)
    uses_ib = "NCCL_IB_HCA" in env or env.get("NCCL_IB_DISABLE") == "0"
    for g in _cluster_spec(doc)["workerGroupSpecs"]:
        c = g["template"]["spec"]["containers"][0]
        rdma = any(k.startswith("rdma/") for k in c["resources"].get("limits", {}))
        ipc = "IPC_LOCK" in ((c.get("securityContext") or {}).get("capabilities") or {}).get("add", [])
        assert (rdma and ipc) == uses_ib, (path.name, g["groupName"], uses_ib, rdma, ipc)
    if int(_cluster_spec(doc)["workerGroupSpecs"][0]["replicas"]) > 1:  # multi-node: NCCL's bootstrap interface named
        assert "NCCL_SOCKET_IFNAME" in env


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_cluster_has_token_auth_and_states_the_kuberay_version(path):
    doc = yaml.safe_load(path.read_text())
    assert _cluster_spec(doc)["authOptions"] == {"mode": "token"}
    assert "KubeRay >= 1.5.1" in path.read_text()
    images = {c["image"] for pod in [_cluster_spec(doc)["headGroupSpec"]] + _cluster_spec(doc)["workerGroupSpecs"]
              for c in pod["template"]["spec"]["containers"]}
    assert len(images) == 1, images  # one image on every pod


def test_raycluster_example_command_writes_to_the_shared_volume():
    text = (REPO / "cluster" / "raycluster.yaml").read_text()
    (line,) = [ln for ln in text.splitlines() if "ray job submit" in ln]
    cmd = line.split(" -- ", 1)[1]
    doc = {"kind": "RayJob", "metadata": {"name": "example"}, "spec": {"entrypoint": cmd, "rayClusterSpec": yaml.safe_load(text)["spec"]}}
    _, cfg = _entry_and_config(doc)
    assert cfg.run.out_dir.startswith(SHARED_MOUNT + "/") and cfg.sft.storage_path.startswith(SHARED_MOUNT + "/")
    check_inputs(doc)


def test_shared_volume_claim_and_staging_job():
    pvc = yaml.safe_load((REPO / "cluster" / "pvc-shared.yaml").read_text())
    assert (pvc["kind"], pvc["metadata"]["name"], pvc["spec"]["accessModes"]) == ("PersistentVolumeClaim", "tsrec-shared",
                                                                                  ["ReadWriteMany"])
    job = yaml.safe_load((REPO / "cluster" / "job-stage-inputs.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:2] == ["python", "cluster/stage_inputs.py"] and _flag(c["command"], "--root") == SHARED_MOUNT
    claims = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "tsrec-shared"}
    assert any(m["mountPath"] == SHARED_MOUNT and m["name"] in claims for m in c["volumeMounts"])
    # every backbone a RayJob reads is staged by this job
    staged_models = {f"{SHARED_MOUNT}/models/{b.split('/')[-1]}" for b in c["command"][c["command"].index("--backbone"):]
                     if "/" in b}
    for path in JOBS:
        entry, cfg = _entry_and_config(yaml.safe_load(path.read_text()))
        backbone = job_inputs(entry, cfg).get("model.backbone")
        assert backbone is None or backbone in staged_models, (path.name, backbone, staged_models)
    assert "stage_inputs.py" in (REPO / "cluster" / "Dockerfile").read_text()  # the image carries the script


def test_stage_inputs_copies_and_checks_every_file(tmp_path):
    """cluster/stage_inputs.py --from: every file lands at its layout path with its pinned sha256; a corrupt
    source is refused and leaves nothing behind."""
    src = require_shared(SHARED_DATA)
    mod = _stage_inputs()
    assert mod.main(["--root", str(tmp_path / "root"), "--from", str(src)]) == 0
    for rel, (_, digest) in mod.DATA_FILES.items():
        assert mod.sha256(tmp_path / "root" / rel) == digest
        assert any(rel.startswith(d + "/") for d in mod.STAGED_DIRS)
    bad = tmp_path / "bad"
    rel = next(iter(mod.DATA_FILES))
    (bad / Path(rel).relative_to("data")).parent.mkdir(parents=True)
    (bad / Path(rel).relative_to("data")).write_text("{}")
    with pytest.raises(SystemExit, match="sha256"):
        mod.stage_file(tmp_path / "root2", rel, "", mod.DATA_FILES[rel][1], bad)
    assert not any((tmp_path / "root2").rglob("*.json"))
