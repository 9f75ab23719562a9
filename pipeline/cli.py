"""Shared command-line plumbing of the stages: ``--config FILE [key=value ...]`` plus each stage's
own flags, process-group set-up and teardown, and one-line errors with a non-zero exit code.

Error policy: the library converts the errors of bad inputs where they happen (a file, a
directory, a checkpoint) into :data:`USER_ERRORS` whose message names the item; those end
with exit code 2 and the single line ``PROG: error: MESSAGE`` on stderr. Anything else is a
bug or an environment failure: one line ``PROG: internal error: TYPE: MESSAGE (rerun with
KD_DEBUG=1 for the traceback)`` and exit code 1. ``KD_DEBUG=1`` re-raises both kinds.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from pipeline.config import ConfigError, load_config
from pipeline.storage.errors import StorageError, StoreError, one_line, store_cause

USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, KeyError, StorageError, StoreError)

ENV_HELP = """environment:
  KD_DEBUG=1             show the traceback of an error instead of one line
  KD_PROGRESS_EVERY_S=N  seconds between progress lines when stderr is not a terminal (default 30)"""


def parse(prog: str, description: str, argv: list[str] | None,
          flags: dict[str, tuple[str, str]] | None = None,
          switches: dict[str, str] | None = None) -> argparse.Namespace:
    """Parse ``--config FILE [flags] [key=value ...]``.

    Args:
        flags: ``{"--flag": (override, help)}``: boolean flags that append ``override`` (a
            ``key=value``) to the overrides when given, e.g. ``--lr-find`` → ``lr_find.enabled=true``.
        switches: ``{"--switch": help}``: boolean options of this invocation only, never a
            config key (so never written to, or repeated from, a config file), e.g.
            ``--restart``; ``args.restart`` is True when given.
    Returns:
        The namespace; ``overrides`` includes the overrides of the flags given.
    """
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=ENV_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file")
    for flag, (override, text) in (flags or {}).items():
        p.add_argument(flag, action="append_const", const=override, dest="flag_overrides",
                       help=f"{text} (= {override})")
    for switch, text in (switches or {}).items():
        p.add_argument(switch, action="store_true", help=text)
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-3")
    args = p.parse_intermixed_args(argv)
    args.overrides = list(args.overrides) + list(getattr(args, "flag_overrides", None) or [])
    return args


def run_stage(prog: str, cfg_cls, fn: Callable, argv: list[str] | None, description: str,
              flags: dict[str, tuple[str, str]] | None = None) -> int:
    """Load the config, initialise distributed, call ``fn(cfg, info)``, always tear down.

    Ends through :func:`pipeline.distributed.finish`: under torchrun the worker process exits
    there instead of returning.

    Returns:
        0 on success; 2 on a user error (:data:`USER_ERRORS`: bad config, path, data file,
        model, checkpoint, vocabulary, a failed object-store request...; one line on stderr
        naming the key/path/sizes; a store failure caught nowhere else names its cause); 1 on
        any other exception (one line with its type; ``KD_DEBUG=1`` re-raises instead).
    """
    args = parse(prog, description, argv, flags)
    from pipeline.distributed import finish, teardown

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()  # keep the console to our own progress bars
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    debug = os.environ.get("KD_DEBUG", "") not in ("", "0")
    try:
        code = _call(prog, cfg_cls, fn, args, debug)
    except BaseException:  # KD_DEBUG re-raise, KeyboardInterrupt: the traceback, after teardown
        teardown()
        raise
    return finish(code, sync=False)  # _call passed its barrier on success; an error path must not wait


def _call(prog: str, cfg_cls, fn: Callable, args: argparse.Namespace, debug: bool) -> int:
    """``fn(cfg, info)`` with the error policy of :func:`run_stage`; returns the exit code."""
    from pipeline.distributed import barrier, init_distributed
    from pipeline.progress import close_all

    try:
        cfg = load_config(cfg_cls, args.config, args.overrides)
        info = init_distributed(cfg.device)
        fn(cfg, info)
        barrier()  # no rank destroys the gloo group while another still uses it (aborts otherwise)
        return 0
    except USER_ERRORS as e:
        close_all()  # an open progress bar's line is ended first: the error starts on its own line
        if debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {one_line(msg)}", file=sys.stderr, flush=True)
        return 2
    except BaseException as e:  # last resort: a bug or an environment failure, not a bad input
        if not isinstance(e, Exception) and type(e).__name__ != "CheckpointException":
            raise  # KeyboardInterrupt, SystemExit
        close_all()
        if debug:
            raise
        cause = store_cause(e)  # a store request that no call site named (e.g. a shard read mid-run)
        if cause is not None:
            print(f"{prog}: error: a request to the object store failed: {cause}", file=sys.stderr, flush=True)
            return 2
        what = f"{type(e).__name__}: {one_line(e)}" if one_line(e) else type(e).__name__
        print(f"{prog}: internal error: {what} (rerun with KD_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
        return 1
