"""The strict config loader: defaults <- preset TOML diff <- section.key=value overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from stages.common.config import (
    ConfigError,
    changed_keys,
    dumps,
    from_dict,
    load_config,
    parse_override,
    save_json,
    to_dict,
)


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    kind: Literal["adamw", "adamw8bit"] = "adamw"


@dataclass(frozen=True)
class Model:
    channels: int = 32
    mult: tuple[int, ...] = (1, 2, 4)
    name: str = "unet"
    attention: bool = False
    dropout: float | None = None


@dataclass(frozen=True)
class Root:
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    seed: int = 0


@pytest.fixture()
def configs(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "unet.toml").write_text(
        "seed = 7\n[model]\nchannels = 16\nmult = [1, 2]\n[optim]\nkind = 'adamw8bit'\n"
    )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "unet.toml").write_text("[model]\nchanels = 16\n")
    return tmp_path


def test_defaults_round_trip_through_plain_dicts_and_json(tmp_path):
    cfg = Root()
    plain = to_dict(cfg)
    assert plain["model"]["mult"] == [1, 2, 4]  # tuples become lists for JSON / TOML
    assert from_dict(Root, plain) == cfg  # and come back as tuples
    save_json(cfg, tmp_path / "run" / "config.json")
    assert from_dict(Root, json.loads((tmp_path / "run" / "config.json").read_text())) == cfg
    assert json.loads(dumps(cfg)) == plain
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1


def test_preset_holds_only_differences_and_overrides_win(configs):
    cfg = load_config(Root, "tiny", "unet", configs_dir=configs)
    assert cfg.seed == 7 and cfg.model.channels == 16 and cfg.model.mult == (1, 2)
    assert cfg.optim.kind == "adamw8bit"
    assert cfg.optim.lr == 1e-3 and cfg.model.name == "unet"  # untouched defaults
    cfg = load_config(
        Root,
        "tiny",
        "unet",
        overrides=[
            "model.channels=64",
            "optim.lr=1",  # an integer where a float is expected is fine
            "model.mult=[1, 1, 2, 2]",
            "model.name=big-unet",  # a bare word is a string
            "model.attention=true",
            "optim.betas=[0.5, 0.9]",
            "model.dropout=0.1",
        ],
        configs_dir=configs,
    )
    assert cfg.model == Model(64, (1, 1, 2, 2), "big-unet", True, 0.1)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.5, 0.9) and cfg.seed == 7
    # a stage without a file in the preset gets the defaults
    assert load_config(Root, "tiny", "vae", configs_dir=configs) == Root()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.chanels=3", "model.chanels"),
        ("optimizer.lr=3", "optimizer"),
        ("model.channels=abc", "model.channels"),
        ("model.channels=1.5", "model.channels"),
        ("model.channels=true", "model.channels"),  # a bool is not an int
        ("model.attention=1", "model.attention"),
        ("optim.kind=sgd", "optim.kind"),
        ("optim.betas=[0.9]", "optim.betas"),  # fixed-length tuple
        ("model.mult=[1, 'x']", r"model.mult\[1\]"),
        ("model.name=[1]", "model.name"),
        ("model=3", "model"),
        ("seed.value=1", "'seed' is a value"),
        ("model.channels", "section.key=value"),
        ("=3", "empty key"),
    ],
)
def test_bad_overrides_are_rejected_naming_the_key(configs, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Root, "tiny", "unet", overrides=[override], configs_dir=configs)


def test_bad_presets_name_the_file_and_the_key(configs):
    with pytest.raises(ConfigError, match=r"broken/unet.toml.*model\.chanels"):
        load_config(Root, "broken", "unet", configs_dir=configs)
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        load_config(Root, "huge", "unet", configs_dir=configs)
    (configs / "tiny" / "clip.toml").write_text("[model\n")
    with pytest.raises(ConfigError, match="clip.toml"):
        load_config(Root, "tiny", "clip", configs_dir=configs)


def test_parse_override_reads_toml_literals():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("path=data/emoji-32") == (["path"], "data/emoji-32")
    assert parse_override("s='x=y'") == (["s"], "x=y")  # split at the first '=' only


def test_changed_keys_lists_dotted_differences():
    base = to_dict(Root())
    other = to_dict(
        dataclasses.replace(Root(), seed=3, model=dataclasses.replace(Model(), mult=(1,)))
    )
    assert changed_keys(base, other) == ["model.mult", "seed"]
    assert changed_keys(base, base) == []
    assert changed_keys({"a": {"b": 1}}, {"a": {"c": 1}}) == ["a.b", "a.c"]


@dataclass(frozen=True)
class Init:
    from_: str = field(default="", metadata={"key": "from"})


@dataclass(frozen=True)
class WithKeyword:
    init: Init = field(default_factory=Init)


def test_a_keyword_key_is_named_by_field_metadata():
    cfg = load_config(WithKeyword, overrides=["init.from=runs/tiny/unet/export"])
    assert cfg.init.from_ == "runs/tiny/unet/export"
    assert to_dict(cfg) == {"init": {"from": "runs/tiny/unet/export"}}
    assert from_dict(WithKeyword, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="init.from_"):
        load_config(WithKeyword, overrides=["init.from_=x"])
