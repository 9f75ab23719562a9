"""The teacher and pretrained-student loaders that never hold a whole model: built on the meta
device, sharded, then filled with this rank's rows read from the safetensors file (2 ranks:
tests/test_cli.py and tests/test_ensemble.py check that 2-rank caches equal 1-rank caches bit for
bit; a 2-rank train-student run from a pretrained student below)."""
import json

import torch
from conftest import run_cli, train_config, write_yaml

from pipeline.distributed import init_distributed, shard_model, teardown
from pipeline.models import build_student, load_student_sharded, load_teacher, load_teacher_sharded


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


def test_sharded_pretrained_student_equals_the_whole_load(assets):
    info = init_distributed("cpu")
    try:
        plain = build_student(assets["teacher"], "pretrained", seed=0)
        seen = []
        sharded = load_student_sharded(assets["teacher"], torch.float32, info.device,
                                       lambda m: (seen.append({p.device.type for p in m.parameters()}), shard_model(m)))
        assert seen == [{"meta"}]  # shard is called before any weight exists on the rank
        got = {n: p.full_tensor() for n, p in sharded.named_parameters()}
        want = dict(plain.named_parameters())
        assert got.keys() == want.keys()
        for name, p in want.items():
            torch.testing.assert_close(got[name], p, rtol=0, atol=0, msg=name)
        for (name, b), (_, ref) in zip(sharded.named_buffers(), plain.named_buffers()):
            torch.testing.assert_close(b, ref, rtol=0, atol=0, msg=name)
        assert all(p.requires_grad for p in sharded.parameters()) and sharded.training
        assert sharded.config.use_cache is False and plain.config.use_cache is False
    finally:
        teardown()


def test_two_rank_run_from_a_pretrained_student(assets, caches, tmp_path):
    """train-student at 2 ranks with ``student.init: pretrained`` (loaded sharded): with a
    vanishing learning rate the exported student is the pretrained one."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = train_config(assets, caches, out, student={"path": assets["teacher"], "init": "pretrained"},
                       max_steps=2, eval_steps=2, optim={"warmup_steps": 0, "lr": 1e-12})
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    final, teacher = (dict(AutoModelForCausalLM.from_pretrained(d).named_parameters()) for d in (out / "final", assets["teacher"]))
    assert final.keys() == teacher.keys()
    for name, p in teacher.items():
        torch.testing.assert_close(final[name], p, rtol=0, atol=1e-9, msg=name)
