"""Stage 1: run the frozen teacher(s) over the samples and write the sparse top-k cache."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.cache import Manifest, cache_record_from_targets, finalize_cache, open_writer, prepare_cache
from pipeline.cache.manifest import TeacherEntry
from pipeline.config import PrecomputeConfig
from pipeline.data import Sample, load_samples
from pipeline.distributed import DistInfo, barrier, broadcast_object, print0, shard_model
from pipeline.loader import collate
from pipeline.models import load_teacher, load_tokenizer, model_fingerprint, tokenizer_fingerprint, vocab_size
from pipeline.teacher import ensemble_logprobs, topk_targets


def _load_teachers(cfg: PrecomputeConfig, tokenizer, dtype: torch.dtype) -> tuple[list, int, list[TeacherEntry]]:
    """Load every teacher and check they share one vocabulary (and the tokenizer's)."""
    teachers, entries, sizes = [], [], []
    for t in cfg.teachers:
        if not Path(t.path).is_dir():
            raise FileNotFoundError(f"teacher directory not found: {t.path}")
        teachers.append(load_teacher(t.path, dtype))
        sizes.append(vocab_size(teachers[-1]))
        entries.append(TeacherEntry(path=str(Path(t.path).resolve()), weight=t.weight, fingerprint=model_fingerprint(t.path)))
        if (Path(t.path) / "tokenizer.json").is_file() and t.path != (cfg.tokenizer or cfg.teachers[0].path):
            other = tokenizer_fingerprint(load_tokenizer(t.path))
            if other != tokenizer_fingerprint(tokenizer):
                raise ValueError(f"teacher {t.path} has a different tokenizer (fingerprint {other}); "
                                 "an ensemble needs one shared tokenizer")
    if len(set(sizes)) > 1:
        raise ValueError(f"teachers have different vocabulary sizes {dict(zip([t.path for t in cfg.teachers], sizes))}")
    if len(tokenizer) > sizes[0]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the teacher vocabulary is {sizes[0]}")
    return teachers, sizes[0], entries


def _batches(samples: list[Sample], batch_size: int) -> list[list[Sample]]:
    """Length-sorted batches (little padding), independent of the world size."""
    order = sorted(samples, key=lambda s: (-len(s.input_ids), s.sample_id))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def precompute(cfg: PrecomputeConfig, info: DistInfo) -> Manifest | None:
    """Write the teacher cache for ``cfg``; returns the final manifest on rank 0 (None elsewhere).

    Resumable: sample IDs in closed shards of a compatible cache are skipped. Batch ``b`` of the
    length-sorted batch list goes to rank ``b % world_size``; ranks with fewer batches run
    padding batches so every rank makes the same number of forward calls.

    Raises:
        FileNotFoundError, ValueError, KeyError: bad paths, incompatible cache, vocab mismatch,
            empty dataset; raised on every rank.
    """
    tok_dir = cfg.tokenizer or cfg.teachers[0].path
    tokenizer = load_tokenizer(tok_dir)
    dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
    teachers, V, entries = _load_teachers(cfg, tokenizer, dtype)
    samples, ds_fp, skipped = load_samples(cfg.dataset, tokenizer)
    manifest = Manifest(backend=cfg.cache.backend, k=cfg.cache.k, index_dtype="uint16" if V <= 65536 else "int32",
                        value_dtype=cfg.cache.value_dtype, vocab_size=V, temperature=cfg.temperature,
                        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), teachers=entries,
                        dataset=cfg.dataset.model_dump(), dataset_fingerprint=ds_fp, max_length=cfg.dataset.max_length)
    if cfg.cache.k > V:
        raise ValueError(f"cache.k={cfg.cache.k} exceeds the vocabulary size {V}")
    state: object = None
    if info.is_main:
        try:
            state = prepare_cache(cfg.cache.dir, manifest, cfg.cache.overwrite)
            Path(cfg.cache.dir, "tokenizer").mkdir(exist_ok=True)
            tokenizer.save_pretrained(str(Path(cfg.cache.dir, "tokenizer")))
        except (ValueError, OSError) as e:
            state = e
    state = broadcast_object(state)
    if isinstance(state, Exception):
        raise state
    todo = [s for s in samples if s.sample_id not in state.done_ids]
    batches = _batches(todo, cfg.batch_size)
    n_calls = -(-len(batches) // info.world_size)
    mine = batches[info.rank::info.world_size]
    print0(f"[precompute] {len(samples)} samples ({skipped} empty skipped), {len(samples) - len(todo)} already cached, "
           f"{len(todo)} to do in {len(batches)} batches on {info.world_size} rank(s); k={cfg.cache.k}, V={V}")
    for t in teachers:
        shard_model(t, sum_gradients=False)
        t.to(info.device)
    writer = open_writer(cfg.cache.dir, manifest, info.rank, state.attempt, cfg.cache.samples_per_shard,
                         cfg.cache.row_group_size)
    bar = tqdm(total=sum(len(s.input_ids) for b in batches for s in b), unit="tok", unit_scale=True,
               disable=not info.is_main, desc="teacher top-k", dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 15.0)
    t0 = time.perf_counter()
    with torch.no_grad():  # not inference_mode: FSDP2 unshard fails on inference tensors (torch 2.13)
        for b in range(n_calls):
            group = mine[b] if b < len(mine) else None
            batch = collate(group if group else [samples[0]], pad_only=group is None).to(info.device)
            lp = ensemble_logprobs(teachers, [t.weight for t in cfg.teachers], batch.input_ids, cfg.temperature)
            tg = topk_targets(lp, batch.input_ids, cfg.cache.k)
            if group:
                ids, vals = tg.topk_ids.cpu().numpy(), tg.topk_logprobs.cpu().numpy()
                tail, target = tg.tail_logprob.cpu().numpy(), tg.target_logprob.cpu().numpy()
                writer.write([cache_record_from_targets(s, ids[i, : len(s.input_ids) - 1], vals[i, : len(s.input_ids) - 1],
                                                        tail[i, : len(s.input_ids) - 1], target[i, : len(s.input_ids) - 1])
                              for i, s in enumerate(group)])
            # rank 0 advances the bar by the global work of this call (all ranks run in lockstep)
            bar.update(sum(len(s.input_ids) for bb in batches[b * info.world_size:(b + 1) * info.world_size] for s in bb))
    writer.close()
    bar.close()
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
