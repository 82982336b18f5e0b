"""Hub-ready cards: README.md with YAML front matter for trained models and exported datasets.

The Hub indexes a repository by its README's front matter
(https://huggingface.co/docs/hub/model-cards, .../datasets-cards): `base_model` must be a Hub id
(never a local path), `library_name`, `tags`, `datasets`; a dataset card's `configs` name its
files. Cards are built from plain dicts (no stage imports); `roles_lines` and `eval_lines` are
the hooks the pipeline fills with the roles' models and the eval headline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what `smollm2` is, on the Hub
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def front_matter(meta: dict) -> str:
    """`---\\n<yaml>---\\n` with keys in the given order; None values left out."""
    clean = {k: v for k, v in meta.items() if v not in (None, [], {})}
    return "---\n" + yaml.safe_dump(clean, sort_keys=False, allow_unicode=True) + "---\n"


def read_front_matter(readme: Path) -> dict:
    """The YAML front matter of a README.md ({} when there is none or it is not YAML)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---\n", 4)
    try:
        meta = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def hub_base_model(model_arg: str | None, model_path: str | Path | None) -> str | None:
    """The Hub id of the model training started from, or None where there is none to name.

    `smollm2`/None is the embedded SmolLM2; a hub id stays itself; a local folder names its
    own base where it says (a Charter run's card: its `base_model`; a transformers config's
    `_name_or_path` when that is a hub id)."""
    if model_arg in (None, "smollm2"):
        return EMBEDDED_HUB_ID
    if HUB_ID.match(str(model_arg)) and not Path(str(model_arg)).exists():
        return str(model_arg)
    folder = Path(model_path or model_arg)
    for f in (folder / "README.md", folder / "final" / "README.md"):
        base = read_front_matter(f).get("base_model")
        if isinstance(base, str) and HUB_ID.match(base):
            return base
    try:
        name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get(
            "_name_or_path", "")
    except (OSError, ValueError):
        name = ""
    if HUB_ID.match(str(name)) and not Path(name).exists():
        return name
    return None


def roles_lines(roles: dict[str, str] | None) -> list[str]:
    """Card lines for the run's roles (policy, teacher, labeller, judge → model)."""
    if not roles:
        return []
    return ["## Roles", "", "| role | model |", "|---|---|"] + [
        f"| {role} | `{model}` |" for role, model in roles.items()] + [""]


def eval_lines(headline: dict | None) -> list[str]:
    """Card lines for the evaluation headline (metric → value), where an eval ran."""
    if not headline:
        return []
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else v  # noqa: E731
    return ["## Evaluation", ""] + [f"- {k}: {fmt(v)}" for k, v in headline.items()] + [""]


def add_to_card(readme: Path, roles: dict[str, str] | None = None,
                headline: dict | None = None) -> bool:
    """Put the roles' models and/or the eval headline into a trained model's card (before its
    "## Result"; a section already there is replaced). False when there is no card."""
    from charter.core.records import write_text_atomic

    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return False
    for title, lines in (("## Roles", roles_lines(roles)), ("## Evaluation", eval_lines(headline))):
        if not lines:
            continue
        start = text.find(title + "\n")
        if start >= 0:  # replace the old section (up to the next heading)
            end = text.find("\n## ", start + len(title))
            text = text[:start] + text[end + 1:] if end >= 0 else text[:start]
        at = text.find("## Result")
        block = "\n".join(lines) + "\n"
        text = text[:at] + block + text[at:] if at >= 0 else text.rstrip("\n") + "\n\n" + block
    write_text_atomic(readme, text)
    return True


def model_card(stage: str, cfg_dict: dict, provenance: dict, model_path: str, summary: dict,
               roles: dict[str, str] | None = None, headline: dict | None = None) -> str:
    """A trained model's README.md: front matter the Hub indexes, then what made it."""
    adapter = bool(cfg_dict.get("lora") and not cfg_dict.get("merge"))
    base = hub_base_model(cfg_dict.get("model"), model_path)
    data = str(provenance.get("data", ""))
    name = provenance.get("constitution_name")
    meta = {
        "base_model": base,
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": "text-generation",
        "tags": [stage, "charter", "constitutional-ai", "trl-compatible"]
        + (["lora"] if cfg_dict.get("lora") else []),
        "datasets": [data] if HUB_ID.match(data) and not Path(data).exists() else None,
    }
    start = cfg_dict.get("model") or "smollm2"
    lines = [front_matter(meta), f"# Charter {stage.upper()} model", "",
             f"Trained with `charter train {stage}` from `{start}`"
             + (f" ({base} on the Hub)" if base else "") + ".", "",
             "Load it with `AutoModelForCausalLM.from_pretrained(this_directory)`"
             + (" or, as an adapter, `PeftModel.from_pretrained(base, this_directory)`."
                if adapter else "."), "", "## Constitution", ""]
    if provenance.get("constitution_sha256"):
        lines.append(f"- name: `{name or 'unknown'}`, sha256 "
                     f"`{provenance['constitution_sha256']}`")
    else:
        lines.append("- not recorded beside the data")
    lines += ["", "## Data", ""] + [f"- {k}: `{v}`" for k, v in provenance.items()
                                    if not k.startswith("constitution")]
    lines += [""] + roles_lines(roles) + eval_lines(headline)
    lines += ["## Result", ""] + [f"- {k}: {v}" for k, v in summary.items()]
    lines += ["", "## Config", "", "```json", json.dumps(cfg_dict, indent=2), "```", ""]
    return "\n".join(lines)


def dataset_card(*, source: str, constitution: dict | None, configs: dict[str, str],
                 counts: dict[str, int], fmt: str, options: dict, license: str = "other"
                 ) -> str:
    """An exported dataset's README.md; `configs` maps a config name to its JSONL file."""
    meta = {
        "license": license,
        "task_categories": ["text-generation"],
        "tags": ["charter", "constitutional-ai", "rlaif", "synthetic", "trl"]
        + (["dpo"] if "preference" in configs else []) + (["sft"] if "sft" in configs else []),
        "configs": [{"config_name": name, "data_files": [{"split": "train", "path": path}]}
                    for name, path in configs.items()],
    }
    con = constitution or {}
    lines = [front_matter(meta), "# Charter dataset", "",
             f"Exported with `charter export` from the run `{source}` in TRL's {fmt} format "
             "(https://huggingface.co/docs/trl/dataset_formats).", "",
             f"- constitution: `{con.get('name', 'unknown')}`, sha256 "
             f"`{con.get('sha256', 'not recorded')}`" + (" (constitution.yaml beside this card)"
                                                        if con.get("copied") else ""), ""]
    lines += ["| config | file | rows |", "|---|---|---|"] + [
        f"| {n} | `{p}` | {counts.get(n, 0)} |" for n, p in configs.items()]
    lines += ["", "Export options: " + ", ".join(f"{k}={v}" for k, v in options.items()), "",
              "Load with `datasets.load_dataset(\"json\", data_files=...)` or, once uploaded, "
              "`load_dataset(REPO, CONFIG)`. The licence field is a placeholder until you set "
              "it: the data's terms follow those of its prompts and of the models that wrote "
              "it.", ""]
    return "\n".join(lines)
