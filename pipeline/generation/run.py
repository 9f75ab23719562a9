"""``generate-completions``: the stage's loop (prompts → batches → completions → shards).

Batches are fixed by the dataset, not by the run: global batch ``b`` holds the prompts of rows
``[b·batch_size, (b+1)·batch_size)``, each repeated ``num_completions`` times, and runs on rank
``b % world_size`` (data parallel: every rank holds the whole model). A batch whose prompts are
all in closed shards is skipped. So the sequences sharing a forward are the same at every world
size and after any resume; together with the per-completion generators and the batch-independent
logits of :mod:`pipeline.generation.sampling`, every row is the same bit for bit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import progress
from pipeline.config import GenerateConfig
from pipeline.data import load_rows
from pipeline.data.samples import _tokenization_fingerprint
from pipeline.distributed import DistInfo, barrier, gather_objects, on_rank0, print0
from pipeline.generation.output import finalize_output, new_header, prepare_output, shard_name, write_shard
from pipeline.generation.prompts import Prompt, make_prompts, prompt_format
from pipeline.generation.sampling import completion_seed, sample_completions
from pipeline.models import load_teacher, load_tokenizer, model_fingerprint, tokenizer_fingerprint, vocab_size
from pipeline.models.common import require_dir
from pipeline.storage import Folder
from pipeline.storage.errors import fault_point


@dataclass(frozen=True)
class GenerateResult:
    """What :func:`generate` returns, on every rank.

    Attributes:
        manifest: the final ``generation.json`` (rank 0); None on the other ranks.
        rows: rows this rank generated in this run (resumed rows excluded).
        tokens: completion tokens this rank generated in this run.
        seconds: wall-clock seconds of this rank's generation loop.
    """

    manifest: dict | None
    rows: int
    tokens: int
    seconds: float


def _dtype(cfg: GenerateConfig, device: torch.device) -> torch.dtype:
    """The model's dtype: ``cfg.dtype``, or bfloat16 on a GPU and float32 on a CPU for ``auto``."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load_generator_model(cfg: GenerateConfig, device: torch.device):
    """The model (whole, eval mode, frozen, on ``device``), its tokenizer and V = ``len(tokenizer)``.

    Raises:
        FileNotFoundError: the model or tokenizer directory, config or weights are missing (named).
        ValueError: unreadable config or weights (named), fewer output logits than tokens, or
            ``dataset.max_length + sampling.max_new_tokens`` beyond the model's
            ``max_position_embeddings``.
    """
    require_dir(cfg.model, "model directory")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    model = load_teacher(cfg.model, _dtype(cfg, device)).to(device)
    V = len(tokenizer)
    if vocab_size(model) < V:
        raise ValueError(f"model {cfg.model} has {vocab_size(model)} output logits but the tokenizer "
                         f"({cfg.tokenizer or cfg.model}) has {V} tokens")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and cfg.dataset.max_length + cfg.sampling.max_new_tokens > limit:
        raise ValueError(f"dataset.max_length ({cfg.dataset.max_length}, the longest prompt) + sampling.max_new_tokens "
                         f"({cfg.sampling.max_new_tokens}) exceeds the {limit} positions of model {cfg.model} "
                         "(max_position_embeddings); lower one of them")
    return model, tokenizer, V


def stop_tokens(cfg: GenerateConfig, model, tokenizer) -> set[int]:
    """The tokens that end a completion: the tokenizer's EOS, the model's
    ``generation_config.eos_token_id`` (an int or a list) and ``sampling.stop_token_ids``."""
    ids = set(cfg.sampling.stop_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen] if isinstance(gen, int) else list(gen or []))
    return ids


def _check_unique_ids(cfg: GenerateConfig, ds) -> None:
    """Refuse duplicate prompt IDs (``dataset.id_field``) before anything is generated.

    Raises:
        ValueError: an ID on two rows (the ID named).
    """
    if cfg.dataset.id_field is None:
        return
    seen: set = set()
    for x in ds[cfg.dataset.id_field][:]:
        if str(x) in seen:
            raise ValueError(f"dataset {cfg.dataset.path}: duplicate sample_id {str(x)!r}")
        seen.add(str(x))


def _rows_of_batch(prompts: list[Prompt], tokenizer, model, cfg: GenerateConfig, stops: set[int], V: int,
                   pad_id: int) -> list[dict]:
    """The output rows (``num_completions`` per prompt, in prompt order) of one batch."""
    n = cfg.sampling.num_completions
    seqs = [p.ids for p in prompts for _ in range(n)]
    seeds = [completion_seed(cfg.sampling.seed, p.prompt_id, j) for p in prompts for j in range(n)]
    outs = sample_completions(model, seqs, seeds, cfg.sampling, stops, V, pad_id)
    rows = []
    for k, (ids, reason) in enumerate(outs):
        p, j = prompts[k // n], k % n
        rows.append({"id": f"{p.prompt_id}/{j}", "prompt_id": p.prompt_id, "prompt_ids": p.ids.tolist(),
                     "completion_ids": ids.tolist(), "prompt": p.text,
                     "completion": tokenizer.decode(ids.tolist(), skip_special_tokens=False),
                     "finish_reason": reason})
    return rows


def generate(cfg: GenerateConfig, info: DistInfo) -> GenerateResult:
    """Generate the completions of ``cfg`` into ``cfg.output_dir``; returns the final manifest on
    rank 0 and this rank's counts (:class:`GenerateResult`).

    Resumable: prompts whose rows are in closed shards are skipped (a rerun of a complete
    dataset generates nothing and rewrites its manifest). Every rank loads the whole model and
    runs its share of the global batches (module docstring).

    Raises:
        FileNotFoundError, ValueError, KeyError: a missing or unreadable model, tokenizer or
            dataset, a bad row or duplicate ID, an ``output_dir`` holding something else or
            completions of other settings; raised on every rank before anything is written.
        StorageError: a shard or the manifest could not be written (the dataset stays
            incomplete; a rerun resumes it).
    """
    model, tokenizer, V = load_generator_model(cfg, info.device)
    ds = load_rows(cfg.dataset)
    if len(ds) == 0:
        raise ValueError(f"dataset {cfg.dataset.path} (split {cfg.dataset.split}) is empty")
    if cfg.dataset.num_samples is not None and len(ds) < cfg.dataset.num_samples:  # load_rows takes what there is
        print0(f"[generate] dataset.num_samples={cfg.dataset.num_samples}: {cfg.dataset.path} (split "
               f"{cfg.dataset.split}) has only {len(ds)} rows; prompting with all {len(ds)}")
    fmt = prompt_format(cfg.dataset, ds.column_names)[0]
    _check_unique_ids(cfg, ds)
    stops = stop_tokens(cfg, model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops, default=0)
    state = on_rank0(_prepare, cfg, tokenizer, V, ds, fmt)
    bs, num_batches = cfg.batch_size, -(-len(ds) // cfg.batch_size)
    mine = range(info.rank, num_batches, info.world_size)
    print0(f"[generate] {len(ds)} prompt rows in {num_batches} batches of {bs} on {info.world_size} rank(s); "
           f"{len(state.done)} prompts already generated; {cfg.sampling.num_completions} completion(s) per prompt, "
           f"max_new_tokens={cfg.sampling.max_new_tokens}")
    folder, t0 = Folder(cfg.output_dir), time.perf_counter()
    bar = progress.Progress(len(mine), "generate", "batch", enabled=info.is_main,
                            tokens="tok/s" if info.world_size == 1 else "tok/s on rank 0")  # completion tokens
    pending: list[dict] = []
    skipped = rows_done = tokens = closed = 0
    for b in mine:
        a = b * bs
        prompts, n_skip = make_prompts(ds.select(range(a, min(a + bs, len(ds)))), tokenizer, cfg.dataset,
                                       cfg.prompt_tokens, a, ds._fingerprint)
        skipped += n_skip
        todo = [p for p in prompts if p.prompt_id not in state.done]
        new_tokens = 0
        if todo:
            rows = _rows_of_batch(todo, tokenizer, model, cfg, stops, V, pad_id)
            pending += rows
            rows_done += len(rows)
            new_tokens = sum(len(r["completion_ids"]) for r in rows)
            tokens += new_tokens
        if pending and (len(pending) >= cfg.rows_per_shard or b == mine[-1]):
            write_shard(folder, shard_name(info.rank, state.attempt, closed), pending)
            pending, closed = [], closed + 1
            fault_point("generated-shard", closed, info.rank)
        bar.update(1, tokens=new_tokens)
    bar.close()
    seconds = time.perf_counter() - t0
    totals = gather_objects((skipped, rows_done, tokens, seconds))
    barrier()
    manifest = None
    if info.is_main:
        manifest = finalize_output(cfg.output_dir, sum(t[0] for t in totals), len(ds))
        wall = max(t[3] for t in totals)
        print0(f"[generate] complete: {manifest['num_rows']} rows of {manifest['num_prompts']} prompts "
               f"({sum(t[1] for t in totals)} generated now, {sum(t[2] for t in totals)} tokens in {wall:.1f}s); "
               f"finish reasons {manifest['finish_reasons']}; {manifest['skipped_prompts']} prompts skipped; "
               f"{len(manifest['shards'])} shards in {cfg.output_dir}")
    return GenerateResult(manifest, rows_done, tokens, seconds)


def _prepare(cfg: GenerateConfig, tokenizer, V: int, ds, fmt: str):
    """Rank 0: the manifest header (model fingerprint: a hash of its weights) and
    :func:`~pipeline.generation.output.prepare_output`."""
    header = new_header(str(Path(cfg.model).resolve()), model_fingerprint(cfg.model), tokenizer_fingerprint(tokenizer),
                        V, cfg.sampling.model_dump(), cfg.prompt_tokens, cfg.batch_size, cfg.dataset.model_dump(),
                        _tokenization_fingerprint(ds, tokenizer, cfg.dataset), fmt)
    return prepare_output(cfg.output_dir, header, cfg.overwrite)

