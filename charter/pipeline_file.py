"""The pipeline file (`charter run PIPELINE.yaml`): its schema, validation and the data split.

```yaml
constitution: ../principles/harmless.yaml   # required; used by critique, label and eval
model: smollm2          # the starting model (default: the embedded SmolLM2-135M-Instruct)
backend: transformers   # default for every stage section that has a `backend` key
seed: 0                 # default for every stage section that has a `seed` key
iterations: 1           # label → DPO → eval repeated N times (iterative DPO)
teacher: policy         # critiques and revises (or answers under the constitution)
labeler: start          # start (the starting model), policy (the newest model) or a model
judge: start            # eval judge: start, policy, a model, or null (no judge)
# any role may be a full backend description instead of a name:
# labeler: {model: Qwen/Qwen2.5-72B-Instruct, backend: openai, base_url: http://h:8000/v1}
harmful: {path: red-team.jsonl.gz, eval: 32, train: 64}    # prompt sets, held out per set
benign: {path: helpful.jsonl, eval: 32, train: 32}
critique: {rounds: 1}   # each stage section: the keys of that stage's command/config
sft: {max_steps: 40}
label: {samples: 2}
dpo: {beta: 0.1}
eval: {max_new_tokens: 128}
```

Relative paths in the file (constitution, model, prompt sets) are resolved against the
pipeline file's folder; where nothing exists there but the path exists relative to the current
directory, that is used instead (so a file in `examples/` can name `../principles/x.yaml` or
`principles/x.yaml`). The runner fills the keys that wire the stages together (each stage's
`out`, inputs and models); a section that sets one of them is an error, as is any unknown key,
each naming the file and line.

Held-out split: each prompt set is read, de-duplicated by id, shuffled with `seed`, and cut into
the first `eval` prompts (held out for evaluation) and the next `train` (all the rest when
`train` is null). The runner writes `DIR/data/{harmful-train,benign-train,train,eval}.jsonl`.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from charter.core.config import config_from_dict, read_yaml_config
from charter.core.errors import CharterError
from charter.core.records import PromptItem, read_prompts
from charter.roles import ROLES, parse_role


@dataclass(kw_only=True)
class PromptSet:
    path: str
    """Prompts file (JSONL, .jsonl.gz or CSV)."""
    eval: int = 0
    """Prompts held out for evaluation (taken first after the seeded shuffle)."""
    train: int | None = None
    """Prompts for training (after the held-out ones); null: all the rest."""
    prompt_field: str | None = None
    """Field holding the prompt (default: detected)."""

    def validate(self) -> None:
        if self.eval < 0 or (self.train is not None and self.train < 0):
            raise CharterError("eval and train must be 0 or more", field="eval")


@dataclass(kw_only=True)
class PipelineConfig:
    constitution: str
    """Principle file used by critique, label and eval."""
    model: str = "smollm2"
    """The starting model (smollm2: the embedded SmolLM2-135M-Instruct)."""
    backend: str = "transformers"
    """Default backend for the stage sections that have a `backend` key."""
    seed: int = 0
    """Seed of the data split and default seed of the stage sections."""
    iterations: int = 1
    """How many times label → DPO → eval runs, each on the newest model."""
    teacher: str | dict = "policy"
    """Critiques and revises (or answers under the constitution, critique.mode distill):
    policy (the model being trained: SL-CAI), start, a model, or a backend mapping."""
    labeler: str | dict = "start"
    """Labeller: start (the starting model), policy (the newest model), a model, or a backend
    mapping {model, backend, base_url, api_key_env, dtype, ...}."""
    second_labeler: str | dict | None = None
    """Relabels the pairs within label.relabel_below of 0.5 (a bigger model; null: the labeller
    itself with chain of thought)."""
    judge: str | dict | None = "start"
    """Eval judge: start, policy (the evaluated model), a model, a backend mapping, or null."""
    eval_sft: bool = False
    """Also evaluate the SFT model (stage eval-sft), for the trend."""
    out: str | None = None
    """Output directory (the --out flag overrides it; default runs/<file name>)."""
    harmful: dict
    """Red-team prompt set: {path, eval, train, prompt_field}."""
    benign: dict | None = None
    """Helpfulness prompt set, mixed into SFT and labelling and held out for eval."""
    critique: dict = field(default_factory=dict)
    """Settings of the critique stage (keys of `charter critique`)."""
    sft: dict = field(default_factory=dict)
    """Settings of the SFT stage (keys of `charter train sft`)."""
    label: dict = field(default_factory=dict)
    """Settings of the labelling stage (keys of `charter label`)."""
    dpo: dict = field(default_factory=dict)
    """Settings of the DPO stage (keys of `charter train dpo`)."""
    eval: dict = field(default_factory=dict)
    """Settings of the eval stages (keys of `charter eval`)."""

    def validate(self) -> None:
        if self.iterations < 0:
            raise CharterError("must be 0 or more", field="iterations")


SECTIONS = ("critique", "sft", "label", "dpo", "eval")


@dataclass
class PipelineFile:
    """A loaded, validated pipeline file."""

    path: Path
    cfg: PipelineConfig
    harmful: PromptSet
    benign: PromptSet | None
    sections: dict[str, dict]  # stage section -> its raw values
    lines: dict[str, dict[str, int]]  # "" (top level) or a section -> key -> line
    roles: dict = field(default_factory=dict)  # role -> charter.roles.RoleSpec (or None)


def key_lines(path: Path) -> dict[str, dict[str, int]]:
    """Line of every top-level key ("") and of every key one level down (by section)."""
    node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    lines: dict[str, dict[str, int]] = {"": {}}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for k, v in node.value:
        lines[""][k.value] = k.start_mark.line + 1
        if isinstance(v, yaml.MappingNode):
            lines[k.value] = {kk.value: kk.start_mark.line + 1 for kk, _ in v.value}
    return lines


def resolve_path(value: str, base: Path) -> str:
    """`value` against the pipeline file's folder, else against the cwd where it exists there."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    beside = base / p
    if not beside.exists() and p.exists():
        return str(p.resolve())
    return str(beside.resolve())


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.endswith((".yaml", ".yml"))


def check_constitution(value: str, path: Path, line: int | None) -> None:
    """The constitution a pipeline names exists and lints, before anything runs (`--check`
    included): its own errors name its file and line."""
    from constitution import load_constitution

    if not Path(value).exists():
        raise CharterError(f"principle file {value} not found", path=path, line=line,
                           field="constitution")
    load_constitution(value)


def load_pipeline_file(path: str | Path) -> PipelineFile:
    """Read and check the whole file: top-level keys, prompt sets, section mappings."""
    path = Path(path)
    data, top_lines = read_yaml_config(path)
    lines = key_lines(path)
    base = path.resolve().parent
    cfg = config_from_dict(PipelineConfig, data, source=str(path), lines=top_lines)
    cfg.constitution = resolve_path(cfg.constitution, base)
    check_constitution(cfg.constitution, path, top_lines.get("constitution"))
    def resolve(value: str) -> str:
        if value not in ("start", "policy", "smollm2") and _looks_like_path(value):
            return resolve_path(value, base)
        return value

    cfg.model = resolve(cfg.model)
    roles = {name: parse_role(getattr(cfg, name), backend=cfg.backend, where=name,
                              source=str(path), line=top_lines.get(name), resolve=resolve)
             for name in ROLES}
    sets = {}
    for name in ("harmful", "benign"):
        raw = getattr(cfg, name)
        if raw is None:
            sets[name] = None
            continue
        ps = config_from_dict(PromptSet, raw, source=str(path), lines=lines.get(name, {}))
        sets[name] = dataclasses.replace(ps, path=resolve_path(ps.path, base))
    for name in SECTIONS:
        if not isinstance(getattr(cfg, name), dict):
            raise CharterError("expected a mapping of that stage's settings", path=path,
                               line=top_lines.get(name), field=name)
    return PipelineFile(path, cfg, sets["harmful"], sets["benign"],
                        {s: dict(getattr(cfg, s)) for s in SECTIONS}, lines, roles)


def split_prompts(items: list[PromptItem], ps: PromptSet, seed: int, kind: str
                  ) -> tuple[list[PromptItem], list[PromptItem]]:
    """(train, eval) of one prompt set: de-duplicated by id, seeded shuffle, eval first."""
    seen, unique = set(), []
    for it in items:
        if it.id not in seen:
            seen.add(it.id)
            unique.append(it)
    random.Random(f"{seed}:{kind}").shuffle(unique)
    held = unique[: ps.eval]
    rest = unique[ps.eval:]
    train = rest if ps.train is None else rest[: ps.train]
    if len(held) < ps.eval or (ps.train is not None and len(train) < ps.train):
        raise CharterError(f"the {kind} set has {len(unique)} distinct prompts; "
                           f"eval {ps.eval} + train {ps.train} asks for more", path=ps.path)
    return ([dataclasses.replace(i, label=kind) for i in train],
            [dataclasses.replace(i, label=kind) for i in held])


def split_data(pf: PipelineFile) -> dict[str, list[dict]]:
    """The rows of data/harmful-train, benign-train, train (both) and eval (labelled)."""
    out: dict[str, list[dict]] = {"harmful-train": [], "benign-train": [], "eval": []}
    for kind in ("harmful", "benign"):
        ps = getattr(pf, kind)
        if ps is None:
            continue
        items = read_prompts(ps.path, ps.prompt_field)
        train, held = split_prompts(items, ps, pf.cfg.seed, kind)
        out[f"{kind}-train"] = [_row(i) for i in train]
        out["eval"] += [_row(i) for i in held]
    out["train"] = out["harmful-train"] + out["benign-train"]
    if not out["eval"]:
        raise CharterError("no prompts held out for evaluation: set `eval: N` in harmful "
                           "and/or benign", path=pf.path, line=pf.lines[""].get("harmful"),
                           field="harmful")
    if not out["harmful-train"]:
        raise CharterError("no harmful training prompts left after the held-out part",
                           path=pf.path, line=pf.lines[""].get("harmful"), field="harmful")
    return out


def _row(it: PromptItem) -> dict:
    return {"id": it.id, "messages": it.messages, "label": it.label, "source": it.source}
