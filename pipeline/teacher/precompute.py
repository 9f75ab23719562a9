"""Stage 1: run the frozen teacher(s) over the samples and write the sparse top-k cache."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.storage import Folder, StoreError
from pipeline.cache import (CacheWriter, Encoding, Manifest, PrepareState, cache_record_from_targets, finalize_cache,
                            open_writer, prepare_cache)
from pipeline.cache.manifest import TeacherEntry
from pipeline.cache.shard_ids import ShardIds
from pipeline.config import PrecomputeConfig
from pipeline import progress
from pipeline.data import Sample, SampleWindows
from pipeline.distributed import DistInfo, barrier, gather_objects, on_rank0, print0, shard_model
from pipeline.data.batch import collate
from pipeline.models import (defer_output_projection, has_tokenizer, load_teacher_sharded, load_tokenizer, model_fingerprint,
                             tokenizer_fingerprint, vocab_size)
from pipeline.teacher.load_check import FirstBatch, check_first_batch, first_batch
from pipeline.teacher.sampled import SampleStats, sample_seed, sampled_targets
from pipeline.teacher.topk import fused_topk_targets, output_head, position_logprobs




def _load_teachers(cfg: PrecomputeConfig, tokenizer, dtype: torch.dtype,
                   device: torch.device) -> tuple[list, int, list[TeacherEntry]]:
    """Load every teacher, sharded (FSDP2) on ``device``, one at a time and each without ever
    existing whole on a rank (:func:`pipeline.models.load_teacher_sharded`), and check that
    they share the tokenizer and cover its vocabulary.

    The cache vocabulary is ``V = len(tokenizer)``, the tokens that can occur: a teacher whose
    output layer is padded beyond it (e.g. to a multiple of 64) has its logits sliced to the
    first V before the softmax (pipeline/teacher/topk.py), so padding rows get no probability.

    Returns:
        (teachers in eval mode with frozen parameters in ``dtype``, V, manifest entries with
        normalised weights and model fingerprints)
    Raises:
        FileNotFoundError: a teacher directory is missing.
        ValueError: a teacher's tokenizer differs from the shared one (both fingerprints named),
            an ensemble member has no tokenizer files to check, or a teacher has fewer output
            logits than the tokenizer has tokens.
    """
    V, fp = len(tokenizer), tokenizer_fingerprint(tokenizer)
    tok_dir = cfg.tokenizer or cfg.teachers[0].path
    total = sum(t.weight for t in cfg.teachers)
    teachers, entries = [], []
    for t in cfg.teachers:
        if not Path(t.path).is_dir():
            raise FileNotFoundError(f"teacher directory not found: {t.path}")
        if has_tokenizer(t.path):
            if Path(t.path).resolve() != Path(tok_dir).resolve():
                other = tokenizer_fingerprint(load_tokenizer(t.path))
                if other != fp:
                    raise ValueError(f"teacher {t.path} has a different tokenizer (fingerprint {other}) than {tok_dir} "
                                     f"(fingerprint {fp}); all teachers must share one tokenizer and vocabulary")
        elif len(cfg.teachers) > 1:
            raise ValueError(f"teacher {t.path} has no tokenizer files, so it cannot be checked against {tok_dir}; "
                             "save the tokenizer with every teacher of an ensemble")
        teachers.append(load_teacher_sharded(t.path, dtype, device, _shard_teacher))
        if vocab_size(teachers[-1]) < V:
            raise ValueError(f"teacher {t.path} has {vocab_size(teachers[-1])} output logits but the tokenizer "
                             f"({tok_dir}) has {V} tokens")
        entries.append(TeacherEntry(path=str(Path(t.path).resolve()), weight=t.weight / total,
                                    fingerprint=model_fingerprint(t.path)))
    return teachers, V, entries


def _shard_teacher(model) -> None:
    """Replace the output layer by :class:`~pipeline.models.OutputProjection` (the forward
    returns hidden states; the targets are computed from them chunk by chunk), then FSDP2."""
    defer_output_projection(model)
    shard_model(model, sum_gradients=False)


PROGRESS_EVERY_S = 30.0
"""Seconds between the per-rank progress lines of the teacher loop."""


@dataclass(frozen=True)
class PrecomputeStats:
    """Throughput and host memory of one :func:`precompute` run's teacher loop, gathered from
    every rank (the same on every rank).

    Attributes:
        tokens: tokens of the samples the teacher ran on (already cached ones excluded),
            summed over ranks.
        seconds: wall-clock seconds of the slowest rank's teacher loop (from the loop's start
            until its writer thread has written the last shard).
        per_rank: ``(tokens, seconds)`` of each rank, in rank order.
        peak_rss: peak resident set size of each rank's process, bytes
            (:func:`peak_rss_bytes`), in rank order.
    """

    tokens: int
    seconds: float
    per_rank: list[tuple[int, float]]
    peak_rss: list[int]

    @property
    def tokens_per_s(self) -> float:
        """The global rate: all ranks' tokens / the slowest rank's seconds (tokens/s)."""
        return self.tokens / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class PrecomputeResult:
    """What :func:`precompute` returns, on every rank.

    Attributes:
        manifest: the final manifest of the complete cache on rank 0; None on the other ranks.
        stats: the teacher loop's throughput and memory (:class:`PrecomputeStats`).
    """

    manifest: Manifest | None
    stats: PrecomputeStats


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's address space, bytes: ``VmHWM`` of
    ``/proc/self/status`` on Linux. Not ``ru_maxrss``: Linux carries that over ``exec`` from the
    forked parent, so a child started by a large process reports the parent's size. Falls back
    to ``ru_maxrss`` elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _throughput(info: DistInfo, tokens: int, seconds: float) -> PrecomputeStats:
    """Gather every rank's (tokens, seconds) of the teacher loop and its peak host memory
    (:func:`peak_rss_bytes`); rank 0 prints one line per rank and the global tokens/s (all ranks'
    tokens / the slowest rank's seconds). Collective; returns the gathered stats on every rank."""
    peak = peak_rss_bytes()
    per_rank = gather_objects((tokens, seconds, peak))
    total, wall = sum(t for t, _, _ in per_rank), max(s for _, s, _ in per_rank)
    out = PrecomputeStats(tokens=total, seconds=wall, per_rank=[(t, s) for t, s, _ in per_rank],
                          peak_rss=[m for _, _, m in per_rank])
    if info.world_size > 1:
        for r, (t, sec, mem) in enumerate(per_rank):
            print0(f"[precompute] rank {r}: {t} tokens in {sec:.1f}s ({t / max(sec, 1e-9):.0f} tok/s), "
                   f"peak RSS {mem / 2**20:.0f} MiB")
    print0(f"[precompute] teacher loop: {total} tokens in {wall:.1f}s, global {total / max(wall, 1e-9):.0f} tok/s "
           f"on {info.world_size} rank(s); peak RSS {max(m for _, _, m in per_rank) / 2**20:.0f} MiB (largest rank)")
    return out


RELEASE_THRESHOLD = 1 << 20
"""Bytes from which glibc serves an allocation by ``mmap`` (returned to the OS when freed) with
``host_memory: release``."""


def _release_host_memory(cfg: PrecomputeConfig, info: DistInfo) -> bool:
    """Whether this run sets :data:`RELEASE_THRESHOLD` (``host_memory``; ``auto`` = on CPU
    with more than one rank)."""
    if cfg.host_memory == "auto":
        return info.device.type == "cpu" and info.world_size > 1
    return cfg.host_memory == "release"


def _return_freed_memory() -> bool:
    """Make glibc serve every allocation of :data:`RELEASE_THRESHOLD` bytes or more by ``mmap``,
    so the teacher loop's freed activations and FSDP2's freed all-gather buffers go back to the
    OS at once instead of fragmenting the heap.

    Trade-off, measured on 2 CPU cores (bench/precompute_bench.py and the numbers in the
    README): a 155M-parameter teacher at 2 ranks peaks at about 1.0 GiB per rank with it and
    2.1 GiB without; but every large activation then comes in fresh pages, which made a
    hidden-512 teacher's forward about 25 % slower. Same as ``MALLOC_MMAP_THRESHOLD_`` (glibc
    ``mallopt``, ``M_MMAP_THRESHOLD`` = -3). Returns False where there is no glibc (nothing
    changed).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(-3, RELEASE_THRESHOLD))
    except (OSError, AttributeError):
        return False


def _batches(samples: list[Sample], batch_size: int) -> list[list[Sample]]:
    """Length-sorted batches (little padding) of one window's samples; independent of the
    world size."""
    order = sorted(samples, key=lambda s: (-len(s.input_ids), s.sample_id))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class _Plan:
    """The global sequence of batches, built window by window (identical on every rank):
    call ``c`` runs global batches ``c·W .. c·W + W − 1``, batch ``c·W + r`` on rank ``r``."""

    windows: SampleWindows
    done: ShardIds  # the closed shards' samples (hashes, confirmed against their IDs)
    batch_size: int
    world_size: int
    cached: int = 0  # samples of the windows seen so far that were already in the cache
    _pending: deque = field(default_factory=deque)
    _exhausted: bool = False

    def __post_init__(self) -> None:
        self._it = iter(self.windows)  # windows are read (collectively) only by next_call

    def next_call(self) -> list[tuple[float, list[Sample]]]:
        """The next call's ``(row credit, batch)`` pairs, one per rank that has a batch (fewer
        than W at the end; empty once every batch has run). Collective (reads windows)."""
        credit = 0.0
        while len(self._pending) < self.world_size and not self._exhausted:
            try:
                rows, samples = next(self._it)
            except StopIteration:
                self._exhausted = True
                break
            found = self.done.find([s.sample_id for s in samples]) if len(self.done) else None
            todo = samples if found is None else [s for s, i in zip(samples, found) if i < 0]
            self.cached += len(samples) - len(todo)
            batches = _batches(todo, self.batch_size)
            credit += rows
            for b in batches:
                self._pending.append((credit / len(batches), b))
            if batches:
                credit = 0.0
        return [self._pending.popleft() for _ in range(min(self.world_size, len(self._pending)))]


def precompute(cfg: PrecomputeConfig, info: DistInfo) -> PrecomputeResult:
    """Write the teacher cache for ``cfg``; returns, on every rank, the final manifest (rank 0;
    None elsewhere) and the teacher loop's throughput (:class:`PrecomputeResult`).

    Resumable: sample IDs in closed shards of a compatible cache are skipped. The samples are
    streamed window by window (:class:`~pipeline.data.SampleWindows`, ``window_rows`` rows, each
    rank tokenizing its part); global batch ``b`` of the length-sorted batches (per window, the
    same at every world size) goes to rank ``b % world_size`` (:class:`_Plan`); ranks with
    fewer batches run padding calls so every rank makes the same number of forward calls.
    Targets are extracted fused from the hidden states (:func:`_teacher_targets`).

    The teacher loop only builds records; each rank's background writer thread
    (:class:`~pipeline.cache.writer.CacheWriter`, at most ``cache.writer_queue_shards`` shards
    pending) codes and writes the shards, and is joined before the cache is finalised.

    Raises:
        FileNotFoundError, ValueError, KeyError: bad paths, incompatible cache, vocab mismatch,
            empty dataset; raised on every rank.
        ValueError: invalid teacher output (sample ID named; its shard is not written).
        StorageError: a shard or marker could not be written (full disk...); raised on that
            rank, the cache stays incomplete.
    """
    tok_dir = cfg.tokenizer or cfg.teachers[0].path
    tokenizer = load_tokenizer(tok_dir)
    dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
    if _release_host_memory(cfg, info):  # shards + per-block all-gathers fragment the heap: give memory back
        _return_freed_memory()
    teachers, V, entries = _load_teachers(cfg, tokenizer, dtype, info.device)
    windows = SampleWindows(cfg.dataset, tokenizer, cfg.window_rows, info.rank, info.world_size, gather_objects,
                            with_offsets=cfg.cache.text_offsets)
    manifest = Manifest(backend=cfg.cache.backend, k=cfg.cache.k, index_dtype=Encoding.index_dtype_for(V),
                        value_dtype=cfg.cache.value_dtype, index_coding=cfg.cache.index_coding,
                        q8_step=cfg.cache.q8_step, compression=cfg.cache.compression, vocab_size=V, temperature=cfg.temperature,
                        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), teachers=entries, combine=cfg.combine,
                        dataset=cfg.dataset.model_dump(), dataset_fingerprint=windows.fingerprint,
                        max_length=cfg.dataset.max_length)
    if cfg.cache.text_offsets:  # cross-tokenizer caches: the text and teacher token spans (pipeline/data/formats.py)
        manifest.text_offsets, manifest.tokenizer_name = "char", str(getattr(tokenizer, "name_or_path", ""))
    tcfg = cfg.targets
    if tcfg.type != "topk":  # recorded in the manifest header: a rerun must use the same targets
        manifest.target_type, manifest.num_draws = tcfg.type, tcfg.num_draws
        manifest.head_k, manifest.sample_temperature = tcfg.head_k or 0, tcfg.sample_temperature
        manifest.sample_seed = tcfg.seed
    stats = SampleStats()
    if cfg.cache.k > V:
        raise ValueError(f"cache.k={cfg.cache.k} exceeds the vocabulary size {V}")
    state = on_rank0(_prepare_cache_dir, cfg, manifest, tokenizer)  # rank 0; its answer or its error on every rank
    plan = _Plan(windows, state.done, cfg.batch_size, info.world_size)
    print0(f"[precompute] {windows.num_rows} rows in windows of {cfg.window_rows} rows; samples: "
           f"{len(state.done)} already cached; batches of {cfg.batch_size} on {info.world_size} rank(s); "
           f"k={cfg.cache.k}, V={V}")
    writer = open_writer(cfg.cache.dir, manifest, info.rank, state.attempt, cfg.cache.samples_per_shard,
                         cfg.cache.row_group_size, cfg.cache.compression_level, cfg.cache.writer_queue_shards,
                         int(cfg.cache.shard_mib * 2**20))
    try:
        my_tokens, t0 = _teacher_loop(cfg, info, teachers, entries, V, plan, writer, stats)
        writer.close()  # joins the writer thread; a shard's error is raised here at the latest
    except BaseException:
        writer.abort()  # the shard being written finishes (or fails) before the error goes up
        raise
    throughput = _throughput(info, my_tokens, time.perf_counter() - t0)
    print0(f"[precompute] cache writer (rank 0): {len(writer.closed)} shards, teacher loop waited "
           f"{writer.wait_seconds:.1f}s on the writer thread")
    if tcfg.type != "topk":
        print0(f"[precompute] {tcfg.type} targets (rank 0): {stats.summary()}")
    barrier()
    if not info.is_main:
        return PrecomputeResult(None, throughput)
    m = finalize_cache(cfg.cache.dir, windows.skipped)
    dt = time.perf_counter() - t0
    done_tokens = throughput.tokens
    print0(f"[precompute] cache complete: {m.num_samples} samples ({plan.cached} already cached, "
           f"{m.num_samples - plan.cached} computed; {windows.skipped} empty skipped), {m.num_tokens} tokens in "
           f"{len(m.shards)} shards; {done_tokens} tokens computed in "
           f"{dt:.1f}s ({done_tokens / max(dt, 1e-9):.0f} tok/s); teacher ppl "
           f"{m.teacher_perplexity:.2f} on the valid positions")
    return PrecomputeResult(m, throughput)


def _prepare_cache_dir(cfg: PrecomputeConfig, manifest: Manifest, tokenizer) -> PrepareState:
    """Create or resume ``cache.dir`` (:func:`~pipeline.cache.prepare_cache`) and save the
    tokenizer into its ``tokenizer/`` (on a store: saved locally, then uploaded). Rank 0 only
    (:func:`precompute` runs it through :func:`~pipeline.distributed.on_rank0`).

    Returns:
        The :func:`~pipeline.cache.prepare_cache` state (closed shards' samples, attempt).
    Raises:
        ValueError: an incompatible cache (:func:`~pipeline.cache.prepare_cache`), or an
            ``OSError`` (not writable, disk full...) as one line naming ``cache.dir``.
        StoreError: a store request failed (unreachable endpoint, refused credentials, missing
            bucket, throttling), ``cache.dir`` and the cause named.
    """
    try:
        state = prepare_cache(cfg.cache.dir, manifest, cfg.cache.overwrite)
        with Folder(cfg.cache.dir).sub("tokenizer").written_locally() as tok_dir:
            tokenizer.save_pretrained(str(tok_dir))
    except (ValueError, StoreError):
        raise  # first, as before: an error that is both a ValueError and an OSError passes unchanged;
        # a failed store request already names cache.dir, the URL and the cause
    except OSError as e:
        raise ValueError(f"cache.dir {cfg.cache.dir}: cannot be written ({e})") from e
    return state


PAD_SAMPLE = Sample("<padding call>", np.zeros(2, dtype=np.int32), np.zeros(2, dtype=bool))
"""The input of a padding call (a rank with no batch left runs the teacher on it so that every
rank makes the same FSDP2 collectives)."""


def _teacher_targets(cfg: PrecomputeConfig, teachers: list, weights: list[float], V: int, batch,
                     group: list[Sample], stats: SampleStats, first: list[FirstBatch] | None = None) -> list:
    """Cache records of one batch: the teachers' forwards (hidden states), then the targets of
    the real positions only, computed chunk by chunk in the teachers' device memory
    (:func:`~pipeline.teacher.topk.fused_topk_targets`, or per sample for the sampled types), one
    device→host copy per array. ``first`` (the first call): each teacher's
    :class:`~pipeline.teacher.load_check.FirstBatch` numbers are appended to it."""
    tcfg, T = cfg.targets, batch.input_ids.shape[1]
    hiddens = [m(input_ids=batch.input_ids, use_cache=False).logits.flatten(0, 1) for m in teachers]  # (B·T, H)
    if not group:
        if first is not None:
            first.extend(FirstBatch() for _ in teachers)
        return []
    heads = [output_head(m, V) for m in teachers]
    n = [len(s.input_ids) - 1 for s in group]  # positions per sample (targets of tokens 1..T-1)
    offsets = np.cumsum([0] + n)  # sample i's positions: offsets[i]:offsets[i+1] of the flat rows
    rows_np = np.concatenate([i * T + np.arange(p) for i, p in enumerate(n)])
    rows = torch.from_numpy(rows_np).to(batch.input_ids.device)
    next_ids = batch.input_ids.flatten()[rows + 1]
    if first is not None:
        first.extend(first_batch(h, head, rows, next_ids) for h, head in zip(hiddens, heads))
    if tcfg.type == "topk":
        out = fused_topk_targets(hiddens, heads, weights, rows, next_ids, cfg.cache.k, cfg.temperature, cfg.combine)
        ids, vals, tail, target = (t.cpu().numpy() for t in out)
    else:  # per sample: batch-independent draws
        parts = []
        for s, a, b in zip(group, offsets[:-1], offsets[1:]):
            lp = position_logprobs(hiddens, heads, weights, rows[a:b], cfg.temperature, cfg.combine)  # (P, V)
            gen = torch.Generator(device=lp.device).manual_seed(sample_seed(tcfg.seed, s.sample_id))
            si, sv, st = sampled_targets(lp, cfg.cache.k, tcfg.type, num_draws=tcfg.num_draws, head_k=tcfg.head_k or 0,
                                         sample_temperature=tcfg.sample_temperature, generator=gen, stats=stats)
            parts.append((si, sv, st, lp.gather(-1, next_ids[a:b, None]).squeeze(-1)))
            del lp
        ids, vals, tail, target = (torch.cat(x).cpu().numpy() for x in zip(*parts))
    return [cache_record_from_targets(s, ids[a:b], vals[a:b], tail[a:b], target[a:b])
            for s, a, b in zip(group, offsets[:-1], offsets[1:])]


def _teacher_loop(cfg: PrecomputeConfig, info: DistInfo, teachers: list, entries: list[TeacherEntry], V: int,
                  plan: _Plan, writer: CacheWriter, stats: SampleStats) -> tuple[int, float]:
    """Run teacher forwards on this rank in step with the others (every rank the same number of
    calls: padding calls once its batches run out) and hand each batch's :class:`CacheRecord`
    list to ``writer`` (whose thread codes and closes the shards); between forwards only
    collation and target extraction happen here.

    Returns:
        (tokens of this rank's real samples, ``time.perf_counter()`` at the loop's start)
    Raises:
        ValueError, StorageError: a shard failed in the writer (raised at the next write); a
            bad row or duplicate sample ID in a window (every rank); a teacher that looks like
            a broken load on the first call (every rank,
            :func:`~pipeline.teacher.load_check.check_first_batch`).
    """
    from torch.distributed.fsdp import FSDPModule

    bar = progress.Progress(plan.windows.num_rows, "teacher top-k", "row", enabled=info.is_main, unit_scale=True,
                            tokens="tok/s")
    weights = [e.weight for e in entries]
    t0 = time.perf_counter()
    my_tokens, last_log, credit, c, call_tokens = 0, t0, 0.0, 0, 0
    with torch.no_grad():  # not inference_mode: FSDP2 unshard fails on inference tensors (torch 2.13)
        while calls := plan.next_call():
            group = calls[info.rank][1] if info.rank < len(calls) else None
            batch = collate(group or [PAD_SAMPLE], pad_only=group is None).to(info.device)
            first = [] if c == 0 else None
            records = _teacher_targets(cfg, teachers, weights, V, batch, group or [], stats, first)
            if first is not None:  # a broken load stops here, before anything is written
                check_first_batch(first, [t.path for t in cfg.teachers], V, cfg.teacher_check)
            for m in teachers:  # the root's parameters (embedding, output layer) stay unsharded after a forward
                if isinstance(m, FSDPModule):
                    m.reshard()
            if records:
                writer.write(records)
            credit += sum(cr for cr, _ in calls)  # rows: each window's rows spread over its batches
            call_tokens += sum(len(s.input_ids) for _, g in calls for s in g)  # every rank's batch of this call
            if int(credit) > bar.n:
                bar.update(int(credit) - bar.n, tokens=call_tokens)
                call_tokens = 0
            my_tokens += sum(len(s.input_ids) for s in group or ())
            c += 1
            if time.perf_counter() - last_log > PROGRESS_EVERY_S:
                last_log = time.perf_counter()
                print(f"[precompute rank {info.rank}/{info.world_size}] call {c}, {my_tokens} tokens, "
                      f"{my_tokens / (last_log - t0):.0f} tok/s", flush=True)
    bar.close()
    return my_tokens, t0
