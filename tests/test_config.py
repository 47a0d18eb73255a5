"""Config: a bad value stops the run with one line naming it and what is allowed; flags
override presets in both ``--a.b=v`` and ``--a.b v`` forms; config.json records the
resolved values.

Parsing is tested in-process on the recipes' own config classes; the exit paths
(one ``error:`` line, exit 2, nothing written) run ``tests/tiny.py`` as a real program.
"""

from __future__ import annotations

import json
import os
import re
from types import ModuleType

import pytest

from conftest import TINY, launch
from toolkit.checkpoint import list_checkpoints
from toolkit import recipe
from toolkit.config import parse, to_dict
from toolkit.errors import UserError


@pytest.fixture(scope="module")
def digits() -> ModuleType:
    from recipes import digits
    return digits


@pytest.fixture(scope="module")
def tiny() -> ModuleType:
    import tiny  # tests/ is on the path of the tests
    return tiny


def one_error_line(stderr: str) -> str:
    """The single non-empty stderr line of a run that stopped on a UserError."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def flat(text: str) -> str:
    """tyro's boxed output with box characters and line wrapping removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


# ---- bad values: UserError naming the value and the allowed range --------------------------

@pytest.mark.parametrize("args, expected", [
    (["--optim.lr=-1"], ["lr=-1", "> 0"]),
    (["--optim.lr", "0"], ["lr=0", "> 0"]),
    (["--optim.betas", "0.9", "1.0"], ["betas[1]=1.0", "[0, 1)"]),
    (["--optim.eps=0"], ["eps=0", "> 0"]),
    (["--optim.wd=-0.1"], ["=-0.1", ">= 0"]),
    (["--schedule.div=0"], ["div=0", "> 0"]),
    (["--schedule.pct=1.5"], ["pct=1.5", "(0, 1)"]),
    (["--schedule.moms", "0.95", "1.2"], ["moms=(0.95, 1.2)", "[0, 1)"]),
    (["--max-steps=-3"], ["max_steps=-3", ">= 1"]),
    (["--keep-checkpoints", "1"], ["keep_checkpoints=1", ">= 2"]),
    (["--preset", "huge"], ["'huge'", "default, adam-l2, sgd"]),
    (["--preset=huge"], ["'huge'", "default, adam-l2, sgd"]),
    # Combinations, the recipe's own fields, and non-finite numbers in every section.
    (["--optim.name", "sgd", "--optim.nesterov", "--optim.momentum", "0"],
     ["nesterov", "momentum > 0"]),
    (["--optim.name", "sgd", "--optim.impl", "compiled"], ["compiled", "adam and adamw"]),
    (["--optim.lr-mults"], ["--optim.lr-mults=()", "one value > 0"]),
    (["--optim.lr-mults", "1", "-2"], ["--optim.lr-mults=(1.0, -2.0)", "> 0"]),
    (["--dropout", "1.5"], ["--dropout=1.5", "[0, 1)"]),
    (["--width", "-1"], ["--width=-1", ">= 1"]),
    (["--width", "0"], ["--width=0", ">= 1"]),
    (["--optim.wd", "inf"], ["--optim.wd=inf", "finite"]),
    (["--optim.lr", "inf"], ["--optim.lr=inf", "finite"]),
    (["--optim.eps", "nan"], ["--optim.eps=nan", "finite"]),
    (["--optim.betas", "0.9", "inf"], ["--optim.betas=(0.9, inf)", "finite"]),
    (["--schedule.div", "inf"], ["--schedule.div=inf", "finite"]),
    (["--schedule.final-frac", "nan"], ["--schedule.final-frac=nan", "finite"]),
    (["--clip", "inf"], ["--clip=inf", "finite"]),
    (["--dropout", "nan"], ["--dropout=nan", "finite"]),
    # What tyro itself rejects: its panel becomes one line.
    (["--optim.name", "lamb"], ["'lamb'", "'adamw', 'adam', 'sgd'", "--optim.name"]),
    (["--optim.lr", "fast"], ["--optim.lr", "'fast'"]),
    (["--epochs", "x"], ["--epochs", "'x'"]),
    (["--no-such-flag", "3"], ["Unrecognized options: --no-such-flag"]),
])
def test_bad_value_raises_user_error(digits, args, expected):
    with pytest.raises(UserError) as e:
        parse(digits.PRESETS, args)
    message = str(e.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize("args, expected", [
    (["--dropouts", "0.1", "0.1", "1.2", "0", "0"], "--dropouts=(0.1, 0.1, 1.2, 0.0, 0.0)"),
    (["--cutoffs", "100", "50"], "--cutoffs=(100, 50) must be increasing"),
    (["--alpha", "-1"], "--alpha=-1.0 must be >= 0"),
    (["--bptt", "0"], "--bptt=0 must be >= 1"),
    (["--hidden-size", "0"], "--hidden-size=0 must be >= 1"),
    (["--cache-theta", "inf"], "--cache-theta=inf is not a finite number"),
    (["--batching", "keras"], "'keras'"),
])
def test_bad_value_in_wt2_recipe(args, expected):
    from recipes import wt2
    with pytest.raises(UserError) as e:
        parse(wt2.PRESETS, ["--preset", "cpu", *args])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_bad_value_in_tiny_recipe(tiny):
    with pytest.raises(UserError, match=r"lr=-1\.0 must be > 0"):
        parse({"default": tiny.Config}, ["--optim.lr=-1"])


@pytest.mark.parametrize("flag", ["--local_rank=1", "--local-rank=1", "--local_rank 1"])
def test_launchers_local_rank_is_accepted(digits, flag, monkeypatch):
    """``deepspeed`` passes ``--local_rank=N`` to every worker."""
    monkeypatch.setenv("LOCAL_RANK", "")  # so that the test's own value is undone after it
    monkeypatch.delenv("LOCAL_RANK")
    cfg = parse(digits.PRESETS, [*flag.split(), "--epochs", "3"])
    assert cfg.train.epochs == 3
    assert os.environ["LOCAL_RANK"] == "1"


# ---- overrides and presets -------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--optim.lr=0.003"], ["--optim.lr", "0.003"]])
def test_override_both_forms(digits, args):
    cfg = parse(digits.PRESETS, args)
    assert cfg.optim.lr == 0.003
    assert cfg.optim.wd == 1e-2 and cfg.schedule.div == 10  # the rest stays as the preset has it


def test_top_level_flags_land_in_train(digits):
    cfg = parse(digits.PRESETS, ["--epochs", "3", "--max-steps", "5", "--output-dir", "X",
                                 "--seed", "4", "--resume", "auto", "--lr-find"])
    t = cfg.train
    assert (t.epochs, t.max_steps, t.output_dir, t.seed, t.resume, t.lr_find) == \
        (3, 5, "X", 4, "auto", True)
    assert t.batch_size == 64  # the recipe's own default, untouched


def test_preset_then_flags(digits):
    assert parse(digits.PRESETS, []).optim.name == "adamw"
    cfg = parse(digits.PRESETS, ["--preset", "adam-l2"])
    assert cfg.optim.name == "adam" and cfg.optim.wd == 1e-4
    cfg = parse(digits.PRESETS, ["--optim.lr", "0.02", "--preset=adam-l2", "--optim.amsgrad"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.wd, cfg.optim.amsgrad) == \
        ("adam", 0.02, 1e-4, True)


def test_help_lists_flags_with_defaults(digits, capsys, monkeypatch):
    # What `python recipes/digits.py --help` does, without paying for a second interpreter.
    with pytest.raises(SystemExit) as e:
        recipe.main(digits.PRESETS, digits.build, digits.__doc__, ["--help"])
    assert e.value.code in (0, None)
    out = flat(capsys.readouterr().out)
    assert "--preset NAME" in out and "adam-l2" in out
    defaults = {"--optim.lr": "0.01", "--schedule.div": "10", "--epochs": "15",
                "--output-dir": "runs/digits", "--resume": "None", "--lr-find": "False"}
    for flag, default in defaults.items():
        shown = re.search(re.escape(flag) + r"[ ,].*?\(default: ([^)]*)\)", out)
        assert shown and shown.group(1) == default, (flag, shown and shown.group(0))


# ---- exit paths of a real run ------------------------------------------------------------------

def test_bad_value_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = launch(TINY, ["--optim.lr=-1", "--output-dir", str(out)], check=False)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "lr=-1" in line and "> 0" in line
    assert not out.exists()


def test_lr_mults_for_another_number_of_layer_groups_exits_2(tmp_path):
    out = tmp_path / "run"
    proc = launch(TINY, ["--optim.lr-mults", "1", "2", "--output-dir", str(out)], check=False)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "--optim.lr-mults has 2 values (1.0, 2.0)" in line and "1 layer group" in line
    assert not out.exists()


def test_non_finite_loss_exits_2_with_one_line(tmp_path):
    out = tmp_path / "run"
    # SGD at lr 1e12 overflows within a few steps; a checkpoint every step shows which were saved.
    proc = launch(TINY, ["--optim.name", "sgd", "--optim.lr", "1e12", "--max-steps", "6",
                         "--checkpoint-every", "1", "--keep-checkpoints", "10",
                         "--output-dir", str(out)], check=False)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert line.startswith("error: non-finite loss") and "--optim.lr" in line
    bad_step = int(re.search(r"at step (\d+)", line).group(1))
    # Checkpoints of the steps before are fine; the diverged step must not get one.
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == list(range(1, bad_step))


def test_config_json_holds_resolved_values(tmp_path, tiny):
    out = tmp_path / "run"
    args = ["--max-steps", "3", "--optim.lr", "0.003", "--schedule.div=25", "--seed", "4",
            "--output-dir", str(out)]
    launch(TINY, args)
    saved = json.loads((out / "config.json").read_text())
    assert saved["optim"]["lr"] == 0.003 and saved["schedule"]["div"] == 25
    assert saved["train"]["max_steps"] == 3 and saved["train"]["output_dir"] == str(out)
    assert saved["optim"]["betas"] == [0.95, 0.99] and saved["examples"] == 320  # defaults too
    expected = json.loads(json.dumps(to_dict(parse({"default": tiny.Config}, args)), default=str))
    assert saved == expected
