"""A method owns its settings: `method.NAME.KEY` in the config, its Options dataclass and RULES, read from the
older flat layout too, written back under method.NAME, and checked in one line."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from simclr_cli.config import Config, config_from_dict, config_to_dict, dump_config, load_config
from simclr_cli.errors import ConfigError
from simclr_cli.registry import METHODS
from simclr_cli.train.preflight import check_resume_config

# A value each rule refuses: (method, setting) -> text as typed after --set.
BAD = {("moco", "momentum"): "1", ("moco", "momentum_end"): "1.5", ("moco", "queue_size"): "0",
       ("byol", "momentum"): "-0.1", ("byol", "momentum_end"): "2", ("byol", "predictor_hidden"): "0",
       ("dino", "momentum"): "1", ("dino", "momentum_end"): "-1", ("dino", "prototypes"): "1", ("dino", "hidden"): "0",
       ("dino", "bottleneck"): "0", ("dino", "teacher_temp"): "0", ("dino", "teacher_temp_end"): "-0.1",
       ("dino", "teacher_temp_epochs"): "-1", ("dino", "student_temp"): "0", ("dino", "center_momentum"): "1",
       ("dino", "freeze_last_layer_epochs"): "-1", ("dino", "clip_grad"): "-1",
       ("mae", "mask_ratio"): "1", ("mae", "decoder_depth"): "0", ("mae", "decoder_width"): "30",
       ("mae", "decoder_heads"): "0"}


def test_bad_values_cover_every_built_in_rule():
    assert set(BAD) == {(name, key) for name in METHODS.names() for key, _, _ in METHODS[name].RULES}


@pytest.mark.parametrize("name,key", sorted(BAD))
def test_every_method_rule_refuses_a_bad_value_in_one_line(name, key):
    with pytest.raises(ConfigError, match=rf"^'method\.{name}\.{key}' must be .*; got "):
        load_config(overrides=[f"method.name={name}", f"method.{name}.{key}={BAD[name, key]}"])


def test_settings_default_from_the_methods_own_dataclass_and_round_trip():
    cfg = load_config(overrides=["method.name=moco", "method.moco.queue_size=64"])
    assert cfg.method.options == METHODS["moco"].Options(queue_size=64)
    written = yaml.safe_load(dump_config(cfg))["method"]
    assert written == {"name": "moco", "moco": {"momentum": 0.99, "momentum_end": 1.0, "queue_size": 64}}
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_to_dict(load_config())["method"] == {"name": "simclr"}  # a method without settings


def test_the_flat_layout_of_older_files_still_reads():
    """Configs and checkpoints written before methods owned their settings kept every method's keys flat."""
    old = {"name": "moco", "momentum": 0.9, "momentum_end": 0.999, "queue_size": 128, "predictor_hidden": None}
    cfg = config_from_dict({"method": old})
    assert cfg.method.options == METHODS["moco"].Options(momentum=0.9, momentum_end=0.999, queue_size=128)
    simclr = config_from_dict({"method": {**old, "name": "simclr"}})  # another method's keys: left out, as then
    assert simclr.method.options is None
    # A checkpoint's config in the old layout resumes under this version: nothing counts as changed.
    saved = {**config_to_dict(cfg), "method": old}
    assert check_resume_config(saved, cfg) == []


@pytest.mark.parametrize("overrides,message", [
    (["method.name=moco", "method.moco.queu_size=3"], "unknown config key 'method.moco.queu_size': did you mean 'queue_size'"),
    (["method.sise=3"], "unknown config key 'method.sise'"),
    (["method.simclr.x=1"], "'method.simclr' takes no settings"),
    (["method.name=byol", "method.byol=3"], "'method.byol' must be a mapping"),
    (["method.name=mocoo"], "'method.name' must be one of simclr, moco, byol, dino, mae; got 'mocoo' "
                            "(did you mean 'moco'?)"),
    (["method.name=moco", "augment.small_crops=2"], "needs a method that takes it (simclr, dino)"),
    (["a.b.c=1"], "section.key=value"),
])
def test_bad_method_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=overrides)


def test_a_config_built_in_code_gets_its_methods_defaults():
    cfg = dataclasses.replace(Config(), method=dataclasses.replace(Config().method, name="byol"))
    from simclr_cli.config import validate
    assert validate(cfg).method.options == METHODS["byol"].Options()
