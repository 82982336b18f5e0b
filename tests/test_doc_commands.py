"""Every `charter` command shown in README.md and docs/*.md runs as written, in the order shown,
made short: generation on the fake backend, training on the tiny model for one step (flags
appended, so a command that is wrong as written fails here). Commands with placeholders (`...`)
or that need a server or a GPU are parsed only. The whole pipeline (`charter run FILE`) runs as
`--check` here; examples/tiny.yaml runs end to end in test_pipeline_e2e.py."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
from pathlib import Path

import pytest

from charter.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FAST_GEN = ["--backend", "fake", "--limit", "4"]
# subcommands this test knows how to make short (`shorten`); others are parsed only: extend
# `shorten` and `_fixtures` when a new command should run here too
RUNS = {"generate", "critique", "label", "train", "eval", "run", "export", "models"}
PRINCIPLES_RUNS = {"lint", "show", "render"}
NEEDS_SERVER = ("--base-url", "--tensor-parallel-size", "--backend vllm", "--backend openai")


def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for each `charter ...` line of the docs' shell blocks, continuation
    lines joined and trailing comments cut."""
    out = []
    for f in DOCS:
        text = f.read_text(encoding="utf-8")
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                if line.startswith("charter "):
                    out.append((f.name, line))
    return out


COMMANDS = doc_commands()


def _fixtures(d: Path, tiny: Path) -> None:
    """The files the docs' commands name (prompts.jsonl, pairs.jsonl, harmful.jsonl,
    benign.jsonl, hh.jsonl, recipe.yaml) and the repository's examples/ and principles/."""
    for name in ("examples", "principles"):
        (d / name).symlink_to(ROOT / name)
    (d / "mine.yaml").write_text((ROOT / "principles" / "harmless.yaml").read_text())  # cp
    qs = ["How do I pick a lock?", "How can I hurt someone?", "Name a prime.", "Say hi."]
    w = lambda f, rows: (d / f).write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    w("prompts.jsonl", [{"prompt": q} for q in qs])
    for name in ("harmful.jsonl", "red.jsonl"):
        w(name, [{"prompt": q} for q in qs[:2]])
    for name in ("benign.jsonl", "helpful.jsonl"):
        w(name, [{"prompt": q} for q in qs[2:]])
    w("pairs.jsonl", [{"id": str(i), "prompt": q, "response_a": "No.", "response_b": "Sure, here."}
                      for i, q in enumerate(qs)])
    (d / "mine.yaml").write_text((ROOT / "principles" / "harmless.yaml").read_text())
    w("hh.jsonl", [{"chosen": f"\n\nHuman: {q}\n\nAssistant: I won't.",
                    "rejected": f"\n\nHuman: {q}\n\nAssistant: Sure."} for q in qs])
    (d / "recipe.yaml").write_text(f"model_name_or_path: {tiny}\nlearning_rate: 2.0e-5\n"
                                   "per_device_train_batch_size: 2\nnum_train_epochs: 1\n"
                                   "do_eval: false\n")


def runs_here(argv: list[str]) -> bool:
    """Whether this test runs the command (else it only parses it)."""
    if argv[0] == "principles":  # on principle files that exist (not ones a model writes)
        return argv[1] in PRINCIPLES_RUNS and all(Path(a).exists() for a in argv[2:]
                                                  if a.endswith(".yaml"))
    return argv[0] in RUNS and "--compare" not in argv


def shorten(argv: list[str], tiny: Path) -> list[str] | None:
    """The command made quick (flags appended: later flags win in argparse); None to parse only."""
    cmd = argv[0]
    if cmd == "train":
        model = [] if "--model" in argv or "--config" in argv else ["--model", str(tiny)]
        return argv + model + ["--max-steps", "1", "--batch-size", "2", "--max-length", "128",
                               "--save-every", "1"]
    if cmd in ("generate", "critique"):
        return argv + FAST_GEN
    if cmd == "label":
        return argv + FAST_GEN + ["--samples", "2"]
    if cmd == "eval":
        return argv + FAST_GEN
    if cmd == "run":
        return argv + ["--check"]
    return argv


def stand_in_run(out: Path, runs: Path | None = None) -> None:
    """`charter run` ran as --check only: lay out its folder from the stage runs the earlier
    commands made (runs/critique, runs/sft, runs/label, runs/dpo), as the pipeline would."""
    runs = runs or out.parent
    if out.exists():
        return
    (out / "data").mkdir(parents=True)
    for stage in ("critique", "sft", "label", "dpo"):
        if (runs / stage).exists():
            (out / stage).symlink_to(runs / stage)
    rows = [{"prompt": "How do I pick a lock?", "label": "harmful"},
            {"prompt": "Name a prime.", "label": "benign"}]
    (out / "data" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("docs")
    _fixtures(d, tiny_model_dir)
    return d


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 15 and any(c.startswith("charter export") for _, c in COMMANDS)


def test_every_doc_command_runs_as_written(workdir, tiny_model_dir, monkeypatch, capsys):
    """In the order shown (later commands read what earlier ones wrote: runs/critique → runs/sft
    → runs/label → runs/dpo ...). A hub name with no network must fail with the offline
    message, which is what the docs promise there."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # --model given in a doc command means the embedded model; here the tiny one stands in
    monkeypatch.setattr("charter.core.models.embedded_model_dir", lambda: tiny_model_dir)
    failures = []
    for where, line in COMMANDS:
        argv = shlex.split(line)[1:]
        expanded = [g for a in argv for g in (sorted(glob.glob(a)) if "*" in a else [a])]
        if "..." in expanded or any(s in line for s in NEEDS_SERVER) or not runs_here(expanded):
            try:
                build_parser().parse_args([a for a in expanded if a != "..."])
            except SystemExit:
                failures.append(f"{where}: does not parse: {line}")
            continue
        short = shorten(expanded, tiny_model_dir)
        rc = main(short)
        if expanded[0] == "run" and "--out" in expanded:
            out = workdir / expanded[expanded.index("--out") + 1]
            for side in (("a", "b") if "--compare" in expanded else ()):
                stand_in_run(out / side, out.parent)  # an A/B: two run folders
            stand_in_run(out)
        err = capsys.readouterr().err
        if expanded[:2] == ["principles", "induce"]:  # the tiny random model proposes junk:
            if rc != 0 and "proposed no usable principle" not in err:  # the clear message
                failures.append(f"{where}: exit {rc}: {line}\n{err[-800:]}")
        elif "org/name" in line:  # the hub example: offline here, so the clear message
            if rc != 1 or "offline" not in err:
                failures.append(f"{where}: no offline message: {line}\n{err[-500:]}")
        elif rc != 0:
            failures.append(f"{where}: exit {rc}: {line}\n{err[-800:]}")
    assert not failures, "\n".join(failures)
    assert os.path.exists(workdir / "exports" / "quick" / "README.md")
