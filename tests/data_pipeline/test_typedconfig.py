"""Typed configs: YAML + dotted overrides -> dataclasses; every mistake names its key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest

from data_pipeline.config import DataConfig, load_data_config
from data_pipeline.typedconfig import (
    ConfigError,
    apply_overrides,
    config_fields,
    from_dict,
    load_config,
    option,
    to_dict,
)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Inner:
    """A nested section."""

    size: int = option(3, "a size")
    ratio: float = option(0.5, "a ratio")
    names: list[str] = option(["a"], "names")

    def validate(self) -> None:
        if self.size < 0:
            raise ConfigError("size", "must be >= 0")


@dataclass
class Outer:
    """The top level."""

    mode: Literal["x", "y"] = option("x", "a mode")
    flag: bool = option(False, "a flag")
    path: Optional[str] = option(None, "a path")
    inner: Inner = option(Inner, "inner section")
    table: dict[int, int] = option({}, "a mapping")


def test_defaults_and_overrides_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("mode: y\ninner:\n  size: 7\n  names: [p, q]\ntable: {1: 0}\n")
    cfg = load_config(Outer, f, ["inner.ratio=0.25", "flag=true", "path=/tmp/x", "table.2=1"])
    assert cfg.mode == "y" and cfg.flag is True and cfg.path == "/tmp/x"
    assert cfg.inner.size == 7 and cfg.inner.ratio == 0.25 and cfg.inner.names == ["p", "q"]
    assert cfg.table == {1: 0, 2: 1}
    assert from_dict(Outer, to_dict(cfg)) == cfg


@dataclass
class Switch:
    """A mode whose choices YAML 1.1 reads as booleans when written bare."""

    mode: Literal["auto", "on", "off"] = option("auto", "a switch")
    other: Literal["x", "y"] = option("x", "no on/off choice")


def test_bare_on_off_select_the_on_off_literal(tmp_path: Path) -> None:
    assert load_config(Switch, None, ["mode=off"]).mode == "off"
    assert load_config(Switch, None, ["mode=on"]).mode == "on"
    f = tmp_path / "c.yaml"
    f.write_text("mode: off\n")
    assert load_config(Switch, f).mode == "off"
    with pytest.raises(ConfigError, match="got 'on'; choose one of 'x', 'y'"):  # the override's text, as written
        load_config(Switch, None, ["other=on"])
    f.write_text("other: on\n")
    with pytest.raises(ConfigError, match="got True; choose one of 'x', 'y'"):  # a YAML file is YAML
        load_config(Switch, f)


def test_mutable_defaults_are_not_shared() -> None:
    a, b = Outer(), Outer()
    a.inner.names.append("z")
    assert b.inner.names == ["a"]


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["inner.sise=3"], "inner.sise", "did you mean 'size'"),
        (["inner.size=abc"], "inner.size", "expected an integer"),
        (["inner.size=-1"], "inner.size", "must be >= 0"),
        (["mode=z"], "mode", "choose one of"),
        (["flag=3"], "flag", "true or false"),
        (["inner.names=5"], "inner.names", "expected a list"),
        (["inner.names=[1]"], "inner.names[0]", "expected a string"),
        (["inner.ratio=null"], "inner.ratio", "must not be null"),
        (["table.x=1"], "table.x", "expected an integer"),
        (["mode"], "mode", "key=value"),
        (["flag.sub=1"], "flag", "true or false"),
    ],
)
def test_errors_name_the_key(overrides: list[str], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Outer, None, overrides)
    assert info.value.key == key
    assert words in str(info.value)
    assert f"'{key}'" in str(info.value)


def test_missing_and_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Outer, lst)


def test_apply_overrides_does_not_mutate_input() -> None:
    base = {"inner": {"size": 1}}
    out = apply_overrides(base, ["inner.size=2"])
    assert base == {"inner": {"size": 1}} and out == {"inner": {"size": 2}}


def test_every_field_has_help() -> None:
    """Style rule 1: each config field carries a one-line help text."""
    import dataclasses

    def walk(cls: type) -> None:
        for name, tp, default, help_ in config_fields(cls):
            assert help_ and "\n" not in help_, f"{cls.__name__}.{name} needs a one-line help"
            if dataclasses.is_dataclass(default):
                walk(type(default))

    walk(DataConfig)


def test_shipped_data_configs_load() -> None:
    for path in sorted((REPO / "configs" / "data").glob("*.yaml")):
        cfg = load_data_config(path)
        assert cfg.window.length > 0, path


def test_data_config_cross_field_checks() -> None:
    with pytest.raises(ConfigError) as info:
        load_data_config(None, ["source.kind=recordings"])
    assert info.value.key == "source.path"
    with pytest.raises(ConfigError) as info:
        load_data_config(None, ["source.kind=hapt_package", "output.shard_windows=100", "output.chunk_windows=64"])
    assert info.value.key == "output.shard_windows"
    with pytest.raises(ConfigError) as info:
        load_data_config(
            None,
            ["source.kind=hapt_package", "split.test_subjects=[1, 2]", "split.val_subjects=['02']"],
        )
    assert info.value.key == "split.val_subjects" and "'2'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_data_config(None, ["source.kind=windows", "source.path=/x"])
    assert info.value.key == "split.method"


def test_render_config_round_trips_every_shipped_config() -> None:
    """render_config (the CLI's --print-config): every key once, with its type and help as a
    comment, and the YAML loads back to the same config."""
    import dataclasses

    import yaml

    from data_pipeline.typedconfig import from_dict, render_config, to_dict
    from timemae_dist.eval.config import EvalConfig, load_eval_config
    from timemae_dist.train.config import PretrainConfig, load_pretrain_config

    cases = [(DataConfig, load_data_config(p)) for p in sorted((REPO / "configs" / "data").glob("*.yaml"))]
    cases += [(PretrainConfig, load_pretrain_config(p, ["data.store=s", "run.name='off'", "trainer.cpu_dropout=off"]))
              for p in sorted((REPO / "configs" / "pretrain").glob("*.yaml"))]
    cases += [(EvalConfig, load_eval_config(p)) for p in sorted((REPO / "configs" / "eval").glob("*.yaml"))]
    assert len(cases) >= 5
    for cls, cfg in cases:
        text = render_config(cfg)
        assert from_dict(cls, yaml.safe_load(text)) == cfg, cls
        assert to_dict(from_dict(cls, yaml.safe_load(text))) == to_dict(cfg)

        def count(c) -> int:
            return sum(1 + (count(getattr(c, f.name)) if dataclasses.is_dataclass(getattr(c, f.name)) else 0)
                       for f in dataclasses.fields(c))

        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert len(lines) == count(cfg) and all("  # " in ln for ln in lines), cls
    text = render_config(load_pretrain_config(REPO / "configs" / "pretrain" / "har.yaml", ["data.store=s"]))
    assert "  micro_batch_size: 128  # (int) windows per worker per forward/backward" in text.splitlines()


def test_text_keys_take_overrides_as_written() -> None:
    """With the config class, a str / Literal-of-str key keeps the override's text (YAML would make
    `off` a boolean and `2026-12-03` a date); quoting forces YAML; null stays null where allowed;
    other types are still YAML-typed and checked."""
    from timemae_dist.train.config import load_pretrain_config

    cfg = load_pretrain_config(None, ["data.store=2026", "run.name=off", "trainer.cpu_dropout=off",
                                      "model.encoder.pretrained=null", "run.storage_path=2026-12-03"])
    assert cfg.data.store == "2026" and cfg.run.name == "off" and cfg.trainer.cpu_dropout == "off"
    assert cfg.model.encoder.pretrained is None and cfg.run.storage_path == "2026-12-03"
    assert load_pretrain_config(None, ["data.store=s", "run.name='yes'"]).run.name == "yes"
    with pytest.raises(ConfigError) as info:
        load_pretrain_config(None, ["data.store=s", "trainer.num_workers=two"])
    assert info.value.key == "trainer.num_workers"
    with pytest.raises(ConfigError) as info:
        load_pretrain_config(None, ["data.store=s", "trainer.cpu_dropout=sometimes"])
    assert info.value.key == "trainer.cpu_dropout"
    cfg = load_data_config(None, ["source.kind=hapt_package", "name=2026", "output.path=on"])
    assert cfg.name == "2026" and cfg.output.path == "on"


def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads `1e-4` as text; float keys accept it, in overrides and files."""
    from timemae_dist.train.config import load_pretrain_config

    cfg = load_pretrain_config(None, ["data.store=s", "deepspeed.lr=1e-4", "model.alpha=5E0", "deepspeed.eps=+1e-8"])
    assert cfg.deepspeed.lr == 1e-4 and cfg.model.alpha == 5.0 and cfg.deepspeed.eps == 1e-8
    f = tmp_path / "p.yaml"
    f.write_text("data:\n  store: s\ndeepspeed:\n  lr: 3e-4\n")
    assert load_pretrain_config(f).deepspeed.lr == 3e-4
    with pytest.raises(ConfigError) as info:
        load_pretrain_config(None, ["data.store=s", "deepspeed.lr=1e-4x"])
    assert info.value.key == "deepspeed.lr"
