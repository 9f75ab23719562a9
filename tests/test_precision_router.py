"""Router losses against a hand computation, fp16 loss scaling (a forced overflow skips exactly
that step, at 1 and 2 ranks), bf16, and the precision of exported models."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli, train_config, write_yaml
from helpers import synthetic_records, tiny_student

from pipeline.config import LossConfig
from pipeline.data.batch import collate
from pipeline.student.router_losses import router_losses
from pipeline.student.step import Trainer

V, E, TOP_K = 64, 4, 2


def _mixtral(vocab: int = V, seed: int = 0):
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=E, num_experts_per_tok=TOP_K))
    model.config.use_cache = False
    return model


def _hand(layers: list[torch.Tensor], k: int) -> dict[str, float]:
    """The three terms with plain loops over positions and experts (float64), summed over layers;
    ``layers``: per layer, the (n, E) router logits of the valid positions."""
    out = {"load_balance": 0.0, "z_loss": 0.0, "auxiliary": 0.0}
    for x in layers:
        x = x.double()
        n, e_count = x.shape
        P, f, z = [0.0] * e_count, [0.0] * e_count, 0.0
        for row in x.tolist():
            m = max(row)
            s = sum(math.exp(v - m) for v in row)
            p = [math.exp(v - m) / s for v in row]
            for e in range(e_count):
                P[e] += p[e] / n
            for e in sorted(range(e_count), key=lambda j: -p[j])[:k]:
                f[e] += 1 / n
            z += (m + math.log(s)) ** 2 / n
        out["load_balance"] += e_count * sum(f[e] * P[e] for e in range(e_count))
        out["z_loss"] += z
        out["auxiliary"] += e_count * sum((P[e] - 1 / e_count) ** 2 for e in range(e_count))
    return out


def test_router_losses_match_a_hand_computation_and_ignore_padding():
    """Three samples of different lengths (right-padded rows, masked positions) and a padding
    sample: the terms equal the hand computation over the valid positions of each sample run
    alone (no padding at all); one layer's load balance equals transformers' Mixtral function."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = _mixtral().eval()
    recs = synthetic_records(3, V, 4, seed=5, min_len=6, max_len=20)
    batch = collate(recs + [recs[0]], pad_only=False)
    pad = collate(recs[:1], pad_only=True)
    assert pad.n_valid == 0
    with torch.no_grad():
        got = router_losses(model(input_ids=batch.input_ids, output_router_logits=True).router_logits, batch.rows,
                            TOP_K, batch.input_ids.numel())
        per_layer: list[list[torch.Tensor]] = [[], []]
        for r in recs + [recs[0]]:  # each sample alone: no padding anywhere
            logits = model(input_ids=torch.as_tensor(r.input_ids[None], dtype=torch.long),
                           output_router_logits=True).router_logits
            valid = [t for t in range(len(r.input_ids) - 1) if r.loss_mask[t + 1]]  # DESIGN.md: valid positions
            for layer, x in enumerate(logits):
                per_layer[layer].append(x[valid])
        want = _hand([torch.cat(xs) for xs in per_layer], TOP_K)
        assert batch.input_ids.shape[1] > min(len(r.input_ids) for r in recs)  # the batch has padding
        for name, value in want.items():
            assert got[name].dtype == torch.float32
            assert got[name].item() == pytest.approx(value, rel=1e-5), name
        # balanced routing would give k per layer; a random router is close to it, never below 0
        assert 0 < got["auxiliary"].item() < got["load_balance"].item()
        one = torch.cat(per_layer[0])
        hf = load_balancing_loss_func((one,), E, TOP_K)
        alone = router_losses((one,), torch.arange(one.shape[0]), TOP_K, one.shape[0])
        assert alone["load_balance"].item() == pytest.approx(hf.item(), rel=1e-5)
        zeros = router_losses(model(input_ids=pad.input_ids, output_router_logits=True).router_logits, pad.rows,
                              TOP_K, pad.input_ids.numel())
        assert all(v.item() == 0 for v in zeros.values())  # a padding micro-batch adds nothing (and no NaN)
        with pytest.raises(ValueError, match=r"router_logits\[0\] has shape"):  # not one row per position
            router_losses((one,), torch.arange(3), TOP_K, one.shape[0] + 1)


def test_router_losses_enter_the_loss_per_valid_token_and_train_the_router():
    model = _mixtral()
    batch = collate(synthetic_records(3, V, 4, seed=7))
    coefs = {"load_balance_coef": 0.01, "z_loss_coef": 0.002, "auxiliary_coef": 0.05}
    base = Trainer(model, None, None, LossConfig(alpha=0.5), None, torch.device("cpu"))._loss(batch)
    t = Trainer(model, None, None, LossConfig(alpha=0.5, router=coefs), None, torch.device("cpu"))
    sums = t._loss(batch)
    with torch.no_grad():
        terms = router_losses(model(input_ids=batch.input_ids, output_router_logits=True).router_logits, batch.rows,
                              TOP_K, batch.input_ids.numel())
    added = sum(coefs[f"{n}_coef"] * terms[n].item() * batch.n_valid for n in terms)
    assert sums.loss_sum.item() - base.loss_sum.item() == pytest.approx(added, rel=1e-4)
    assert set(sums.named) == {"router_load_balance", "router_z_loss", "router_auxiliary"}
    for n in terms:
        assert sums.named[f"router_{n}"].item() == pytest.approx(terms[n].item() * batch.n_valid, rel=1e-6)
        assert not sums.named[f"router_{n}"].requires_grad
    # the router terms' gradient reaches the router weights: (with router) - (without) = direct
    gates = [m.weight for m in model.modules() if type(m).__name__ == "MixtralTopKRouter"]
    assert len(gates) == 2
    g_with = torch.autograd.grad(sums.loss_sum, gates)
    g_without = torch.autograd.grad(base.loss_sum, gates)
    direct = router_losses(model(input_ids=batch.input_ids, output_router_logits=True).router_logits, batch.rows,
                           TOP_K, batch.input_ids.numel())
    g_direct = torch.autograd.grad(sum(coefs[f"{n}_coef"] * direct[n] * batch.n_valid for n in direct), gates)
    for a, b, c in zip(g_with, g_without, g_direct):
        assert c.abs().max() > 0
        torch.testing.assert_close(a - b, c, rtol=1e-3, atol=1e-7)
    # the logged value of a step is the token-weighted mean over its micro-batches
    from pipeline.config import OptimConfig
    from pipeline.student.step import build_optimizer

    micro = [collate(synthetic_records(2, V, 4, seed=s)) for s in (1, 2)]
    with torch.no_grad():
        want = sum(router_losses(model(input_ids=b.input_ids, output_router_logits=True).router_logits, b.rows, TOP_K,
                                 b.input_ids.numel())["z_loss"].item() * b.n_valid for b in micro)
    stats = Trainer(model, build_optimizer(model, OptimConfig(lr=1e-3)), None, LossConfig(alpha=0.5, router=coefs),
                    1.0, torch.device("cpu")).train_step(micro)
    assert stats.metrics("train")["train/router_z_loss"] == pytest.approx(want / stats.n_tokens, rel=1e-5)
    with pytest.raises(ValueError, match=r"loss\.router\.z_loss_coef.*router_logits"):
        Trainer(tiny_student(V), None, None, LossConfig(router={"z_loss_coef": 0.1}), None,
                torch.device("cpu"))._loss(batch)


def _fp16_trainer(seed: int = 0):
    from pipeline.config import OptimConfig
    from pipeline.distributed import shard_model
    from pipeline.models import defer_output_projection
    from pipeline.student.step import build_optimizer, lr_lambda

    model = tiny_student(V, seed=seed)
    defer_output_projection(model)
    shard_model(model, mixed_precision=torch.float16)
    opt = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(OptimConfig(warmup_steps=0), 10))
    return model, Trainer(model, opt, sched, LossConfig(alpha=0.5), 1.0, torch.device("cpu"), loss_scaling=True)


def _snapshot(model, opt) -> list[torch.Tensor]:
    loc = lambda t: (t.to_local() if hasattr(t, "to_local") else t).detach().clone()  # noqa: E731
    return [loc(p) for p in model.parameters()] + [loc(v) for s in opt.state.values() for v in s.values()]


def test_fp16_overflow_skips_exactly_that_step_and_halves_the_scale():
    """FSDP2 fp16 at one rank: step 2's gradients are made inf (a loss-scale overflow): that step
    leaves every weight and the AdamW state as they were, halves the scale, counts 1 overflow (not
    a non-finite step); steps 1 and 3 update; the LR schedule advances on every step."""
    from pipeline.distributed import init_distributed, teardown

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        model, trainer = _fp16_trainer()
        force = {"on": False}

        def hook(module, args, out):
            if force["on"] and out.requires_grad:
                out.register_hook(lambda g: g * float("inf"))

        model.model.norm.register_forward_hook(hook)
        recs = synthetic_records(6, V, 4, seed=11)
        stats = []
        snaps = [_snapshot(model, trainer.optimizer)]
        for step in range(3):
            force["on"] = step == 1
            stats.append(trainer.train_step([collate(recs[2 * step: 2 * step + 2])]))
            snaps.append(_snapshot(model, trainer.optimizer))
        assert [s.overflow for s in stats] == [False, True, False]
        assert not any(s.nonfinite for s in stats) and not math.isfinite(stats[1].grad_norm)
        assert math.isfinite(stats[1].loss)
        assert [s.loss_scale for s in stats] == [65536.0, 65536.0, 32768.0]
        assert [s.overflow_steps for s in stats] == [0, 1, 1]
        assert stats[1].metrics("train") == {"train/loss_scale": 65536.0, "train/overflow_steps": 1}
        assert len(snaps[1]) == len(snaps[2]) and all(torch.equal(a, b) for a, b in zip(snaps[1], snaps[2]))
        assert not all(torch.equal(a, b) for a, b in zip(snaps[0][:3], snaps[1][:3]))
        assert not all(torch.equal(a, b) for a, b in zip(snaps[2], snaps[3]))
        assert trainer.scheduler.last_epoch == 3  # the LR follows the step index
        state = trainer.state_dict()
        assert state["overflow_steps"] == 1 and state["grad_scaler"]["scale"] == 32768.0
        _, fresh = _fp16_trainer()
        fresh.load_state_dict(state)
        assert fresh.scaler.get_scale() == 32768.0 and fresh.overflow_steps == 1
        # a non-finite *loss* does not depend on the scale: a non-finite step, the scale kept
        with torch.no_grad():
            model.model.embed_tokens.weight.to_local().fill_(float("nan"))
        bad = trainer.train_step([collate(recs[:2])])
        assert bad.nonfinite and not bad.overflow and trainer.scaler.get_scale() == 32768.0
    finally:
        teardown()
        torch.set_num_threads(threads)


def _hook_cfg(tmp_path: Path, at_step: int, rank: int | None = None) -> dict:
    return {"target": "tests.precision_hooks:ForceOverflow", "at_step": at_step, "log": str(tmp_path / "hook"),
            "rank": rank}


def _metrics(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["train/step"]: r for r in rows if "train/step" in r}


def _hook_log(tmp_path: Path, rank: int) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (tmp_path / f"hook.rank{rank}.jsonl").read_text().splitlines())}


def test_fp16_run_counts_an_overflow_exports_fp16_and_resumes_exactly(assets, caches, tmp_path):
    """train-student with mixed_precision fp16 at one rank: the forced overflow at step 2 is a
    note, not an error (skip_nonfinite is 0); the checkpoint after it holds the halved scale, and
    a rerun resumed from it repeats step 3 exactly; final/ is float16 and says so."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    cfg = train_config(assets, caches, run, max_steps=3, save_steps=2, eval_steps=3, mixed_precision="fp16",
                       save_precision="fp16", optim={"warmup_steps": 0, "schedule": "constant"},
                       callbacks=[_hook_cfg(tmp_path, 2)])
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "c.yaml", cfg))])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fp16 gradient overflow at step 2 at loss scale 65536" in res.stdout + res.stderr
    m = _metrics(run)
    assert [m[s]["train/loss_scale"] for s in (1, 2, 3)] == [65536.0, 65536.0, 32768.0]
    assert [m[s]["train/overflow_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert m[2]["train/skipped_steps"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["overflow_steps"] == 1 and summary["skipped_steps"] == 0
    log = _hook_log(tmp_path, 0)
    assert log[2]["params"] == log[1]["params"] and log[2]["opt"] == log[1]["opt"] != log[3]["opt"]
    ckpt = torch.load(run / "checkpoints" / "step-00000002" / "trainer.pt", weights_only=False)["trainer"]
    assert ckpt["grad_scaler"]["scale"] == 32768.0 and ckpt["overflow_steps"] == 1
    with safe_open(str(run / "final" / "model.safetensors"), "pt") as f:
        first = {k: f.get_tensor(k) for k in f.keys()}
    assert {t.dtype for t in first.values()} == {torch.float16}
    assert json.loads((run / "final" / "config.json").read_text())["dtype"] == "float16"
    loaded = AutoModelForCausalLM.from_pretrained(run / "final")
    assert loaded.dtype == torch.float16
    # the rerun resumes at step 2 and repeats step 3 with the restored scale: the same weights
    (tmp_path / "hook.rank0.jsonl").unlink()
    res = run_cli(["stages.train_student", "--config", str(tmp_path / "c.yaml")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    assert _hook_log(tmp_path, 0)[3] == log[3]
    with safe_open(str(run / "final" / "model.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in first.items())


def test_fp16_overflow_on_one_rank_is_skipped_on_both(assets, caches, tmp_path):
    """Two ranks, the overflow forced on rank 1 only: both ranks skip step 2 (their shards and
    AdamW state unchanged), and rank 0 (which logs) halves its scale too."""
    cfg = train_config(assets, caches, tmp_path / "run", max_steps=3, eval_steps=3, mixed_precision="fp16",
                       callbacks=[_hook_cfg(tmp_path, 2, rank=1)])
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "c.yaml", cfg))], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    m = _metrics(tmp_path / "run")
    assert [m[s]["train/loss_scale"] for s in (1, 2, 3)] == [65536.0, 65536.0, 32768.0]
    assert m[3]["train/overflow_steps"] == 1
    for rank in (0, 1):
        log = _hook_log(tmp_path, rank)
        assert log[2]["params"] == log[1]["params"] != log[3]["params"], rank
        assert log[2]["opt"] == log[1]["opt"], rank


def test_bf16_run_and_router_losses_are_logged(assets, caches, tmp_path):
    """A tiny Mixtral student with mixed_precision bf16, router losses on and a bf16 export: the
    router terms are logged by name for train and eval, the export is bfloat16."""
    from safetensors import safe_open
    from transformers import MixtralConfig

    student = tmp_path / "mixtral"
    MixtralConfig(vocab_size=assets["vocab"], hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, num_local_experts=E,
                  num_experts_per_tok=TOP_K).save_pretrained(student)
    run = tmp_path / "run"
    cfg = train_config(assets, caches, run, max_steps=2, eval_steps=2, mixed_precision="bf16", save_precision="bf16",
                       student={"path": str(student)},
                       loss={"router": {"load_balance_coef": 0.01, "z_loss_coef": 0.001, "auxiliary_coef": 0.01}})
    cfg["data"]["eval_max_samples"] = 4
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "c.yaml", cfg))])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/step" in r][-1]
    ev = [r for r in rows if "eval/step" in r][-1]
    for split, r in (("train", train), ("eval", ev)):
        # 2 layers of about k each (a random router is nearly balanced)
        assert 0 < r[f"{split}/router_auxiliary"] < r[f"{split}/router_load_balance"] < 2 * TOP_K * 1.1
        assert r[f"{split}/router_z_loss"] > 0
    assert "train/loss_scale" not in train  # no loss scaling in bf16
    with safe_open(str(run / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((run / "final" / "config.json").read_text())["dtype"] == "bfloat16"


def test_fp16_output_layer_gradient_is_summed_in_float32():
    """fp16 hidden states and output layer over 4096 positions: the output layer's gradient
    summed over positions exceeds float16's range before backward divides it by N; it must come
    out finite and equal to the float32 computation (a loss scale cannot fix that overflow)."""
    from pipeline.data.batch import LossTargets

    from pipeline.student.losses import fused_linear_loss
    torch.manual_seed(0)
    N, H, Vs = 4096, 4, 8
    h = (torch.randn(N, H) * 4 + 30).requires_grad_()
    w = (torch.randn(Vs, H) * 0.1).requires_grad_()
    targets = LossTargets(torch.zeros(N, dtype=torch.long), torch.zeros(N, dtype=torch.long), 1)
    grads = {}
    for dtype in (torch.float32, torch.float16):
        hh, ww = h.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
        loss = fused_linear_loss(hh, ww, None, targets, alpha=1.0).loss_sum
        (loss / N).backward()
        grads[dtype] = ww.grad
    assert (h.detach().T @ torch.ones(N, Vs)).abs().max() > 65504  # the raw sum overflows float16
    assert grads[torch.float16].dtype == torch.float16 and torch.isfinite(grads[torch.float16]).all()
    torch.testing.assert_close(grads[torch.float16].float(), grads[torch.float32], rtol=2e-2, atol=2e-3)
