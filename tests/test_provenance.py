"""env.json names the code a run used: commit, dirty flag, a patch rebuilding a dirty tree, a source hash."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from deqlm.infra.provenance import code_provenance, env_record, source_hash
from deqlm.infra.run_folder import RunFolder, patch_name

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "model.py").write_text("WIDTH = 64\n")
    (repo / "pkg" / "solver.py").write_text("CAP = 12\n")
    (repo / "exp.yaml").write_text("lr: 3.0e-3\n")
    (repo / ".gitignore").write_text("runs/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "start")
    return repo


def _tree(root: Path) -> dict[str, bytes]:
    """Every file and symlink of a checkout but .git and the ignored runs/: contents, or link targets."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if ".git" in rel.parts or "runs" in rel.parts:
            continue
        if p.is_symlink():
            out[rel.as_posix()] = b"-> " + os.fsencode(os.readlink(p))
        elif p.is_file():
            out[rel.as_posix()] = p.read_bytes()
    return out


def test_dirty_checkout_patch_reapplies_to_its_commit(tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    (repo / "data.bin").write_bytes(bytes(range(256)))
    (repo / "old name.py").write_text("X = 1\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "more")
    (repo / "pkg" / "model.py").write_text("WIDTH = 128\n")  # unstaged change
    (repo / "exp.yaml").write_text("lr: 1.0e-3\n")
    _git(repo, "add", "exp.yaml")  # staged change
    (repo / "pkg" / "solver.py").unlink()  # deleted
    _git(repo, "mv", "old name.py", "new name.py")  # renamed, with a space
    (repo / "data.bin").write_bytes(bytes(range(255, -1, -1)))  # binary
    (repo / "pkg" / "sub" / "deep").mkdir(parents=True)
    (repo / "pkg" / "sub" / "deep" / "block.py").write_text("LAYERS = 4\n")  # untracked, nested
    (repo / "dangling").symlink_to("nowhere")  # untracked symlink to nothing
    (repo / "runs").mkdir()
    (repo / "runs" / "out.txt").write_text("ignored\n")
    # a configuration that would make a plain `git diff` unreadable to `git apply`
    for i, (key, value) in enumerate((("diff.noprefix", "true"), ("color.ui", "always"),
                                      ("color.diff", "always"))):
        monkeypatch.setenv(f"GIT_CONFIG_KEY_{i}", key)
        monkeypatch.setenv(f"GIT_CONFIG_VALUE_{i}", value)
    monkeypatch.setenv("GIT_CONFIG_COUNT", "3")
    info, patch = code_provenance(repo)
    assert info["git_sha"] == _git(repo, "rev-parse", "HEAD") and info["git_dirty"] is True
    assert patch and b"runs/out.txt" not in patch and b"\x1b[" not in patch

    monkeypatch.delenv("GIT_CONFIG_COUNT")
    rebuilt = tmp_path / "rebuilt"
    _git(tmp_path, "clone", "-q", str(repo), str(rebuilt))
    _git(rebuilt, "checkout", "-q", info["git_sha"])
    (tmp_path / "code.patch").write_bytes(patch)
    _git(rebuilt, "apply", "--check", str(tmp_path / "code.patch"))
    _git(rebuilt, "apply", str(tmp_path / "code.patch"))
    assert _tree(rebuilt) == _tree(repo)


def test_clean_checkout_records_its_commit_and_no_patch(tmp_path):
    repo = _repo(tmp_path)
    (repo / "runs").mkdir()
    (repo / "runs" / "metrics.jsonl").write_text("{}\n")  # ignored output does not make the tree dirty
    info, patch = code_provenance(repo)
    assert info["git_dirty"] is False and patch is None and len(info["git_sha"]) == 40


def test_source_hash_follows_content_not_timestamps(tmp_path):
    repo = _repo(tmp_path)
    before = source_hash(repo)
    assert before["source_files"] == 2  # the .py files only
    (repo / "pkg" / "model.py").touch()
    (repo / "exp.yaml").write_text("lr: 9\n")
    assert source_hash(repo) == before
    (repo / "pkg" / "solver.py").write_text("CAP = 30\n")
    assert source_hash(repo)["source_sha256"] != before["source_sha256"]


def test_code_outside_a_checkout_is_still_named_by_its_source_hash(tmp_path):
    code = tmp_path / "copy"
    code.mkdir()
    (code / "model.py").write_text("WIDTH = 64\n")
    info, patch = code_provenance(code)
    assert info["git_sha"] is None and info["git_dirty"] is None and patch is None
    assert info["source_sha256"] == source_hash(code)["source_sha256"]


def test_write_env_puts_the_patch_beside_the_env_file_it_names_only_for_a_dirty_checkout(tmp_path,
                                                                                       monkeypatch):
    import deqlm.infra.provenance as provenance

    repo = _repo(tmp_path)
    monkeypatch.setattr(provenance, "_package_dir", lambda: repo)
    clean_dir, dirty_dir = tmp_path / "clean", tmp_path / "dirty"
    clean_dir.mkdir()
    dirty_dir.mkdir()
    clean = RunFolder(clean_dir).write_env(*env_record(torch.device("cpu")))
    assert clean["git_dirty"] is False and clean["git_patch"] is None and not list(clean_dir.glob("*.patch"))
    assert clean["source_sha256"] == source_hash(repo)["source_sha256"]
    (repo / "pkg" / "model.py").write_text("WIDTH = 256\n")
    dirty = RunFolder(dirty_dir).write_env(*env_record(torch.device("cpu")), resume_step=400)
    saved = json.loads((dirty_dir / "env-resume-400.json").read_text())
    assert saved == json.loads(json.dumps(dirty)) and saved["git_dirty"] is True
    assert saved["git_patch"] == patch_name("env-resume-400.json") == "code-resume-400.patch"
    assert b"WIDTH = 256" in (dirty_dir / "code-resume-400.patch").read_bytes()


ROOT = Path(__file__).resolve().parents[1]


def test_a_run_of_record_names_its_commit_and_its_small_files_collect_without_checkpoints(tmp_path):
    sha = _git(ROOT, "rev-parse", "HEAD")
    script = ROOT / "scripts" / "run_of_record.sh"
    env = {**os.environ, "RUNS_ROOT": str(tmp_path)}
    tree = tmp_path / f"run-{sha[:7]}"
    try:
        out = subprocess.run([str(script), "HEAD", "experiments/debug/transformer_xl.yaml",
                              "train.max_steps=2", "train.eval_every=2", "train.ckpt_every=2",
                              "log.progress=false", "log.wandb_mode=disabled"],
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr
        (run,) = (tree / "results" / "runs").glob("*/*/*")
        saved = json.loads((run / "env.json").read_text())
        assert saved["git_sha"] == sha and saved["git_dirty"] is False and saved["git_patch"] is None
        dest = Path(subprocess.run([str(script), "collect", str(run), str(tmp_path / "record")],
                                   capture_output=True, text=True, check=True).stdout.strip())
        assert sorted(p.name for p in dest.iterdir()) == ["config.yaml", "env.json", "metrics.jsonl"]
        bad = subprocess.run([str(script), "no-such-commit", "x.yaml"], env=env, capture_output=True,
                             text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a commit" in bad.stderr
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
