"""The eval cache checked like the train cache (tokenizer, vocabulary, target type, k,
temperature, and the resolved ``loss.tail``), each difference refused in one line naming both
caches; ``data.eval_max_samples`` a seeded random subset, not the first (longest) N, the same
at 1 and 2 ranks and after a resume."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import precompute_config, run_cli, train_config, write_yaml

from pipeline.cache import open_cache
from pipeline.losslog.reader import load_loss_logs
from pipeline.student.sampler import eval_batches, eval_subset

EVAL_N = 8


def _edited_copy(src, dst, **fields):
    """A copy of the cache ``src`` whose manifest says ``fields`` (the records are not read:
    the refusal comes first)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m.update(fields)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("field, value, tail, expect", [
    ("tokenizer_fingerprint", "0" * 16, None, "tokenizer_fingerprint"),
    ("vocab_size", 999, None, "vocab_size"),
    ("temperature", 2.0, None, "temperature"),
    ("k", 4, None, "k 4"),
    ("target_type", "sampled", "renormalize", "target_type"),  # a tail valid for both: the field is named
    ("target_type", "sampled", None, "loss.tail=bucket"),  # the resolved tail counts a sampled tail twice
])
def test_each_eval_mismatch_is_refused_naming_both_caches(assets, caches, tmp_path, capfd, field, value, tail,
                                                          expect):
    from stages.train_student import main

    other = _edited_copy(caches["validation"], tmp_path / "eval", **{field: value})
    cfg = train_config(assets, caches, tmp_path / "run", max_steps=2)
    cfg["data"]["eval_cache"] = str(other)
    if tail is not None:
        cfg["loss"] = {"tail": tail}
    code = main(["--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1, err[-2000:]
    for part in (str(other), str(caches["train"]), "data.eval_cache", expect):
        assert part in err, (part, err)
    assert not (tmp_path / "run" / "final").exists()


def test_eval_subset_is_seeded_sorted_and_not_the_first_n():
    a = eval_subset(40, EVAL_N, seed=3)
    assert len(a) == EVAL_N and len(set(a.tolist())) == EVAL_N and (np.diff(a) > 0).all()
    assert a.min() >= 0 and a.max() < 40
    np.testing.assert_array_equal(a, eval_subset(40, EVAL_N, seed=3))  # a function of (N, n, seed) only
    assert a.tolist() != list(range(EVAL_N))
    assert not np.array_equal(a, eval_subset(40, EVAL_N, seed=4))
    np.testing.assert_array_equal(eval_subset(40, None, seed=3), np.arange(40))
    np.testing.assert_array_equal(eval_subset(40, 99, seed=3), np.arange(40))


def test_eval_batches_split_the_subset_over_ranks():
    """The union of the ranks' real batches is the subset, each sample once, at any rank count;
    every rank makes the same number of forward calls."""
    from helpers import synthetic_records

    recs = synthetic_records(40, 16, 4)
    idx = eval_subset(40, 11, seed=0)
    for world in (1, 2, 3):
        seen, calls = [], set()
        for rank in range(world):
            batches = list(eval_batches(recs, idx, 2, rank, world))
            calls.add(len(batches))
            seen += [sid for b in batches for sid in b.sample_ids if sid]
        assert len(calls) == 1 and sorted(seen) == sorted(recs[i].sample_id for i in idx), world


def _eval_ids(run_dir) -> dict[int, list[str]]:
    t = load_loss_logs(run_dir, split="eval").to_pandas()
    return {int(s): sorted(g["sample_id"]) for s, g in t.groupby("step")}


def test_eval_subset_is_random_and_the_same_at_one_and_two_ranks_and_after_resume(assets, caches, tmp_path):
    """Eval on 8 of the 33 validation samples, whose lengths (80 to 259 tokens) the cache keeps
    at ``max_length`` 256: the subset is neither the first 8 stored nor the 8 longest."""
    pre = precompute_config(assets, tmp_path / "eval-cache", split="validation", **{"dataset.max_length": 256})
    res = run_cli(["stages.precompute_teacher", "--config", str(write_yaml(tmp_path / "pre.yaml", pre))])
    assert res.returncode == 0, res.stderr[-3000:]
    ev = open_cache(tmp_path / "eval-cache")
    assert len(ev) > 2 * EVAL_N and len(set(ev.lengths().tolist())) > EVAL_N
    ids = {}
    for nproc in (1, 2):
        cfg = train_config(assets, caches, tmp_path / f"run{nproc}", micro_batch_size=4 // nproc, max_steps=4,
                           eval_steps=2, save_steps=2, seed=7)
        cfg["data"].update(eval_cache=str(tmp_path / "eval-cache"), eval_max_samples=EVAL_N)
        res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / f"t{nproc}.yaml", cfg))],
                      nproc=nproc)
        assert res.returncode == 0, res.stderr[-3000:]
        ids[nproc] = _eval_ids(tmp_path / f"run{nproc}")
    # resume: the 1-rank run continued from its step-4 checkpoint to step 6
    cfg["output_dir"], cfg["micro_batch_size"], cfg["max_steps"] = str(tmp_path / "run1"), 4, 6
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "resume.yaml", cfg))])
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    resumed = _eval_ids(tmp_path / "run1")
    subset = ids[1][2]
    assert len(subset) == EVAL_N
    assert ids[1] == {2: subset, 4: subset} and ids[2] == ids[1] and resumed == {2: subset, 4: subset, 6: subset}
    lengths = ev.lengths()
    mine = lengths[[ev.index_of(s) for s in subset]]
    longest = np.sort(lengths)[-EVAL_N:]
    assert mine.mean() < longest.mean()  # not the first (longest) N of the length-sorted cache
    assert sorted(subset) != sorted(ev.sample_ids[:EVAL_N])
