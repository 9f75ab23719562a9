"""One thin file-system layer for paths that may be fsspec URLs (``s3://``, ``gs://``, ``az://``,
``file://``) or plain local paths.

What accepts a URL: ``dataset.path``, ``cache.dir`` (precompute-teacher writes the cache
there), ``data.train_cache`` / ``data.eval_cache``, ``output_dir`` and ``resume`` (the run
directory: checkpoints, ``best/``, ``final/``, loss logs, metrics), a pretrained
``student.path`` (a previous round's ``final/``), ``inspect-cache`` and ``inspect-losses``.
Model, teacher and tokenizer paths and chat templates stay local: :func:`local_path` refuses a
URL with an error naming the config key, so a URL never silently becomes a local directory
(``Path("s3://b/x")`` is ``s3:/b/x``).

Options of the remote file system (endpoint, region, anonymous access, credentials) come from
fsspec's standard environment variables (``FSSPEC_S3_ENDPOINT_URL``, ``FSSPEC_S3_ANON``...,
see fsspec's configuration docs), the credential chain of the backend (``AWS_ACCESS_KEY_ID``,
``~/.aws``...) and the optional ``storage_options:`` config section (:func:`configure`, which
wins over the environment); credentials are never written into the cache, the run directory,
wandb or the logs (:func:`redact`).

Layout: :mod:`pipeline.storage.paths` (URL helpers), :mod:`pipeline.storage.folder`
(:class:`Folder`: one object for a local directory or a store prefix; the small-file layer),
:mod:`pipeline.storage.errors` (I/O errors while writing; the one classification of failed store
requests, :func:`store_cause`: unreachable endpoint, refused credentials, missing bucket, missing
object, throttling). This module only re-exports them.
"""
from pipeline.storage.errors import (  # noqa: F401
    StoreError,
    StoreNotFound,
    describe,
    one_line,
    store_cause,
    store_error,
    store_requests,
)
from pipeline.storage.folder import (  # noqa: F401
    Folder,
    Remote,
    RemotePath,
    check_access,
    file_exists,
    local_copy,
    read_file,
    staging_dir,
    write_file,
)
from pipeline.storage.paths import (  # noqa: F401
    SECRET_KEYS,
    URL_KEYS,
    configure,
    filesystem,
    is_remote,
    join,
    local_path,
    redact,
    scheme,
)

__all__ = ["Folder", "Remote", "RemotePath", "SECRET_KEYS", "StoreError", "StoreNotFound", "URL_KEYS", "check_access",
           "configure", "describe", "file_exists", "filesystem", "is_remote", "join", "local_copy", "local_path",
           "one_line", "read_file", "redact", "scheme", "staging_dir", "store_cause", "store_error", "store_requests",
           "write_file"]
