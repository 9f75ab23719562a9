"""The student's own tokenizer (``data.tokenizer``, or the tokenizer files of its directory)
against the train cache's fingerprint: another one refused in one line naming both, unless
``loss.cross_tokenizer`` is set; a student without one falls back to the cache's (said once);
``best/`` and ``final/`` carry the student's own tokenizer."""
from __future__ import annotations

import pytest
from conftest import run_cli, train_config, write_yaml

from pipeline.cache import read_manifest
from pipeline.models import load_tokenizer, tokenizer_fingerprint


def _student(assets, d, tokenizer) -> str:
    """A pretrained tiny student of the fixture's vocabulary saved in ``d`` with ``tokenizer``."""
    from helpers import tiny_student

    tiny_student(assets["vocab"], seed=5).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def foreign(assets, tmp_path_factory):
    """A byte-level BPE of the fixture's size trained on other text (the corpus reversed): same
    kind, other token IDs."""
    from datasets import load_from_disk

    from pipeline.data.demo_corpus import train_tokenizer

    texts = [t[::-1] for t in load_from_disk(assets["corpus"])["train"]["text"]]
    tok = train_tokenizer(texts, assets["vocab"], tmp_path_factory.mktemp("foreign") / "tok")
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(load_tokenizer(assets["tokenizer"]))
    return tok


def _train(cfg, path, capfd):
    from stages.train_student import main

    code = main(["--config", str(write_yaml(path, cfg))])
    return code, capfd.readouterr()


@pytest.mark.parametrize("key", ["student.path", "data.tokenizer"])
def test_another_tokenizer_is_refused_naming_both(assets, caches, foreign, tmp_path, capfd, key):
    d = _student(assets, tmp_path / "student", foreign)
    cfg = train_config(assets, caches, tmp_path / "run", max_steps=2,
                       student={"path": d if key == "student.path" else assets["student"],
                                "init": "pretrained" if key == "student.path" else "random"})
    if key == "data.tokenizer":
        cfg["data"]["tokenizer"] = d
    code, cap = _train(cfg, tmp_path / "t.yaml", capfd)
    assert code == 2 and cap.err.count("\n") == 1, cap.err[-2000:]
    fp_student, fp_cache = tokenizer_fingerprint(foreign), read_manifest(caches["train"]).tokenizer_fingerprint
    for part in (d, key, fp_student, str(caches["train"] / "tokenizer"), fp_cache, "loss.cross_tokenizer"):
        assert part in cap.err, (part, cap.err)
    assert not (tmp_path / "run" / "final").exists()


def test_same_tokenizer_is_accepted_and_exported(assets, caches, tmp_path, capfd):
    """A student whose tokenizer has the cache's fingerprint but files of its own (a chat
    template the cache's copy lacks) trains, and best/ and final/ carry its files."""
    tok = load_tokenizer(assets["tokenizer"])
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}student"
    d = _student(assets, tmp_path / "student", tok)
    assert tokenizer_fingerprint(load_tokenizer(d)) == read_manifest(caches["train"]).tokenizer_fingerprint
    assert not (caches["train"] / "tokenizer" / "chat_template.jinja").exists()
    cfg = train_config(assets, caches, tmp_path / "run", max_steps=2, eval_steps=2,
                       student={"path": d, "init": "pretrained"})
    code, cap = _train(cfg, tmp_path / "t.yaml", capfd)
    assert code == 0, cap.err[-2000:]
    assert "no tokenizer files" not in cap.out
    for export in ("best", "final"):
        got = load_tokenizer(tmp_path / "run" / export)
        assert got.chat_template == tok.chat_template, export
        assert tokenizer_fingerprint(got) == read_manifest(caches["train"]).tokenizer_fingerprint


def test_student_without_tokenizer_falls_back_to_the_cache_and_says_so_once(assets, caches, tmp_path):
    res = run_cli(["stages.train_student", "--config",
                   str(write_yaml(tmp_path / "t.yaml", train_config(assets, caches, tmp_path / "run", max_steps=2,
                                                                     eval_steps=2)))])
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("no tokenizer files") == 1, res.stdout
    assert str(caches["train"] / "tokenizer") in res.stdout
    # the fallback export reloads to the cache's fingerprint: a next round starting from it is accepted
    got = load_tokenizer(tmp_path / "run" / "final")
    assert tokenizer_fingerprint(got) == read_manifest(caches["train"]).tokenizer_fingerprint


def test_cross_tokenizer_student_directory_is_exempt_and_exported(assets, tmp_path):
    """A student directory with another tokenizer and ``loss.cross_tokenizer`` set (no
    ``data.tokenizer``) trains through the conversion, and final/ carries its tokenizer."""
    from test_cross_tokenizer import _offsets_cache, _student_dir

    student = _student_dir(tmp_path)
    cache = _offsets_cache(assets, tmp_path / "c", "parquet")
    fp_student = tokenizer_fingerprint(load_tokenizer(student))
    assert fp_student != read_manifest(cache).tokenizer_fingerprint
    cfg = train_config(assets, {"train": cache, "validation": cache}, tmp_path / "run", max_steps=2, eval_steps=2,
                       student={"path": str(student)}, loss={"cross_tokenizer": "gold", "alpha": 0.5})
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
    assert res.returncode == 0, res.stderr[-2000:]
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "run" / "final")) == fp_student
