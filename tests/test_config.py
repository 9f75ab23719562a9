"""Config loading: unknown keys and wrong types are errors naming the key; overrides parse as YAML."""
import pytest

from pipeline.config import ConfigError, TrainStudentConfig, load_config


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "output_dir: r\nstudent: {path: s}\ndata: {train_cache: c}\n"


def test_overrides_and_defaults(tmp_path):
    cfg = load_config(TrainStudentConfig, _write(tmp_path, BASE), ["optim.lr=3e-4", "loss.alpha=1", "wandb.name=null"])
    assert cfg.optim.lr == 3e-4 and cfg.loss.alpha == 1.0 and cfg.wandb.name is None and cfg.loss.tail == "bucket"


@pytest.mark.parametrize("extra,key", [("optim: {lrr: 1}", "optim.lrr"), ("max_steps: lots", "max_steps"),
                                       ("loss: {alpha: 2}", "loss.alpha")])
def test_errors_name_the_key(tmp_path, extra, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(TrainStudentConfig, _write(tmp_path, BASE + extra))


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainStudentConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainStudentConfig, _write(tmp_path, BASE), ["optim.lr"])


def test_teacher_free_training_requires_alpha_one(tmp_path):
    text = "output_dir: r\nstudent: {path: s}\ndata: {train_dataset: {path: d}, tokenizer: t}\n"
    with pytest.raises(ConfigError, match="loss.alpha must be 1"):
        load_config(TrainStudentConfig, _write(tmp_path, text))
