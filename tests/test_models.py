"""The teacher loader that never holds a whole teacher: built on the meta device, sharded, then
filled with this rank's rows read from the safetensors file (2 ranks: tests/test_cli.py and
tests/test_ensemble.py check that 2-rank caches equal 1-rank caches bit for bit)."""
import torch

from pipeline.distributed import init_distributed, shard_model, teardown
from pipeline.models import load_teacher, load_teacher_sharded


def test_sharded_load_equals_the_plain_load(assets, tmp_path):
    info = init_distributed("cpu")
    try:
        plain = load_teacher(assets["teacher"])
        sharded = load_teacher_sharded(assets["teacher"], torch.float32, info.device,
                                       lambda m: shard_model(m, sum_gradients=False))
        got = {n: p.full_tensor() for n, p in sharded.named_parameters()}
        want = dict(plain.named_parameters())
        assert got.keys() == want.keys()
        for name, p in want.items():
            torch.testing.assert_close(got[name], p, rtol=0, atol=0, msg=name)
        for (name, b), (_, ref) in zip(sharded.named_buffers(), plain.named_buffers()):  # rotary inv_freq
            torch.testing.assert_close(b, ref, rtol=0, atol=0, msg=name)
        assert not any(p.requires_grad for p in sharded.parameters()) and not sharded.training
        ids = torch.tensor([[1, 5, 9, 3, 7]])
        with torch.no_grad():
            torch.testing.assert_close(sharded(input_ids=ids).logits, plain(input_ids=ids).logits)
    finally:
        teardown()
