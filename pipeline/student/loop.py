"""Stage 2: build the student and its data from the cache, run the steps, evaluate, export."""
from __future__ import annotations

import json
import math
import signal
import sys
import time

import numpy as np
import torch

from pipeline.cache import open_cache, read_manifest
from pipeline.cache.mixture import CacheMixture, check_compatible
from pipeline.student.divergences import Divergence
from pipeline.student.losses import resolve_tail
from pipeline.student.cross_tokenizer import wrap_sources
from pipeline.student.cache_checks import check_eval_cache, check_student_tokenizer
from pipeline.storage import Folder, join, write_file
from pipeline.storage.lock import RunLock
from pipeline.student.checkpoint import agree_resume, export_hf, load_checkpoint, load_optimizer_moments, save_checkpoint, save_optimizer
from pipeline.config import ConfigError, TrainStudentConfig, config_dict, dump_config
from pipeline.data import DatasetSamples
from pipeline.student.callbacks import CallbackList, EarlyStopping, MetricsCallback, RunState, load_callbacks
from pipeline.distributed import (DistInfo, all_reduce_sum, barrier, compute_dtype, gather_objects, on_rank0, print0,
                                  shard_model)
from pipeline.storage.errors import writing
from pipeline import progress
from pipeline.student.sampler import StepPrefetcher, eval_batches, eval_subset, prefetch
from pipeline.student.streams import build_sampler
from pipeline.losslog.writer import LossLogWriter
from pipeline.losslog.reader import load_loss_logs
from pipeline.student.lr_find import run_lr_find
from pipeline.student.lora import add_adapters, load_initial_adapters
from pipeline.student.rounds import finite_rows, read_run_json, round_configs, select_sample_ids, write_run_json
from pipeline.student.rounds import sample_weights as loss_weights
from pipeline.student.metrics import MetricsLogger
from pipeline.models import (build_student, count_parameters, defer_output_projection, load_student_sharded,
                             load_tokenizer, refuse_zero_output_layer, vocab_size)
from pipeline.student.step import Trainer, build_optimizer, check_packing, lr_lambda


REMOTE_NUM_WORKERS, REMOTE_PREFETCH_STEPS = 4, 16
"""Loader defaults for a cache on a remote store (``data.num_workers`` / ``prefetch_steps`` unset):
more requests in flight, further ahead (bench/object_store_bench.py: 1 thread, 4 steps ahead ran
0.80x local disk; 4 threads, 16 steps 1.09x)."""


def _sources(cfg: TrainStudentConfig, info: DistInfo):
    """(train source, eval source or None, tokenizer dir, vocabulary size the data requires).

    The train source is the cache of ``data.train_cache`` (or of a one-entry
    ``data.train_caches``), a :class:`CacheMixture` of two or more ``train_caches``, or the
    samples of ``data.train_dataset``. A dataset (``data.train_dataset`` / ``eval_dataset``) is
    streamed once, window by window, each rank tokenizing its part
    (:class:`~pipeline.data.DatasetSamples`, collective), and its samples are tokenized again
    from their rows when read: memory does not grow with its tokens. A cache written with
    another tokenizer than the student's is converted (:func:`wrap_sources`). The tokenizer
    directory is the student's own (``data.tokenizer``, or the tokenizer files of its
    directory), else the cache's: what ``best/`` and ``final/`` carry.

    Raises:
        ValueError: the caches of ``train_caches`` differ in tokenizer, vocabulary or targets
            (both paths named).
        ConfigError: ``eval_cache`` differs from the train cache in tokenizer, vocabulary,
            target type, k or temperature, or refuses the resolved ``loss.tail``
            (:func:`~pipeline.student.cache_checks.check_eval_cache`); the student's own
            tokenizer is not the cache's and ``loss.cross_tokenizer`` is unset
            (:func:`~pipeline.student.cache_checks.check_student_tokenizer`).
    """
    d = cfg.data
    paths = d.cache_paths()
    if paths:
        readers = [open_cache(p, max_cached_bytes=d.max_cached_bytes) for p in paths]
        check_compatible(readers, paths)
        train = readers[0] if len(readers) == 1 else CacheMixture(readers, [c.weight for c in d.train_caches])
        ev = open_cache(d.eval_cache, max_cached_bytes=d.max_cached_bytes) if d.eval_cache else None
        m = train.manifest
        if ev is not None:
            check_eval_cache(cfg, m, ev.manifest, paths[0], d.eval_cache)
        cache_tok = str(Folder(paths[0]).sub("tokenizer").local())
        student = check_student_tokenizer(cfg, m, cache_tok)
        train, ev, student_vocab = wrap_sources(cfg, train, ev, cache_tok, student)  # another tokenizer: converted
        return train, ev, student.path if student is not None else cache_tok, student_vocab or m.vocab_size
    tokenizer = load_tokenizer(d.tokenizer)
    gather = gather_objects if info.world_size > 1 else None
    train = DatasetSamples(d.train_dataset, tokenizer, rank=info.rank, world_size=info.world_size, gather=gather)
    ev = (DatasetSamples(d.eval_dataset, tokenizer, rank=info.rank, world_size=info.world_size, gather=gather)
          if d.eval_dataset else None)
    return train, ev, d.tokenizer, len(tokenizer)


def uses_fsdp(cfg: TrainStudentConfig, info: DistInfo) -> bool:
    """Whether the student is wrapped in FSDP2 (``pipeline.distributed.shard_model``): at world
    size > 1, with mixed precision (FSDP2's ``MixedPrecisionPolicy`` casts the parameters), or
    when ``fsdp_at_world_size_1`` asks for it. Otherwise (one rank, float32 compute) it trains
    as the plain module: FSDP2 at one rank only copies (all-gather and reduce-scatter of one
    shard) and dispatches every parameter operation through DTensor. The two give the same
    losses, gradients, state-dict keys and checkpoints (``tests/test_plain_ws1.py``)."""
    return (info.world_size > 1 or cfg.fsdp_at_world_size_1
            or compute_dtype(cfg.mixed_precision, info.device) is not None)


def run(cfg: TrainStudentConfig, info: DistInfo) -> dict | None:
    """The stage (:func:`train_rounds`) as the run directory's only writer: rank 0 takes
    ``output_dir``'s lock (:class:`~pipeline.storage.lock.RunLock`) before anything is
    written and gives it back at the end.

    Raises:
        ValueError: ``output_dir`` is a URL the store cannot serve (missing bucket, refused
            credentials), named, before anything is written (checked on every rank).
        RunLockHeld: another live process writes ``output_dir`` (named), on every rank.
        Others: as :func:`train_rounds`.
    """
    Folder(cfg.output_dir).check_access("output_dir")
    lock = RunLock(cfg.output_dir, "train-student")
    on_rank0(lock.acquire)  # held by rank 0 only; a refusal reaches every rank
    try:
        summary = train_rounds(cfg, info)
        barrier()  # every rank's files are closed before the lock goes
        return summary
    finally:
        lock.release()


def train_rounds(cfg: TrainStudentConfig, info: DistInfo) -> dict | None:
    """The stage: one round (``cfg.rounds`` empty) or a multi-round run (pipeline/rounds.py).

    Rounds already marked finished in ``run.json`` are skipped, so a rerun of the same command
    resumes the current round from its newest checkpoint. A preempted round stops the run.

    The configured callbacks (``callbacks:``, pipeline/callbacks.py) are built once here and
    see every round: ``on_train_begin`` ... ``on_train_end``, ``on_round_end`` per round.

    Raises:
        ConfigError: ``select`` on the first round (there is no previous loss log); a
            ``loss.tail`` the train cache's target type refuses (:func:`resolve_tail`).
        FileNotFoundError: ``data.train_cache`` is not a teacher cache (no manifest).
        ValueError: a ``callbacks`` entry that cannot be imported or built (named); a
            ``select`` that keeps no sample of the previous round's loss log.
    """
    if cfg.data.first_cache is not None and cfg.loss.alpha != 1.0:  # config.yaml shows the resolved loss.tail
        m = read_manifest(cfg.data.first_cache)
        cfg = resolve_tail(cfg, m.target_type, m.temperature, m.k, m.vocab_size)
    callbacks = load_callbacks(cfg.callbacks)  # once: the same objects see every round
    if not cfg.rounds:
        if cfg.select is not None or cfg.weight_by is not None:
            raise ConfigError("config keys 'select'/'weight_by': need a previous round (use rounds:)")
        return train(cfg, info, callbacks=callbacks)
    out = cfg.output_dir
    rcfgs = round_configs(cfg)
    if rcfgs[0].select is not None or rcfgs[0].weight_by is not None:
        raise ConfigError("config key 'rounds[0].select'/'weight_by': the first round has no previous loss log")
    state = on_rank0(read_run_json, out)
    if info.is_main:
        Folder(out).makedirs()
        dump_config(cfg, join(out, "config.yaml"))
    summary = None
    for rc in rcfgs:
        if any(x["round"] == rc.round for x in state["rounds"]):
            print0(f"[rounds] round {rc.round} already finished")
            continue
        ids = weights = None
        if rc.round > 0 and (rc.select is not None or rc.weight_by is not None):
            prev = load_loss_logs(out, round_=rc.round - 1, split="train")
            finite, excluded = finite_rows(prev, [m for m in (rc.select and rc.select.metric, rc.weight_by) if m])
            ids = (select_sample_ids(finite, rc.select, rc.seed, rc.round) if rc.select is not None
                   else sorted(set(prev["sample_id"].to_pylist())))
            if not ids:
                raise ValueError(f"config key 'rounds[{rc.round}].select': selects no sample of round {rc.round - 1}'s "
                                 f"loss log ({prev.num_rows} rows, {excluded} of them non-finite and left out)")
            weights = loss_weights(finite, ids, rc.weight_by) if rc.weight_by is not None else None
            print0(f"[rounds] round {rc.round}: {len(ids)} samples"
                   + (f" selected by {rc.select.model_dump(exclude_none=True)}" if rc.select else "")
                   + (f", drawn ∝ {rc.weight_by} per token" if weights is not None else "")
                   + (f"; {excluded} row(s) of steps skipped as non-finite left out" if excluded else ""))
        state["current"] = rc.round
        if info.is_main:
            write_run_json(out, state)
        nxt = rcfgs[rc.round + 1] if rc.round + 1 < len(rcfgs) else None
        summary = train(rc, info, loss_log_dir=join(out, "loss_logs"), sample_ids=ids, sample_weights=weights,
                        carry_from=join(out, f"round-{rc.round - 1}", "optimizer") if rc.carry_optimizer and rc.round else None,
                        save_optimizer_to=join(out, f"round-{rc.round}", "optimizer") if nxt and nxt.carry_optimizer else None,
                        callbacks=callbacks)
        barrier()  # every rank's loss-log files are closed before the next round selects from them
        outcome = on_rank0(lambda: summary["outcome"])
        if outcome == "preempted":
            return summary
        state["rounds"].append({"round": rc.round, "samples": len(ids) if ids is not None else "all",
                                "outcome": outcome, "loss": loss_description(rc.loss),
                                "final_eval": (summary or {}).get("final_eval")})
        if info.is_main:
            write_run_json(out, state)
    return summary


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
    loss-log rows, the same weights as an uninterrupted run. The phases: :class:`RoundTrainer`.

    Raises:
        FileNotFoundError / ValueError: missing cache or student, vocabulary mismatch (sizes named),
            too few samples for one global batch.
    """
    return RoundTrainer(cfg, info, loss_log_dir, sample_ids, sample_weights, carry_from, save_optimizer_to,
                        callbacks).run()


def loss_description(loss_cfg) -> dict:
    """The loss of a round for ``summary.json`` and ``run.json``: α, τ, the tail mode, the
    divergence and the parameters it uses."""
    return {"alpha": loss_cfg.alpha, "temperature": loss_cfg.temperature, "tail": loss_cfg.tail,
            **Divergence.from_config(loss_cfg).params()}


def train_metrics(stats, lr: float, state: RunState, dt: float) -> dict[str, float]:
    """The ``train/*`` metrics of one optimizer step (``on_step_end``; metrics.jsonl)."""
    return {"train/loss": stats.loss, "train/ce_loss": stats.ce, "train/kl_loss": stats.kl,
            "train/distill_loss": stats.distill, "train/learning_rate": lr, "train/grad_norm": stats.grad_norm,
            "train/epoch": state.epoch_progress, "train/step": state.step, "train/tokens_per_second": stats.n_tokens / dt,
            "train/skipped_steps": state.skipped_steps, "round": state.round, **stats.metrics("train")}


def eval_metrics(ev, state: RunState, step: int) -> dict[str, float]:
    """The ``eval/*`` metrics of one evaluation (``on_evaluate``; metrics.jsonl; summary's final_eval)."""
    return {"eval/loss": ev.loss, "eval/ce_loss": ev.ce, "eval/kl_loss": ev.kl, "eval/distill_loss": ev.distill,
            "eval/min_loss": state.best_eval_loss,
            "eval/perplexity": math.exp(min(ev.ce, 50.0)), "eval/epoch": state.epoch_progress, "eval/step": step,
            "round": state.round, **ev.metrics("eval")}


class RoundTrainer:
    """One round of student training, phase by phase: :meth:`build`, :meth:`resume`, then
    :meth:`step` (and :meth:`evaluate`, :meth:`save`) per optimizer step, :meth:`finish`;
    :meth:`run` strings them together (what :func:`train` does). The round's state is one
    :class:`RunState` (``self.state``): callbacks see it, checkpoints save its ``state_dict()``.

    Args: as :func:`train`.
    """

    def __init__(self, cfg: TrainStudentConfig, info: DistInfo, loss_log_dir: str | None = None,
                 sample_ids: list[str] | None = None, sample_weights: np.ndarray | None = None,
                 carry_from: str | None = None, save_optimizer_to: str | None = None, callbacks: list | None = None):
        self.t_start = time.perf_counter()
        self.cfg, self.info, self.run_dir = cfg, info, cfg.output_dir
        self.loss_log_dir, self.sample_ids, self.sample_weights = loss_log_dir, sample_ids, sample_weights
        self.carry_from, self.save_optimizer_to, self.user_callbacks = carry_from, save_optimizer_to, callbacks
        self.V = self.n_params = self.n_trainable = self.ckpt = None
        self.lora_init: dict = {}  # LoRA: the seeded initial adapter values, full (pipeline/lora.py)
        self.last_eval: dict = {}

    def run(self) -> dict | None:
        """Train the round (see :func:`train`); returns the summary on rank 0, None elsewhere
        (lr-find: its result)."""
        cfg = self.cfg
        self.build()
        if cfg.lr_find.enabled:
            return run_lr_find(cfg.lr_find, self.trainer, self.sampler, self.train_src, self.run_dir, self.info,
                               pack_length=self.pack_len)
        self.resume()
        self.preemption = Preemption()
        self.bar = progress.Progress(self.max_steps, "train", "step", enabled=self.info.is_main, initial=self.state.step,
                                     tokens="tok/s")
        t_train, outcome = time.perf_counter(), "finished"
        self.loader = self._loader()
        summary = None
        try:
            self.callbacks.call("on_train_begin", self.state)
            for step in range(self.state.step + 1, self.max_steps + 1):
                stats = self.step(step)
                if self.eval_src is not None and (step % cfg.eval_steps == 0 or step == self.max_steps):
                    self.evaluate(step)
                self._agree_requests()
                ended = self._save_or_stop(step, preempted=stats.stop)  # stop agreed over all ranks in the step
                if ended is not None:
                    outcome = ended
                    break
            self.bar.close()
            summary = self.finish(outcome, time.perf_counter() - t_train)
        finally:
            self.loader.close()
            self.preemption.restore()
            self.loss_log.close()
            self.logger.finish()
        self._write_summary(summary)
        self.callbacks.call("on_round_end", self.state, summary)
        return summary if self.info.is_main else None

    # -- build -----------------------------------------------------------------------------

    def build(self) -> None:
        """Open the data sources, build the sharded student (pretrained: read after sharding),
        the sampler, optimizer, scheduler and :class:`Trainer`; unless lr-find is on, the
        metrics and loss-log writers, the callbacks and the fresh :class:`RunState`.

        Raises:
            FileNotFoundError / ValueError: missing cache or student, vocabulary mismatch (sizes
                named), too few samples for one global batch, a pretrained student whose output
                layer is all zeros (path named).
            ConfigError: ``data.shuffle=block`` without a cache; a ``loss.tail`` the train
                cache's target type refuses.
        """
        cfg, info = self.cfg, self.info
        self.train_src, self.eval_src, self.tok_dir, self.data_vocab = _sources(cfg, info)
        if cfg.data.first_cache is not None:  # loss.tail defaults from, and is checked against, the cache
            m = self.train_src.manifest
            self.cfg = cfg = resolve_tail(cfg, m.target_type, m.temperature, m.k, m.vocab_size)
        self.fsdp = uses_fsdp(cfg, info)
        if cfg.student.init == "pretrained" and self.fsdp:  # never whole on a rank: its rows are read after sharding
            student = Folder(cfg.student.path).local()
            self.model = load_student_sharded(student, torch.float32, info.device, self._prepare)
        elif cfg.student.init == "pretrained":  # one plain rank holds the whole model anyway
            self.model = build_student(Folder(cfg.student.path).local(), "pretrained", cfg.seed)
            self._prepare(self.model)
        else:  # random weights drawn whole with torch.manual_seed(cfg.seed), as on every rank
            self.model = build_student(cfg.student.path, cfg.student.init, cfg.seed)
            self._prepare(self.model)
        if cfg.student.init == "pretrained":  # an all-zero output layer: a broken checkpoint or load
            refuse_zero_output_layer(self.model, cfg.student.path)
        load_initial_adapters(self.model, self.lora_init)  # this rank's rows of them (none without LoRA)
        self._build_sampler()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.optim, self.max_steps))
        self.trainer = Trainer(self.model, self.optimizer, self.scheduler, cfg.loss, cfg.optim.max_grad_norm,
                               info.device, vocab_size=self.data_vocab if self.V > self.data_vocab else None,
                               packing=cfg.data.packing,
                               loss_scaling=compute_dtype(cfg.mixed_precision, info.device) == torch.float16,
                               cache_temperature=(self.train_src.manifest.temperature
                                                  if cfg.data.first_cache is not None else 1.0))
        self.pack_len = None
        if cfg.data.packing:
            self.pack_len = cfg.data.pack_length or (self.train_src.manifest.max_length
                                                     if hasattr(self.train_src, "manifest")
                                                     else cfg.data.train_dataset.max_length)
            check_packing(self.trainer, self.data_vocab)
        if cfg.lr_find.enabled:  # lr-find writes no metrics, loss logs or checkpoints
            return
        print0(f"[train] round {cfg.round}: student {self.n_params / 1e6:.2f}M params, V={self.V}; "
               f"{len(self.indices)} train samples, {self.sampler.steps_per_epoch} steps/epoch of "
               f"{self.sampler.global_batch} samples; {self.max_steps} steps; alpha={cfg.loss.alpha} "
               f"tau={cfg.loss.temperature} lr={cfg.optim.lr}; {info.world_size} rank(s); "
               f"shuffle {self.data_order}"
               + ("" if self.fsdp else " (plain module, no FSDP2)")
               + (f"; packing into rows of {self.pack_len} tokens" if self.pack_len else ""))
        self._build_loggers()

    def _prepare(self, model: torch.nn.Module) -> None:
        """From the built student to the FSDP2-sharded one (or, when :func:`uses_fsdp` is
        False, the plain module on the device). A pretrained student loaded sharded comes here
        with its parameters on the meta device, before any weight is read (shapes only).

        Raises:
            ValueError: the student's vocabulary is smaller than the data's.
        """
        cfg, info = self.cfg, self.info
        defer_output_projection(model)  # the output layer runs inside the fused loss (before fully_shard)
        self.V = vocab_size(model)
        if self.V < self.data_vocab:
            raise ValueError(f"student vocabulary size {self.V} is smaller than the data's {self.data_vocab} "
                             f"({cfg.data.first_cache or cfg.data.tokenizer})")
        if self.V > self.data_vocab:
            print0(f"[train] student output layer has {self.V} rows, the data's vocabulary {self.data_vocab}: "
                   f"logits are sliced to the first {self.data_vocab}")
        self.n_params = count_parameters(model)
        if cfg.student.lora is not None or cfg.student.peft_config is not None:  # adapters exist before fully_shard
            self.lora_init.update(add_adapters(model, cfg.student, cfg.seed))
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before sharding: whole sizes
        # verified on rank 0 (the same answer on every rank) before anything is written: a resume
        # PATH that fails verification leaves the run directory as it was; lr-find does not resume
        self.ckpt = None if cfg.lr_find.enabled else agree_resume(self.run_dir, cfg.resume)
        if info.is_main:
            Folder(self.run_dir).makedirs()
            dump_config(cfg, join(self.run_dir, "config.yaml"))
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.fsdp:
            shard_model(model, mixed_precision=compute_dtype(cfg.mixed_precision, info.device))
        else:
            model.to(info.device)

    def _build_sampler(self) -> None:
        """The round's sample indices (``sample_ids``: in cache order, their weights along) and
        the sampler of ``data.shuffle``; ``max_steps`` from ``epochs`` or ``max_steps``.

        Raises:
            ConfigError: a ``data.shuffle`` the source cannot serve
                (:func:`~pipeline.student.streams.build_sampler`).
        """
        cfg, info, src, weights = self.cfg, self.info, self.train_src, self.sample_weights
        indices = np.arange(len(src))
        if self.sample_ids is not None:
            ids = self.sample_ids
            found = src.indices_of(ids)  # one batched hash lookup (KeyError naming a missing ID)
            order = np.argsort(found, kind="stable")
            indices = found[order]
            weights = None if weights is None else np.asarray(weights)[order]
        if isinstance(src, CacheMixture):  # each cache its share of the draws (times any loss weights)
            mix = src.draw_weights(indices)
            weights = mix if weights is None else mix * np.asarray(weights, dtype=np.float64)
        self.indices = indices
        self.sampler, self.data_order = build_sampler(cfg.data, src, indices, weights, cfg.micro_batch_size,
                                                      cfg.grad_accum_steps, info.rank, info.world_size, cfg.seed)
        self.max_steps = cfg.epochs * self.sampler.steps_per_epoch if cfg.epochs else cfg.max_steps

    def _build_loggers(self) -> None:
        """Metrics logger, loss-log writer, the callbacks (built-ins first) and the fresh state."""
        cfg, info = self.cfg, self.info
        self.logger = MetricsLogger(self.run_dir, info.rank, cfg.wandb, config_dict(cfg))
        self.loss_log = LossLogWriter(self.loss_log_dir or join(self.run_dir, "loss_logs"), info.rank)
        self.eval_indices = (eval_subset(len(self.eval_src), cfg.data.eval_max_samples, cfg.seed)
                             if self.eval_src is not None else None)
        self.early_stopping = EarlyStopping(cfg.early_stopping.patience, cfg.early_stopping.min_delta)
        builtin = [MetricsCallback(self.logger, cfg.log_steps), self.early_stopping]
        user = self.user_callbacks if self.user_callbacks is not None else load_callbacks(cfg.callbacks)
        self.callbacks = CallbackList(builtin + list(user), len(builtin))
        self.state = RunState(round=cfg.round, step=0, max_steps=self.max_steps, epoch=0, epoch_progress=0.0,
                              tokens=0, best_eval_loss=math.inf, evals_without_improvement=0, rank=info.rank,
                              world_size=info.world_size, output_dir=str(self.run_dir), model=self.model,
                              optimizer=self.optimizer)
        self._sync_position()

    def _loader(self) -> StepPrefetcher:
        """The step prefetcher; a cache on a remote store gets more workers, further ahead,
        unless ``data.num_workers`` / ``prefetch_steps`` are set (hides the store's latency).
        On CUDA its threads pin the batches (asynchronous host-to-device copies)."""
        d = self.cfg.data
        workers, depth = d.num_workers, d.prefetch_steps
        if any(Folder(p).is_remote for p in d.cache_paths()):
            workers = workers if "num_workers" in d.model_fields_set else REMOTE_NUM_WORKERS
            depth = depth if "prefetch_steps" in d.model_fields_set else REMOTE_PREFETCH_STEPS
        return StepPrefetcher(self.sampler, self.train_src, workers, depth, pack_length=self.pack_len,
                              pin_memory=self.info.device.type == "cuda")

    def _sync_position(self) -> None:
        """Copy the sampler's data position (what it has handed out is what was consumed) into the state."""
        s = self.sampler
        self.state.epoch, self.state.position = s.epoch, s.position
        self.state.epoch_progress = s.epoch + s.position / len(self.indices)

    # -- phases ----------------------------------------------------------------------------

    def resume(self) -> None:
        """Restore the newest checkpoint (``resume:``): weights, optimizer, scheduler, RNG, the
        run state, data position, callbacks' and trainer's state, and cut the loss logs after
        its step in every rank's files; else carry the previous round's optimizer moments
        (``carry_optimizer``) and drop every row an earlier attempt logged for the round."""
        cfg, ckpt = self.cfg, self.ckpt
        if ckpt is not None:
            saved = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, self.info.rank)
            self.state.load_state_dict(saved)
            self.sampler.epoch, self.sampler.position = self.state.epoch, self.state.position
            self._sync_position()
            # a checkpoint written before orders were recorded drew with the default of then: global;
            # why a run fell back to global is not part of its order
            saved_order = self.state.extra.get("data_order", "global")
            if saved_order.split(" (streams cannot")[0] != self.data_order.split(" (streams cannot")[0]:
                print0(f"[train] the checkpoint was drawing samples in the order '{saved_order}', this run "
                       f"'{self.data_order}': the rest of epoch {self.state.epoch} is drawn from the new order "
                       "(some of its samples may be seen twice or not at all)")
            self.callbacks.load_state_dict(saved.get("callbacks", {}))
            self.trainer.load_state_dict(saved)  # fp16: the loss scale and overflow count
            print0(f"[train] resumed from {ckpt} at step {saved['step']} (epoch {saved['epoch']}, "
                   f"sample {saved['position']})")
        elif self.carry_from is not None:
            load_optimizer_moments(self.carry_from, self.model, self.optimizer)
            print0(f"[train] optimizer state carried over from {self.carry_from}")
        # rows of steps after the one resumed from (0: a fresh start) are logged again as they
        # rerun: drop them in every rank's files, all ranks done before any writes (gather)
        step = self.state.step
        dropped = sum(gather_objects(self.loss_log.truncate_after(cfg.round, step, self.info.world_size)))
        if dropped:
            print0(f"[train] loss logs: dropped {dropped} rows of round {cfg.round} logged after step {step} "
                   "by an earlier attempt (those steps run again and log them anew)")

    def step(self, step: int):
        """Run optimizer step ``step`` (collective), log its loss-log rows, update the state and
        call ``on_step_end``; returns the step's stats (``.stop``: a preemption agreed over ranks).

        Raises:
            ValueError: more than ``skip_nonfinite`` steps had a non-finite loss or gradient norm;
                ``max_consecutive_overflows`` fp16 overflow-skipped steps in a row.
        """
        cfg, state = self.cfg, self.state
        t0 = time.perf_counter()
        micro = self.loader.next_step()
        stats = self.trainer.train_step(micro, stop_requested=self.preemption.flag)
        dt = time.perf_counter() - t0
        if stats.nonfinite:  # the optimizer step was skipped: the weights are the previous step's
            state.skipped_steps += 1
            ids = ", ".join(stats.nonfinite_sample_ids[:8]) + (" ..." if len(stats.nonfinite_sample_ids) > 8 else "")
            what = (f"non-finite loss or gradient norm at step {step} (round {cfg.round}; loss {stats.loss}, "
                    f"grad norm {stats.grad_norm}); samples on rank {self.info.rank}: {ids or 'none'}")
            if state.skipped_steps > cfg.skip_nonfinite:
                raise ValueError(f"{what}; stopped with no checkpoint after it "
                                 f"(skip_nonfinite={cfg.skip_nonfinite} steps may be skipped)")
            print(f"[train] warning: {what}; step skipped ({state.skipped_steps} of skip_nonfinite="
                  f"{cfg.skip_nonfinite})", file=sys.stderr, flush=True)
        if stats.overflow:  # fp16 loss scaling: expected now and then, not an error (nor skip_nonfinite)
            print0(f"[train] fp16 gradient overflow at step {step} at loss scale {stats.loss_scale:g}: "
                   f"step skipped, scale lowered ({stats.overflow_steps} overflow steps this round)")
            n = stats.consecutive_overflows
            if n >= cfg.max_consecutive_overflows:  # no scale helps: stop rather than end with no update
                raise ValueError(f"fp16 gradient overflow in {n} consecutive steps ({step - n + 1} to {step}, round "
                                 f"{cfg.round}; last at loss scale {stats.loss_scale:g}): the gradients are not finite "
                                 f"at any scale; stopped with no checkpoint after it "
                                 f"(max_consecutive_overflows={cfg.max_consecutive_overflows})")
        state.tokens += stats.n_tokens
        self.loss_log.append(cfg.round, "train", self.sampler.epoch, step, stats.rows)
        self.bar.update(1, tokens=stats.n_tokens, loss=f"{stats.loss:.4f}")  # tok/s: since the last line
        state.step = step
        self._sync_position()
        self.callbacks.call("on_step_end", state, train_metrics(stats, self.scheduler.get_last_lr()[0], state, dt))
        return stats

    def evaluate(self, step: int) -> None:
        """Evaluate (collective), log the eval rows, apply the improvement rule, export best/ on
        an improvement, call ``on_evaluate`` (early stopping's patience is a callback)."""
        cfg, info = self.cfg, self.info
        batches = eval_batches(self.eval_src, self.eval_indices, cfg.micro_batch_size, info.rank, info.world_size,
                               pack_length=self.pack_len)
        if info.device.type == "cuda":  # pinned in the prefetch thread, as the train loader's: asynchronous copies
            batches = (b.pin_memory() for b in batches)
        ev = self.trainer.evaluate(prefetch(batches))
        self.loss_log.append(cfg.round, "eval", self.sampler.epoch, step, ev.rows)
        improved = self.early_stopping.update(self.state, ev.loss)
        self.last_eval = eval_metrics(ev, self.state, step)
        if info.is_main:
            progress.write(f"[eval] step {step}: loss {ev.loss:.4f} ce {ev.ce:.4f} kl {ev.kl:.4f} "
                           f"ppl {self.last_eval['eval/perplexity']:.2f}{' (best)' if improved else ''}")
        if improved:
            export_hf(self.model, join(self.run_dir, "best"), self.tok_dir, info.rank, precision=cfg.save_precision)
        self.callbacks.call("on_evaluate", self.state, self.last_eval)

    def save(self, step: int) -> None:
        """Write checkpoint ``step`` (collective): model, optimizer, scheduler and
        ``self.state.state_dict()``; then ``on_save``."""
        self.loss_log.flush()  # rows up to this step are closed before the checkpoint that covers them
        self.state.extra.update(samples_consumed=step * self.sampler.global_batch, data_order=self.data_order,
                                callbacks=self.callbacks.state_dict(), **self.trainer.state_dict())
        path = save_checkpoint(self.run_dir, step, self.model, self.optimizer, self.scheduler,
                               self.state.state_dict(), self.info.rank, self.cfg.save_total_limit)
        self.callbacks.call("on_save", self.state, str(path))

    def _save_or_stop(self, step: int, preempted: bool) -> str | None:
        """After step ``step``: checkpoint if due or asked for; returns the outcome if the round
        ends here (preempted, or a callback's stop reason), else None."""
        state = self.state
        stopping = state.stop_reason is not None
        if (preempted or (self.cfg.save_steps and step % self.cfg.save_steps == 0) or state.save_requested
                or (stopping and state.save_on_stop)):
            self.save(step)
            state.save_requested = False
        if not (preempted or stopping):
            return None
        outcome = "preempted" if preempted else state.stop_reason
        print0(f"[train] {outcome} after step {step}")
        return outcome

    def _agree_requests(self) -> None:
        """A stop/save request of a user callback on any rank holds on every rank (one tiny
        all-reduce per step, only when user callbacks are configured)."""
        state, info = self.state, self.info
        if not self.callbacks.needs_agreement or info.world_size == 1:
            return
        stopping = state.stop_reason is not None
        flags = torch.tensor([stopping, state.save_requested, stopping and state.save_on_stop], dtype=torch.int64,
                             device=info.device)
        all_reduce_sum(flags)
        if int(flags[0]):
            state.request_stop("stopped")  # a no-op where this rank made its own request
            state.save_on_stop = bool(flags[2])
        state.save_requested = bool(flags[1])

    def finish(self, outcome: str, train_s: float) -> dict:
        """Export final/ (and the optimizer for the next round's ``carry_optimizer``) unless
        preempted, build the summary, call ``on_train_end``; returns the summary."""
        cfg, info, state = self.cfg, self.info, self.state
        if outcome != "preempted":
            export_hf(self.model, join(self.run_dir, "final"), self.tok_dir, info.rank, precision=cfg.save_precision)
            if self.save_optimizer_to is not None:
                save_optimizer(self.save_optimizer_to, self.model, self.optimizer, info.rank)
        summary = {"outcome": outcome, "loss": loss_description(cfg.loss),
                   "final_eval": {k.split("/", 1)[1]: v for k, v in self.last_eval.items() if k.startswith("eval/")},
                   "best_eval_loss": state.best_eval_loss, "steps": self.max_steps, "train_tokens": state.tokens,
                   "train_seconds": train_s, "tokens_per_second": state.tokens / max(train_s, 1e-9),
                   "num_parameters": self.n_params, "trainable_parameters": self.n_trainable,
                   "skipped_steps": state.skipped_steps, "overflow_steps": self.trainer.overflow_steps,
                   "world_size": info.world_size, "wall_s": time.perf_counter() - self.t_start}
        self.callbacks.call("on_train_end", state, summary)
        return summary

    def _write_summary(self, summary: dict) -> None:
        """summary.json and the closing line (rank 0), after the loggers are closed."""
        if not self.info.is_main:
            return
        with writing("the run summary", join(self.run_dir, "summary.json")):
            write_file(join(self.run_dir, "summary.json"), json.dumps(summary, indent=1).encode())
        outcome = summary["outcome"]
        print0(f"[train] {outcome} in {summary['wall_s']:.0f}s; student in "
               f"{join(self.run_dir, 'checkpoints' if outcome == 'preempted' else 'final')}")


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
        """Put back the signal handlers found at construction."""
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
