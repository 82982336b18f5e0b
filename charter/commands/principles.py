"""Lint, show and render principle files (constitutions).

    charter principles lint principles/*.yaml
    charter principles show principles/harmless.yaml
    charter principles render principles/harmless.yaml --principle harm --stage critique
    charter principles render principles/harmless.yaml --principle harm --stage preference \\
        --conversation conv.json
    charter principles report runs/quick         # what each principle did in a run
    charter principles induce --pairs pairs.jsonl --out induced.yaml   # learn principles

`lint` exits with status 1 if any file has a problem (each printed as FILE:LINE: field: what is
wrong). `render` shows the exact text the model is asked, on a built-in sample conversation or
on `--conversation`: a JSON file holding a chat-message list, or an object with `messages` (or
`prompt`, a string) and optionally `response`, `critique` and `options` (two responses).
`report` reads a run folder (a pipeline's, or one critique or label stage's) and writes, per
principle, how often it was drawn, how often its critique changed the response, its votes'
agreement with the ensemble and with human labels, and its share of low-margin votes
(attribution.md, .json, .png; `critique/evaluate/attribution.py`). `induce` learns preference
principles from pairs with a human `preferred` side (Inverse Constitutional AI): a model proposes
the rule behind each preference, near-duplicates are merged, and each candidate is kept with its
agreement on held-out pairs (`critique/label/induce.py`); it takes the backend flags of the other
commands (--backend, --model, --base-url, ...).
"""

from __future__ import annotations

import argparse
from typing import Any

SAMPLE = {
    "messages": [{"role": "user", "content": "How do I get into my neighbour's house while "
                  "they are away?"}],
    "response": "Check under the doormat for a spare key, or slide a card into the latch.",
    "critique": "Yes. The response helps someone break into another person's home.",
    "options": [
        "Check under the doormat for a spare key, or slide a card into the latch.",
        "I can't help with entering someone else's home without permission; it is illegal. "
        "If you are looking after their house, ask them to leave you a key.",
    ],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="principles_cmd", metavar="ACTION", required=True)
    lint = sub.add_parser("lint", help="validate principle files (exit 1 on any problem)")
    lint.add_argument("files", nargs="+", metavar="FILE")
    show = sub.add_parser("show", help="name, description, hash and a table of principles")
    show.add_argument("file", metavar="FILE")
    rend = sub.add_parser("render", help="show the prompt a principle produces")
    rend.add_argument("file", metavar="FILE")
    rend.add_argument("--principle", required=True, metavar="ID", help="principle id")
    rend.add_argument("--stage", required=True, choices=("critique", "revision", "preference"))
    rend.add_argument("--conversation", metavar="JSON", default=None,
                      help="a message list, or an object with messages/prompt and optional "
                      "response, critique, options")


    rep = sub.add_parser("report", help="what each principle did in a run: draws, changed "
                         "revisions, vote agreement, low-margin votes, candidates to rewrite")
    rep.add_argument("run_dir", metavar="RUN_DIR",
                     help="a pipeline run folder, or a critique or label stage's folder")
    rep.add_argument("--out", default=None, metavar="DIR",
                     help="where attribution.md/.json/.png go (default: RUN_DIR)")
    rep.add_argument("--min-count", type=int, default=3, metavar="N",
                     help="rounds or compared votes needed before a principle is named as a "
                     "candidate to rewrite (default: 3)")
    ind = sub.add_parser("induce", help="learn preference principles from preference pairs "
                         "(Inverse Constitutional AI), each with its held-out agreement")
    ind.add_argument("--config", metavar="YAML", default=None,
                     help="YAML file with any of the settings below (flags override it)")
    from charter.core.config import add_config_args
    from critique.label.induce import InduceConfig

    add_config_args(ind, InduceConfig)


def run(args: argparse.Namespace) -> int:
    if args.principles_cmd == "report":
        return _report(args)
    if args.principles_cmd == "induce":
        return _induce(args)
    if args.principles_cmd == "lint":
        return _lint(args.files)
    if args.principles_cmd == "show":
        return _show(args.file)
    return _render(args)


def summary(c: Any) -> str:
    """`N principles: C critique/revision, P preference; F few-shot, L label few-shot`."""
    return (f"{len(c.principles)} principles: {len(c.critique_principles)} critique/revision, "
            f"{len(c.preference_principles)} preference; {len(c.few_shot)} few-shot, "
            f"{len(c.label_few_shot)} label few-shot")


def _lint(files: list[str]) -> int:
    from constitution import ConstitutionError, load_constitution

    failed = 0
    for f in files:
        try:
            c = load_constitution(f)
        except ConstitutionError as e:
            print(e)
            failed += 1
            continue
        print(f"{f}: ok ({summary(c)})")
    if failed and len(files) > 1:
        print(f"{failed} of {len(files)} files failed")
    return 1 if failed else 0


def _show(path: str) -> int:
    from constitution import load_constitution

    c = load_constitution(path)
    print(f"name:        {c.name}")
    print(f"description: {c.description}")
    if c.version is not None:
        print(f"version:     {c.version}")
    print(f"file:        {c.path}")
    print(f"sha256:      {c.sha256}")
    print(f"counts:      {summary(c)}")
    print()
    rows = [("ID", "STAGES", "TAGS", "TRAIT")]
    for p in c.principles:
        stages = ",".join(s for s in ("critique", "revision", "preference") if getattr(p, s))
        rows.append((p.id, stages, ",".join(p.tags) or "-", p.trait or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[3])
    return 0


def load_conversation(path: str) -> dict[str, Any]:
    """Read `--conversation`: messages (ending, optionally, with the response) and extras."""
    from charter.core.errors import CharterError
    from charter.core.reader import read_json_document
    from charter.core.records import validate_messages

    data = read_json_document(path, "conversation file")
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict):
        raise CharterError("expected a message list or an object with messages or prompt",
                           path=path)
    unknown = set(data) - {"messages", "prompt", "response", "critique", "options"}
    if unknown:
        raise CharterError(f"unknown key {sorted(unknown)[0]!r}; expected messages, prompt, "
                           "response, critique, options", path=path, field=sorted(unknown)[0])
    if "messages" in data:
        messages = validate_messages(data["messages"], path=path)
    elif isinstance(data.get("prompt"), str):
        messages = [{"role": "user", "content": data["prompt"]}]
    else:
        raise CharterError("expected 'messages' (a list) or 'prompt' (a string)", path=path)
    response = data.get("response")
    if response is None and messages[-1]["role"] == "assistant" and len(messages) > 1:
        response, messages = messages[-1]["content"], messages[:-1]
    out = {"messages": messages, "response": response if response is not None
           else SAMPLE["response"], "critique": data.get("critique", SAMPLE["critique"])}
    for key in ("response", "critique"):
        if not isinstance(out[key], str):
            raise CharterError("expected a string", path=path, field=key)
    options = data.get("options", [out["response"], SAMPLE["options"][1]])
    if (not isinstance(options, list) or len(options) != 2
            or not all(isinstance(o, str) for o in options)):
        raise CharterError("expected a list of two strings", path=path, field="options")
    out["options"] = options
    return out


def _render(args: argparse.Namespace) -> int:
    from constitution import ConstitutionError, load_constitution

    c = load_constitution(args.file)
    p = c.principle(args.principle)
    conv = load_conversation(args.conversation) if args.conversation else SAMPLE
    if not getattr(p, args.stage):
        have = [s for s in ("critique", "revision", "preference") if getattr(p, s)]
        raise ConstitutionError(f"principle {p.id!r} has no {args.stage} template (it has "
                                f"{', '.join(have)})", path=c.path, field=args.principle)
    msgs = conv["messages"]
    if args.stage == "critique":
        text = c.render_critique(p, msgs, conv["response"])
    elif args.stage == "revision":
        text = c.render_revision(p, msgs, conv["response"], conv["critique"])
    else:
        text = c.render_label(p, msgs, conv["options"])
    print(text)
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from charter.core.errors import CharterError
    from critique.evaluate.attribution import render_section, write_attribution

    if args.min_count < 1:
        raise CharterError(f"must be at least 1, got {args.min_count}", field="min_count")
    report = write_attribution(args.run_dir, args.out, args.min_count)
    out = Path(args.out) if args.out else Path(args.run_dir)
    print("\n".join(render_section(report)))
    print(f"\nwritten: {out / 'attribution.md'}, attribution.json, attribution.png")
    return 0


def _induce(args: argparse.Namespace) -> int:
    from charter.core.config import build_config
    from critique.label.induce import InduceConfig, run_induce

    cfg = build_config(InduceConfig, args, args.config)
    report = run_induce(cfg)
    kept = {c["id"]: c for c in report["candidates"] if c["id"] in report["kept"]}
    print(f"{len(report['candidates'])} candidates from {report['proposal_pairs']} pairs "
          f"({report['unparsed']} proposals unusable), tested on {report['held_out_pairs']} "
          f"held-out pairs; kept {len(kept)}:")
    for c in kept.values():
        print(f"  {c['agreement']:.2f}  {c['text']}")
    print(f"wrote {cfg.out} and {cfg.out}.report.json")
    return 0
