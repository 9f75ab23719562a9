"""World size 1 trains the plain module (no FSDP2): the same run as FSDP2 at one rank (losses,
gradient norms, clipping, accumulation, checkpoints, exports), LoRA students included, and its
checkpoints resume at 2 ranks and 2-rank checkpoints at 1 plain rank."""
import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import run_cli, train_config, write_yaml
from safetensors.torch import load_file

from pipeline.config import TrainStudentConfig
from pipeline.distributed import DistInfo
from pipeline.student.loop import uses_fsdp

PLAIN = "(plain module, no FSDP2)"


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _series(run, key: str) -> list[float]:
    return [m[key] for m in _metrics(run) if key in m]


def _ckpt_layout(ckpt) -> dict:
    """DCP keys → global shape of every saved tensor (model and optimizer state)."""
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    return {k: tuple(getattr(v, "size", ())) for k, v in meta.items()}


def test_uses_fsdp_only_where_needed():
    cfg = TrainStudentConfig.model_validate({"output_dir": "x", "student": {"path": "s"},
                                             "data": {"train_cache": "c"}, "device": "cpu"})
    one, two = (DistInfo(0, n, 0, torch.device("cpu")) for n in (1, 2))
    assert not uses_fsdp(cfg, one) and uses_fsdp(cfg, two)
    assert uses_fsdp(cfg.model_copy(update={"fsdp_at_world_size_1": True}), one)
    assert uses_fsdp(cfg.model_copy(update={"mixed_precision": "bf16"}), one)  # FSDP2's MixedPrecisionPolicy


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_plain_module_equals_fsdp_at_one_rank(assets, caches, tmp_path, lora):
    """Accumulation (2 micro-batches of different lengths), clipping at every step (a tiny
    ``max_grad_norm``), eval, a checkpoint and the export: the plain module and FSDP2 at one
    rank give the same losses, gradient norms, exported weights and checkpoint layout. They are
    asserted equal bit for bit: at one rank FSDP2's all-gather and reduce-scatter are copies
    and the arithmetic is the same (same kernels, same order)."""
    over = dict(micro_batch_size=2, grad_accum_steps=2, max_steps=4, eval_steps=2, save_steps=2,
                optim={"warmup_steps": 1, "max_grad_norm": 0.05, "lr": 1e-2})
    if lora:
        base = tmp_path / "base"
        from helpers import tiny_student

        tiny_student(assets["vocab"], seed=3).save_pretrained(base)
        over["student"] = {"path": str(base), "init": "pretrained", "lora": {"r": 4, "alpha": 8}}
        over["optim"]["max_grad_norm"] = 1e-4  # the adapters' gradients are small (lora_B starts at 0)
    runs = {}
    for name, fsdp in (("plain", False), ("fsdp", True)):
        out = tmp_path / name
        cfg = write_yaml(tmp_path / f"{name}.yaml", train_config(assets, caches, out, fsdp_at_world_size_1=fsdp, **over))
        res = run_cli(["stages.train_student", "--config", str(cfg)])
        assert res.returncode == 0, res.stderr[-3000:]
        assert (PLAIN in res.stdout) == (not fsdp), res.stdout[-2000:]
        runs[name] = out
    plain, fsdp = runs["plain"], runs["fsdp"]
    for key in ("train/loss", "train/ce_loss", "train/kl_loss", "train/grad_norm", "eval/loss"):
        a, b = _series(plain, key), _series(fsdp, key)
        assert len(a) == len(b) > 0 and a == b, (key, a, b)
    norms = _series(plain, "train/grad_norm")
    assert all(g > over["optim"]["max_grad_norm"] for g in norms), norms  # every step was clipped
    a, b = load_file(plain / "final" / "model.safetensors"), load_file(fsdp / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    layout = _ckpt_layout(plain / "checkpoints" / "step-00000004")
    assert layout == _ckpt_layout(fsdp / "checkpoints" / "step-00000004")
    if lora:
        assert all(".lora_" in k for k in layout if k.startswith("model.")), sorted(layout)[:5]
        assert load_file(plain / "final" / "adapter" / "adapter_model.safetensors").keys() == \
            load_file(fsdp / "final" / "adapter" / "adapter_model.safetensors").keys()


def _assert_close_weights(run_a, run_b, atol: float) -> None:
    """The two exports load as the same model (within ``atol``). Loaded, not compared file by
    file: a 2-rank export of a student with tied embeddings also writes ``lm_head.weight``
    (the gathered state dict holds it as a tensor of its own), a 1-rank export only the
    embedding; from_pretrained ties them either way."""
    from transformers import AutoModelForCausalLM

    a, b = (AutoModelForCausalLM.from_pretrained(r / "final").state_dict() for r in (run_a, run_b))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def test_checkpoints_resume_across_one_plain_rank_and_two_ranks(assets, caches, tmp_path):
    """A plain 1-rank run's step-2 checkpoint resumed at 2 ranks ends as the 1-rank run did,
    and a 2-rank run's step-2 checkpoint resumed at 1 plain rank ends as the 2-rank run did
    (same global batch of 4; DCP reshards plain tensors into DTensor shards and back). Float32
    sums over 2 ranks differ from 1 rank in the last bits (tests/test_grad_equivalence.py):
    weights within 1e-5."""
    over = dict(max_steps=4, eval_steps=4, save_steps=2, save_total_limit=4)

    def run(name, nproc, **extra):
        out = tmp_path / name
        cfg = train_config(assets, caches, out, micro_batch_size=4 // nproc, **over, **extra)
        res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / f"{name}.yaml", cfg))], nproc=nproc)
        assert res.returncode == 0, res.stderr[-3000:]
        assert (PLAIN in res.stdout) == (nproc == 1)
        return out

    one, two = run("one", 1), run("two", 2)
    one_then_two = run("one_then_two", 2, resume=str(one / "checkpoints" / "step-00000002"))
    two_then_one = run("two_then_one", 1, resume=str(two / "checkpoints" / "step-00000002"))
    _assert_close_weights(one_then_two, one, atol=1e-5)
    _assert_close_weights(two_then_one, two, atol=1e-5)
    # the resumed runs trained steps 3 and 4 only, on the same samples as the runs they continue
    assert [m["train/step"] for m in _metrics(one_then_two) if "train/loss" in m] == [3, 4]
    assert _series(one_then_two, "train/loss") == pytest.approx(_series(one, "train/loss")[2:], rel=1e-5)
    assert _series(two_then_one, "train/loss") == pytest.approx(_series(two, "train/loss")[2:], rel=1e-5)
