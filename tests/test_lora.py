"""LoRA students (pipeline/student/lora.py): frozen base, trained adapters under FSDP2 at 1 and 2 ranks,
adapter-only checkpoints and exact resume, the merged export against peft's own forward."""
import json
import os
import signal

import pytest
import torch
from conftest import run_cli, train_config, write_yaml
from helpers import synthetic_records, tiny_student
from safetensors.torch import load_file
from test_resume import _popen, _wait_for

from pipeline.config import ConfigError, LoraConfig, OptimConfig, StudentConfig, TrainStudentConfig, load_config
from pipeline.student.lora import add_adapters, load_initial_adapters
from pipeline.models import defer_output_projection

LORA = {"r": 4, "alpha": 8}


def _lora_student(vocab: int, seed: int = 0, **lora):
    model = tiny_student(vocab, seed)
    defer_output_projection(model)
    init = add_adapters(model, StudentConfig(path="unused", init="pretrained", lora=LoraConfig(**{**LORA, **lora})), 7)
    load_initial_adapters(model, init)
    return model


@pytest.fixture(scope="module")
def base(assets, tmp_path_factory):
    """A pretrained student directory (weights + config + tokenizer): the frozen base."""
    d = tmp_path_factory.mktemp("lora-base") / "base"
    model = tiny_student(assets["vocab"], seed=3)
    model.save_pretrained(d)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(assets["tokenizer"]).save_pretrained(d)
    return str(d)


def _cfg(assets, caches, base, out, **over):
    student = {"path": base, "init": "pretrained", "lora": LORA}
    return train_config(assets, caches, out, student=student, optim={"warmup_steps": 2, "lr": 1e-2}, **over)


def test_bad_configs_name_the_key(assets, caches, base, tmp_path):
    for student, match in [({"path": base, "lora": LORA}, "student.lora needs student.init: pretrained"),
                           ({"path": base, "init": "pretrained", "lora": LORA, "peft_config": str(tmp_path)},
                            "exactly one"),
                           ({"path": base, "peft_config": str(tmp_path)}, "student.peft_config needs student.init"),
                           ({"path": base, "init": "pretrained", "lora": {"r": 0}}, "student.lora.r")]:
        cfg = write_yaml(tmp_path / "bad.yaml", train_config(assets, caches, tmp_path / "run", student=student))
        with pytest.raises(ConfigError, match=match):
            load_config(TrainStudentConfig, cfg)
    with pytest.raises(ValueError, match=r"student.lora.target_modules \['lm_head'\].*output layer"):
        _lora_student(64, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="student.lora.target_modules.*not found"):
        _lora_student(64, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="student.lora.modules_to_save: 'nope'"):
        _lora_student(64, modules_to_save=["nope"])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="student.peft_config.*IA3"):
        add_adapters(tiny_student(64), StudentConfig(path="x", init="pretrained", peft_config=str(tmp_path)), 0)


def test_base_frozen_adapters_move_and_param_group_lrs():
    """Three optimizer steps of the Trainer on a LoRA student: every base parameter is bit for
    bit unchanged, A and B move; ``lora_`` and ``embed_tokens`` (modules_to_save) get their
    param-group LRs: AdamW's first step moves B (zero, no decay) by exactly lr per element."""
    from pipeline.config import LossConfig
    from pipeline.data.batch import collate
    from pipeline.student.step import Trainer, build_optimizer

    V = 64
    model = _lora_student(V, modules_to_save=["embed_tokens"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if ".lora_" in n} | {"model.embed_tokens.weight"}
    assert all(".lora_" in n or "embed_tokens" in n for n in trainable)
    opt = build_optimizer(model, OptimConfig(lr=1e-3, param_groups=[{"pattern": "lora_", "lr": 4e-3},
                                                                     {"pattern": "embed_tokens", "lr": 2e-3}]))
    lrs = {n: g["lr"] for g in opt.param_groups for p in g["params"] for n, q in model.named_parameters() if p is q}
    assert set(lrs) == trainable  # frozen parameters are not in the optimizer
    assert {lrs[n] for n in trainable if "lora_" in n} == {4e-3} and lrs["model.embed_tokens.weight"] == 2e-3
    t = Trainer(model, opt, None, LossConfig(alpha=0.5), None, torch.device("cpu"))
    for step in range(3):
        t.train_step([collate(synthetic_records(4, V, 4, seed=step))])
        if step == 0:
            dB = model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.detach().abs()
            torch.testing.assert_close(dB.max(), torch.tensor(4e-3), rtol=1e-3, atol=0)
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not move"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_initial_adapters_depend_on_the_seed_only():
    a, b = _lora_student(64), _lora_student(64)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a if "lora_A" in k)
    assert all(not sd_a[k].any() for k in sd_a if "lora_B" in k)  # B = 0: training starts at the base model


def test_peft_config_and_modules_to_save_export_loads_in_peft(tmp_path):
    """A saved peft config (``student.peft_config``) with ``modules_to_save``: the adapter
    directory restores adapters and the saved module in ``PeftModel``, equal to the merged model."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.student.lora import save_adapter, split_export

    tiny_student(64, seed=1).save_pretrained(tmp_path / "base")
    PeftLoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"], use_rslora=True,
                   modules_to_save=["model.norm"]).save_pretrained(tmp_path / "cfg")
    model = tiny_student(64, seed=1)
    defer_output_projection(model)
    student = StudentConfig(path=str(tmp_path / "base"), init="pretrained", peft_config=str(tmp_path / "cfg"))
    add_adapters(model, student, 0)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted([f"model.layers.{i}.{m}.lora_{ab}.default.weight" for i in (0, 1)
                                for m in ("self_attn.q_proj", "mlp.down_proj") for ab in "AB"] + ["model.norm.weight"])
    with torch.no_grad():  # as if trained: B != 0, the norm moved
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    merged, adapter = split_export(model, model.state_dict())
    assert "model.norm.weight" in merged and "base_model.model.model.norm.weight" in adapter
    model.save_pretrained(tmp_path / "merged", state_dict=merged)
    save_adapter(model, adapter, tmp_path / "adapter")
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _adapter(run):
    return load_file(os.path.join(run, "final", "adapter", "adapter_model.safetensors"))


def test_one_and_two_ranks_merged_export_equals_peft(assets, caches, base, tmp_path):
    """The same LoRA run at 1 rank and at 2 ranks (same global batch) ends with the same
    adapters; the merged export's logits equal peft's base + adapter forward; non-target
    parameters are the base's bit for bit; checkpoints hold the adapters only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    over = dict(max_steps=6, eval_steps=3, save_steps=3)
    one = write_yaml(tmp_path / "one.yaml", _cfg(assets, caches, base, tmp_path / "one", micro_batch_size=4, **over))
    two = write_yaml(tmp_path / "two.yaml", _cfg(assets, caches, base, tmp_path / "two", micro_batch_size=2, **over))
    res = run_cli(["stages.train_student", "--config", str(one)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[lora] 14 layers adapted" in res.stdout
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    n_adapter = sum(v.numel() for v in _adapter(tmp_path / "one").values())
    assert summary["trainable_parameters"] == n_adapter < summary["num_parameters"]
    res = run_cli(["stages.train_student", "--config", str(two)], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert len(a) == 28 and all(k.startswith("base_model.model.model.layers.") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert any(v.abs().max() > 1e-3 for k, v in a.items() if "lora_B" in k)  # the adapters moved

    ckpt = tmp_path / "one" / "checkpoints" / "step-00000006"
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and all(".lora_" in k for k in model_keys), sorted(model_keys)[:5]

    merged_dir = tmp_path / "one" / "final"
    assert (merged_dir / "tokenizer.json").is_file() and (merged_dir / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base_model = AutoModelForCausalLM.from_pretrained(base)
    base_sd, merged_sd = base_model.state_dict(), merged.state_dict()
    for k, v in base_sd.items():
        if "proj" not in k:  # embeddings, norms, output layer: never adapted, never trained
            assert torch.equal(merged_sd[k], v), k
    peft_model = PeftModel.from_pretrained(base_model, merged_dir / "adapter")
    ids = torch.randint(0, assets["vocab"], (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - plain).abs().max() > 1e-4  # the adapters change the model


def test_sigkill_then_resume_equals_uninterrupted(assets, caches, base, tmp_path):
    over = dict(micro_batch_size=2, max_steps=9, save_steps=3, eval_steps=9, save_total_limit=2)
    ref = write_yaml(tmp_path / "ref.yaml", _cfg(assets, caches, base, tmp_path / "ref", **over))
    assert run_cli(["stages.train_student", "--config", str(ref)]).returncode == 0
    cfg = write_yaml(tmp_path / "run.yaml", _cfg(assets, caches, base, tmp_path / "run", **over))
    proc = _popen(cfg, 1)
    _wait_for(tmp_path / "run" / "checkpoints" / "step-00000006", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "final").exists()
    res = run_cli(["stages.train_student", "--config", str(cfg)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    a, b = _adapter(tmp_path / "ref"), _adapter(tmp_path / "run")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_rounds_keep_the_adapter_config_on_the_merged_base(assets, caches, base, tmp_path):
    from pipeline.student.rounds import round_configs

    cfg = TrainStudentConfig.model_validate(_cfg(assets, caches, base, tmp_path / "r", rounds=[{}, {"max_steps": 3}]))
    r0, r1 = round_configs(cfg)
    assert r0.student.path == base and r1.student.path == str(tmp_path / "r" / "round-0" / "final")
    assert r1.student.lora == r0.student.lora and r1.student.init == "pretrained"
