"""``toolkit report``: the post's table from run folders, checked against numbers computed
here (numpy, ddof 1) from what the test wrote; plots, LR finder, real digits runs, bad input,
and byte-identical reports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DIGITS, ROOT, env, launch
from report_runs import write_grid, write_run
from toolkit.experiments import report
from toolkit.errors import UserError

CELL = re.compile(r"^(\S+) ± (\S+) \(n=(\d+)\)$")
ADAM_ROW, ADAMW_ROW = "Adam-L2 (optim.wd=0.0001)", "AdamW (optim.wd=0.01)"


def tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Each markdown table under its nearest heading ("h2 / h3"), as dicts by column."""
    out, h2, h3, lines = {}, "", "", md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            h2, h3 = line[3:], ""
        elif line.startswith("### "):
            h3 = line[4:]
        elif line.startswith("| ") and not lines[i - 1].startswith("|"):
            block = []
            for r in lines[i:]:
                if not r.startswith("|"):
                    break
                block.append([c.strip() for c in r.strip()[1:-1].split("|")])
            out[f"{h2} / {h3}"] = [dict(zip(block[0], r)) for r in block[2:]]
    return out


def assert_cell(text: str, values: list[float]) -> None:
    """``mean ± std (n=K)`` shows these values' mean (4 significant digits) and sample std
    (2 digits)."""
    m = CELL.match(text)
    assert m, text
    mean, std, n = float(m[1]), float(m[2]), int(m[3])
    assert n == len(values)
    assert mean == pytest.approx(np.mean(values), rel=5e-4)
    assert std == pytest.approx(np.std(values, ddof=1), rel=5e-2)


@pytest.fixture
def grid(tmp_path: Path) -> tuple[Path, dict]:
    """The 2 x 2 x 3 grid and one unfinished AdamW run whose high accuracy would show in a
    mean that counted it."""
    root = tmp_path / "grid"
    values = write_grid(root)
    write_run(root / "adamw-seed3", seed=3, evals=(0.999, 0.999, 0.999), tta=0.999,
              finished=False)
    return root, values


def test_post_table_numbers(grid, tmp_path):
    root, values = grid
    md = report.report(report.load_runs([root]), tmp_path / "out").read_text()
    t = tables(md)
    post, tta, runs = (t[f"All runs / {k}"] for k in ("valid_accuracy", "tta_accuracy", "Runs"))
    assert [r[""] for r in post] == [ADAM_ROW, ADAMW_ROW]
    for row, optim in zip(post, ("adam", "adamw")):
        assert_cell(row["without AMSGrad"], values[optim, False])  # n=3: seed3 not counted
        assert_cell(row["with AMSGrad"], values[optim, True])
    for row, optim in zip(tta, ("adam", "adamw")):
        assert_cell(row["with AMSGrad"], [v + 0.005 for v in values[optim, True]])
    # Final and best of metrics.jsonl's eval rows (v - 0.2, v + 0.01, v): best is the middle.
    adamw = next(r for r in runs if r["cell"] == ADAMW_ROW)
    assert adamw["finished"] == "3/4"
    assert_cell(adamw["final valid_accuracy"], values["adamw", False])
    assert_cell(adamw["best valid_accuracy"], [v + 0.01 for v in values["adamw", False]])
    assert float(adamw["wall time (s)"]) == pytest.approx(np.mean([1.0, 2.0, 3.0]), abs=0.05)
    assert adamw["steps"] == "30"
    assert f"- adamw-seed3 ({ADAMW_ROW}): unfinished (last step 10)" in md.splitlines()
    assert "Each optimizer's own settings: optim.wd." in md


def test_n1_and_no_tta(tmp_path):
    write_run(tmp_path / "runs" / "a", evals=(0.7, 0.8))
    md = report.report(report.load_runs([tmp_path / "runs"]), tmp_path / "out").read_text()
    post = tables(md)["All runs / valid_accuracy"]
    assert post == [{"": "AdamW", "without AMSGrad": "0.8 (n=1)", "with AMSGrad": "-"}]
    assert "tta_accuracy" not in md


def test_wd_sweep_one_table_per_value(tmp_path):
    acc = {}
    for optim in ("adam", "adamw"):
        for wd in (1e-3, 1e-2, 1e-5):
            for seed in (0, 1):
                acc.setdefault(wd, {}).setdefault(optim, []).append(v := 0.5 + wd * 10 + seed / 50)
                write_run(tmp_path / "wd" / f"{optim}-wd{wd}-seed{seed}", optim=optim, wd=wd,
                          seed=seed, evals=(v,))
    md = report.report(report.load_runs([tmp_path / "wd"]), tmp_path / "out").read_text()
    # Numeric order of wd, not the text's: 1e-05 < 0.001 < 0.01.
    assert re.findall(r"^## (optim\.wd=.*)$", md, re.M) == [
        "optim.wd=1e-05", "optim.wd=0.001", "optim.wd=0.01"]
    t = tables(md)
    for wd in (1e-5, 1e-3, 1e-2):
        post = t[f"optim.wd={wd} / valid_accuracy"]
        assert [r[""] for r in post] == ["Adam-L2", "AdamW"]
        for row, optim in zip(post, ("adam", "adamw")):
            assert_cell(row["without AMSGrad"], acc[wd][optim])
            assert row["with AMSGrad"] == "-"
    assert report.split_fields(report.load_runs([tmp_path / "wd"])) == ([], ["optim.wd"])


def test_rows_order_sgd_and_lower_is_better(tmp_path):
    """Other optimizers get their own row after the post's two; a perplexity is the main
    metric of a language model's runs, and its best is the lowest."""
    for name, optim in (("a-sgd", "sgd"), ("b-adamw", "adamw"), ("c-adam", "adam")):
        write_run(tmp_path / "lm" / name, optim=optim, metric="valid_ppl",
                  evals=(300.0, 150.0, 170.0))
    runs = report.load_runs([tmp_path / "lm"])
    assert report.main_metric(runs) == "valid_ppl"
    t = tables(report.report(runs, tmp_path / "out").read_text())
    assert [r[""] for r in t["All runs / valid_ppl"]] == ["Adam-L2", "AdamW", "SGD"]
    assert {r["best valid_ppl"] for r in t["All runs / Runs"]} == {"150 (n=1)"}
    assert {r["final valid_ppl"] for r in t["All runs / Runs"]} == {"170 (n=1)"}


def raw_rows(path: Path) -> list[dict]:
    """metrics.jsonl read here, independently: the last row of a step and kind wins."""
    rows = {}
    for line in (path / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["step"], "train_loss" in r] = r
    return [rows[k] for k in sorted(rows)]


def test_plots_and_their_series(grid, tmp_path):
    root, _ = grid
    # A resumed run logs steps 5 and 10 again: the plot must show the second rows.
    path = root / "adamw-seed0" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 5, "stage": 0, "epoch": 0.5, "lr": 0.001, '
                    '"beta1": 0.9, "train_loss": 7.5}\n')
    runs = report.load_runs([root])
    out = tmp_path / "out"
    md = report.report(runs, out).read_text()
    for key in ("train_loss", "valid_accuracy", "lr", "beta1"):
        data = report.series(runs, key)
        assert list(data) == [f"{ADAM_ROW}", f"{ADAM_ROW} + AMSGrad", ADAMW_ROW,
                              f"{ADAMW_ROW} + AMSGrad"]
        for lines in data.values():
            for name, steps, values in lines:
                rows = [r for r in raw_rows(root / name) if key in r]
                assert (steps, values) == ([r["step"] for r in rows], [r[key] for r in rows])
    seed0 = report.series(runs, "train_loss")[ADAMW_ROW][0]
    assert seed0[0] == "adamw-seed0" and seed0[2][0] == 7.5
    unfinished = report.series(runs, "train_loss")[ADAMW_ROW][-1]
    assert unfinished[0] == "adamw-seed3" and unfinished[1] == [5, 10]  # plotted, not averaged
    pngs = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert pngs == ["train_loss.png", "valid_metric.png", "schedule.png"]
    page = (out / "report.html").read_text()
    for png in pngs:
        assert f'src="{png}"' in page
        with Image.open(out / png) as im:
            assert im.width >= 400 and im.height >= 300
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.var() > 0 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2


def test_html_escapes_and_is_self_contained(tmp_path):
    write_run(tmp_path / "runs" / "a<b>&c", evals=(0.7, 0.8, 0.9), finished=False)  # listed
    out = tmp_path / "out"
    report.report(report.load_runs([tmp_path / "runs"]), out)
    page = (out / "report.html").read_text()
    assert "a&lt;b&gt;&amp;c" in page and "a<b>" not in page
    assert "<script" not in page and "http" not in page
    assert page.count("<table>") == 2


def test_same_runs_same_report(grid, tmp_path):
    root, _ = grid
    first = report.report(report.load_runs([root]), tmp_path / "one")
    copy = shutil.copytree(root, tmp_path / "elsewhere" / "grid")
    second = report.report(report.load_runs([copy]), tmp_path / "two")
    assert first.read_bytes() == second.read_bytes()
    for png in ("train_loss.png", "valid_metric.png", "schedule.png"):
        assert (tmp_path / "one" / png).read_bytes() == (tmp_path / "two" / png).read_bytes()


def test_no_wall_time_equal_reports_of_equal_runs(tmp_path):
    """Two sweeps that differ only in their timings (an interrupted one, resumed) give the
    same report without the wall time, and different ones with it."""
    write_grid(tmp_path / "a", wall_time_s=1.0)
    write_grid(tmp_path / "b", wall_time_s=9.0)
    md = {k: {w: report.report(report.load_runs([tmp_path / k]), tmp_path / f"{k}{w}",
                               wall_time=w).read_text() for w in (True, False)} for k in "ab"}
    assert md["a"][False] == md["b"][False] and "wall time" not in md["a"][False]
    assert md["a"][True] != md["b"][True]


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> tuple[Path, Path]:
    """A 20-step digits run and a digits LR range test (~15 s)."""
    base = tmp_path_factory.mktemp("real")
    launch(DIGITS, ["--output-dir", str(base / "train"), "--max-steps", "20", "--no-progress"])
    launch(DIGITS, ["--output-dir", str(base / "lrfind"), "--lr-find", "--no-progress"])
    return base / "train", base / "lrfind"


def test_real_digits_runs(real_runs, tmp_path, capsys):
    train, lrfind = real_runs
    out = tmp_path / "out"
    report.main([str(train), str(lrfind), "--out", str(out)])
    assert capsys.readouterr().out == f"{out / 'report.md'}\n"
    md = (out / "report.md").read_text()
    results = json.loads((train / "results.json").read_text())
    post = tables(md)["All runs / valid_accuracy"]
    assert post[0][""] == "AdamW"
    assert float(post[0]["without AMSGrad"].split()[0]) == pytest.approx(
        results["valid_accuracy"], rel=5e-4)
    runs = report.load_runs([train, lrfind])
    name, steps, values = report.series(runs, "valid_accuracy")["AdamW"][0]
    evals = [r for r in raw_rows(train) if "valid_accuracy" in r]
    assert (name, steps) == ("train", [r["step"] for r in evals]) and steps[-1] == 20
    assert values == [r["valid_accuracy"] for r in evals]
    # The LR range test: its suggestions and its plot.
    found = json.loads((lrfind / "lr_find.json").read_text())["suggestions"]
    assert "### lrfind" in md and "![LR range test of lrfind](lr_find-lrfind.png)" in md
    assert f"valley {found['valley']:.3g}" in md
    with Image.open(out / "lr_find-lrfind.png") as im:
        assert im.width >= 400 and im.height >= 300
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 2


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    for args, words in (([], "no run folders given"),
                        ([str(tmp_path / "empty")], f"{tmp_path / 'empty'} is not a run folder"),
                        ([str(tmp_path / "nope")], f"{tmp_path / 'nope'} does not exist")):
        with pytest.raises(UserError) as e:
            report.main(args + ["--out", str(tmp_path / "out")])
        assert words in str(e.value) and "\n" not in str(e.value)
    write_run(tmp_path / "runs" / "a")
    with pytest.raises(UserError, match=r"--metric valid_bleu is in no run's .*valid_accuracy"):
        report.main([str(tmp_path / "runs"), "--metric", "valid_bleu", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing written before the checks


def test_cli_error_line(tmp_path):
    """Through the CLI's wrapper, as ``toolkit report`` runs: exit 2 and one ``error:`` line."""
    code = ("import sys; from toolkit.cli import run; from toolkit.experiments.report import main; "
            "run(lambda: main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path} is not a run folder: expected config.json (or " \
                          "lr_find.json) in it or in its subfolders\n"
