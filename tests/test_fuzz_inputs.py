"""Property-based fuzzing of every kind of input file: prompt files (JSONL, JSON, CSV, gzip,
parquet), label pairs, training pairs and SFT data, YAML configs, pipeline files and principle
files. Any generated input ends in success or a `CharterError`: never another exception, never
a hang (each example runs under a 5 s alarm and hypothesis' deadline). Example counts are kept
modest so the whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charter.core.errors import CharterError

FUZZ = settings(max_examples=40, deadline=3000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KEYS = ["prompt", "messages", "chosen", "rejected", "response", "response_a", "response_b",
        "label", "id", "role", "content", "p_chosen", "text", "completion", "instruction",
        "question", "preferred", "data"]

# JSON values biased towards the shapes the readers expect (keys, roles, message lists), with
# hostile strings (surrogates, NUL, huge numbers, control characters) mixed in
text = st.one_of(st.text(max_size=30), st.sampled_from(
    ["user", "assistant", "system", "Human: hi\n\nAssistant: yo", "\ud800", "\x00", "a\r\nb",
     "harmful", "benign", "A", "(B)", ""]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True), text)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | text, inner,
                                                 max_size=5)), max_leaves=20)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant",
                                                                    "system", "bot"]),
                                           "content": text}), max_size=4)
records = st.dictionaries(st.sampled_from(KEYS), st.one_of(json_values, messages), max_size=6)


def ends_well(deadline, fn, *args) -> None:
    """`fn(*args)` returns or raises CharterError (anything else fails the property)."""
    with deadline(5.0):
        try:
            fn(*args)
        except CharterError as e:
            assert str(e) and "\n" not in str(e).strip(), repr(str(e))


def _json_line(obj) -> str:
    try:
        return json.dumps(obj, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError):
        return "{}"


def _as_file(name: str, data: bytes):
    d = tempfile.TemporaryDirectory()
    p = Path(d.name) / name
    p.write_bytes(data)
    return d, p


def _readers():
    from charter.core.records import read_prompts
    from critique.label.inputs import read_label_pairs
    from training.data import load_pair_rows, load_sft_rows

    return [read_prompts, read_label_pairs, load_pair_rows, load_sft_rows]


@FUZZ
@given(rows=st.lists(records, min_size=0, max_size=4),
       fmt=st.sampled_from(["jsonl", "json", "jsonl.gz", "csv"]), cut=st.integers(0, 60),
       torn=st.booleans())
def test_record_files_end_in_success_or_one_clear_error(rows, fmt, cut, torn, deadline):
    lines = [_json_line(r) for r in rows]
    if fmt == "json":
        data = ("[" + ",".join(lines) + "]").encode()
    elif fmt == "csv":
        keys = sorted({k for r in rows for k in r}) or ["prompt"]
        body = [",".join(keys)] + [",".join(json.dumps(str(r.get(k, "")))
                                            for k in keys) for r in rows]
        data = "\n".join(body).encode("utf-8", "surrogatepass")
    else:
        data = "".join(x + "\n" for x in lines).encode()
        if fmt.endswith(".gz"):
            data = gzip.compress(data)
    if torn and data:
        data = data[: max(1, len(data) - cut)]
    d, p = _as_file(f"in.{fmt}", data)
    with d:
        for read in _readers():
            ends_well(deadline, read, p)


@FUZZ
@given(data=st.binary(max_size=400), fmt=st.sampled_from(["jsonl", "json", "csv", "parquet",
                                                           "jsonl.gz"]))
def test_arbitrary_bytes_end_in_success_or_one_clear_error(data, fmt, deadline):
    d, p = _as_file(f"in.{fmt}", data)
    with d:
        for read in _readers():
            ends_well(deadline, read, p)


config_values = st.dictionaries(
    st.sampled_from(["temperature", "seed", "max_new_tokens", "model", "backend", "top_p",
                     "prompts", "out", "batch_size", "backend_options", "limit", "on_error",
                     "base_url", "nonsense"]) | text, json_values, max_size=5)


@FUZZ
@given(values=config_values, raw=st.one_of(st.none(), st.text(max_size=80)))
def test_configs_end_in_success_or_one_clear_error(values, raw, deadline):
    from charter.commands.generate import GenerateConfig
    from charter.core.config import build_config

    text_ = raw if raw is not None else yaml.safe_dump(values, allow_unicode=True)
    d, p = _as_file("c.yaml", text_.encode("utf-8", "surrogatepass"))
    with d:
        ends_well(deadline, build_config, GenerateConfig, {"prompts": "p.jsonl", "out": "o.jsonl"},
                  p)


template_parts = st.sampled_from([
    "{{ response }}", "{{ prompt|upper }}", "{% for x in range(3) %}{{ x }}{% endfor %}",
    "{{ conversation[:10] }}", "{{ ([1] * 50000)|sum(start=[]) }}", "{{ 'x' * 100000 }}",
    "{% if response %}ok{% endif %}", "{{ nope }}", "{{ response.__class__ }}", "{% set a = 1 %}",
    "{{", "}}", "{% for %}", "Critique it.", "{{ options|join(', ') }}", "\ud800", "",
])
templates = st.lists(template_parts, min_size=0, max_size=4).map("".join)
principle = st.fixed_dictionaries({"id": st.sampled_from(["a", "b", "bad id", ""])},
                                  optional={"critique": templates, "revision": templates,
                                            "preference": templates, "tags": json_values,
                                            "unknown": text})
principle_files = st.fixed_dictionaries(
    {"name": text, "description": text, "principles": st.lists(principle, max_size=3)},
    optional={"label_template": templates, "few_shot": json_values, "version": json_values})


@FUZZ
@given(doc=principle_files, raw=st.booleans())
def test_principle_files_end_in_success_or_one_clear_error(doc, raw, deadline):
    from constitution import load_constitution

    try:
        text_ = yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return
    if raw:  # break it somewhere: a tab, a torn line
        text_ = text_.replace("  ", "\t", 1)[: max(1, len(text_) - 7)]
    d, p = _as_file("p.yaml", text_.encode("utf-8", "surrogatepass"))
    with d:
        ends_well(deadline, load_constitution, p)


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(["constitution", "harmful", "benign", "model",
                                            "critique", "sft", "seed", "iterations", "label",
                                            "out", "judge"]) | text,
                           st.one_of(json_values, st.fixed_dictionaries(
                               {"path": text}, optional={"eval": json_values})), max_size=5))
def test_pipeline_files_end_in_success_or_one_clear_error(doc, deadline):
    from charter.pipeline_file import load_pipeline_file

    try:
        text_ = yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return
    d, p = _as_file("pipe.yaml", text_.encode("utf-8", "surrogatepass"))
    with d:
        ends_well(deadline, load_pipeline_file, p)
