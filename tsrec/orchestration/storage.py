"""Where Ray Train runs keep checkpoints and artifacts, and how their workers are placed on nodes.

Storage is a local path (one machine, or an RWX volume mounted at the same path on every pod) or a
cloud URI (``s3://bucket/prefix``, ``gs://...``) read through pyarrow's filesystems. An S3-compatible
server other than AWS (MinIO, Ceph, a test's moto server) is named by ``run.storage_endpoint``;
pyarrow also honours ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` in every process's environment.
Credentials are never config keys: each node reads them from AWS's usual chain (``AWS_ACCESS_KEY_ID``
/ ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an IAM role), as a KubeRay pod gets them from its Secret.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tsrec.config import ConfigError


def filesystem(uri: str, endpoint: str = ""):
    """``(pyarrow filesystem, path inside it)`` for a local path or cloud URI.

    ``endpoint`` (``run.storage_endpoint``, e.g. ``http://minio:9000``) applies to ``s3://`` URIs; a local
    path ignores it (one stage may keep checkpoints on S3 and another on local disk), another cloud
    scheme is an error (the endpoint would silently not apply).
    """
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    scheme, _, rest = uri.partition("://")
    if not endpoint:
        return pafs.FileSystem.from_uri(uri)
    if scheme != "s3":
        raise ConfigError(f"run.storage_endpoint is for S3-compatible servers; storage {uri!r} is {scheme}://")
    # A scheme in the endpoint picks http/https (a local MinIO or moto speaks plain http).
    ep_scheme, sep, host = endpoint.partition("://")
    if not sep:
        ep_scheme, host = "https", endpoint
    # Region: S3-compatible servers ignore it, but pyarrow would otherwise ask AWS which region the bucket is in.
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    fs = pafs.S3FileSystem(endpoint_override=host.rstrip("/"), scheme=ep_scheme, region=region)
    return fs, rest.rstrip("/")


def ray_storage(uri: str, endpoint: str = "") -> dict:
    """``RunConfig`` keywords for a storage location: Ray resolves a plain path or URI itself, a custom
    endpoint needs the filesystem object (and then a path inside it, without the scheme)."""
    if not endpoint or "://" not in uri:
        return {"storage_path": uri}
    fs, path = filesystem(uri, endpoint)
    return {"storage_path": path, "storage_filesystem": fs}


def check_storage(uri: str, endpoint: str, key: str) -> None:
    """ConfigError naming ``key`` (e.g. ``tune.storage_path``) unless the storage ``uri`` can be used, checked
    before any worker starts: a local path always can (created when first written); a URI needs a scheme
    pyarrow knows (``s3://``, ``gs://``, ...) and a reachable bucket: ``s3://`` on ``endpoint``
    (``run.storage_endpoint``), else on AWS or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, with this
    process's credentials (the Ray workers need the same ones)."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        return
    scheme = uri.partition("://")[0]
    where = (f" on run.storage_endpoint={endpoint}" if endpoint else
             " (run.storage_endpoint empty: AWS itself, or AWS_ENDPOINT_URL_S3)" if scheme == "s3" else "")
    try:
        fs, path = filesystem(uri, endpoint)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    except (ValueError, OSError) as e:  # pyarrow: ArrowInvalid for an unknown scheme, OSError for an unreachable S3
        if "Unrecognized filesystem type" in str(e):
            raise ConfigError(f"{key}: unknown storage scheme {scheme}:// in {uri!r} (a local path, or a URI such as "
                              f"s3://bucket/prefix or gs://bucket/prefix)") from None
        raise ConfigError(f"{key}: cannot reach {uri!r}{where}: {e}") from None
    bucket = path.split("/")[0]  # object stores (s3, gs): the bucket must exist; else (hdfs) the server answers
    try:
        info = fs.get_file_info(bucket or path)
    except OSError as e:  # connection refused, unknown host, denied credentials
        raise ConfigError(f"{key}: cannot reach {uri!r}{where}: {e}") from None
    if bucket and info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{key}: bucket {bucket!r} of {uri!r} does not exist{where}")


def tree_fingerprint(uri: str, endpoint: str = "") -> dict | None:
    """Identifies a folder's content by its listing (relative paths, sizes, modification times) without
    reading it, on any storage (``filesystem``); None when ``uri`` is not a folder with files."""
    import hashlib

    import pyarrow.fs as pafs

    fs, path = filesystem(uri, endpoint)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    files = sorted((f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                    if f.type == pafs.FileType.File), key=lambda f: f.path)
    if not files:
        return None
    h = hashlib.sha1()
    for f in files:
        h.update(f"{f.path[len(path):].lstrip('/')}:{f.size}:{f.mtime_ns}".encode())
    return {"files": len(files), "listing_sha1": h.hexdigest()}


def exists(uri: str, endpoint: str = "") -> bool:
    """Whether file or folder ``uri`` (local path or cloud URI) exists."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, endpoint)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


# Ray Train 2.60 reads the worker-group start timeout from the driver's environment when fit() creates its
# controller (and passes it on); there is no parameter for it.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def failure_config(max_failures: int, restart_wait_s: float, section: str = "resources.sft"):
    """``FailureConfig``: ``max_failures`` lost worker groups (a dead worker or node) are restarted; with
    ``restart_wait_s`` > 0 a start that finds no room for the group within that time fails the run
    (``controller_failure_limit=0``) instead of retrying forever."""
    from ray.train import FailureConfig

    if restart_wait_s < 0:
        raise ConfigError(f"{section}.restart_wait_s: must be >= 0, got {restart_wait_s}")
    if restart_wait_s == 0:
        return FailureConfig(max_failures=max_failures)
    return FailureConfig(max_failures=max_failures, controller_failure_limit=0)


@contextlib.contextmanager
def restart_wait(restart_wait_s: float):
    """Set Ray Train's start timeout to ``restart_wait_s`` around ``fit()`` (0: leave Ray's default)."""
    if restart_wait_s <= 0:
        yield
        return
    saved = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = str(restart_wait_s)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = saved
