"""A local S3-compatible server for the object-store tests (moto's server mode, threaded in this process)."""

from __future__ import annotations

import contextlib
import os
import socket

# Credentials moto accepts; the driver (and the Ray workers, through their runtime_env) get them.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
BUCKET = "tsrec-ckpt"


@contextlib.contextmanager
def moto_s3():
    """Yields ``{"endpoint": "http://127.0.0.1:PORT", "bucket": BUCKET, "client": boto3 S3 client}`` with the
    bucket created; this process has :data:`S3_TEST_ENV` meanwhile (restored afterwards)."""
    import boto3  # moto[server] is in the dev extra: a missing install fails here, it does not skip
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in S3_TEST_ENV}
    os.environ.update(S3_TEST_ENV)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield {"endpoint": endpoint, "bucket": BUCKET, "client": client}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
