"""An S3 endpoint on 127.0.0.1 for the streaming benchmarks: moto's server (the `test` extra), a bucket, files
uploaded with boto3, and the environment that points s3fs (in this process and its children) at it. Nothing
leaves the loopback; the server stops and the environment is put back on exit."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Iterator

BUCKET = "simclr-bench"
# set for the endpoint, or cleared (a proxy would see the 127.0.0.1 calls; a profile could name another store)
ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
       "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "HTTP_PROXY",
       "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@contextlib.contextmanager
def s3_store(uploads: dict[str, Path], scratch: Path) -> Iterator[str]:
    """Serve S3 on a free port of 127.0.0.1, upload every file of each folder in `uploads` ({prefix: folder})
    to s3://BUCKET/prefix/NAME, and yield the s3:// URL of the bucket."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise SystemExit(f"the S3 rows need moto and boto3 ({e}): pip install -e '.[test]'") from None
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
    saved = {k: os.environ.pop(k, None) for k in ENV}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    started = threading.Thread(target=server.start, daemon=True)  # start() never returns when the bind fails
    started.start()
    started.join(20)
    try:
        if started.is_alive():
            raise SystemExit("the S3 server did not start on 127.0.0.1 within 20 s")
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=endpoint,
                          AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=str(scratch / "no-aws-config"),
                          AWS_SHARED_CREDENTIALS_FILE=str(scratch / "no-aws-credentials"))
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        for prefix, folder in uploads.items():
            for path in sorted(p for p in folder.iterdir() if p.is_file()):
                s3.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
        yield f"s3://{BUCKET}"
    finally:
        if not started.is_alive():
            server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
