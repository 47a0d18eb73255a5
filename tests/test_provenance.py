"""Every run records what made it: provenance.json (one record per start: command, versions,
device, world size, git commit) and the diff of uncommitted changes beside it."""

from __future__ import annotations

import json
import subprocess
from importlib import metadata

import torch

from conftest import DIGITS, ROOT, launch
from toolkit import provenance


def test_a_run_and_its_resume_record_what_made_them(tmp_path):
    out = tmp_path / "run"
    args = ["--output-dir", str(out), "--max-steps", "4", "--no-progress"]
    launch(DIGITS, args)
    launch(DIGITS, [*args, "--resume", "auto"])
    first, second = json.loads((out / "provenance.json").read_text())
    assert (first["start"], second["start"]) == (0, 1)
    assert second["command"][-2:] == ["--resume", "auto"]
    assert first["versions"] == {"python": first["versions"]["python"],
                                 "torch": torch.__version__,
                                 "accelerate": metadata.version("accelerate"),
                                 "deepspeed": metadata.version("deepspeed"),
                                 "cuda": torch.version.cuda}
    assert first["toolkit"] == metadata.version("toolkit")
    assert first["world_size"] == 1 and first["device"].startswith("cpu (")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode == 0:  # a clone: the commit, and the diff when there is one
        assert first["git_commit"] == head.stdout.strip()
        if first["git_dirty"]:
            assert (out / first["diff"]).read_text().startswith("diff --git")


def test_git_state_names_the_commit_the_changes_and_new_files(tmp_path, monkeypatch):
    repo = tmp_path / "code"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    monkeypatch.setattr(provenance, "CODE", repo)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert provenance.git_state() == (commit.strip(), None, [])
    (repo / "a.py").write_text("x = 2\n")
    (repo / "b.py").write_text("new\n")
    commit2, diff, untracked = provenance.git_state()
    assert commit2 == commit.strip() and "-x = 1\n+x = 2" in diff and untracked == ["b.py"]
    monkeypatch.setattr(provenance, "CODE", tmp_path / "not-a-repo")
    assert provenance.git_state() == (None, None, [])
