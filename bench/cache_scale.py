"""Per-sample memory, open time and loader rate of a large cache, without a teacher.

Writes a synthetic cache of ``--samples`` samples (default 10^7) through the real cache writer
(:func:`pipeline.cache.open_writer`, the precompute defaults for shard and row-group sizes):
``--tokens`` tokens per sample (short, so 10^7 samples fit on disk), random input ids and a
random top-``--k`` per position (sorted log-probabilities of a random distribution holding 90 %
of the mass, tail 10 %). The bytes on disk are printed. Then it measures:

1. Stage 1's bookkeeping per sample (goal ≤ 24 B):
   * resume: :func:`pipeline.cache.prepare_cache` over the closed shards (the done samples as
     :class:`~pipeline.cache.ShardIds`): its ``nbytes`` / N and the Python heap it leaves
     allocated (``tracemalloc``, which numpy reports to) / N;
   * the duplicate check of the streamed windows (:meth:`pipeline.data.SampleWindows.check_unique`'s
     :class:`~pipeline.sample_ids.HashIndex`, fed the same number of IDs in windows of 1,024):
     ``nbytes`` / N and its ``tracemalloc`` share.
2. The cache reader (stage 2's bookkeeping; goal ≤ 24 B, open ≤ 10 s at 10^7): wall time of
   :func:`pipeline.cache.open_cache` (verify on, the default), and the heap it leaves allocated
   per sample (``tracemalloc``, a second open) plus the process RSS delta of the first open.
3. Loader vs consumption (goal ≥ 20×), in samples/s (the loader's cost is per sample and per
   block; the synthetic samples are short): what :class:`pipeline.student.sampler.StepPrefetcher`
   (``num_workers=0``: one thread, inline) delivers as collated micro-batches of
   ``--micro-batch`` samples per rank from a freshly opened reader (cold LRU, the default
   ``data.max_cached_bytes``) over ``--steps`` steps, for each ``data.shuffle`` (``streams``, the
   default; ``global``; ``block``; built by train-student's own
   :func:`pipeline.student.streams.build_sampler`) at world size 1 and as rank ``--rank`` of 8
   (the rank's own share of each global batch of 8 × ``--micro-batch``: what one of 8 ranks
   reads). The first step (epoch order, first imports) is timed apart; the modes alternate for
   ``--rounds`` rounds and the median rate is printed. Also printed: blocks decoded and shards
   opened per 1,000 samples delivered. The student's consumption is measured
   in the same run (``--student-steps`` plain float32 training steps of the stories260K-sized
   student, hidden 32, 4 layers, V = 512, on ``16 × --consume-seq`` batches, one thread: forward,
   cross-entropy, backward, AdamW), or taken from ``--consume-tok-s`` when ``--student-steps 0``
   (34,600 tokens/s of 256-token rows measured by ``bench/student_step.py``).

4. With ``--bucket`` (instead of 1-3): the default loader from a loopback S3 bucket against
   the local cache, one epoch each (goal: >= 0.9x the local rate, <= 1.2x the cache's bytes
   fetched per epoch); see :func:`bucket`.

Run (10^7 on a quiet machine with a large disk; 10^5 takes about a minute)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/cache_scale.py --samples 100000 [--dir DIR] [--keep]
    OMP_NUM_THREADS=1 .venv/bin/python bench/cache_scale.py --cache CACHE_DIR  # again, on the cache a --keep run left
    OMP_NUM_THREADS=1 .venv/bin/python bench/cache_scale.py --samples 20000 --bucket
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache import cache_bytes, finalize_cache, open_cache, open_writer, prepare_cache  # noqa: E402
from pipeline.cache.manifest import Manifest, TeacherEntry  # noqa: E402
from pipeline.cache.records import CacheRecord  # noqa: E402
from pipeline.config.precompute import CacheConfig  # noqa: E402
from pipeline.sample_ids import HashIndex, id_hashes  # noqa: E402
from pipeline.student.sampler import StepPrefetcher  # noqa: E402

CHUNK = 4096


def _records(rng: np.random.Generator, start: int, n: int, T: int, k: int, V: int) -> list[CacheRecord]:
    """``n`` synthetic records ``synth-{start}``... of ``T`` tokens, valid top-``k`` targets."""
    P = T - 1
    ids = rng.integers(0, V, (n, T)).astype(np.int32)
    top = rng.integers(0, V, (n, P, k)).astype(np.int32)
    p = rng.random((n, P, k)) + 1e-3
    p = -np.sort(-p / p.sum(-1, keepdims=True) * 0.9, axis=-1)
    vals = np.log(p).astype(np.float32)
    tail = np.full((n, P), np.log(0.1), np.float32)
    mask = np.ones(T, bool)
    return [CacheRecord(f"synth-{start + i}", ids[i], mask, top[i], vals[i], tail[i], 1.0) for i in range(n)]


def _manifest(backend: str, k: int, V: int, T: int) -> Manifest:
    return Manifest(backend=backend, k=k, index_dtype="uint16", value_dtype="float32", vocab_size=V, temperature=1.0,
                    tokenizer_fingerprint="synthetic", teachers=[TeacherEntry(path="none", weight=1.0, fingerprint="none")],
                    dataset={}, dataset_fingerprint=f"synthetic-{T}", max_length=T)


def write_cache(d: Path, args) -> float:
    """Write the synthetic cache (not finalised: resume is measured first); returns seconds."""
    fields = CacheConfig.model_fields
    m = _manifest(args.backend, args.k, args.vocab, args.tokens)
    state = prepare_cache(d, m)
    w = open_writer(d, m, 0, state.attempt, args.samples_per_shard or fields["samples_per_shard"].default,
                    fields["row_group_size"].default)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for a in range(0, args.samples, CHUNK):
        w.write(_records(rng, a, min(CHUNK, args.samples - a), args.tokens, args.k, args.vocab))
    w.close()
    return time.perf_counter() - t0


def _rss() -> int:
    """Resident set size of this process, bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _traced(fn):
    """(fn's result, bytes of Python/numpy heap it left allocated while its result is alive)."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    out = fn()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return out, after - before


def stage1(d: Path, N: int, backend: str, k: int, V: int, T: int) -> None:
    state, heap = _traced(lambda: prepare_cache(d, _manifest(backend, k, V, T)))
    print(f"stage 1 resume (done samples): {len(state.done)} samples; ShardIds {state.done.nbytes / N:.1f} B/sample, "
          f"heap left {heap / N:.1f} B/sample (goal <= 24)")

    def windows() -> HashIndex:
        ix = HashIndex(np.int32)
        for w, a in enumerate(range(0, N, 1024)):
            ix.add(id_hashes(f"synth-{i}" for i in range(a, min(a + 1024, N))), np.full(min(1024, N - a), w))
        return ix

    ix, heap = _traced(windows)
    print(f"stage 1 duplicate check (windows of 1024): HashIndex {ix.nbytes / N:.1f} B/sample, "
          f"heap left {heap / N:.1f} B/sample (goal <= 24)")


def reader(d: Path, N: int, args) -> None:
    rss0 = _rss()
    t0 = time.perf_counter()
    r = open_cache(d)
    dt = time.perf_counter() - t0
    rss = _rss() - rss0
    print(f"open_cache: {dt:.2f} s for {len(r)} samples in {len(r.shards)} shards (goal <= 10 s at 10^7); "
          f"index {r.nbytes / N:.1f} B/sample; RSS delta {rss / N:.1f} B/sample")
    r2, heap = _traced(lambda: open_cache(d))
    print(f"open_cache heap left: {heap / N:.1f} B/sample (goal <= 24)")
    del r2
    consume = student_rate(args)
    runs: dict[tuple, list] = {}
    for _ in range(args.rounds):  # the modes alternate: a shared machine's load hits them alike
        for world, rank in ((1, 0), (8, args.rank)):
            for shuffle in ("streams", "global", "block"):
                runs.setdefault((world, rank, shuffle), []).append(loader_rate(d, args, shuffle, world, rank))
    for (world, rank, shuffle), rs in runs.items():
        rate = statistics.median(r["rate"] for r in rs)
        each = ", ".join(f"{r['rate']:,.0f}" for r in rs)
        print(f"loader {rs[0]['note']}, rank {rank} of {world} (1 thread, micro-batch {args.micro_batch}): "
              f"{rate:,.0f} samples/s (median of {len(rs)}: {each}; "
              f"{statistics.median(r['cpu_rate'] for r in rs):,.0f} per CPU second) -> "
              f"{rate / consume:.1f}x the student (goal >= 20x); per 1,000 samples {rs[0]['decoded']:.0f} blocks "
              f"decoded, {rs[0]['opened']:.1f} shards opened; first step {rs[0]['first']:.2f} s")


def bucket(d: Path, args) -> None:
    """One epoch of the ``streams`` loader at one rank from the cache copied into a loopback S3
    bucket (moto's server in its own process, ``bench/object_store_bench.py``) against the same
    epoch from the local copy, each with train-student's loader settings (local: the default
    ``data.num_workers`` 1 thread, 4 steps ahead; store: 4 threads, 16 steps ahead), alternating
    for ``--rounds`` rounds: samples/s, bytes fetched at open and in the epoch (ratio to the
    cache's bytes), requests, and the CPU seconds the server used (it shares this machine's
    cores with the loader, which a real store does not)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from object_store_bench import FETCHED, count_s3_reads, start_store
    from pipeline.config.train import TrainDataConfig
    from pipeline.storage import Remote
    from pipeline.student.streams import build_sampler

    count_s3_reads()
    proc, _ = start_store()
    try:
        Remote("s3://kd-bench/cache").put_dir(d, "")
        size = cache_bytes(d)
        rates: dict[str, list[float]] = {"local": [], "bucket": []}
        cpu_rates: dict[str, list[float]] = {"local": [], "bucket": []}
        for _ in range(args.rounds):
            for where, workers, depth in (("local", 1, 4), ("bucket", 4, 16)):
                src = str(d) if where == "local" else "s3://kd-bench/cache"
                FETCHED.update(bytes=0, requests=0)
                r = open_cache(src)
                at_open = dict(FETCHED)
                sampler, note = build_sampler(TrainDataConfig(train_cache=src), r, np.arange(len(r)), None,
                                              args.micro_batch, 1, 0, 1, seed=0)
                pf = StepPrefetcher(sampler, r, num_workers=workers, depth=depth)
                cpu0, t0, mine0 = _cpu_seconds(proc.pid), time.perf_counter(), time.process_time()
                for _ in range(sampler.steps_per_epoch):
                    pf.next_step()
                dt, cpu = time.perf_counter() - t0, _cpu_seconds(proc.pid) - cpu0
                mine = time.process_time() - mine0
                pf.close()
                rate = sampler.steps_per_epoch * args.micro_batch / dt
                rates[where].append(rate)
                cpu_rates[where].append(sampler.steps_per_epoch * args.micro_batch / mine)
                fetched = (FETCHED["bytes"] - at_open["bytes"]) / size
                print(f"{where:6} {note}, {workers} thread(s): one epoch at {rate:,.0f} samples/s "
                      f"({sampler.steps_per_epoch * args.micro_batch / mine:,.0f} per CPU second of this process)" + (
                      f"; fetched {at_open['bytes'] / size:.2f}x the cache at open ({at_open['requests']} requests) "
                      f"and {fetched:.2f}x in the epoch ({FETCHED['requests'] - at_open['requests']} requests; goal "
                      f"<= 1.2x); the server used {cpu:.1f} CPU s of the epoch's {dt:.1f} s" if where == "bucket" else ""),
                      flush=True)
        med = {w: statistics.median(v) for w, v in rates.items()}
        cpu = {w: statistics.median(v) for w, v in cpu_rates.items()}
        print(f"bucket / local: {med['bucket'] / med['local']:.2f}x (medians {med['bucket']:,.0f} / "
              f"{med['local']:,.0f} samples/s; goal >= 0.9x); per CPU second {cpu['bucket'] / cpu['local']:.2f}x "
              f"({cpu['bucket']:,.0f} / {cpu['local']:,.0f})")
    finally:
        proc.terminate()
        proc.wait()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def student_rate(args) -> float:
    """Samples/s the stories260K-sized student trains on (``--student-steps`` plain steps after
    2 warm-up steps, median step time), or ``--consume-tok-s / --consume-seq``."""
    if args.student_steps <= 0:
        rate = args.consume_tok_s / args.consume_seq
        print(f"student (given): {rate:,.0f} samples/s ({args.consume_tok_s:,.0f} tokens/s of {args.consume_seq}-token rows)")
        return rate
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data.demo_corpus import llama_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(512, 32, 4, 4, 2, 86, context=args.consume_seq))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (16, args.consume_seq))
    times = []
    for i in range(args.student_steps + 2):
        t0 = time.perf_counter()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    rate = 16 / float(np.median(times[2:]))
    print(f"student (measured, {torch.get_num_threads()} thread(s)): {rate:,.0f} samples/s "
          f"({rate * args.consume_seq:,.0f} tokens/s of {args.consume_seq}-token rows)")
    return rate


def loader_rate(d: Path, args, shuffle: str, world: int, rank: int) -> dict:
    """One rank's loader with ``data.shuffle: shuffle`` over ``--steps`` steps after the first:
    ``rate`` (samples/s), ``decoded`` blocks and ``opened`` shards per 1,000 samples, ``first``
    step's seconds, ``note`` (the order's description)."""
    from pipeline.config.train import TrainDataConfig
    from pipeline.student.streams import build_sampler

    r = open_cache(d)  # cold LRU, no open shard
    decoded = []
    read = r.read_block
    r.read_block = lambda s, b: decoded.append(1) or read(s, b)
    data = TrainDataConfig(train_cache=str(d), shuffle=shuffle)
    sampler, note = build_sampler(data, r, np.arange(len(r)), None, args.micro_batch, 1, rank, world, seed=0)
    pf = StepPrefetcher(sampler, r, num_workers=0)
    t0 = time.perf_counter()
    pf.next_step()
    first = time.perf_counter() - t0
    n0, t0, c0 = len(decoded), time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        pf.next_step()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = args.steps * args.micro_batch
    files = getattr(getattr(r.backend, "_local", None), "files", None)  # parquet: this thread's open shards
    return {"rate": n / dt, "cpu_rate": n / cpu, "decoded": (len(decoded) - n0) * 1000 / n, "first": first, "note": note,
            "opened": files.opens * 1000 / (n + args.micro_batch) if files is not None else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10**7)
    ap.add_argument("--tokens", type=int, default=8, help="tokens per sample")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--backend", default="parquet", choices=["parquet", "zarr"])
    ap.add_argument("--samples-per-shard", type=int, default=None, help="default: cache.samples_per_shard's default")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rank", type=int, default=3, help="the simulated rank of 8")
    ap.add_argument("--rounds", type=int, default=3, help="loader measurements per mode (median printed)")
    ap.add_argument("--student-steps", type=int, default=10, help="student steps timed (0: use --consume-tok-s)")
    ap.add_argument("--consume-tok-s", type=float, default=34_600.0, help="the student's tokens/s (--student-steps 0)")
    ap.add_argument("--consume-seq", type=int, default=256, help="tokens per sample of the student's batches")
    ap.add_argument("--dir", default=None, help="parent directory of the cache (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the cache")
    ap.add_argument("--cache", default=None, help="measure the reader and loader of this cache (written by --keep "
                                                  "earlier) instead of writing one")
    ap.add_argument("--bucket", action="store_true", help="only the loader from a loopback S3 bucket against the "
                                                          "local cache (one epoch each: use a small --samples)")
    args = ap.parse_args()
    if args.cache:
        (bucket if args.bucket else lambda d, a: reader(d, len(open_cache(d)), a))(Path(args.cache), args)
        return
    d = Path(tempfile.mkdtemp(prefix="cache-scale-", dir=args.dir))
    try:
        dt = write_cache(d, args)
        N = args.samples
        print(f"wrote {N} samples x {args.tokens} tokens (k={args.k}, {args.backend}) in {dt:.1f} s: "
              f"{cache_bytes(d):,} bytes on disk ({cache_bytes(d) / N:.1f} B/sample) in {d}")
        stage1(d, N, args.backend, args.k, args.vocab, args.tokens)
        finalize_cache(d)
        bucket(d, args) if args.bucket else reader(d, N, args)
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
