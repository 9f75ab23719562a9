"""Nothing silent: settings that would be ignored or bent are refused or announced in one line
naming the key and what was done: ``loss.cross_tokenizer`` on a cache of the student's own
tokenizer, ``loss.divergence`` in a cross-tokenizer run, one cache twice in
``data.train_caches``, ``dataset.num_samples`` above the prompt dataset's size, and a
distill-rounds round whose loss logs are gone when ``inspect-losses`` reads the run."""
import json

import pytest
from conftest import run_cli, train_config, write_yaml

from pipeline.cache import open_cache
from pipeline.config import ConfigError, TrainStudentConfig, load_config
from pipeline.losslog.writer import LossLogWriter
from pipeline.storage import Folder


def _wrap(cfg: dict, caches):
    from pipeline.student.cache_checks import find_student_tokenizer
    from pipeline.student.cross_tokenizer import wrap_sources

    train = open_cache(caches["train"])
    config = TrainStudentConfig.model_validate(cfg)
    return wrap_sources(config, train, None, str(Folder(caches["train"]).sub("tokenizer").local()),
                        find_student_tokenizer(config))


def test_cross_tokenizer_settings_that_do_not_apply(assets, caches, tmp_path, capsys):
    from test_cross_tokenizer import _student_dir

    cfg = train_config(assets, caches, tmp_path / "run", loss={"cross_tokenizer": "gold"})
    train, _, vocab = _wrap(cfg, caches)  # the cache's own tokenizer: the ordinary loss trains
    assert vocab is None and train.__class__.__name__ != "CrossTokenizerSource"
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "loss.cross_tokenizer=gold ignored" in out[0] and "loss.divergence=forward_kl" in out[0]

    student = _student_dir(tmp_path)  # another tokenizer: the cross-tokenizer loss has its own distance
    cfg = train_config(assets, caches, tmp_path / "run", loss={"cross_tokenizer": "uld", "divergence": "reverse_kl"})
    cfg["data"]["tokenizer"] = str(student)
    with pytest.raises(ConfigError, match="loss.divergence=reverse_kl: does not apply to a cross-tokenizer run") as e:
        _wrap(cfg, caches)
    assert "\n" not in str(e.value) and "loss.cross_tokenizer=uld" in str(e.value)


def test_one_cache_twice_in_train_caches_is_refused(tmp_path):
    cache = tmp_path / "cache"
    (tmp_path / "t.yaml").write_text(f"output_dir: r\nstudent: {{path: s}}\ndata: {{train_caches: "
                                     f"[{{path: {cache}}}, {{path: x}}, {{path: {cache}/}}]}}\n")
    with pytest.raises(ConfigError, match=r"data\.train_caches: cache .* is listed twice \(entries 0 and 2\)") as e:
        load_config(TrainStudentConfig, tmp_path / "t.yaml")
    assert "\n" not in str(e.value)


def test_num_samples_above_the_dataset_size_is_announced(assets, tmp_path):
    from test_generate import gen_config, rows, run_generate

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "text": f"def f{i}(x): return x"}) + "\n" for i in range(3)))
    cfg = gen_config(assets, tmp_path / "out", dataset={"path": str(data), "id_field": "id", "num_samples": 5,
                                                        "max_length": 48}, sampling={"max_new_tokens": 2})
    res = run_generate(cfg, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    said = [line for line in res.stdout.splitlines() if "dataset.num_samples" in line]
    assert len(said) == 1 and "dataset.num_samples=5" in said[0] and "only 3 rows" in said[0], res.stdout
    assert sorted({r["prompt_id"] for r in rows(tmp_path / "out")}) == ["p0", "p1", "p2"]


def test_inspect_losses_names_a_round_missing_on_disk(tmp_path):
    run = tmp_path / "rounds"
    steps = {f"round-{r}/{s}": {"complete": True} for r in (0, 1, 2) for s in ("generate", "precompute", "train")}
    run.mkdir()
    (run / "rounds.json").write_text(json.dumps({"steps": steps}))
    for r in (0, 2):  # round 1's directory was tidied away
        w = LossLogWriter(run / f"round-{r}" / "student" / "loss_logs", rank=0)
        w.append(r, "train", 0, 1, {"sample_id": ["a"], "n_tokens": [4], "ce_sum": [1.0], "kl_sum": [1.0],
                                    "loss_sum": [1.0]})
        w.close()
    res = run_cli(["stages.inspect_losses", str(run)])
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("\n") == 1 and "round(s) 1 as trained" in res.stderr, res.stderr
    assert str(run / "round-1" / "student" / "loss_logs") in res.stderr
    summary = res.stdout.split("hardest")[0]
    assert [line.split()[0] for line in summary.splitlines()[2:] if line.strip()] == ["0", "2"]
    res = run_cli(["stages.inspect_losses", str(run), "--round", "2"])  # not asked for: no warning
    assert res.returncode == 0 and res.stderr == "", res.stderr
    (run / "rounds.json").write_text('{"steps": {"round-0/gen')  # truncated: named
    res = run_cli(["stages.inspect_losses", str(run)])
    assert res.returncode == 2 and str(run / "rounds.json") in res.stderr, res.stderr
