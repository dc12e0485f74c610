"""KubeRay manifests in cluster/ validate against the KubeRay v1 CRD schemas (no API server here)."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO.parent / "shared" / "data" / "kuberay"


def crd_schema(kind: str) -> dict:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        pytest.skip(f"CRD not found: {path}")
    crd = yaml.safe_load(path.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("path", sorted((REPO / "cluster").glob("ray*.yaml")), ids=lambda p: p.name)
def test_manifest_validates_against_crd(path):
    import jsonschema

    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(crd_schema(doc["kind"])).validate(doc)
    if doc["kind"] == "RayJob":
        assert doc["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
        entry = doc["spec"]["entrypoint"].split()
        assert (REPO / entry[1]).exists(), f"entrypoint script {entry[1]} missing"


def test_runtime_env_is_valid():
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert set(env) <= {"working_dir", "excludes", "env_vars", "pip", "py_modules"}
    assert ".venv" in env["excludes"]
