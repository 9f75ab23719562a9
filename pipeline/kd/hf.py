"""A Hugging Face ``Trainer`` that trains a causal LM from a teacher cache with :class:`KDLoss`.

Everything but the loss, the data order and the token count is the ``Trainer``'s own:
optimizer, schedule, gradient accumulation, mixed precision, DDP, checkpoints, logging,
callbacks. Exactness (DESIGN.md, Loss): the Trainer passes ``compute_loss`` the number of
valid positions of the whole optimizer step over all ranks (``num_items_in_batch``, counted
here from the batches before the forward passes), each micro-batch back-propagates
``Σ loss / N``, times the world size because DDP averages gradients over ranks; the gradient is
then that of one big batch, as train-student's.
"""
from __future__ import annotations

import itertools

import torch
import transformers

from pipeline.kd.dataset import CacheDataset, KDCollator, StepOrderSampler
from pipeline.kd.loss import KDLoss
from pipeline.models import defer_output_projection


class KDTrainer(transformers.Trainer):
    """``transformers.Trainer`` for offline KD from a teacher cache.

    The model's output layer is replaced by a pass-through (:func:`defer_output_projection`)
    when the trainer is built: ``model(...).logits`` are then the final hidden states, and the
    loss applies the output layer chunk by chunk, so no ``(B, T, V)`` logits exist. State-dict
    keys are unchanged, so checkpoints and ``save_model`` directories load as the original model
    class; :func:`~pipeline.kd.restore_output_projection` gives back the ``nn.Linear`` for
    generation in the same process.

    Samples are visited in train-student's order (:class:`~pipeline.kd.StepOrderSampler` with
    ``args.data_seed``, else ``args.seed``; ``train_sampling_strategy`` does not apply): for the
    same seed, batch sizes and world size, optimizer step ``s`` sees the samples of
    train-student's step ``s``. Evaluation reports the per-token loss of each eval
    batch (the Trainer averages those) and no predictions.

    Args:
        model: a Hugging Face causal LM (not yet wrapped by DDP/FSDP).
        args: ``transformers.TrainingArguments``.
        train_dataset: the train cache (:class:`~pipeline.kd.CacheDataset`).
        kd_loss: the loss; default ``KDLoss(train_dataset)`` (α 0.5, τ 1, the cache's tail mode).
        data_collator: default :class:`~pipeline.kd.KDCollator` (padded rows).
        **kwargs: the other ``transformers.Trainer`` arguments (``eval_dataset``, ``callbacks``,
            ``optimizers``, ...).
    Raises:
        TypeError: ``train_dataset`` is not a :class:`CacheDataset`; the model has no output layer.
        ValueError: the model soft-caps its logits (:func:`defer_output_projection`).
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the whole step's token count

    def __init__(self, model: torch.nn.Module, args: transformers.TrainingArguments, train_dataset: CacheDataset,
                 kd_loss: KDLoss | None = None, data_collator=None, **kwargs):
        if not isinstance(train_dataset, CacheDataset):
            raise TypeError(f"KDTrainer: train_dataset must be a pipeline.kd.CacheDataset, "
                            f"not {type(train_dataset).__name__}")
        self.head = defer_output_projection(model)  # before the Trainer wraps the model
        self.kd_loss = kd_loss if kd_loss is not None else KDLoss(train_dataset)
        super().__init__(model=model, args=args, train_dataset=train_dataset,
                         data_collator=data_collator if data_collator is not None else KDCollator(), **kwargs)
        # transformers 4.x reads this instead of loss_is_scaled_for_ga: the loss is already per step
        self.model_accepts_loss_kwargs = True

    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler:
        """train-student's sample order (:class:`StepOrderSampler`), whole global batches only."""
        a = self.args
        ds = train_dataset if train_dataset is not None else self.train_dataset
        seed = a.data_seed if a.data_seed is not None else a.seed
        return StepOrderSampler(len(ds), a.per_device_train_batch_size, a.gradient_accumulation_steps, a.world_size,
                                seed)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, torch.Tensor]:
        """The next ``num_batches`` micro-batches and ``N``, the valid positions of all of them
        on all ranks (one all-reduce), whatever the model's forward signature or
        ``average_tokens_across_devices``."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        n = torch.tensor(sum(int(b["rows"].numel()) for b in batches), dtype=torch.int64, device=device)
        if self.args.world_size > 1:
            n = self.accelerator.reduce(n, reduction="sum")
        return batches, n

    def compute_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        """``KDLoss`` of one micro-batch: ``Σ loss / N`` in training (times the number of
        processes, whose gradients DDP averages), the batch's per-token loss otherwise (also
        when ``num_items_in_batch`` is None)."""
        extra = {"position_ids": inputs["position_ids"]} if "position_ids" in inputs else {}
        out = model(input_ids=inputs["input_ids"], use_cache=False, **extra)
        hidden = out.logits  # (R, L, H): the deferred output layer returns its input
        if model.training and num_items_in_batch is not None:
            loss = self.kd_loss(hidden, self.head.weight, self.head.bias, inputs, num_items_in_batch)
            loss = loss * self.accelerator.num_processes
        else:
            loss = self.kd_loss(hidden, self.head.weight, self.head.bias, inputs, max(int(inputs["rows"].numel()), 1))
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs: dict, prediction_loss_only: bool, ignore_keys=None):
        """The eval batch's per-token loss; no logits or labels are gathered (the model's
        outputs are hidden states, not predictions)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
