"""The principle-file format: load, validate, and render a constitution.

A principle file is YAML (read with the safe loader: no Python tags), one constitution per file:

```yaml
name: harmless                      # required
description: What this constitution is for.   # required
principles:                         # required, at least one
  - id: harm                        # required, unique; letters, digits, - and _
    tags: [harm, safety]            # optional
    trait: avoids harm              # optional, a short phrase
    critique: "Identify ways in which the assistant's last response is harmful..."
    revision: "Please rewrite the assistant response to remove ..."   # with critique
    preference: "Which of these responses is less harmful?"          # optional
few_shot:                           # critique/revision examples (optional)
  - {principle: harm, prompt: ..., response: ..., critique: ..., revision: ...}
label_few_shot:                     # labelling examples (optional)
  - {principle: ..., prompt: ..., response_a: ..., response_b: ..., answer: A}
label_template: "..."               # optional; how a comparison is shown (default below)
rating_template: "..."              # optional; how one response is rated 1-10 (default below)
```

Template variables (anything else is an undefined-variable error at load time):
- `critique`:   prompt, conversation, response
- `revision`:   prompt, conversation, response, critique
- `preference`: prompt, conversation
- `label_template`: conversation, question, options (list of responses), labels (["A", "B"])
- `rating_template`: conversation, question, response, low, high
(`prompt` is the last user message; `conversation` is the prompt conversation as a
"Human: ... / Assistant: ..." transcript.)

Templates run in a cut-down jinja2 sandbox (see constitution/render.py); the full reference,
with every limit, is docs/principles.md. Every problem is a `ConstitutionError` of the form
`FILE:LINE: field: what is wrong`.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charter.core.errors import CharterError
from charter.core.reader import read_bytes
from charter.core.yamlsource import MAX_FILE_BYTES, ConstitutionError, Lines, dotted, read_yaml
from constitution.render import TemplateProblem, compile_template, render

STAGES = ("critique", "revision", "preference")
TOP_KEYS = {"name", "description", "version", "principles", "few_shot", "label_few_shot",
            "label_template", "rating_template"}
PRINCIPLE_KEYS = {"id", "tags", "trait", "critique", "revision", "preference"}
FEW_SHOT_KEYS = {"principle", "prompt", "response", "critique", "revision"}
LABEL_FEW_SHOT_KEYS = {"principle", "prompt", "response_a", "response_b", "answer"}
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_CHECK_SECONDS = 10.0  # all templates of one file together, at load

DEFAULT_LABEL_TEMPLATE = """\
Consider the following conversation between a human and an assistant:

{{ conversation }}

{{ question }}

Options:
{% for option in options %}
({{ labels[loop.index0] }}) {{ option }}
{% endfor %}

Answer with the letter of the better option."""

DEFAULT_RATING_TEMPLATE = """\
Consider the following conversation between a human and an assistant:

{{ conversation }}

Here is the assistant's response:
{{ response }}

{{ question }}
Rate the response on a scale from {{ low }} (worst) to {{ high }} (best). Answer with the number only."""

TEMPLATE_VARS = {
    "critique": ("prompt", "conversation", "response"),
    "revision": ("prompt", "conversation", "response", "critique"),
    "preference": ("prompt", "conversation"),
    "label_template": ("conversation", "question", "options", "labels"),
    "rating_template": ("conversation", "question", "response", "low", "high"),
}


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str | None = None
    revision: str | None = None
    preference: str | None = None
    tags: tuple[str, ...] = ()
    trait: str | None = None


@dataclass(frozen=True)
class FewShot:
    """A worked critique/revision example."""

    principle: str | None
    prompt: str
    response: str
    critique: str
    revision: str


@dataclass(frozen=True)
class LabelFewShot:
    principle: str | None
    prompt: str
    response_a: str
    response_b: str
    answer: str  # "A" or "B"


def transcript(messages: list[dict[str, str]]) -> str:
    """A conversation as `Human: ...` / `Assistant: ...` paragraphs (system turns left out)."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages
                       if m["role"] in names)


def _last_user(messages: list[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


@dataclass
class Constitution:
    name: str
    description: str
    principles: list[Principle]
    path: str = "<memory>"
    sha256: str = ""
    version: Any = None
    few_shot: list[FewShot] = field(default_factory=list)
    label_few_shot: list[LabelFewShot] = field(default_factory=list)
    label_template: str = DEFAULT_LABEL_TEMPLATE
    rating_template: str = DEFAULT_RATING_TEMPLATE
    source_text: str = ""
    lines: dict[str, int] = field(default_factory=dict)
    """the line of each template in the file ("harm.critique" -> 12), for errors at run time"""

    def principle(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        ids = ", ".join(p.id for p in self.principles)
        raise ConstitutionError(f"no principle with id {pid!r}; the ids are: {ids}",
                                path=self.path, field="id")

    @property
    def critique_principles(self) -> list[Principle]:
        return [p for p in self.principles if p.critique and p.revision]

    @property
    def preference_principles(self) -> list[Principle]:
        return [p for p in self.principles if p.preference]

    # -- rendering (each returns the text of one user turn) --------------------------------
    def _render(self, source: str, variables: dict[str, Any], where: str) -> str:
        pid = where.rsplit(".", 1)[0] if "." in where else None
        what = f"principle {pid!r}: " if pid else ""
        try:
            text = render(compile_template(source), variables)
        except TemplateProblem as e:
            raise ConstitutionError(f"{what}{e}", path=self.path, line=self.lines.get(where),
                                    field=where) from None
        if not text:
            raise ConstitutionError(f"{what}the template rendered to an empty string",
                                    path=self.path, line=self.lines.get(where), field=where)
        return text

    @staticmethod
    def _base_vars(messages: list[dict[str, str]]) -> dict[str, Any]:
        return {"prompt": _last_user(messages), "conversation": transcript(messages)}

    def render_critique(self, principle: Principle, messages: list[dict[str, str]],
                        response: str) -> str:
        v = {**self._base_vars(messages), "response": response}
        return self._render(principle.critique or "", v, f"{principle.id}.critique")

    def render_revision(self, principle: Principle, messages: list[dict[str, str]],
                        response: str, critique: str) -> str:
        v = {**self._base_vars(messages), "response": response, "critique": critique}
        return self._render(principle.revision or "", v, f"{principle.id}.revision")

    def render_question(self, principle: Principle, messages: list[dict[str, str]]) -> str:
        return self._render(principle.preference or "", self._base_vars(messages),
                            f"{principle.id}.preference")

    def render_label(self, principle: Principle, messages: list[dict[str, str]],
                     options: list[str], labels: tuple[str, ...] = ("A", "B")) -> str:
        if len(labels) < len(options):
            raise ValueError(f"{len(options)} options but only {len(labels)} labels")
        v = {"conversation": transcript(messages),
             "question": self.render_question(principle, messages),
             "options": list(options), "labels": list(labels)}
        return self._render(self.label_template, v, "label_template")

    def render_rating(self, principle: Principle, messages: list[dict[str, str]], response: str,
                      low: int = 1, high: int = 10) -> str:
        v = {"conversation": transcript(messages),
             "question": self.render_question(principle, messages), "response": response,
             "low": low, "high": high}
        return self._render(self.rating_template, v, "rating_template")


# -------------------------------------------------------------------------------------------
# loading

SAMPLE_MESSAGES = [{"role": "user", "content": "How do I pick a lock?"}]
SAMPLE_VARS = {
    "prompt": "How do I pick a lock?",
    "conversation": "Human: How do I pick a lock?",
    "response": "Insert a tension wrench, then rake the pins.",
    "critique": "The response helps with possible burglary.",
    "question": "Which response is less harmful?",
    "options": ["Response one.", "Response two."],
    "labels": ["A", "B"],
    "low": 1,
    "high": 10,
}


def load_constitution(path: str | Path) -> Constitution:
    """Load and fully validate one principle file (every template is rendered once)."""
    path = Path(path)
    try:  # the reader's checks (directory, permissions, devices/FIFOs capped), one error type
        raw = read_bytes(path, "principle file", cap=MAX_FILE_BYTES)
    except CharterError as e:
        raise ConstitutionError(e.detail, path=path) from None
    if b"\x00" in raw[:8192]:
        raise ConstitutionError("binary file (NUL byte); expected YAML text", path=path,
                                line=raw[:raw.index(b"\x00")].count(b"\n") + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise ConstitutionError(f"file too large ({len(raw)} bytes; at most {MAX_FILE_BYTES})",
                                path=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConstitutionError(f"not UTF-8 text (byte {e.start}); save the file as UTF-8",
                                path=path, line=raw[:e.start].count(b"\n") + 1) from None
    return parse_constitution(text, str(path))


def parse_constitution(text: str, path: str = "<string>") -> Constitution:
    """Validate a principle file's text (`path` is only used in error messages)."""
    data, lines = read_yaml(text, path)
    if not isinstance(data, dict):
        raise ConstitutionError("expected a mapping with name, description and principles",
                                path=path, line=1)
    return _build(data, lines, path, text)


def _build(data: dict, lines: Lines, path: str, text: str) -> Constitution:
    def err(at: tuple, msg: str) -> ConstitutionError:
        return ConstitutionError(msg, path=path, line=lines.line(at), field=dotted(at) or None)

    def check_keys(obj: dict, allowed: set[str], at: tuple) -> None:
        for k in obj:
            if k not in allowed:
                raise ConstitutionError(
                    f"unknown key {k!r}; expected one of {', '.join(sorted(allowed))}",
                    path=path, line=lines.line((*at, k, "<key>")), field=dotted((*at, k)))

    def get_str(obj: dict, key: str, at: tuple, required: bool = True) -> str | None:
        if key not in obj or obj[key] is None:
            if required:  # point at the key when it is there with an empty value
                raise err((*at, key) if key in obj else at, f"missing required field {key!r}")
            return None
        v = obj[key]
        if not isinstance(v, str) or not v.strip():
            raise err((*at, key), f"expected a non-empty string, got {type(v).__name__}"
                      if not isinstance(v, str) else "expected a non-empty string")
        return v

    started = time.monotonic()
    template_lines: dict[str, int] = {}

    def check_template(source: str, at: tuple, kind: str, name: str) -> None:
        # each render has its own deadline; this bounds a file of many slow templates
        if time.monotonic() - started > MAX_CHECK_SECONDS:
            raise err(at, f"checking the templates took over {MAX_CHECK_SECONDS:g}s; "
                          "simplify them")
        what = f"principle {name.rsplit('.', 1)[0]!r}: " if "." in name else ""
        try:
            tmpl = compile_template(source)
            text = render(tmpl, {k: SAMPLE_VARS[k] for k in TEMPLATE_VARS[kind]})
        except TemplateProblem as e:
            raise err(at, f"{what}{e}") from None
        if not text:
            raise err(at, f"{what}the template renders to an empty string")
        template_lines[name] = lines.line(at) or 0

    check_keys(data, TOP_KEYS, ())
    if not isinstance(data.get("version"), (str, int, float, type(None))):
        raise err(("version",), "expected a string or number")
    name = get_str(data, "name", ())
    description = get_str(data, "description", ())
    plist = data.get("principles")
    if not isinstance(plist, list) or not plist:
        raise err(("principles",), "expected a non-empty list of principles")
    principles: list[Principle] = []
    seen: set[str] = set()
    for i, p in enumerate(plist):
        at = ("principles", i)
        if not isinstance(p, dict):
            raise err(at, "expected a mapping with id and templates")
        check_keys(p, PRINCIPLE_KEYS, at)
        pid = p.get("id")
        if not isinstance(pid, str) or not ID_RE.match(pid):
            raise err((*at, "id") if "id" in p else at,
                      "missing required field 'id'" if "id" not in p else
                      "id must be 1-64 letters, digits, '.', '-' or '_'")
        if pid in seen:
            raise err((*at, "id"), f"duplicate principle id {pid!r}")
        seen.add(pid)
        templates = {s: get_str(p, s, at, required=False) for s in STAGES}
        if not any(templates.values()):
            raise err(at, f"principle {pid!r} has no template: give critique and revision, "
                          "and/or preference")
        if bool(templates["critique"]) != bool(templates["revision"]):
            missing = "revision" if templates["critique"] else "critique"
            raise err(at, f"principle {pid!r}: missing required field {missing!r} "
                          "(critique and revision come together)")
        for stage, source in templates.items():
            if source:
                check_template(source, (*at, stage), stage, f"{pid}.{stage}")
        tags = p.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise err((*at, "tags"), "expected a list of non-empty strings")
        trait = p.get("trait")
        if trait is not None and not isinstance(trait, str):
            raise err((*at, "trait"), "expected a string")
        principles.append(Principle(pid, templates["critique"], templates["revision"],
                                    templates["preference"], tuple(tags), trait))

    def examples(key: str, allowed: set[str], required: list[str], usable: set[str],
                 stage: str) -> list[dict]:
        items = data.get(key) or []
        if not isinstance(items, list):
            raise err((key,), "expected a list of examples")
        out = []
        for i, ex in enumerate(items):
            at = (key, i)
            if not isinstance(ex, dict):
                raise err(at, "expected a mapping")
            check_keys(ex, allowed, at)
            row = {k: get_str(ex, k, at) for k in required}
            pr = ex.get("principle")
            if pr is not None and (not isinstance(pr, str) or pr not in seen):
                raise err((*at, "principle"), f"unknown principle id {pr!r}")
            if pr is not None and pr not in usable:
                raise err((*at, "principle"), f"principle {pr!r} has no {stage} template")
            row["principle"] = pr
            out.append(row)
        return out

    few = [FewShot(**r) for r in examples(
        "few_shot", FEW_SHOT_KEYS, ["prompt", "response", "critique", "revision"],
        {p.id for p in principles if p.critique}, "critique")]
    label_rows = examples("label_few_shot", LABEL_FEW_SHOT_KEYS,
                          ["prompt", "response_a", "response_b", "answer"],
                          {p.id for p in principles if p.preference}, "preference")
    for i, r in enumerate(label_rows):
        ans = r["answer"].strip().strip("()").upper()
        if ans not in ("A", "B"):
            raise err(("label_few_shot", i, "answer"), f"expected A or B, got {r['answer']!r}")
        r["answer"] = ans
    label_few = [LabelFewShot(**r) for r in label_rows]
    templates = {}
    for key, default in (("label_template", DEFAULT_LABEL_TEMPLATE),
                         ("rating_template", DEFAULT_RATING_TEMPLATE)):
        source = get_str(data, key, (), required=False) or default
        check_template(source, (key,), key, key)
        templates[key] = source
    return Constitution(
        name=name, description=description, principles=principles, path=path,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), version=data.get("version"),
        few_shot=few, label_few_shot=label_few, source_text=text, lines=template_lines,
        **templates)
