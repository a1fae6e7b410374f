import json
from dataclasses import dataclass

import pytest

from latentct.util.settings import SettingsError, check, load_settings, parse_settings, save_settings, setting


@dataclass
class Demo:
    test_fraction: float = setting(0.2, "share of patients held out")
    size: int = setting(128, "image side")
    overwrite: bool = setting(False, "replace outputs")
    labels: str | None = setting(None, "optional CSV")
    betas: tuple[float, float] = setting((0.5, 0.999), "Adam betas")
    mode: str = setting("proj", "deformator type", choices=("proj", "ortho"))

    def __post_init__(self):
        check(self.size >= 8, "size", f"must be at least 8, got {self.size}")


def test_defaults_and_both_flag_spellings():
    assert parse_settings(Demo, []) == Demo()
    assert parse_settings(Demo, ["--test-fraction", "0.3"]).test_fraction == 0.3
    assert parse_settings(Demo, ["--test_fraction", "0.4"]).test_fraction == 0.4


def test_bool_none_tuple_and_choice_values():
    assert parse_settings(Demo, ["--overwrite"]).overwrite is True
    assert parse_settings(Demo, ["--overwrite", "false"]).overwrite is False
    assert parse_settings(Demo, ["--overwrite", "true", "--no-overwrite"]).overwrite is False
    assert parse_settings(Demo, ["--labels", "a.csv"]).labels == "a.csv"
    assert parse_settings(Demo, ["--labels", "none"]).labels is None
    assert parse_settings(Demo, ["--betas", "0.0", "0.9"]).betas == (0.0, 0.9)
    assert parse_settings(Demo, ["--mode", "ortho"]).mode == "ortho"


@pytest.mark.parametrize("argv, named", [
    (["--sise", "64"], "--sise"),
    (["--size", "big"], "--size"),
    (["--size", "4"], "--size"),
    (["--overwrite", "maybe"], "--overwrite"),
    (["--mode", "fc"], "--mode"),
])
def test_errors_are_one_line_naming_the_flag(argv, named):
    with pytest.raises(SettingsError) as err:
        parse_settings(Demo, argv, prog="demo.py")
    message = str(err.value)
    assert named in message and "\n" not in message


def test_cli_errors_exit_with_one_line(monkeypatch):
    monkeypatch.setattr("sys.argv", ["demo.py", "--size", "x"])
    with pytest.raises(SystemExit) as err:
        parse_settings(Demo)
    assert str(err.value).startswith("demo.py: ") and "--size" in str(err.value) and "\n" not in str(err.value)


def test_presets_apply_and_flags_override_them():
    presets = {"tiny": {"size": 32, "overwrite": True}}
    cfg = parse_settings(Demo, ["--preset", "tiny"], presets=presets)
    assert (cfg.size, cfg.overwrite) == (32, True)
    assert parse_settings(Demo, ["--preset", "tiny", "--size", "64"], presets=presets).size == 64
    with pytest.raises(SettingsError, match="--preset"):
        parse_settings(Demo, ["--preset", "huge"], presets=presets)


def test_resolved_settings_round_trip_through_json(tmp_path):
    cfg = parse_settings(Demo, ["--size", "64", "--betas", "0.1", "0.2"])
    save_settings(cfg, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["size"] == 64 and saved["betas"] == [0.1, 0.2]
    assert load_settings(Demo, tmp_path / "config.json") == cfg


@dataclass
class Trainer:
    steps: int = setting(100, "optimiser steps", replaces=("epochs",))
    epochs: float | None = setting(None, "passes; sets steps")
    lr: float = setting(1e-3, "learning rate")


def test_an_explicit_flag_beats_what_a_preset_derives():
    presets = {"long": {"epochs": 50.0, "lr": 1e-4}}
    cfg = parse_settings(Trainer, ["--preset", "long"], presets=presets)
    assert (cfg.steps, cfg.epochs, cfg.lr) == (100, 50.0, 1e-4)  # the preset's epochs will set the steps
    cfg = parse_settings(Trainer, ["--preset", "long", "--steps", "2"], presets=presets)
    assert (cfg.steps, cfg.epochs, cfg.lr) == (2, None, 1e-4)  # typed --steps wins over the preset's epochs
    cfg = parse_settings(Trainer, ["--preset", "long", "--steps", "2", "--epochs", "3"], presets=presets)
    assert (cfg.steps, cfg.epochs) == (2, 3.0)  # both typed: epochs decides, as documented


def test_inherited_settings_are_listed_after_the_scripts_own(capsys):
    from Training import TrainGAN

    with pytest.raises(SystemExit):
        parse_settings(TrainGAN.Settings, ["--help"], presets=TrainGAN.PRESETS)
    text = capsys.readouterr().out
    assert text.index("--ngf") < text.index("--checkpoint-every") and "--display-window" in text
