"""One SGD(lr=1) optimizer step of a tiny FSDP2 student; the resulting full state dict is saved.

Run as ``python tests/dist_grad_check.py OUT MBS ACCUM [PACK]`` (1 rank) or under
``torchrun --nproc_per_node=2`` (2 ranks): with the same global batch the saved states must
match, since the parameter change equals the gradient. ``PACK`` > 0 packs each micro-batch
into rows of that many tokens (``data.packing``).
"""
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import synthetic_records, tiny_student  # noqa: E402

from pipeline.config import LossConfig  # noqa: E402
from pipeline.distributed import finish, full_state_dict, init_distributed, shard_model  # noqa: E402
from pipeline.student.sampler import StepSampler  # noqa: E402
from pipeline.data.batch import collate
from pipeline.models import defer_output_projection  # noqa: E402
from pipeline.student.step import Trainer  # noqa: E402

VOCAB, K, N = 64, 6, 16


@contextlib.contextmanager
def _count_fsdp_collectives():
    """Count FSDP2's all-gathers and reduce-scatters (torch 2.13 calls ``dist.all_gather_single``
    and ``dist.reduce_scatter_single``) inside the block; yields the counts."""
    import torch.distributed as dist

    counts = {"all_gather": 0, "reduce_scatter": 0}
    names = (("all_gather_single", "all_gather"), ("reduce_scatter_single", "reduce_scatter"))
    originals = {name: getattr(dist, name) for name, _ in names}
    for name, key in names:
        def wrap(*a, _orig=originals[name], _key=key, **kw):
            counts[_key] += 1
            return _orig(*a, **kw)

        setattr(dist, name, wrap)
    try:
        yield counts
    finally:
        for name, orig in originals.items():
            setattr(dist, name, orig)


def one_step(out: str, mbs: int, accum: int, pack: int = 0, divergence: str = "forward_kl") -> None:
    info = init_distributed("cpu")
    records = synthetic_records(N, VOCAB, K)
    student = tiny_student(VOCAB)
    defer_output_projection(student)  # before fully_shard, as train-student does
    model = shard_model(student)
    init = {n: t.clone() for n, t in full_state_dict(model).items()}  # may alias the parameters
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Trainer(model, opt, None, LossConfig(alpha=0.3, temperature=2.0, tail="bucket", divergence=divergence, beta=0.3), None, info.device,
                      packing=pack > 0, cache_temperature=2.0)
    import numpy as np

    sampler = StepSampler(np.arange(N), mbs, accum, info.rank, info.world_size, seed=0)
    micro = [collate([records[i] for i in idx], pack_length=pack or None) for idx in sampler.next_step()]
    with _count_fsdp_collectives() as comms:
        stats = trainer.train_step(micro)
    from torch.distributed.fsdp import FSDPModule

    comms["groups"] = sum(isinstance(m, FSDPModule) for m in model.modules())
    state = full_state_dict(model)
    if info.rank == 0:
        torch.save({"delta": {n: state[n] - init[n] for n in state}, "loss": stats.loss, "n_tokens": stats.n_tokens,
                    "kl": stats.kl, "distill": stats.distill,
                    "micro_valid": [b.n_valid for b in micro], "rows": stats.rows,
                    "micro_rows": [b.input_ids.shape[0] for b in micro], "comms": comms}, out)
    # barrier (destroying the group while rank 0 still saves aborts rank 1), teardown, and under
    # torchrun the stages' exit (no interpreter finalization beside a peer's teardown)
    finish(0)


if __name__ == "__main__":
    one_step(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0,
             sys.argv[5] if len(sys.argv) > 5 else "forward_kl")
