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


def _untied_llama(d, vocab: int = 64):
    """A tiny random Llama with an untied output layer saved in ``d``; returns the model."""
    from transformers import AutoModelForCausalLM

    from pipeline.data.demo_corpus import llama_config

    cfg = llama_config(vocab, 16, 2, 2, 1, 32)
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(d)
    return model


def _shard_like_a_teacher(model):
    from pipeline.models import defer_output_projection

    defer_output_projection(model)
    shard_model(model, sum_gradients=False)


def test_untied_output_layer_is_filled_after_it_is_replaced(tmp_path):
    """The shard callback replaces the untied output layer (the deferred projection): its rows are
    read into the replacement, the one the model uses, not into the detached old layer."""
    plain = _untied_llama(tmp_path / "m")
    info = init_distributed("cpu")
    try:
        model = load_teacher_sharded(tmp_path / "m", torch.float32, info.device, _shard_like_a_teacher)
        head = model.get_output_embeddings()
        assert type(head).__name__ == "OutputProjection"
        torch.testing.assert_close(head.weight.full_tensor(), plain.lm_head.weight, rtol=0, atol=0)
    finally:
        teardown()


def test_checkpoint_names_that_map_to_nothing_are_refused(tmp_path):
    """An extra checkpoint tensor, or a parameter with no tensor, stops the load in one line naming
    the tensor (or parameter) and the model class, before ``shard`` runs; nothing is loaded whole."""
    import pytest
    from safetensors.torch import load_file, save_file

    _untied_llama(tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    cases = {"extra": ({**tensors, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, "model.layers.0.mlp.extra.weight"),
             "missing": ({k: v for k, v in tensors.items() if k != "lm_head.weight"}, "lm_head.weight")}
    calls = []
    info = init_distributed("cpu")
    try:
        for name, (state, named) in cases.items():
            d = tmp_path / name
            d.mkdir()
            (d / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
            save_file(state, d / "model.safetensors", metadata={"format": "pt"})
            with pytest.raises(ValueError, match=rf"teacher {d}: .*{named}.*LlamaForCausalLM") as e:
                load_teacher_sharded(d, torch.float32, info.device, calls.append)
            assert "\n" not in str(e.value)
        assert calls == []
    finally:
        teardown()


def test_conversions_other_than_renames_and_stacked_experts_are_refused(tmp_path, monkeypatch):
    """A checkpoint tensor transformers would convert otherwise (here: split in two along dim 0)
    cannot be read row by row: refused in one line naming it, the operation and the class."""
    import pytest
    from safetensors.torch import load_file, save_file
    from transformers.core_model_loading import Chunk, WeightConverter

    _untied_llama(tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    for i in range(2):
        p = f"model.layers.{i}.mlp."
        state[p + "gate_up.weight"] = torch.cat([state.pop(p + "gate_proj.weight"), state.pop(p + "up_proj.weight")])
    save_file(state, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    split = WeightConverter(source_patterns="mlp.gate_up.weight", target_patterns=["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                            operations=[Chunk(dim=0)])
    import importlib

    mapping = importlib.import_module("transformers.conversion_mapping")
    monkeypatch.setattr(mapping, "get_model_conversion_mapping", lambda model: [split])
    info = init_distributed("cpu")
    try:
        with pytest.raises(ValueError, match=r"gate_up\.weight is converted by \[Chunk.*LlamaForCausalLM"):
            load_teacher_sharded(tmp_path / "m", torch.float32, info.device, _shard_like_a_teacher)
    finally:
        teardown()


def test_bin_checkpoint_is_loaded_whole_and_says_why(tmp_path, capsys):
    plain = _untied_llama(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(plain.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    info = init_distributed("cpu")
    try:
        model = load_teacher_sharded(tmp_path / "m", torch.float32, info.device, _shard_like_a_teacher)
        out = capsys.readouterr().out
        assert f"[teacher] {tmp_path / 'm'}: whole-model load on every rank" in out and ".bin" in out
        torch.testing.assert_close(model.get_output_embeddings().weight.full_tensor(), plain.lm_head.weight)
    finally:
        teardown()
