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

from shared_data import SHARED_DATA

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
PLANNED_JOBS = ["rayjob-pipeline.yaml", "rayjob-rl.yaml", "rayjob-tune.yaml", "rayjob-sft-7b.yaml"]


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
