"""The CLI as a user meets it: help for every option, a preset's values in --help, runs from a config file."""

import argparse
import json

import pytest

from fastcifar import cli, runs
from fastcifar.config import PRESETS, TrainConfig

TINY = ["--synthetic", "--device", "cpu", "--loader", "torch", "--subset", "32", "--test-subset", "16",
        "--batch-size", "16", "--amp", "off", "--no-report"]


def options(parser: argparse.ArgumentParser, path=()):
    """(command path, action) of every option and argument, through the subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from options(sub, (*path, name))
        else:
            yield path, action


def test_every_option_of_every_command_has_help():
    missing = [(" ".join(path), action.option_strings or action.dest) for path, action in options(cli.build_parser())
               if not action.help]
    assert missing == []
    assert {path for path, _ in options(cli.build_parser())} >= {("train",), ("speedrun",), ("eval",), ("report",),
                                                                  ("bench",), ("profile",), ("data", "prepare")}


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        cli.main([*argv, "--help"])
    assert exit.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_gives_the_named_presets_values_as_defaults(capsys):
    assert "training epochs (default: 20)" in help_of(["train"], capsys)  # the reference
    fast = help_of(["train", "--preset", "fast"], capsys)
    assert f"training epochs (default: {PRESETS['fast'].epochs})" in fast
    assert f"OneCycle's peak learning rate (default: {PRESETS['fast'].lr})" in fast
    assert "Nesterov momentum (default: on)" in fast and "recipe:" in fast and "test views and evaluation:" in fast
    speedrun = help_of(["speedrun"], capsys)  # a speedrun's own defaults beside fast's
    assert "(0: the last only) (default: 0)" in speedrun and "(0: only the last) (default: 0)" in speedrun
    assert "(0: the last only) (default: 1)" in help_of(["train"], capsys)


def test_train_from_a_runs_config_json_with_an_override(tmp_path, capsys):
    first = tmp_path / "first"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(first)]) == 0
    saved = runs.read_json(first / "config.json")
    code = cli.main(["train", "--config", str(first / "config.json"), "--epochs", "2", "--lr", "0.01",
                     "--out", str(tmp_path / "second")])
    assert code == 0, capsys.readouterr().err
    again = runs.read_json(tmp_path / "second" / "config.json")
    assert again == {**saved, "epochs": 2, "lr": 0.01, "out": str(tmp_path / "second")}
    assert len(runs.read_metrics(tmp_path / "second" / "metrics.jsonl")) == 2
    # without --out the config's folder is not reused: a new run gets a new one
    args = cli.build_parser().parse_args(["train", "--config", str(first / "config.json")])
    assert cli.config_from_args(args).out is None


def test_a_hand_written_config_keeps_the_defaults_it_does_not_name(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"epochs": 3, "lr": 0.1}))
    config = cli.config_from_args(cli.build_parser().parse_args(["train", "--config", str(path)]))
    assert config == TrainConfig(epochs=3, lr=0.1, compile_cache_dir=config.compile_cache_dir)


@pytest.mark.parametrize("content, message", [
    ({"epochs": 3, "colour": "red"}, "unknown config keys ['colour']"),
    ({"epochs": "ten"}, "wrong type"),
    ([1, 2], "not a JSON object"),
    ("{", "not valid JSON"),
])
def test_a_bad_config_file_is_one_line_naming_the_problem(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    code = cli.main(["train", "--config", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(path) in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_config_and_preset_together_are_refused(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text("{}")
    code = cli.main(["train", "--config", str(path), "--preset", "fast"])
    assert code == 2 and "give one of them" in capsys.readouterr().err


def test_a_speedrun_from_a_config_file_is_named_as_such(tmp_path, capsys):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"epochs": 1, "synthetic": True, "device": "cpu", "loader": "torch", "subset": 16,
                                "test_subset": 16, "batch_size": 16, "amp": "off", "report": False}))
    out = tmp_path / "result.json"
    code = cli.main(["speedrun", "--config", str(path), "--seeds", "1", "--out", str(tmp_path / "runs"),
                     "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["preset"] == "config" and result["config"]["epochs"] == 1 and result["config"]["lr"] == 0.05
