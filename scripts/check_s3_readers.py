"""Check the README's polars and duckdb one-liners that read loss logs from ``s3://``.

A loopback moto S3 server gets a run's ``loss_logs/`` under ``s3://my-bucket/kd/runs/r1``;
both one-liners then run as written in the README. Needs polars and duckdb (not dependencies of
kd-pipeline)::

    pip install --target /tmp/olap polars duckdb
    PYTHONPATH=/tmp/olap .venv/bin/python scripts/check_s3_readers.py runs/demo/student-kd-seed0
"""
import glob
import os
import socket
import sys

import boto3
from moto.server import ThreadedMotoServer


def main(run_dir: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, FSSPEC_S3_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true")
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="my-bucket")
        for f in glob.glob(f"{run_dir}/loss_logs/**/*.parquet", recursive=True):
            client.upload_file(f, "my-bucket", "kd/runs/r1/" + os.path.relpath(f, run_dir))
        # the README's lines, verbatim
        import polars as pl;  df = pl.read_parquet("s3://my-bucket/kd/runs/r1/loss_logs/**/*.parquet", hive_partitioning=True)  # noqa: E702
        print("polars:", df.shape, "columns", df.columns)
        import duckdb, fsspec;  duckdb.register_filesystem(fsspec.filesystem("s3"));  print(duckdb.sql("select split, sum(loss_sum)/sum(n_tokens) from read_parquet('s3://my-bucket/kd/runs/r1/loss_logs/**/*.parquet', hive_partitioning=true) group by split"))  # noqa: E401,E702
    finally:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1])
