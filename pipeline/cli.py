"""Shared command-line plumbing of the stages: ``--config FILE [key=value ...]``, process-group
set-up and teardown, and one-line errors with a non-zero exit code."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from pipeline.config import ConfigError, load_config

USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, KeyError)


def parse(prog: str, description: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-3")
    return p.parse_args(argv)


def run_stage(prog: str, cfg_cls, fn: Callable, argv: list[str] | None, description: str) -> int:
    """Load the config, initialise distributed, call ``fn(cfg, info)``, always tear down.

    Returns 0 on success, 2 on a user error (bad config, path, vocabulary...; one line on
    stderr naming the key/path/sizes), and re-raises anything unexpected.
    """
    args = parse(prog, description, argv)
    from pipeline.distributed import barrier, init_distributed, teardown

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()  # keep the console to our own progress bars
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        cfg = load_config(cfg_cls, args.config, args.overrides)
        info = init_distributed(cfg.device)
        fn(cfg, info)
        barrier()  # no rank destroys the gloo group while another still uses it (aborts otherwise)
        return 0
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        return 2
    finally:
        teardown()
