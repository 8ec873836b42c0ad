"""Config: defaults, YAML, overrides, precedence, round trip and every validation error."""

import pytest
import yaml

from simclr_cli.config import (
    CHOICES,
    RULES,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg.loss.temperature == 0.5 and cfg.model.arch == "resnet18" and cfg.model.stem == "cifar"


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(overrides=["optim.lr=0.3", "model.width=32", "data.size_dataset_train=100"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_precedence_defaults_yaml_set(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.2\n  name: lars\n")
    cfg = load_config(path, ["optim.lr=0.7"])
    assert cfg.optim.lr == 0.7  # --set beats YAML
    assert cfg.optim.name == "lars"  # YAML beats defaults
    assert cfg.optim.momentum == Config().optim.momentum  # defaults fill the rest


def test_exponent_without_dot_is_a_float_and_infinity_is_refused(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string; a user writing it means a number.
    assert load_config(overrides=["optim.lr=1e-3"]).optim.lr == 1e-3
    assert load_config(write(tmp_path, "optim:\n  weight_decay: 5e-4\n")).optim.weight_decay == 5e-4
    for bad in ("optim.lr=1e400", "optim.lr=.inf", "loss.temperature=.nan"):
        with pytest.raises(ConfigError, match="must be a finite number"):
            load_config(overrides=[bad])
    with pytest.raises(ConfigError, match="must be float"):
        load_config(overrides=["optim.lr=1e-3x"])


def test_int_accepted_for_float_and_types_checked(tmp_path):
    assert load_config(overrides=["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="train.epochs' must be int"):
        load_config(overrides=["train.epochs=ten"])
    with pytest.raises(ConfigError, match="must be bool"):
        load_config(overrides=["train.channels_last=maybe"])


@pytest.mark.parametrize("text,hint", [
    ("optim:\n  lrr: 0.1\n", "did you mean 'lr'"),
    ("optimizer:\n  lr: 0.1\n", "did you mean 'optim'"),
    ("train:\n  batchsize: 8\n", "did you mean 'batch_size'"),
])
def test_unknown_keys_get_a_close_match_hint(tmp_path, text, hint):
    with pytest.raises(ConfigError, match=hint):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_is_checked(key):
    with pytest.raises(ConfigError, match=f"'{key}' must be one of"):
        load_config(overrides=[f"{key}=nonsense"])


BAD_VALUES = {
    "loss.temperature": "0", "train.batch_size": "1", "train.epochs": "0", "train.log_every": "0",
    "train.checkpoint_every": "0", "train.keep_last": "-1", "train.eval_every": "-1", "train.knn_k": "0",
    "train.knn_temperature": "0", "optim.lr": "0", "optim.weight_decay": "-1", "optim.momentum": "1",
    "optim.warmup_epochs": "-1", "optim.min_lr": "-0.1", "optim.betas": "[0.9]", "optim.plateau_factor": "1",
    "optim.plateau_patience": "-1", "augment.crop_scale_min": "0", "augment.jitter_strength": "-1",
    "augment.view_size": "4", "augment.view_size_start": "4", "augment.small_crops": "-1",
    "augment.small_crop_size": "4", "augment.small_crop_scale": "[0.5, 0.2]", "train.seed": "20000000000000", "train.output_dir": "",
    "model.width": "2", "model.head_out": "0", "model.head_layers": "4", "model.head_hidden": "0",
    "data.image_size": "4", "data.num_workers": "-1", "data.synthetic_size": "1", "data.size_dataset_train": "1", "data.val_size": "0",
    "data.read_ahead": "-1", "train.dist_timeout_min": "0", "train.loggers": "[neptune]", "train.log_project": " ",
}


def test_bad_values_cover_every_rule():
    assert set(BAD_VALUES) == {key for key, _, _ in RULES}


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_every_rule_rejects_a_bad_value(key):
    with pytest.raises(ConfigError, match=f"'{key}' must be"):
        load_config(overrides=[f"{key}={BAD_VALUES[key]}"])


def test_folder_dataset_needs_a_root():
    with pytest.raises(ConfigError, match="data.root"):
        load_config(overrides=["data.dataset=folder"])


@pytest.mark.parametrize("text", ["optim.lr", "lr=0.1", "a.b.c=1", "=3"])
def test_malformed_overrides(text):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=[text])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "optim: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_python_yaml_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    text = f"optim: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, text))
    assert not marker.exists()


def test_examples_load_and_every_key_is_commented():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
    assert examples, "examples/*.yaml missing"
    for path in examples:
        load_config(path)
        for line in path.read_text().splitlines():
            if line.strip() and not line.strip().startswith("#") and not line.rstrip().endswith(":"):
                assert "#" in line, f"{path.name}: key without a comment: {line!r}"
        assert yaml.safe_load(path.read_text())


def test_width_under_8_is_refused_for_a_torch_cpu_heap_corruption():
    # torch 2.14.1, CPU: backward of a channels_last 1x1 stride-2 conv with 4-7 input channels aborts in free()
    # (width 4 gives the 4 -> 8 shortcut). Width 8 and up, and contiguous tensors, are fine.
    with pytest.raises(ConfigError, match="'model.width' must be >= 8"):
        load_config(overrides=["model.width=4"])
    assert load_config(overrides=["model.width=8"]).model.width == 8


@pytest.mark.parametrize("value, shown", [("2024-06-01", "as a date"), ("!!binary aGVsbG8=", "!!binary"),
                                          ("!!set {a, b}", "!!set")])
def test_yaml_values_that_are_not_text_are_named(tmp_path, value, shown):
    """A YAML date, !!binary or !!set used to end in a JSON TypeError and a traceback."""
    with pytest.raises(ConfigError, match=f"'train.output_dir' must be str, got .*{shown}"):
        load_config(write(tmp_path, f"train:\n  output_dir: {value}\n"))


@pytest.mark.parametrize("text", ["runs/exp #3", "42", "no", "2024-06-01", "null"])
def test_text_keys_take_the_override_as_typed(text):
    """A key holding a path or a word is a string: the '#3' is not a YAML comment, 42 is a folder name."""
    assert load_config(overrides=[f"train.output_dir={text}"]).train.output_dir == text
    assert load_config(overrides=[f"data.root={text}"]).data.root == (None if text == "null" else text)


def test_dedicated_flag_values_are_never_parsed_and_win(tmp_path):
    path = write(tmp_path, "train:\n  output_dir: from-yaml\n")
    cfg = load_config(path, ["train.output_dir=from-set"], {"train.output_dir": "runs/exp #3", "train.device": "cpu"})
    assert (cfg.train.output_dir, cfg.train.device) == ("runs/exp #3", "cpu")


def test_nesterov_needs_momentum():
    """torch.optim.SGD raises on nesterov with momentum 0 only when the run starts: refuse it in the config."""
    with pytest.raises(ConfigError, match="optim.nesterov"):
        load_config(overrides=["optim.nesterov=true", "optim.momentum=0"])
    with pytest.raises(ConfigError, match="optim.nesterov"):
        load_config(overrides=["optim.nesterov=true", "optim.name=adam"])
    assert load_config(overrides=["optim.nesterov=true"]).optim.nesterov
