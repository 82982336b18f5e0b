"""A plain clone has everything the README's two commands need; nothing points outside it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not match its own patterns.
OUTSIDE = re.compile("|".join([
    r"\.\./(\.\./)*" + "shared",            # the build machines' data folder beside a checkout
    "/" + "work/", "/" + "home/", "/" + "Users/", "/" + "root/", "/" + "mnt/",
    r"[A-Z]:\\\\" + "Users",
]))


def _repo_files() -> list[Path]:
    """Tracked files plus untracked ones git would add (so uncommitted work is checked too)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [ROOT / f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def git_checkout():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout (runs in CI and every development clone)")


def test_nothing_in_the_repository_points_outside_it(git_checkout):
    bad = []
    for f in _repo_files():
        if f.suffix in (".gz", ".parquet", ".png", ".safetensors"):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not bad, "paths outside the repository:\n" + "\n".join(bad)


def test_shipped_examples_read_only_files_inside_the_repository():
    from charter.pipeline_file import load_pipeline_file

    for path in sorted((ROOT / "examples").glob("*.yaml")):
        pf = load_pipeline_file(path)
        for p in (pf.cfg.constitution, pf.harmful.path, pf.benign.path):
            resolved = Path(p).resolve()
            assert resolved.is_file(), (path.name, p)
            assert resolved.is_relative_to(ROOT), (path.name, p)


def test_shipped_data_has_sources_and_licences():
    readme = (ROOT / "examples" / "data" / "README.md").read_text(encoding="utf-8")
    for f in (ROOT / "examples" / "data").iterdir():
        if f.name.endswith((".jsonl", ".gz", ".parquet", ".csv")):
            assert f"`{f.name}`" in readme, f"{f.name} has no source/licence row"
    assert "Copyright (c) 2022 Anthropic" in readme and "Apache" in readme


def test_a_fresh_clone_checks_the_quickstart_with_nothing_outside_it(git_checkout, tmp_path):
    """`git clone` of this checkout (so: its committed HEAD, what CI sees; uncommitted edits are
    not in the clone), then `charter run examples/quickstart.yaml --check` inside the clone with
    the clone's own code first on the path."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True,
                   capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(clone)}
    r = subprocess.run([sys.executable, "-m", "charter.cli", "run", "examples/quickstart.yaml",
                        "--check"], cwd=clone, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ok: 5 stages" in r.stdout
    # every path the plan names is inside the clone
    for m in re.finditer(r'"(/[^"]+)"', r.stdout):
        p = m.group(1)
        if Path(p).exists() and not p.startswith(sys.prefix):
            assert Path(p).resolve().is_relative_to(clone.resolve()), p
