"""Stage 2: build the student and its data from the cache, run the steps, evaluate, export."""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import open_cache
from pipeline.storage import check_access, is_remote, join, local_copy, write_file
from pipeline.student.checkpoint import agree_resume, export_hf, load_checkpoint, load_optimizer_moments, save_checkpoint, save_optimizer
from pipeline.config import ConfigError, TrainStudentConfig, config_dict, dump_config
from pipeline.data import load_samples
from pipeline.student.callbacks import CallbackList, EarlyStopping, MetricsCallback, TrainState, load_callbacks
from pipeline.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, compute_dtype, print0, shard_model
from pipeline.storage.errors import writing
from pipeline import progress
from pipeline.student.sampler import StepPrefetcher, StepSampler, eval_batches, prefetch
from pipeline.losslog.writer import LossLogWriter
from pipeline.losslog.reader import load_loss_logs
from pipeline.student.lr_find import run_lr_find
from pipeline.student.lora import add_adapters, load_initial_adapters
from pipeline.student.rounds import read_run_json, round_configs, select_sample_ids, write_run_json
from pipeline.student.rounds import sample_weights as loss_weights
from pipeline.student.metrics import MetricsLogger
from pipeline.models import (build_student, count_parameters, defer_output_projection, load_student_sharded,
                             load_tokenizer, vocab_size)
from pipeline.student.step import Trainer, build_optimizer, check_packing, early_stopping_update, lr_lambda


REMOTE_NUM_WORKERS, REMOTE_PREFETCH_STEPS = 4, 16
"""Loader defaults for a cache on a remote store (``data.num_workers`` / ``prefetch_steps`` unset):
more requests in flight, further ahead (bench/object_store_bench.py: 1 thread, 4 steps ahead ran
0.80x local disk; 4 threads, 16 steps 1.09x)."""


def _sources(cfg: TrainStudentConfig):
    """(train source, eval source or None, tokenizer dir, vocabulary size the data requires)."""
    d = cfg.data
    if d.train_cache is not None:
        train = open_cache(d.train_cache, max_cached_bytes=d.max_cached_bytes)
        ev = open_cache(d.eval_cache, max_cached_bytes=d.max_cached_bytes) if d.eval_cache else None
        m = train.manifest
        if ev is not None and (ev.manifest.vocab_size, ev.manifest.tokenizer_fingerprint) != (m.vocab_size, m.tokenizer_fingerprint):
            raise ValueError(f"data.eval_cache {d.eval_cache} has another vocabulary/tokenizer than data.train_cache {d.train_cache}")
        tok = d.tokenizer or (local_copy(f"{d.train_cache.rstrip('/')}/tokenizer") if is_remote(d.train_cache)
                              else str(Path(d.train_cache) / "tokenizer"))
        return train, ev, tok, m.vocab_size
    tokenizer = load_tokenizer(d.tokenizer)
    train = load_samples(d.train_dataset, tokenizer)[0]
    ev = load_samples(d.eval_dataset, tokenizer)[0] if d.eval_dataset else None
    return train, ev, d.tokenizer, len(tokenizer)


def run(cfg: TrainStudentConfig, info: DistInfo) -> dict | None:
    """The stage: one round (``cfg.rounds`` empty) or a multi-round run (pipeline/rounds.py).

    Rounds already marked finished in ``run.json`` are skipped, so a rerun of the same command
    resumes the current round from its newest checkpoint. A preempted round stops the run.

    The configured callbacks (``callbacks:``, pipeline/callbacks.py) are built once here and
    see every round: ``on_train_begin`` ... ``on_train_end``, ``on_round_end`` per round.

    Raises:
        ConfigError: ``select`` on the first round (there is no previous loss log).
        ValueError: a ``callbacks`` entry that cannot be imported or built (named).
        ValueError: ``output_dir`` is a URL the store cannot serve (missing bucket, refused
            credentials), named, before anything is written (checked on every rank).
    """
    if is_remote(cfg.output_dir):
        check_access(cfg.output_dir, "output_dir")
    callbacks = load_callbacks(cfg.callbacks)  # once: the same objects see every round
    if not cfg.rounds:
        if cfg.select is not None or cfg.weight_by is not None:
            raise ConfigError("config keys 'select'/'weight_by': need a previous round (use rounds:)")
        return train(cfg, info, callbacks=callbacks)
    out = cfg.output_dir
    rcfgs = round_configs(cfg)
    if rcfgs[0].select is not None or rcfgs[0].weight_by is not None:
        raise ConfigError("config key 'rounds[0].select'/'weight_by': the first round has no previous loss log")
    state = broadcast_object(read_run_json(out) if info.is_main else None)
    if info.is_main:
        _make_dir(out)
        dump_config(cfg, join(out, "config.yaml"))
    summary = None
    for rc in rcfgs:
        if any(x["round"] == rc.round for x in state["rounds"]):
            print0(f"[rounds] round {rc.round} already finished")
            continue
        ids = weights = None
        if rc.round > 0 and (rc.select is not None or rc.weight_by is not None):
            prev = load_loss_logs(out, round_=rc.round - 1, split="train")
            ids = select_sample_ids(prev, rc.select) if rc.select is not None else sorted(set(prev["sample_id"].to_pylist()))
            weights = loss_weights(prev, ids, rc.weight_by) if rc.weight_by is not None else None
            print0(f"[rounds] round {rc.round}: {len(ids)} samples"
                   + (f" selected by {rc.select.model_dump(exclude_none=True)}" if rc.select else "")
                   + (f", drawn ∝ {rc.weight_by} per token" if weights is not None else ""))
        state["current"] = rc.round
        if info.is_main:
            write_run_json(out, state)
        nxt = rcfgs[rc.round + 1] if rc.round + 1 < len(rcfgs) else None
        summary = train(rc, info, loss_log_dir=join(out, "loss_logs"), sample_ids=ids, sample_weights=weights,
                        carry_from=join(out, f"round-{rc.round - 1}", "optimizer") if rc.carry_optimizer and rc.round else None,
                        save_optimizer_to=join(out, f"round-{rc.round}", "optimizer") if nxt and nxt.carry_optimizer else None,
                        callbacks=callbacks)
        barrier()  # every rank's loss-log files are closed before the next round selects from them
        outcome = broadcast_object(summary["outcome"] if info.is_main else None)
        if outcome == "preempted":
            return summary
        state["rounds"].append({"round": rc.round, "samples": len(ids) if ids is not None else "all",
                                "outcome": outcome, "final_eval": (summary or {}).get("final_eval")})
        if info.is_main:
            write_run_json(out, state)
    return summary


def _make_dir(path: str) -> None:
    """Create a local run directory (a prefix on a store needs no creating)."""
    if not is_remote(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def train(cfg: TrainStudentConfig, info: DistInfo, loss_log_dir: str | None = None,
          sample_ids: list[str] | None = None, sample_weights: np.ndarray | None = None, carry_from: str | None = None,
          save_optimizer_to: str | None = None, callbacks: list | None = None) -> dict | None:
    """Train the student; returns the summary dict on rank 0 (None elsewhere).

    Writes to ``cfg.output_dir``: ``config.yaml``, ``metrics.jsonl``, ``loss_logs/``,
    ``checkpoints/step-N`` (every ``save_steps`` and on SIGTERM/SIGINT), ``best/`` (HF
    directory, on every eval improvement), ``final/`` (HF directory) and ``summary.json``
    (outcome, final eval loss/CE/KL per token, perplexity, wall time, tokens/s); ``output_dir``
    may be a URL (pipeline/checkpoint.py: what marks completion on a store). Resumes from
    the newest complete checkpoint with ``resume: auto``: same data order, no duplicate
    loss-log rows, the same weights as an uninterrupted run.

    Raises:
        FileNotFoundError / ValueError: missing cache or student, vocabulary mismatch (sizes named),
            too few samples for one global batch.
    """
    t_start = time.perf_counter()
    run_dir = cfg.output_dir
    train_src, eval_src, tok_dir, data_vocab = _sources(cfg)
    V = n_params = n_trainable = ckpt = None
    lora_init: dict = {}  # LoRA: the seeded initial adapter values, full (pipeline/lora.py)

    def prepare(model: torch.nn.Module) -> None:
        """From the built student to the FSDP2-sharded one. A pretrained student comes here
        with its parameters on the meta device, before any weight is read (shapes only)."""
        nonlocal V, n_params, n_trainable, ckpt
        defer_output_projection(model)  # the output layer runs inside the fused loss (before fully_shard)
        V = vocab_size(model)
        if V < data_vocab:
            raise ValueError(f"student vocabulary size {V} is smaller than the data's {data_vocab} "
                             f"({cfg.data.train_cache or cfg.data.tokenizer})")
        if V > data_vocab:
            print0(f"[train] student output layer has {V} rows, the data's vocabulary {data_vocab}: logits are "
                   f"sliced to the first {data_vocab}")
        n_params = count_parameters(model)
        if cfg.student.lora is not None or cfg.student.peft_config is not None:  # adapters exist before fully_shard
            lora_init.update(add_adapters(model, cfg.student, cfg.seed))
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before sharding: whole sizes
        # verified on rank 0 (the same answer on every rank) before anything is written: a resume
        # PATH that fails verification leaves the run directory as it was; lr-find does not resume
        ckpt = None if cfg.lr_find.enabled else agree_resume(run_dir, cfg.resume, info.rank)
        if info.is_main:
            _make_dir(run_dir)
            dump_config(cfg, join(run_dir, "config.yaml"))
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        shard_model(model, mixed_precision=compute_dtype(cfg.mixed_precision, info.device))

    if cfg.student.init == "pretrained":  # never whole on a rank: its rows are read after sharding
        student = local_copy(cfg.student.path) if is_remote(cfg.student.path) else cfg.student.path
        model = load_student_sharded(student, torch.float32, info.device, prepare)
    else:  # random weights drawn whole with torch.manual_seed(cfg.seed), as on every rank
        model = build_student(cfg.student.path, cfg.student.init, cfg.seed)
        prepare(model)
    load_initial_adapters(model, lora_init)  # this rank's rows of them (none without LoRA)
    indices = np.arange(len(train_src))
    if sample_ids is not None:
        index = train_src.index_of if hasattr(train_src, "index_of") else {s.sample_id: i for i, s in enumerate(train_src)}.__getitem__
        order = sorted(range(len(sample_ids)), key=lambda i: index(sample_ids[i]))
        indices = np.array([index(sample_ids[i]) for i in order], dtype=np.int64)
        sample_weights = None if sample_weights is None else np.asarray(sample_weights)[order]
    groups = None
    if cfg.data.shuffle == "block":
        if not hasattr(train_src, "block_ids"):
            raise ConfigError("data.shuffle=block needs data.train_cache (a dataset has no blocks)")
        groups = train_src.block_ids()[indices]
    sampler = StepSampler(indices, cfg.micro_batch_size, cfg.grad_accum_steps, info.rank, info.world_size, cfg.seed,
                          weights=sample_weights, groups=groups, window=cfg.data.shuffle_window)
    max_steps = cfg.epochs * sampler.steps_per_epoch if cfg.epochs else cfg.max_steps
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, max_steps))
    trainer = Trainer(model, optimizer, scheduler, cfg.loss, cfg.optim.max_grad_norm, info.device,
                      vocab_size=data_vocab if V > data_vocab else None, packing=cfg.data.packing,
                      loss_scaling=compute_dtype(cfg.mixed_precision, info.device) == torch.float16)
    pack_len = None
    if cfg.data.packing:
        pack_len = cfg.data.pack_length or (train_src.manifest.max_length if hasattr(train_src, "manifest")
                                            else cfg.data.train_dataset.max_length)
        check_packing(trainer, data_vocab)
    if cfg.lr_find.enabled:
        return run_lr_find(cfg.lr_find, trainer, sampler, train_src, run_dir, info, pack_length=pack_len)
    print0(f"[train] round {cfg.round}: student {n_params / 1e6:.2f}M params, V={V}; {len(indices)} train samples, "
           f"{sampler.steps_per_epoch} steps/epoch of {sampler.global_batch} samples; {max_steps} steps; "
           f"alpha={cfg.loss.alpha} tau={cfg.loss.temperature} lr={cfg.optim.lr}; {info.world_size} rank(s)"
           + (f"; packing into rows of {pack_len} tokens" if pack_len else ""))
    logger = MetricsLogger(run_dir, info.rank, cfg.wandb, config_dict(cfg))
    loss_log = LossLogWriter(loss_log_dir or join(run_dir, "loss_logs"), info.rank)
    n_eval = min(len(eval_src), cfg.data.eval_max_samples or len(eval_src)) if eval_src is not None else 0
    st = {"step": 0, "epoch": 0, "position": 0, "best": math.inf, "bad_evals": 0, "tokens": 0, "round": cfg.round}
    builtin = [MetricsCallback(logger, cfg.log_steps), EarlyStopping(cfg.early_stopping.patience, cfg.early_stopping.min_delta)]
    cbs = CallbackList(builtin + list(callbacks if callbacks is not None else load_callbacks(cfg.callbacks)), len(builtin))
    if ckpt is not None:
        st = load_checkpoint(ckpt, model, optimizer, scheduler, info.rank)
        sampler.epoch, sampler.position = st["epoch"], st["position"]
        cbs.load_state_dict(st.get("callbacks", {}))
        trainer.load_state_dict(st)  # fp16: the loss scale and overflow count
        loss_log.truncate_after(cfg.round, st["step"])
        print0(f"[train] resumed from {ckpt} at step {st['step']} (epoch {st['epoch']}, sample {st['position']})")
    elif carry_from is not None:
        load_optimizer_moments(carry_from, model, optimizer)
        print0(f"[train] optimizer state carried over from {carry_from}")
    last_eval: dict = {}
    stop = Preemption()
    state = TrainState(round=cfg.round, step=st["step"], max_steps=max_steps, epoch=sampler.epoch,
                       epoch_progress=sampler.epoch + sampler.position / len(indices), tokens=st["tokens"],
                       best_eval_loss=st["best"], evals_without_improvement=st["bad_evals"], rank=info.rank,
                       world_size=info.world_size, output_dir=str(run_dir), model=model, optimizer=optimizer)

    def sync_state(step: int) -> None:
        state.step, state.epoch, state.tokens = step, sampler.epoch, st["tokens"]
        state.epoch_progress = sampler.epoch + sampler.position / len(indices)
        state.best_eval_loss, state.evals_without_improvement = st["best"], st["bad_evals"]

    def run_eval(step: int) -> None:
        """Evaluate, export best/ on improvement, call on_evaluate (early stopping is a callback)."""
        nonlocal last_eval
        ev = trainer.evaluate(prefetch(eval_batches(eval_src, n_eval, cfg.micro_batch_size, info.rank, info.world_size,
                                                       pack_length=pack_len)))
        loss_log.append(cfg.round, "eval", sampler.epoch, step, ev.rows)
        st["best"], st["bad_evals"], improved, _ = early_stopping_update(st["best"], st["bad_evals"], ev.loss,
                                                                        cfg.early_stopping.min_delta, None)
        sync_state(step)
        last_eval = {"eval/loss": ev.loss, "eval/ce_loss": ev.ce, "eval/kl_loss": ev.kl, "eval/min_loss": st["best"],
                     "eval/perplexity": math.exp(min(ev.ce, 50.0)), "eval/epoch": state.epoch_progress, "eval/step": step,
                     "round": cfg.round, **ev.metrics("eval")}
        if info.is_main:
            progress.write(f"[eval] step {step}: loss {ev.loss:.4f} ce {ev.ce:.4f} kl {ev.kl:.4f} "
                       f"ppl {last_eval['eval/perplexity']:.2f}{' (best)' if improved else ''}")
        if improved:
            export_hf(model, join(run_dir, "best"), tok_dir, info.rank, precision=cfg.save_precision)
        cbs.call("on_evaluate", state, last_eval)

    def checkpoint(step: int) -> None:
        loss_log.flush()  # rows up to this step are closed before the checkpoint that covers them
        st.update(step=step, epoch=sampler.epoch, position=sampler.position,
                  samples_consumed=step * sampler.global_batch, callbacks=cbs.state_dict(), **trainer.state_dict())
        path = save_checkpoint(run_dir, step, model, optimizer, scheduler, dict(st), info.rank, cfg.save_total_limit)
        cbs.call("on_save", state, str(path))

    def agree_requests() -> None:
        """A stop/save request of a user callback on any rank holds on every rank (one tiny
        all-reduce per step, only when user callbacks are configured)."""
        if not cbs.needs_agreement or info.world_size == 1:
            return
        stopping = state.stop_reason is not None
        flags = torch.tensor([stopping, state.save_requested, stopping and state.save_on_stop], dtype=torch.int64,
                             device=info.device)
        all_reduce_sum(flags)
        if int(flags[0]):
            state.request_stop("stopped")  # a no-op where this rank made its own request
            state.save_on_stop = bool(flags[2])
        state.save_requested = bool(flags[1])

    bar = progress.Progress(max_steps, "train", "step", enabled=info.is_main, initial=st["step"])
    t_train, outcome = time.perf_counter(), "finished"
    workers, depth = cfg.data.num_workers, cfg.data.prefetch_steps
    if cfg.data.train_cache is not None and is_remote(cfg.data.train_cache):  # hide the store's latency
        workers = workers if "num_workers" in cfg.data.model_fields_set else REMOTE_NUM_WORKERS
        depth = depth if "prefetch_steps" in cfg.data.model_fields_set else REMOTE_PREFETCH_STEPS
    loader = StepPrefetcher(sampler, train_src, workers, depth, pack_length=pack_len)
    summary = None
    try:
        cbs.call("on_train_begin", state)
        for step in range(st["step"] + 1, max_steps + 1):
            t0 = time.perf_counter()
            micro = loader.next_step()
            stats = trainer.train_step(micro, stop_requested=stop.flag)
            dt = time.perf_counter() - t0
            if stats.nonfinite:  # the optimizer step was skipped: the weights are the previous step's
                st["skipped_steps"] = st.get("skipped_steps", 0) + 1
                ids = ", ".join(stats.nonfinite_sample_ids[:8]) + (" ..." if len(stats.nonfinite_sample_ids) > 8 else "")
                what = (f"non-finite loss or gradient norm at step {step} (round {cfg.round}; loss {stats.loss}, "
                        f"grad norm {stats.grad_norm}); samples on rank {info.rank}: {ids or 'none'}")
                if st["skipped_steps"] > cfg.skip_nonfinite:
                    raise ValueError(f"{what}; stopped with no checkpoint after it "
                                     f"(skip_nonfinite={cfg.skip_nonfinite} steps may be skipped)")
                print(f"[train] warning: {what}; step skipped ({st['skipped_steps']} of skip_nonfinite="
                      f"{cfg.skip_nonfinite})", file=sys.stderr, flush=True)
            if stats.overflow:  # fp16 loss scaling: expected now and then, not an error (nor skip_nonfinite)
                print0(f"[train] fp16 gradient overflow at step {step} at loss scale {stats.loss_scale:g}: "
                       f"step skipped, scale lowered ({stats.overflow_steps} overflow steps this round)")
            st["tokens"] += stats.n_tokens
            loss_log.append(cfg.round, "train", sampler.epoch, step, stats.rows)
            bar.update(1, loss=f"{stats.loss:.4f}", tok_s=f"{stats.n_tokens / dt:.0f}")
            sync_state(step)
            cbs.call("on_step_end", state, {
                "train/loss": stats.loss, "train/ce_loss": stats.ce, "train/kl_loss": stats.kl,
                "train/learning_rate": scheduler.get_last_lr()[0], "train/grad_norm": stats.grad_norm,
                "train/epoch": state.epoch_progress, "train/step": step, "train/tokens_per_second": stats.n_tokens / dt,
                "train/skipped_steps": st.get("skipped_steps", 0), "round": cfg.round, **stats.metrics("train")})
            if eval_src is not None and (step % cfg.eval_steps == 0 or step == max_steps):
                run_eval(step)
            agree_requests()
            preempted = stats.stop  # agreed over all ranks inside the step
            stopping = state.stop_reason is not None
            if (preempted or (cfg.save_steps and step % cfg.save_steps == 0) or state.save_requested
                    or (stopping and state.save_on_stop)):
                checkpoint(step)
                state.save_requested = False
            if preempted or stopping:
                outcome = "preempted" if preempted else state.stop_reason
                print0(f"[train] {outcome} after step {step}")
                break
        bar.close()
        train_s = time.perf_counter() - t_train
        if outcome != "preempted":
            export_hf(model, join(run_dir, "final"), tok_dir, info.rank, precision=cfg.save_precision)
            if save_optimizer_to is not None:
                save_optimizer(save_optimizer_to, model, optimizer, info.rank)
        summary = {"outcome": outcome,
                   "final_eval": {k.split("/", 1)[1]: v for k, v in last_eval.items() if k.startswith("eval/")},
                   "best_eval_loss": st["best"], "steps": max_steps, "train_tokens": st["tokens"],
                   "train_seconds": train_s, "tokens_per_second": st["tokens"] / max(train_s, 1e-9),
                   "num_parameters": n_params, "trainable_parameters": n_trainable,
                   "skipped_steps": st.get("skipped_steps", 0), "overflow_steps": trainer.overflow_steps,
                   "world_size": info.world_size, "wall_s": time.perf_counter() - t_start}
        cbs.call("on_train_end", state, summary)
    finally:
        loader.close()
        stop.restore()
        loss_log.close()
        logger.finish()
    if info.is_main:
        with writing("the run summary", join(run_dir, "summary.json")):
            write_file(join(run_dir, "summary.json"), json.dumps(summary, indent=1).encode())
        print0(f"[train] {outcome} in {summary['wall_s']:.0f}s; student in "
               f"{join(run_dir, 'checkpoints' if outcome == 'preempted' else 'final')}")
    cbs.call("on_round_end", state, summary)
    return summary if info.is_main else None


class Preemption:
    """SIGTERM/SIGINT set a flag; the trainer agrees on it over all ranks inside the next
    optimizer step (``Trainer.train_step(stop_requested=...)``), so every rank stops after the
    same step (none hangs in a collective)."""

    def __init__(self):
        self.flag = False
        self.old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.old[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread (e.g. called from a test helper)
                pass

    def _set(self, signum, frame) -> None:
        self.flag = True

    def restore(self) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
