"""``data.train_caches``: several teacher caches mixed with weights in train-student — the share
of draws per cache, a one-entry list equal to ``data.train_cache``, incompatible caches
refused, an exact resume after SIGKILL, and two ranks."""
import json
import os
import shutil
import signal

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from conftest import run_cli, train_config as _train_cfg, write_yaml
from safetensors.torch import load_file

from pipeline.cache import open_cache
from pipeline.cache.mixture import CacheMixture
from pipeline.losslog.reader import SampleText
from pipeline.config import ConfigError, load_config, TrainStudentConfig
from pipeline.student.sampler import StepSampler
from test_resume import _popen, _run_to_end, _wait_for


def _mixed(caches, w_train=3.0, w_val=1.0) -> dict:
    return {"train_caches": [{"path": str(caches["train"]), "weight": w_train},
                             {"path": str(caches["validation"]), "weight": w_val}],
            "eval_cache": str(caches["validation"])}


def _rows(run_dir):
    t = pads.dataset(run_dir / "loss_logs", format="parquet", partitioning="hive").to_table().to_pandas()
    t = t[t["split"] == "train"]
    return sorted(zip(t["step"], t["sample_id"], t["rank"], t["loss_sum"].round(6)))


def test_config_keys_are_exclusive_and_weights_positive(tmp_path):
    base = "output_dir: r\nstudent: {path: s}\n"
    for data, key in (("{train_cache: a, train_caches: [{path: b}]}", "data.train_caches and data.train_cache"),
                      ("{train_caches: []}", "data.train_caches is empty"),
                      ("{train_caches: [{path: a, weight: 0}]}", "data.train_caches.0.weight")):
        (tmp_path / "c.yaml").write_text(base + f"data: {data}\n")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            load_config(TrainStudentConfig, tmp_path / "c.yaml")
        assert "\n" not in str(e.value)
    cfg = TrainStudentConfig(output_dir="r", student={"path": "s"},
                             data={"train_caches": [{"path": "a", "weight": 2}, {"path": "b"}]})
    assert cfg.data.cache_paths() == ["a", "b"] and cfg.data.first_cache == "a"


@pytest.mark.parametrize("w", [(3.0, 1.0), (1.0, 1.0), (1.0, 4.0)])
def test_draws_per_cache_follow_the_weights(caches, w):
    readers = [open_cache(caches["train"]), open_cache(caches["validation"])]
    mix = CacheMixture(readers, list(w))
    n0, n1 = len(readers[0]), len(readers[1])
    assert n0 != n1  # unequal sizes: the share is set by the weights, not by the sizes
    indices = np.arange(len(mix))
    p = mix.draw_weights(indices)
    np.testing.assert_allclose(p.sum(), 1.0)
    np.testing.assert_allclose(p[:n0].sum(), w[0] / sum(w))
    sampler = StepSampler(indices, 4, 1, 0, 1, seed=7, weights=p)
    drawn = np.concatenate([np.concatenate(sampler.next_step()) for _ in range(2000)])
    share = float((drawn < n0).mean())
    # 8000 draws: the binomial standard error is ≤ 0.0056, so 0.025 is > 4 of them
    assert abs(share - w[0] / sum(w)) < 0.025, share
    assert mix[0].sample_id == f"0:{readers[0].sample_ids[0]}" and mix[n0].sample_id == f"1:{readers[1].sample_ids[0]}"
    assert mix.index_of(mix[n0 + 2].sample_id) == n0 + 2
    with pytest.raises(KeyError, match="cache number"):
        mix.index_of(readers[0].sample_ids[0])


def test_one_entry_list_equals_train_cache_bit_for_bit(assets, caches, tmp_path):
    over = dict(max_steps=6, eval_steps=3)
    a = write_yaml(tmp_path / "a.yaml", _train_cfg(assets, caches, tmp_path / "a", **over))
    cfg_b = _train_cfg(assets, caches, tmp_path / "b", **over)
    cfg_b["data"] = {"train_caches": [{"path": str(caches["train"]), "weight": 5.0}],
                     "eval_cache": str(caches["validation"])}
    b = write_yaml(tmp_path / "b.yaml", cfg_b)
    for c in (a, b):
        res = run_cli(["stages.train_student", "--config", str(c)])
        assert res.returncode == 0, res.stderr[-2000:]
    wa, wb = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("a", "b"))
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    assert {sid for _, sid, _, _ in _rows(tmp_path / "b")} <= set(open_cache(caches["train"]).sample_ids)


def test_incompatible_caches_are_refused(assets, caches, tmp_path, capfd):
    from stages.train_student import main as train

    other = shutil.copytree(caches["validation"], tmp_path / "other-tokenizer")
    m = json.loads((other / "manifest.json").read_text())
    m["tokenizer_fingerprint"] = "0" * len(m["tokenizer_fingerprint"])
    (other / "manifest.json").write_text(json.dumps(m))
    cfg = _train_cfg(assets, caches, tmp_path / "run")
    cfg["data"] = {"train_caches": [{"path": str(caches["train"])}, {"path": str(other)}]}
    code = train(["--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1, err[-2000:]
    assert str(other) in err and str(caches["train"]) in err and "tokenizer_fingerprint" in err
    assert not (tmp_path / "run" / "final").exists()


def test_mixed_caches_resume_after_sigkill_equals_uninterrupted(assets, caches, tmp_path):
    over = dict(micro_batch_size=4, max_steps=12, save_steps=3, eval_steps=6, save_total_limit=2)
    ref = _train_cfg(assets, caches, tmp_path / "ref", **over)
    ref["data"] = _mixed(caches)
    code, _, err = _run_to_end(write_yaml(tmp_path / "ref.yaml", ref), 1)
    assert code == 0, err[-2000:]
    run = {**ref, "output_dir": str(tmp_path / "run")}
    cfg = write_yaml(tmp_path / "run.yaml", run)
    proc = _popen(cfg, 1)
    _wait_for(tmp_path / "run" / "checkpoints" / "step-00000006", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "final").exists()
    code, out, err = _run_to_end(cfg, 1)
    assert code == 0 and "resumed from" in out, err[-2000:]
    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(tmp_path / "run" / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    rows = _rows(tmp_path / "run")
    assert rows == _rows(tmp_path / "ref")  # as multisets: draws with replacement may repeat a sample in a step
    prefixes = {sid.split(":", 1)[0] for _, sid, _, _ in rows}
    assert prefixes == {"0", "1"}  # both caches drawn, IDs prefixed by the cache's position
    text = SampleText(tmp_path / "run")  # inspect-losses decodes a mixture's IDs through the right cache
    for c in ("0", "1"):
        sid = next(s for _, s, _, _ in rows if s.startswith(c + ":"))
        assert text(sid) != ""


def test_mixed_caches_two_ranks_draw_the_one_rank_samples(assets, caches, tmp_path):
    def run(name, nproc):
        cfg = _train_cfg(assets, caches, tmp_path / name, micro_batch_size=4 // nproc, max_steps=4, eval_steps=4)
        cfg["data"] = _mixed(caches, 1.0, 1.0)
        code, _, err = _run_to_end(write_yaml(tmp_path / f"{name}.yaml", cfg), nproc)
        assert code == 0, err[-2000:]
        return sorted((step, sid) for step, sid, _, _ in _rows(tmp_path / name))

    one, two = run("one", 1), run("two", 2)
    assert one == two  # the step's global sample set does not depend on the world size
    assert {sid.split(":", 1)[0] for _, sid in two} == {"0", "1"}
