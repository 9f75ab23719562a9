"""generate-completions: the same rows bit for bit on a rerun, alone or in a mixed batch, at 1
and 2 ranks and after a kill + resume; chat, prompt/response and text prompts; stop tokens and
finish reasons; stage 1 reading the output as is; one-line errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import loopback_s3, run_cli, write_yaml

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def gen_config(assets: dict, out: Path, **over) -> dict:
    """A small generate-completions config over the fixture corpus; ``over`` replaces top-level keys."""
    cfg = {"model": assets["teacher"], "output_dir": str(out), "device": "cpu",
           "dataset": {"path": assets["corpus"], "id_field": "id", "num_samples": 7, "max_length": 48},
           "prompt_tokens": 6, "sampling": {"num_completions": 2, "max_new_tokens": 10},
           "batch_size": 3, "rows_per_shard": 4}
    cfg.update(over)
    return cfg


def run_generate(cfg: dict, tmp: Path, nproc: int = 1, env: dict | None = None):
    return run_cli(["stages.generate_completions", "--config", str(write_yaml(tmp / "gen.yaml", cfg))], nproc=nproc,
                   env=env)


def manifest(out: Path) -> dict:
    return json.loads((Path(out) / "generation.json").read_text())


def rows(out: Path) -> list[dict]:
    """Every row of every closed shard, sorted by ID."""
    import pyarrow.parquet as pq

    got = [r for f in sorted(Path(out).glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    return sorted(got, key=lambda r: r["id"])


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> Path:
    """A complete 1-rank generation: 7 text prompts × 2 completions, 3 prompts per batch."""
    d = tmp_path_factory.mktemp("gen-ref")
    res = run_generate(gen_config(assets, d / "out"), d)
    assert res.returncode == 0, res.stderr[-3000:]
    return d / "out"


def test_rows_and_manifest_and_rerun_is_identical(assets, reference, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["teacher"])
    m, got = manifest(reference), rows(reference)
    assert m["complete"] and m["num_rows"] == 14 == len(got) and m["num_prompts"] == 7
    assert m["sampling"]["num_completions"] == 2 and m["model_fingerprint"] and m["tokenizer_fingerprint"]
    assert sum(m["finish_reasons"].values()) == 14 and sum(s["rows"] for s in m["shards"]) == 14
    assert len({r["id"] for r in got}) == 14
    import datasets

    texts = dict(zip(*(datasets.load_from_disk(assets["corpus"])["train"].select(range(7))[c] for c in ("id", "text"))))
    for r in got:
        pid, j = r["id"].rsplit("/", 1)
        assert pid == r["prompt_id"] and j in ("0", "1")
        assert r["prompt_ids"] == tok(texts[pid])["input_ids"][:6]  # text rows: the first prompt_tokens tokens
        assert 1 <= len(r["completion_ids"]) <= 10 and r["completion"] == tok.decode(r["completion_ids"])
        assert r["finish_reason"] == ("eos" if r["completion_ids"][-1] == tok.eos_token_id else "length")
    assert any(a["completion_ids"] != b["completion_ids"] for a, b in zip(got[::2], got[1::2]))  # j draws differ
    res = run_generate(gen_config(assets, tmp_path / "again"), tmp_path)  # a fresh rerun
    assert res.returncode == 0, res.stderr[-2000:]
    assert rows(tmp_path / "again") == got
    res = run_generate(gen_config(assets, tmp_path / "again"), tmp_path)  # complete already: nothing to do
    assert res.returncode == 0 and "7 prompts already generated" in res.stdout
    assert rows(tmp_path / "again") == got and manifest(tmp_path / "again")["attempts"] == 2


def test_a_prompt_alone_and_in_a_mixed_batch_gives_the_same_tokens(assets):
    """Left padding, the attention mask and per-row position ids make a row's logits its own;
    per-completion generators make its draws its own."""
    import torch

    from pipeline.config import SamplingConfig
    from pipeline.generation import completion_seed, sample_completions
    from pipeline.generation.sampling import _left_padded
    from pipeline.models import load_teacher, load_tokenizer

    model, tok = load_teacher(assets["teacher"]), load_tokenizer(assets["teacher"])
    prompts = [np.array(tok(t)["input_ids"], dtype=np.int32) for t in
               ("def f(x):", "import os\nimport sys\n\nclass Thing(object):", "x")]
    seeds = [completion_seed(0, f"p{i}", 0) for i in range(3)]
    for s in (SamplingConfig(max_new_tokens=16), SamplingConfig(max_new_tokens=16, temperature=0.7, top_k=20, top_p=0.9)):
        batch = sample_completions(model, prompts, seeds, s, {tok.eos_token_id}, len(tok), tok.pad_token_id)
        for i in range(3):
            alone = sample_completions(model, prompts[i:i + 1], seeds[i:i + 1], s, {tok.eos_token_id}, len(tok),
                                       tok.pad_token_id)
            assert alone[0][0].tolist() == batch[i][0].tolist() and alone[0][1] == batch[i][1]
    ids, mask, pos = _left_padded(prompts, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        for i, p in enumerate(prompts):
            own = model(input_ids=torch.from_numpy(p.astype(np.int64))[None]).logits[0]
            torch.testing.assert_close(padded[i, -len(p):], own, rtol=0, atol=1e-5)


def test_two_ranks_write_the_same_rows(assets, reference, tmp_path):
    res = run_generate(gen_config(assets, tmp_path / "out"), tmp_path, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert rows(tmp_path / "out") == rows(reference)
    names = [s["file"] for s in manifest(tmp_path / "out")["shards"]]
    assert any("-r00000-" in n for n in names) and any("-r00001-" in n for n in names)


def test_killed_run_resumes_to_the_same_rows(assets, reference, tmp_path):
    """SIGKILL right after the first shard is closed, then a rerun (which also clears a stray
    temporary file): the rows of the uninterrupted run, none twice."""
    out = tmp_path / "out"
    res = run_generate(gen_config(assets, out), tmp_path, env={"KD_FAULT_KILL": "generated-shard:1"})
    assert res.returncode != 0
    m = manifest(out)
    assert not m["complete"] and len(list(out.glob("part-*.parquet"))) == 1
    (out / "part-r00000-a000-00001.parquet.tmp").write_bytes(b"partial")
    res = run_generate(gen_config(assets, out), tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "3 prompts already generated" in res.stdout  # the first shard: batch 0 (3 prompts × 2 rows)
    got = rows(out)
    assert got == rows(reference) and len({r["id"] for r in got}) == len(got)
    assert manifest(out)["attempts"] == 2 and not list(out.glob("*.tmp"))


def test_stop_tokens_end_completions_with_finish_reason_eos(assets, reference, tmp_path):
    """A stop token cuts each completion at its first occurrence (kept), the draws before it
    unchanged; rows without it are unchanged."""
    ref = rows(reference)
    stop = ref[0]["completion_ids"][3]
    cfg = gen_config(assets, tmp_path / "out", sampling={"num_completions": 2, "max_new_tokens": 10,
                                                         "stop_token_ids": [stop]})
    res = run_generate(cfg, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    got, n_eos = rows(tmp_path / "out"), 0
    for a, b in zip(ref, got):
        c = a["completion_ids"]
        if stop in c:
            cut = c.index(stop) + 1
            assert b["completion_ids"] == c[:cut] and b["finish_reason"] == "eos"
            n_eos += 1
        else:
            assert b == a
    assert n_eos >= 1 and manifest(tmp_path / "out")["finish_reasons"]["eos"] == n_eos


def test_chat_and_prompt_response_prompts(assets, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["teacher"])
    chats = [[{"role": "user", "content": "What is os?"}, {"role": "assistant", "content": "A module."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And sys?"}],
             [{"role": "assistant", "content": "Nothing to answer."}]]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n"
                                                 for i, m in enumerate(chats)))
    ds = {"path": str(tmp_path / "chat.jsonl"), "id_field": "id", "chat_template": TEMPLATE, "max_length": 64}
    greedy = {"num_completions": 2, "max_new_tokens": 5, "temperature": 0}
    res = run_generate(gen_config(assets, tmp_path / "chat", dataset=ds, sampling=greedy), tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    got, m = rows(tmp_path / "chat"), manifest(tmp_path / "chat")
    assert m["prompt_format"] == "chat" and m["skipped_prompts"] == 1 and m["num_prompts"] == 2
    for r in got:
        msgs = chats[int(r["prompt_id"][1:])]
        cut = max((k for k, x in enumerate(msgs) if x["role"] == "assistant"), default=len(msgs))
        text = tok.apply_chat_template(msgs[:cut], chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True)
        assert r["prompt"] == text and text.endswith("<|assistant|>\n")
        assert r["prompt_ids"] == tok(text)["input_ids"]
    assert got[0]["completion_ids"] == got[1]["completion_ids"]  # greedy: every completion the same
    (tmp_path / "pr.jsonl").write_text(json.dumps({"id": "a", "prompt": "import os", "response": "x"}) + "\n")
    ds = {"path": str(tmp_path / "pr.jsonl"), "id_field": "id"}
    res = run_generate(gen_config(assets, tmp_path / "pr", dataset=ds), tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["prompt_ids"] for r in rows(tmp_path / "pr")] == [tok("import os")["input_ids"]] * 2


def test_stage1_scores_the_stored_tokens(assets, reference, tmp_path):
    from conftest import precompute_config

    from pipeline.cache import open_cache

    cfg = precompute_config(assets, tmp_path / "cache", **{"dataset": {"path": str(reference), "max_length": 48}})
    res = run_cli(["stages.precompute_teacher", "--config", str(write_yaml(tmp_path / "pre.yaml", cfg))])
    assert res.returncode == 0, res.stderr[-3000:]
    cache = {r.sample_id: r for r in open_cache(tmp_path / "cache")}
    ref = rows(reference)
    assert sorted(cache) == [r["id"] for r in ref]
    for r in ref:
        c = cache[r["id"]]
        assert c.input_ids.tolist() == r["prompt_ids"] + r["completion_ids"]
        assert c.loss_mask.tolist() == [False] * len(r["prompt_ids"]) + [True] * len(r["completion_ids"])


def test_bad_inputs_are_one_line_errors(assets, reference, tmp_path):
    from conftest import precompute_config

    def one_line_error(res, prog: str, *parts: str) -> None:
        assert res.returncode == 2, res.stderr[-2000:]
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), res.stderr
        for p in parts:
            assert p in lines[0], lines[0]

    res = run_generate(gen_config(assets, tmp_path / "o", model=str(tmp_path / "nope")), tmp_path)
    one_line_error(res, "generate-completions", "model directory not found", str(tmp_path / "nope"))
    res = run_generate(gen_config(assets, tmp_path / "o", sampling={"max_new_tokens": 500}), tmp_path)
    one_line_error(res, "generate-completions", "sampling.max_new_tokens (500)", "max_position_embeddings")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    res = run_generate(gen_config(assets, tmp_path / "busy"), tmp_path)
    one_line_error(res, "generate-completions", "not a generated dataset")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    shutil.copytree(reference, tmp_path / "ref")
    res = run_generate(gen_config(assets, tmp_path / "ref", sampling={"num_completions": 2, "max_new_tokens": 10,
                                                                      "temperature": 0.5}), tmp_path)
    one_line_error(res, "generate-completions", "sampling=", "overwrite: true")
    m = manifest(tmp_path / "ref")
    theirs = "0123456789abcdef"
    (tmp_path / "ref" / "generation.json").write_text(json.dumps({**m, "tokenizer_fingerprint": theirs}))
    cfg = precompute_config(assets, tmp_path / "cache", **{"dataset": {"path": str(tmp_path / "ref")}})
    res = run_cli(["stages.precompute_teacher", "--config", str(write_yaml(tmp_path / "pre.yaml", cfg))])
    one_line_error(res, "precompute-teacher", theirs, m["tokenizer_fingerprint"], str(tmp_path / "ref"))
    assert not (tmp_path / "cache" / "manifest.json").exists()
    (tmp_path / "ref" / "generation.json").write_text(json.dumps({**m, "complete": False}))
    res = run_cli(["stages.precompute_teacher", "--config", str(write_yaml(tmp_path / "pre.yaml", cfg))])
    one_line_error(res, "precompute-teacher", "not complete")


@pytest.fixture
def s3_bucket():
    """``s3://kd-gen`` on a loopback moto server (:func:`conftest.loopback_s3`)."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    with loopback_s3("kd-gen") as url:
        yield url


def test_generated_dataset_on_an_object_store(assets, reference, s3_bucket, tmp_path):
    """output_dir on a store: the same rows; stage 1 reads them from the store URL."""
    from conftest import precompute_config

    from pipeline.cache import open_cache
    from pipeline.storage import Remote

    url = f"{s3_bucket}/gen"
    res = run_generate(gen_config(assets, url), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    Remote(url).download_dir("", tmp_path / "copy")
    assert manifest(tmp_path / "copy")["complete"] and rows(tmp_path / "copy") == rows(reference)
    cfg = precompute_config(assets, tmp_path / "cache", **{"dataset": {"path": url, "max_length": 48}})
    res = run_cli(["stages.precompute_teacher", "--config", str(write_yaml(tmp_path / "pre.yaml", cfg))])
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(r.sample_id for r in open_cache(tmp_path / "cache")) == [r["id"] for r in rows(reference)]
