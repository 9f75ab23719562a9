"""Stage 1: run the frozen teacher(s) over the samples and write the sparse top-k cache."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import (CacheWriter, Encoding, Manifest, cache_record_from_targets, finalize_cache, open_writer,
                            prepare_cache)
from pipeline.cache.manifest import TeacherEntry
from pipeline.config import PrecomputeConfig
from pipeline import progress
from pipeline.data import Sample, load_samples
from pipeline.distributed import DistInfo, barrier, broadcast_object, gather_objects, print0, shard_model
from pipeline.loader import collate
from pipeline.models import load_teacher_sharded, load_tokenizer, model_fingerprint, tokenizer_fingerprint, vocab_size
from pipeline.targets import SampleStats, sample_seed, sampled_targets
from pipeline.teacher import ensemble_logprobs, topk_targets


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _load_teachers(cfg: PrecomputeConfig, tokenizer, dtype: torch.dtype,
                   device: torch.device) -> tuple[list, int, list[TeacherEntry]]:
    """Load every teacher, sharded (FSDP2) on ``device``, one at a time and each without ever
    existing whole on a rank (:func:`pipeline.models.load_teacher_sharded`), and check that
    they share the tokenizer and cover its vocabulary.

    The cache vocabulary is ``V = len(tokenizer)``, the tokens that can occur: a teacher whose
    output layer is padded beyond it (e.g. to a multiple of 64) has its logits sliced to the
    first V before the softmax (pipeline/teacher.py), so padding rows get no probability.

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
        if any((Path(t.path) / f).is_file() for f in TOKENIZER_FILES):
            if Path(t.path).resolve() != Path(tok_dir).resolve():
                other = tokenizer_fingerprint(load_tokenizer(t.path))
                if other != fp:
                    raise ValueError(f"teacher {t.path} has a different tokenizer (fingerprint {other}) than {tok_dir} "
                                     f"(fingerprint {fp}); all teachers must share one tokenizer and vocabulary")
        elif len(cfg.teachers) > 1:
            raise ValueError(f"teacher {t.path} has no tokenizer files, so it cannot be checked against {tok_dir}; "
                             "save the tokenizer with every teacher of an ensemble")
        teachers.append(load_teacher_sharded(t.path, dtype, device, lambda m: shard_model(m, sum_gradients=False)))
        if vocab_size(teachers[-1]) < V:
            raise ValueError(f"teacher {t.path} has {vocab_size(teachers[-1])} output logits but the tokenizer "
                             f"({tok_dir}) has {V} tokens")
        entries.append(TeacherEntry(path=str(Path(t.path).resolve()), weight=t.weight / total,
                                    fingerprint=model_fingerprint(t.path)))
    return teachers, V, entries


PROGRESS_EVERY_S = 30.0
"""Seconds between the per-rank progress lines of the teacher loop."""
LAST_STATS: dict = {}
"""Throughput of the last :func:`precompute` call in this process (read by bench/)."""


def _throughput(info: DistInfo, tokens: int, seconds: float) -> None:
    """Gather every rank's (tokens, seconds) of the teacher loop and its peak host memory
    (``ru_maxrss``, bytes); rank 0 prints one line per rank and the global tokens/s (all ranks'
    tokens / the slowest rank's seconds). Collective."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    per_rank = gather_objects((tokens, seconds, peak))
    total, wall = sum(t for t, _, _ in per_rank), max(s for _, s, _ in per_rank)
    LAST_STATS.update(tokens=total, seconds=wall, tokens_per_s=total / max(wall, 1e-9),
                      per_rank=[(t, s) for t, s, _ in per_rank], peak_rss=[m for _, _, m in per_rank])
    if info.world_size > 1:
        for r, (t, sec, mem) in enumerate(per_rank):
            print0(f"[precompute] rank {r}: {t} tokens in {sec:.1f}s ({t / max(sec, 1e-9):.0f} tok/s), "
                   f"peak RSS {mem / 2**20:.0f} MiB")
    print0(f"[precompute] teacher loop: {total} tokens in {wall:.1f}s, global {total / max(wall, 1e-9):.0f} tok/s "
           f"on {info.world_size} rank(s); peak RSS {max(m for _, _, m in per_rank) / 2**20:.0f} MiB (largest rank)")


def _return_freed_memory() -> bool:
    """Make glibc serve every allocation of 128 KiB or more by ``mmap``, so the teacher loop's
    freed activations and FSDP2's freed all-gather buffers go back to the OS at once.

    Why: glibc's default threshold rises with each large block freed, after which such blocks
    come from the heap and stay in the process (measured: one forward of a 157M-parameter
    teacher at 2 ranks left 1.28-1.51 GB resident instead of 0.77 GB; the same run with
    ``MALLOC_MMAP_THRESHOLD_=131072``). Same as that environment variable (glibc ``mallopt``,
    ``M_MMAP_THRESHOLD`` = -3). Returns False where there is no glibc (nothing changed).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(-3, 128 * 1024))
    except (OSError, AttributeError):
        return False


def _batches(samples: list[Sample], batch_size: int) -> list[list[Sample]]:
    """Length-sorted batches (little padding), independent of the world size."""
    order = sorted(samples, key=lambda s: (-len(s.input_ids), s.sample_id))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def precompute(cfg: PrecomputeConfig, info: DistInfo) -> Manifest | None:
    """Write the teacher cache for ``cfg``; returns the final manifest on rank 0 (None elsewhere).

    Resumable: sample IDs in closed shards of a compatible cache are skipped. Batch ``b`` of the
    length-sorted batch list goes to rank ``b % world_size``; ranks with fewer batches run
    padding batches so every rank makes the same number of forward calls.

    The teacher loop only builds records; each rank's background writer thread
    (:class:`~pipeline.cache.store.CacheWriter`, at most ``cache.writer_queue_shards`` shards
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
    if info.device.type == "cpu":  # host memory holds the teacher's activations: give them back
        _return_freed_memory()
    teachers, V, entries = _load_teachers(cfg, tokenizer, dtype, info.device)
    samples, ds_fp, skipped = load_samples(cfg.dataset, tokenizer)
    manifest = Manifest(backend=cfg.cache.backend, k=cfg.cache.k, index_dtype=Encoding.index_dtype_for(V),
                        value_dtype=cfg.cache.value_dtype, index_coding=cfg.cache.index_coding,
                        q8_step=cfg.cache.q8_step, compression=cfg.cache.compression, vocab_size=V, temperature=cfg.temperature,
                        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), teachers=entries, combine=cfg.combine,
                        dataset=cfg.dataset.model_dump(), dataset_fingerprint=ds_fp, max_length=cfg.dataset.max_length)
    tcfg = cfg.targets
    if tcfg.type != "topk":  # recorded in the manifest header: a rerun must use the same targets
        manifest.target_type, manifest.num_draws = tcfg.type, tcfg.num_draws
        manifest.head_k, manifest.sample_temperature = tcfg.head_k or 0, tcfg.sample_temperature
        manifest.sample_seed = tcfg.seed
    stats = SampleStats()
    if cfg.cache.k > V:
        raise ValueError(f"cache.k={cfg.cache.k} exceeds the vocabulary size {V}")
    state: object = None
    if info.is_main:
        try:
            state = prepare_cache(cfg.cache.dir, manifest, cfg.cache.overwrite)
            Path(cfg.cache.dir, "tokenizer").mkdir(exist_ok=True)
            tokenizer.save_pretrained(str(Path(cfg.cache.dir, "tokenizer")))
        except ValueError as e:
            state = e
        except OSError as e:  # not writable, disk full...: one line naming the directory
            state = ValueError(f"cache.dir {cfg.cache.dir}: cannot be written ({e})")
    state = broadcast_object(state)
    if isinstance(state, Exception):
        raise state
    todo = [s for s in samples if s.sample_id not in state.done_ids]
    batches = _batches(todo, cfg.batch_size)
    n_calls = -(-len(batches) // info.world_size)
    mine = batches[info.rank::info.world_size]
    print0(f"[precompute] {len(samples)} samples ({skipped} empty skipped), {len(samples) - len(todo)} already cached, "
           f"{len(todo)} to do in {len(batches)} batches on {info.world_size} rank(s); k={cfg.cache.k}, V={V}")
    writer = open_writer(cfg.cache.dir, manifest, info.rank, state.attempt, cfg.cache.samples_per_shard,
                         cfg.cache.row_group_size, cfg.cache.compression_level, cfg.cache.writer_queue_shards)
    try:
        my_tokens, t0 = _teacher_loop(cfg, info, teachers, entries, V, samples, batches, mine, n_calls, writer, stats)
        writer.close()  # joins the writer thread; a shard's error is raised here at the latest
    except BaseException:
        writer.abort()  # the shard being written finishes (or fails) before the error goes up
        raise
    _throughput(info, my_tokens, time.perf_counter() - t0)
    print0(f"[precompute] cache writer (rank 0): {len(writer.closed)} shards, teacher loop waited "
           f"{writer.wait_seconds:.1f}s on the writer thread")
    if tcfg.type != "topk":
        print0(f"[precompute] {tcfg.type} targets (rank 0): {stats.summary()}")
    barrier()
    if not info.is_main:
        return None
    m = finalize_cache(cfg.cache.dir, skipped)
    dt = time.perf_counter() - t0
    done_tokens = sum(len(s.input_ids) for b in batches for s in b)
    print0(f"[precompute] cache complete: {m.num_samples} samples, {m.num_tokens} tokens in {len(m.shards)} shards; "
           f"{done_tokens} tokens computed in {dt:.1f}s ({done_tokens / max(dt, 1e-9):.0f} tok/s); teacher ppl "
           f"{np.exp(m.teacher_nll_sum / max(m.num_valid_positions, 1)):.2f} on the valid positions")
    return m


def _teacher_loop(cfg: PrecomputeConfig, info: DistInfo, teachers: list, entries: list[TeacherEntry], V: int,
                  samples: list[Sample], batches: list[list[Sample]], mine: list[list[Sample]], n_calls: int,
                  writer: CacheWriter, stats: SampleStats) -> tuple[int, float]:
    """Run ``n_calls`` teacher forwards on this rank (padding calls after ``mine`` runs out)
    and hand each batch's :class:`CacheRecord` list to ``writer`` (whose thread closes the
    shards); between forwards only collation and record building happen here.

    Returns:
        (tokens of this rank's real samples, ``time.perf_counter()`` at the loop's start)
    Raises:
        ValueError, StorageError: a shard failed in the writer (raised at the next write).
    """
    tcfg = cfg.targets
    bar = progress.Progress(sum(len(s.input_ids) for b in batches for s in b), "teacher top-k", "tok",
                            enabled=info.is_main, unit_scale=True)
    t0 = time.perf_counter()
    my_tokens, last_log = 0, t0
    with torch.no_grad():  # not inference_mode: FSDP2 unshard fails on inference tensors (torch 2.13)
        for b in range(n_calls):
            group = mine[b] if b < len(mine) else None
            batch = collate(group if group else [samples[0]], pad_only=group is None).to(info.device)
            lp = ensemble_logprobs(teachers, [e.weight for e in entries], batch.input_ids, cfg.temperature, V,
                                   cfg.combine)
            tg = topk_targets(lp, batch.input_ids, cfg.cache.k)
            if group:
                ids, vals = tg.topk_ids.cpu().numpy(), tg.topk_logprobs.cpu().numpy()
                tail, target = tg.tail_logprob.cpu().numpy(), tg.target_logprob.cpu().numpy()
                for i, s in enumerate(group if tcfg.type != "topk" else []):  # per sample: batch-independent draws
                    n = len(s.input_ids) - 1
                    gen = torch.Generator(device=lp.device).manual_seed(sample_seed(tcfg.seed, s.sample_id))
                    si, sv, st = sampled_targets(lp[i, :n], cfg.cache.k, tcfg.type, num_draws=tcfg.num_draws,
                                                 head_k=tcfg.head_k or 0, sample_temperature=tcfg.sample_temperature,
                                                 generator=gen, stats=stats)
                    ids[i, :n], vals[i, :n], tail[i, :n] = si.cpu().numpy(), sv.cpu().numpy(), st.cpu().numpy()
                writer.write([cache_record_from_targets(s, ids[i, : len(s.input_ids) - 1], vals[i, : len(s.input_ids) - 1],
                                                        tail[i, : len(s.input_ids) - 1], target[i, : len(s.input_ids) - 1])
                              for i, s in enumerate(group)])
            # rank 0 advances the bar by the global work of this call (all ranks run in lockstep)
            bar.update(sum(len(s.input_ids) for bb in batches[b * info.world_size:(b + 1) * info.world_size] for s in bb))
            my_tokens += sum(len(s.input_ids) for s in group or ())
            if time.perf_counter() - last_log > PROGRESS_EVERY_S:
                last_log = time.perf_counter()
                print(f"[precompute rank {info.rank}/{info.world_size}] call {b + 1}/{n_calls}, {my_tokens} tokens, "
                      f"{my_tokens / (last_log - t0):.0f} tok/s", flush=True)
    bar.close()
    return my_tokens, t0
