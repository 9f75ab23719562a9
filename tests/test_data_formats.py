"""Dataset formats of stage 1: joined text fields, chat (OpenAI and ShareGPT style) with the loss
mask exactly on assistant tokens, prompt/response, windows with IDs ``{id}#{n}``, empty rows
skipped and counted, bad rows named."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import ConfigError, DatasetConfig, load_config
from pipeline.data import load_samples, tokenize_rows

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x): return x"},
     {"role": "assistant", "content": "It returns its argument."}, {"role": "user", "content": "And import os?"},
     {"role": "assistant", "content": "It imports the os module."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " spaces  and\nnewlines "}],
]


@pytest.fixture(scope="module")
def tok(assets):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(assets["tokenizer"])
    t.chat_template = TEMPLATE
    return t


def _ds(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the runs of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_chat_mask_is_exactly_the_assistant_tokens(tok):
    cfg = DatasetConfig(path="chat.jsonl", id_field="id", max_length=512)
    samples, skipped = tokenize_rows(_ds([{"id": f"c{i}", "messages": m} for i, m in enumerate(CHATS)]), tok, cfg)
    assert skipped == 0 and [s.sample_id for s in samples] == ["c0", "c1"]
    for s, msgs in zip(samples, CHATS):
        # the whole conversation is the template's rendering, BOS prepended once
        assert s.input_ids[0] == tok.bos_token_id and (s.input_ids == tok.bos_token_id).sum() == 1
        assert tok.decode(s.input_ids[1:]) == tok.apply_chat_template(msgs, tokenize=False)
        # every run of targets decodes to one assistant reply and its end-of-turn, nothing else
        replies = [m["content"] + "<|eos|>\n" for m in msgs if m["role"] == "assistant"]
        assert [tok.decode(s.input_ids[a:b]) for a, b in _runs(s.loss_mask)] == replies
        # and the tokens outside those runs are the same as the tokens of the non-assistant text
        n_targets = sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in replies)
        assert s.loss_mask.sum() == n_targets


def test_sharegpt_conversations_and_bad_rows(tok, tmp_path):
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]
    openai = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    cfg = DatasetConfig(path="x", max_length=64)
    a = tokenize_rows(_ds([{"conversations": conv}]), tok, cfg)[0][0]
    b = tokenize_rows(_ds([{"messages": openai}]), tok, cfg)[0][0]
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    # a chat without an assistant turn has no target: skipped and counted
    rows = [{"id": "ok", "messages": openai}, {"id": "empty", "messages": openai[:1]}]
    samples, skipped = tokenize_rows(_ds(rows), tok, DatasetConfig(path="x", id_field="id"))
    assert [s.sample_id for s in samples] == ["ok"] and skipped == 1
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "a", "messages": openai}) + "\n"
                    + json.dumps({"id": "b7", "messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl row 1 \(sample_id 'b7'\): message 0 has unknown role 'wizard'"):
        load_samples(DatasetConfig(path=str(path), id_field="id"), tok)
    path.write_text(json.dumps({"id": "t1", "text": "fine"}) + "\n" + json.dumps({"id": "t2", "text": 5}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl row 1 \(sample_id 't2'\): field 'text' is int"):
        load_samples(DatasetConfig(path=str(path), id_field="id"), tok)


def test_prompt_response_masks_the_response(tok):
    rows = [{"prompt": "Question: what is os?", "response": "A module."}]
    s = tokenize_rows(_ds(rows), tok, DatasetConfig(path="x"))[0][0]
    p = tok(rows[0]["prompt"])["input_ids"]
    r = tok(rows[0]["response"], add_special_tokens=False)["input_ids"]
    assert list(s.input_ids) == p + r + [tok.eos_token_id]
    assert list(s.loss_mask) == [False] * len(p) + [True] * (len(r) + 1)


def test_text_fields_joined_and_empty_rows_counted(tok):
    rows = [{"title": "A title", "body": "the body"}, {"title": "", "body": None}, {"title": "only", "body": ""}]
    cfg = DatasetConfig(path="x", format="text", text_field=["title", "body"], text_join=" | ")
    samples, skipped = tokenize_rows(_ds(rows), tok, cfg)
    assert skipped == 1 and len(samples) == 2
    assert tok.decode(samples[0].input_ids, skip_special_tokens=True) == "A title | the body"
    assert tok.decode(samples[1].input_ids, skip_special_tokens=True) == "only"


@pytest.mark.parametrize("stride", [None, 5])
def test_windows_cover_every_target_once(tok, stride):
    text = " ".join(f"word{i}" for i in range(60))
    full = tok(text)["input_ids"]
    cfg = DatasetConfig(path="x", id_field="id", max_length=16, overflow="window", stride=stride)
    samples, _ = tokenize_rows(_ds([{"id": "doc", "text": text}, {"id": "short", "text": "hi"}]), tok, cfg)
    wins = [s for s in samples if s.sample_id.startswith("doc#")]
    assert [s.sample_id for s in wins] == [f"doc#{n}" for n in range(len(wins))] and samples[-1].sample_id == "short#0"
    assert all(len(s.input_ids) <= 16 and s.input_ids[0] == tok.bos_token_id for s in wins)
    # the targets of all windows, in order, are exactly the document's targets
    targets = np.concatenate([s.input_ids[1:][s.loss_mask[1:]] for s in wins])
    np.testing.assert_array_equal(targets, full[1:])
    step = stride or 15
    assert len(wins) == 1 + -(-(len(full) - 1 - 15) // step)
    # truncation keeps the first max_length tokens
    cut = tokenize_rows(_ds([{"text": text}]), tok, DatasetConfig(path="x", max_length=16))[0][0]
    np.testing.assert_array_equal(cut.input_ids, full[:16])


def test_dataset_config_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("path: x\nstride: 8\n")
    with pytest.raises(ConfigError, match="stride 8 needs overflow: window"):
        load_config(DatasetConfig, p)
    with pytest.raises(ConfigError, match="format"):
        load_config(DatasetConfig, None, ["path=x", "format=xml"])
