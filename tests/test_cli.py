"""Both stages end to end on the tiny fixture, in one process and under torchrun with 2 ranks,
plus inspect-losses and the bad-input errors."""
import json

import numpy as np
import torch
import pyarrow.dataset as pads
import pytest
from conftest import precompute_config, run_cli, train_config as _train_cfg, write_yaml

from pipeline.cache import open_cache, read_manifest


def test_precompute_writes_complete_manifest(caches, assets):
    m = read_manifest(caches["train"])
    assert m.complete and m.num_samples == 40 and m.k == 8 and m.vocab_size == assets["vocab"]
    assert m.teachers[0].fingerprint and m.tokenizer_fingerprint and m.dataset_fingerprint
    assert m.num_tokens == sum(s.num_tokens for s in m.shards)
    assert (caches["train"] / "tokenizer" / "tokenizer.json").is_file()
    # a rerun of the same command finds everything done and recomputes nothing
    res = run_cli(["stages.precompute_teacher", "--config", str(caches["dir"] / "pre-train.yaml")])
    assert res.returncode == 0 and "40 already cached, 0 computed" in res.stdout


def test_precompute_two_ranks_equals_one_rank(caches, assets, tmp_path):
    cfg = write_yaml(tmp_path / "p.yaml", precompute_config(assets, tmp_path / "c2"))
    res = run_cli(["stages.precompute_teacher", "--config", str(cfg)], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = open_cache(caches["train"]), open_cache(tmp_path / "c2")
    assert {s.rank for s in two.shards} == {0, 1}
    assert sorted(one.sample_ids) == sorted(two.sample_ids)
    for sid in one.sample_ids:
        a, b = one[one.index_of(sid)], two[two.index_of(sid)]
        for field in ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{sid} {field}")


@pytest.mark.parametrize("nproc", [1, 2])
def test_train_student_end_to_end(caches, assets, tmp_path, nproc):
    out = tmp_path / "run"
    over = {"micro_batch_size": 4 // nproc}
    if nproc == 2:  # packed micro-batches through the CLI (numerics: test_grad_equivalence)
        over["data"] = {"train_cache": str(caches["train"]), "eval_cache": str(caches["validation"]), "packing": True}
    cfg = write_yaml(tmp_path / "t.yaml", _train_cfg(assets, caches, out, **over))
    res = run_cli(["stages.train_student", "--config", str(cfg)], nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == nproc and np.isfinite(summary["final_eval"]["loss"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    # the export is a plain HF causal LM: its forward gives vocabulary logits again
    assert final(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == final.config.vocab_size >= len(tok)
    # 10 steps × 4 samples = exactly one epoch of the 40 samples: each sample logged once
    logs = pads.dataset(out / "loss_logs", format="parquet", partitioning="hive").to_table().to_pandas()
    train = logs[logs["split"] == "train"]
    assert sorted(train["sample_id"]) == sorted(open_cache(caches["train"]).sample_ids)
    assert set(train["rank"]) == set(range(nproc))
    n_eval = len(open_cache(caches["validation"]))
    assert (logs[logs["split"] == "eval"].groupby("step").size() == n_eval).all()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/ce_loss", "train/kl_loss", "train/learning_rate", "train/grad_norm",
            "train/tokens_per_second"} <= set(metrics[0])
    last_eval = [m for m in metrics if "eval/loss" in m][-1]
    ev = logs[(logs["split"] == "eval") & (logs["step"] == 10)]
    assert last_eval["eval/loss"] == pytest.approx(ev["loss_sum"].sum() / ev["n_tokens"].sum(), rel=1e-5)
    if nproc == 1:
        _check_inspect(out, logs)


def _check_inspect(run_dir, logs):
    res = run_cli(["stages.inspect_losses", str(run_dir), "--top", "3", "--split", "train",
                   "--export", str(run_dir / "ps.csv")])
    assert res.returncode == 0, res.stderr
    train = logs[logs["split"] == "train"]
    per_tok = (train["loss_sum"] / train["n_tokens"]).to_numpy()
    hardest = train["sample_id"].to_numpy()[np.argsort(-per_tok)[:3]]
    lines = res.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("hardest 3"))
    shown = [ln.split()[2] for ln in lines[header + 2: header + 5]]
    assert shown == list(hardest)
    row = next(ln for ln in lines if ln.strip().startswith("0  train"))
    assert f"{train['loss_sum'].sum() / train['n_tokens'].sum():.4f}" in row
    assert len(open(run_dir / "ps.csv").read().splitlines()) == 41


def _main_err(main, argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_bad_inputs_give_one_line_errors(assets, caches, tmp_path, capsys):
    from stages.precompute_teacher import main as pre
    from stages.train_student import main as train

    good = precompute_config(assets, tmp_path / "c")
    code, err = _main_err(pre, ["--config", str(write_yaml(tmp_path / "a.yaml", {**good, "bogus": 1}))], capsys)
    assert code == 2 and "'bogus'" in err and len(err.strip().splitlines()) == 1
    code, err = _main_err(pre, ["--config", str(write_yaml(tmp_path / "b.yaml", good)), "cache.k=many"], capsys)
    assert code == 2 and "cache.k" in err
    code, err = _main_err(pre, ["--config", str(tmp_path / "b.yaml"), "teachers=[{path: /no/such/teacher}]"], capsys)
    assert code == 2 and "/no/such/teacher" in err
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    code, err = _main_err(pre, ["--config", str(tmp_path / "b.yaml"), f"dataset.path={tmp_path / 'empty.jsonl'}",
                                "dataset.id_field=null", f"cache.dir={tmp_path / 'c3'}"], capsys)
    assert code == 2 and "empty.jsonl" in err
    assert not (tmp_path / "c3" / "manifest.json").exists() or not read_manifest(tmp_path / "c3").complete
    code, err = _main_err(pre, ["--config", str(tmp_path / "b.yaml"), "cache.k=100000", f"cache.dir={tmp_path / 'c4'}"], capsys)
    assert code == 2 and "cache.k=100000 exceeds the vocabulary" in err and not (tmp_path / "c4").exists()
    before = read_manifest(caches["train"]).model_dump()
    code, err = _main_err(pre, ["--config", str(tmp_path / "b.yaml"), "cache.k=16", f"cache.dir={caches['train']}"], capsys)
    assert code == 2 and "k: 8 != 16" in err and len(err.strip().splitlines()) == 1
    assert read_manifest(caches["train"]).model_dump() == before  # a complete cache of another run is left alone
    from pipeline.data.demo_corpus import llama_config

    llama_config(assets["vocab"] - 7, 16, 1, 2).save_pretrained(tmp_path / "wrong-student")
    cfg = write_yaml(tmp_path / "t.yaml", _train_cfg(assets, caches, tmp_path / "run"))
    code, err = _main_err(train, ["--config", str(cfg), f"student.path={tmp_path / 'wrong-student'}"], capsys)
    assert code == 2 and f"{assets['vocab'] - 7}" in err and f"{assets['vocab']}" in err
    code, err = _main_err(train, ["--config", str(cfg), f"data.train_cache={tmp_path / 'nothing'}"], capsys)
    assert code == 2 and "nothing" in err
    assert not (tmp_path / "run" / "final").exists()


def test_lr_find_writes_an_increasing_lr_table(assets, caches, tmp_path):
    cfg = write_yaml(tmp_path / "t.yaml", _train_cfg(assets, caches, tmp_path / "run"))
    res = run_cli(["stages.train_student", "--config", str(cfg), "--lr-find", "lr_find.steps=12", "lr_find.max_lr=100"])
    assert res.returncode == 0, res.stderr[-2000:]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "lr_find.csv")))
    lrs = [float(r["lr"]) for r in rows]
    assert 2 <= len(rows) <= 12 and lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-6)
    assert "suggested lr" in res.stdout and not (tmp_path / "run" / "final").exists()


def test_gradient_checkpointing_and_epochs_give_the_same_weights(assets, caches, tmp_path):
    from safetensors.torch import load_file

    finals = []
    for name, over in (("plain", {"max_steps": 20}), ("ckpt", {"gradient_checkpointing": True, "epochs": 2})):
        cfg = write_yaml(tmp_path / f"{name}.yaml", _train_cfg(assets, caches, tmp_path / name, micro_batch_size=4, **over))
        res = run_cli(["stages.train_student", "--config", str(cfg)])
        assert res.returncode == 0, res.stderr[-2000:]
        finals.append(load_file(tmp_path / name / "final" / "model.safetensors"))
    assert json.loads((tmp_path / "ckpt" / "summary.json").read_text())["steps"] == 20  # 2 epochs × 10 steps
    for key, a in finals[0].items():
        np.testing.assert_allclose(finals[1][key].numpy(), a.numpy(), rtol=0, atol=1e-5, err_msg=key)
