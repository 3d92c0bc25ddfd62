import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from fastcifar import bench, cli, gate, history
from fastcifar.errors import UserError

ROOT = Path(__file__).parents[1]


def test_identical_sides_are_judged_equal_and_pass():
    judged = gate.judge([(100.0, 100.0 + d) for d in (-2, -1, 0, 0, 1, 2, 3)], max_regression=0.05)
    assert judged["low"] < 1 < judged["high"] and judged["ratio"] == 1.0
    assert not judged["regressed"] and judged["pairs"] == 7


def test_a_slowdown_past_the_threshold_is_caught_through_bursts_and_one_within_it_is_not():
    # 20 pairs slowed to 0.8, the machine's speed drifting 2x over them; two turns caught a burst
    pairs = [(rate, 0.8 * rate * (1 + 0.02 * (-1) ** i)) for i, rate in enumerate(range(50, 110, 3))]
    pairs[3], pairs[11] = (pairs[3][0], 2 * pairs[3][1]), (2 * pairs[11][0], pairs[11][1])
    judged = gate.judge(pairs, max_regression=0.05)
    assert judged["ratio"] == pytest.approx(0.8, abs=0.02) and judged["high"] < 1 and judged["regressed"]
    assert judged["geometric_mean"] != pytest.approx(judged["ratio"], abs=0.01)  # the bursts moved the mean
    assert not gate.judge(pairs, max_regression=0.25)["regressed"]  # 20% slower is within 25%


def test_a_slowdown_the_noise_cannot_tell_from_none_passes():
    # the median is 0.9, but a third of the pairs say the current side was faster
    noisy = [(100.0, c) for c in (60, 125, 70, 128, 88, 90, 91, 89, 130)]
    judged = gate.judge(noisy, max_regression=0.05)
    assert judged["ratio"] == pytest.approx(0.90) and judged["high"] > 1 and not judged["regressed"]


def test_the_sign_interval_is_the_order_statistics_of_a_95_percent_sign_test():
    ratios = [i / 100 for i in range(1, 21)]  # 20 pairs: P(Bin(20, 1/2) <= 5) = 2.1%, <= 6: 5.8%
    assert gate.sign_interval(ratios) == (0.06, 0.15)
    assert gate.sign_interval([3, 1, 2, 5, 4, 6]) == (1, 6)  # 6 pairs: the extremes (P(<= 0) = 1.6%)
    with pytest.raises(ValueError):
        gate.sign_interval([1, 2, 3, 4, 5])  # 5 pairs: even the extremes hold less than 95%


def test_the_gate_alternates_which_side_goes_first():
    orders = [("base", "current") if i % 4 in (0, 3) else ("current", "base") for i in range(8)]
    assert [o[0] for o in orders] == ["base", "current", "current", "base"] * 2  # A B, B A, B A, A B
    assert gate.turns(8) == orders


def test_an_unknown_revision_is_one_line_and_measures_nothing(capsys):
    code = cli.main(["bench", "--device", "cpu", "--quick", "--against", "no-such-revision-xyz"])
    err = capsys.readouterr().err
    assert code == 2 and "--against no-such-revision-xyz: no such revision" in err and err.count("\n") == 1


def test_a_revision_without_the_gate_or_with_another_worker_is_refused_with_the_fix(tmp_path):
    (tmp_path / "fastcifar").mkdir()
    with pytest.raises(UserError, match=r"--against v0: abc123400000 predates the A/B gate .* --compare with a saved"):
        gate.check_base(tmp_path, "v0", "abc1234" + "0" * 33)
    (tmp_path / "fastcifar" / "gate.py").write_text('PREFIX = "fastcifar-gate "\n')  # a worker taking bench flags
    with pytest.raises(UserError, match=r"worker takes other arguments .* later revision"):
        gate.check_base(tmp_path, "v1", "abc1234" + "0" * 33)
    (tmp_path / "fastcifar" / "gate.py").write_text((ROOT / "fastcifar" / "gate.py").read_text())
    gate.check_base(tmp_path, "v2", "abc1234" + "0" * 33)  # this one's


@pytest.mark.parametrize("flags,message", [
    (["--what", "eval"], "drop --what"),
    (["--baseline"], "drop --baseline"),
    (["--compare", "x.json"], "drop --compare"),
    (["--pairs", "5"], "--pairs must be at least 6"),
])
def test_against_refuses_flags_it_cannot_honour(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(gate, "against", lambda *a, **k: pytest.fail("measured despite a bad flag"))
    assert cli.main(["bench", "--device", "cpu", "--quick", "--against", "HEAD", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_pairs_without_against_is_refused(capsys):
    assert cli.main(["bench", "--device", "cpu", "--quick", "--pairs", "4"]) == 2
    assert "--pairs goes with --against REV" in capsys.readouterr().err


@pytest.mark.slow  # compiles, or runs processes: minutes on 2 cores
def test_head_against_itself(tmp_path, capsys):
    """The whole gate, two worker processes and a worktree: this tree against its own HEAD."""
    out = tmp_path / "ab.json"
    code = cli.main(["bench", "--device", "cpu", "--quick", "--against", "HEAD", "--pairs", "6", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["schema"] == gate.SCHEMA and not result["void"] and len(result["samples"]) == 6
    judged = result["judgement"]
    assert code == int(judged["regressed"]) and judged["low"] <= judged["ratio"] <= judged["high"]
    assert all(s["base"] > 0 and s["current"] > 0 for s in result["samples"])
    assert Path(result["base"]["fastcifar"]).parent.parent != Path(result["current"]["fastcifar"]).parent.parent
    assert "current / base (HEAD" in capsys.readouterr().out and judged["pairs"] == 6
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "fastcifar-ab-" not in worktrees  # the base's checkout is gone


def bench_result(tmp_path: Path, name: str, timestamp: str, sha: str, images_per_sec: float, **settings) -> None:
    base = {"device_type": "cpu", "device_name": "Xeon", "ranks": 1, "preset": "reference", "batch_size": 32,
            "amp": "torch.bfloat16", "compile": False, "channels_last": True, "loader": "torch", "quick": False}
    figure = {"median": images_per_sec, "min": images_per_sec - 1, "max": images_per_sec + 1}
    (tmp_path / name).write_text(json.dumps({
        "schema": bench.SCHEMA, "timestamp": timestamp, "git_sha": sha, "settings": {**base, **settings},
        "results": {"train_images_per_sec": figure, "mfu": {**figure, "median": 0.1}}}))


def test_history_keeps_each_device_and_setting_its_own_line(tmp_path, capsys):
    bench_result(tmp_path, "b.json", "2026-11-29T02:00:00+0000", "bbbbbbbbb1", 60.0)
    bench_result(tmp_path, "a.json", "2026-11-28T02:00:00+0000", "aaaaaaaaa1", 55.0)
    bench_result(tmp_path, "gpu.json", "2026-11-28T03:00:00+0000", "ccccccccc1", 9000.0, device_type="cuda",
                 device_name="NVIDIA H100")
    bench_result(tmp_path, "b512.json", "2026-11-28T04:00:00+0000", "ddddddddd1", 50.0, batch_size=512)
    (tmp_path / "speedrun.json").write_text('{"schema": "fastcifar-speedrun/1"}')
    groups, skipped = history.collect(tmp_path)
    assert skipped == 1 and len(groups) == 3
    series = {history.label(key): [doc["git_sha"][:3] for doc in docs] for key, docs in groups.items()}
    assert series["Xeon, batch 32, amp torch.bfloat16, compile False, loader torch, preset reference"] == ["aaa", "bbb"]
    assert cli.main(["bench", "--history", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "history.png").stat().st_size > 10_000
    table = (tmp_path / "history.md").read_text()
    assert table in out and table.count("### ") == 3
    assert "| 2026-11-28 02:00 | aaaaaaaaa | 55.0 (54.0–56.0) | 10.00% | a.json |" in table


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "no fastcifar-bench/1 results with train images/sec there"),
    (lambda p: (p / "x.json").write_text("not json"), "no fastcifar-bench/1 results"),
])
def test_history_of_a_folder_without_results_says_so(tmp_path, capsys, setup, message):
    setup(tmp_path)
    assert cli.main(["bench", "--history", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert cli.main(["bench", "--history", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def workflow_commands() -> list[str]:
    commands = []
    for path in sorted((ROOT / ".github" / "workflows").glob("speed-gate-*.yml")):
        commands += re.findall(r"^\s*(?:- )?run: (fastcifar bench .*)$", path.read_text(), re.M)
    return commands


def test_the_workflows_call_flags_the_cli_has():
    commands = workflow_commands()
    assert sum("--against" in c for c in commands) == 2  # the GPU and the CPU recipe
    for command in commands:
        argv = re.sub(r"\$\{\{[^}]*\}\}", "main", command).split()[1:]
        args = cli.build_parser().parse_args(argv)  # an unknown flag exits here
        assert args.against is None or (args.json and math.isfinite(args.max_regression) and args.pairs >= 2)
