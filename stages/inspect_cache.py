"""``inspect-cache CACHE_DIR``: manifest, sizes, bytes/token, top-k mass and teacher entropy.

``--json`` prints the same figures as one JSON object; ``--plot FILE.png`` writes histograms;
``--validate`` also decodes and checks every record (exit 2 naming the shard and sample ID).
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="inspect-cache", description=__doc__.splitlines()[0])
    p.add_argument("cache_dir")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--plot", default=None, help="write histograms to FILE.png")
    p.add_argument("--max-samples", type=int, default=None, help="distributions from the first N samples only")
    p.add_argument("--validate", action="store_true", help="check checksums and every record")
    args = p.parse_args(argv)

    if args.max_samples is not None and args.max_samples < 1:
        print(f"inspect-cache: error: --max-samples {args.max_samples}: must be at least 1", file=sys.stderr)
        return 2
    from pipeline.cache import validate_cache
    from pipeline.cache.stats import cache_summary, format_summary, plot_summary
    from pipeline.storage import StoreError, one_line, store_requests

    try:
        with store_requests(args.cache_dir):  # a shard read that fails on the store: URL and cause
            if args.validate:
                validate_cache(args.cache_dir, allow_incomplete=True)
            summary, arrays = cache_summary(args.cache_dir, args.max_samples)
    except (FileNotFoundError, ValueError, KeyError, StoreError) as e:  # a store failure: URL and cause named
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"inspect-cache: error: {one_line(msg)}", file=sys.stderr)
        return 2
    if args.validate:
        summary["validated"] = True
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    if args.plot:
        plot_summary(arrays, summary, args.plot)
        if not args.json:
            print(f"histograms written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
