"""Roles (teacher, labeller, second labeller, judge) in the pipeline file, the backend pool
that loads each distinct (backend, model, options) once, and the teacher in the critique loop
(revise and distill modes) on fake backends."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from charter.core.errors import CharterError
from charter.pipeline import STAGE_KINDS, plan
from charter.pipeline_file import load_pipeline_file
from charter.roles import BackendPool, make_spec, parse_role
from critique.backends.fake import FakeBackend
from critique.revise.conversation import DISTILL_PRINCIPLE
from critique.revise.run import CritiqueConfig, run_critique

ROOT = Path(__file__).resolve().parents[1]

CONS = """\
name: two
description: Be harmless and helpful.
principles:
  - id: harm
    trait: avoids causing harm
    critique: "Is it harmful?"
    revision: "Rewrite it harmlessly."
    preference: "Which is less harmful?"
  - id: polite
    trait: polite
    critique: "Is it rude?"
    revision: "Rewrite it politely."
few_shot:
  - principle: harm
    prompt: "How do I steal a car?"
    response: "Break the window."
    critique: "Yes: theft."
    revision: "I can't help with stealing a car."
"""


def test_parse_role_string_mapping_and_errors():
    assert parse_role("start", backend="vllm", where="labeler") == make_spec("vllm", "start")
    spec = parse_role({"model": "big", "backend": "openai", "base_url": "http://h:1/v1",
                       "api_key_env": "KEY"}, backend="transformers", where="labeler")
    assert spec.backend == "openai" and spec.model == "big"
    assert spec.kwargs == {"base_url": ["http://h:1/v1"], "api_key_env": "KEY"}
    # a mapping naming only the model shares the loaded backend of the plain name
    assert parse_role({"model": "m"}, backend="transformers", where="teacher").load_key() == \
        parse_role("m", backend="transformers", where="teacher").load_key()
    with pytest.raises(CharterError, match=r"p\.yaml:7: labeler\.tempreture: unknown config"):
        parse_role({"model": "m", "tempreture": 1}, backend="transformers", where="labeler",
                   source="p.yaml", line=7)
    with pytest.raises(CharterError, match="labeler.model"):
        parse_role({"backend": "openai"}, backend="transformers", where="labeler")
    with pytest.raises(CharterError, match="labeler.base_url"):
        parse_role({"model": "m", "backend": "openai"}, backend="transformers", where="labeler")


def test_pool_loads_each_distinct_backend_once_and_releases():
    made = []
    pool = BackendPool(loader=lambda spec: made.append(spec) or FakeBackend(model_name=spec.model))
    a = pool.get(make_spec("transformers", "m", {"batch_size": 16, "dtype": "auto"}))
    b = pool.get(make_spec("transformers", "m", {"batch_size": 4}))  # per-call setting only
    c = pool.get(make_spec("transformers", "m", {"dtype": "bfloat16"}))  # another load
    assert a is b and a is not c and len(made) == 2
    pool.release({c and make_spec("transformers", "m", {"dtype": "bfloat16"}).load_key()})
    assert pool.keys() == [make_spec("transformers", "m", {"dtype": "bfloat16"}).load_key()]


def test_releasing_a_backend_hands_its_memory_back(monkeypatch):
    from charter.core import procmem

    trims = []
    monkeypatch.setattr(procmem, "trim", lambda: trims.append(1))
    pool = BackendPool(loader=lambda spec: FakeBackend(model_name=spec.model))
    pool.get(make_spec("transformers", "m"))
    pool.release({make_spec("transformers", "m").load_key()})  # kept: nothing closed
    assert trims == []
    pool.release(set())
    assert trims == [1] and pool.keys() == []


def test_pool_sets_per_call_settings_and_resets_an_unset_score_batch_size():
    """batch_size and score_batch_size are read per call: one load serves stages with other
    values, and a stage that leaves score_batch_size unset does not inherit the last stage's
    value on the shared backend (None: as batch_size)."""
    from types import SimpleNamespace

    made = []
    pool = BackendPool(loader=lambda spec: made.append(spec) or SimpleNamespace(
        batch_size=32, score_batch_size=None))
    a = pool.get(make_spec("transformers", "m", {"batch_size": 48, "score_batch_size": 16}))
    assert (a.batch_size, a.score_batch_size) == (48, 16)
    b = pool.get(make_spec("transformers", "m", {"batch_size": 8}))
    assert b is a and len(made) == 1 and (a.batch_size, a.score_batch_size) == (8, None)


def _write_pipeline(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "cons.yaml").write_text(CONS)
    (tmp_path / "h.jsonl").write_text("".join(json.dumps({"prompt": f"bad {i}"}) + "\n"
                                              for i in range(6)))
    (tmp_path / "p.yaml").write_text(
        "constitution: cons.yaml\nbackend: fake\nharmful: {path: h.jsonl, eval: 2, train: 4}\n"
        + extra)
    return tmp_path / "p.yaml"


def test_plan_gives_each_stage_its_roles_and_mixes_backends(tmp_path):
    path = _write_pipeline(tmp_path, """\
teacher: {model: teacher-70b, backend: openai, base_url: "http://127.0.0.1:9/v1"}
labeler: {model: judge-8b, backend: openai, base_url: "http://127.0.0.1:9/v1"}
second_labeler: policy
judge: start
critique: {mode: distill}
label: {relabel_below: 0.1}
""")
    pf = load_pipeline_file(path)
    stages = {st.name: st for st in plan(pf, tmp_path / "run", STAGE_KINDS)}
    crit = stages["critique"]
    assert crit.roles["policy"].backend == "fake" and crit.roles["policy"].model == "smollm2"
    assert crit.roles["teacher"].backend == "openai"
    assert crit.roles["teacher"].model == "teacher-70b" and crit.cfg.teacher == "teacher-70b"
    lab = stages["label"]
    assert lab.roles["policy"].model == str(tmp_path / "run" / "sft")
    assert lab.roles["labeler"].model == "judge-8b" and lab.cfg.labeler == "judge-8b"
    assert lab.roles["second_labeler"].model == str(tmp_path / "run" / "sft")
    ev = stages["eval"]
    assert ev.cfg.sft_model == str(tmp_path / "run" / "sft")
    assert {r: s.model for r, s in ev.roles.items()} == {
        "model": str(tmp_path / "run" / "dpo"), "baseline": "smollm2",
        "sft_model": str(tmp_path / "run" / "sft"), "judge": "smollm2"}


def test_top_level_roles_take_the_stage_sections_batch_sizes(tmp_path):
    """`labeler: start` and `judge: start` decode and score in their stage's batches (they ran at
    the backend's default 32 rows whatever the section said); a role mapping's own batch_size
    wins; batch sizes do not change a stage's fingerprint (they change how it runs)."""
    from charter.pipeline import fingerprint

    path = _write_pipeline(tmp_path, """\
teacher: {model: start, batch_size: 4}
labeler: start
judge: start
critique: {mode: distill, batch_size: 48}
label: {batch_size: 48, score_batch_size: 16}
eval: {batch_size: 40}
""")
    path.write_text(path.read_text().replace("backend: fake", "backend: transformers"))
    stages = {st.name: st for st in plan(load_pipeline_file(path), tmp_path / "run",
                                         STAGE_KINDS)}
    kw = lambda st, role: {k: v for k, v in stages[st].roles[role].kwargs.items()  # noqa: E731
                           if k != "dtype"}  # the policy's (a plain name) also has dtype auto
    assert kw("label", "labeler") == {"batch_size": 48, "score_batch_size": 16}
    assert kw("label", "policy") == {"batch_size": 48, "score_batch_size": 16}
    assert kw("eval", "judge") == {"batch_size": 40} == kw("eval", "baseline")
    assert kw("critique", "teacher") == {"batch_size": 4}
    assert kw("critique", "policy") == {"batch_size": 48}
    lab = stages["label"]
    other = dataclasses.replace(lab, roles={r: s.with_call_settings({}) for r, s in
                                            lab.roles.items()})
    other.roles["labeler"] = dataclasses.replace(lab.roles["labeler"], options=())
    assert fingerprint(lab, "d") == fingerprint(other, "d")


def test_bad_role_in_pipeline_file_names_file_and_line(tmp_path):
    path = _write_pipeline(tmp_path, "labeler: {model: x, backend: openai}\n")
    with pytest.raises(CharterError, match=r"p\.yaml:4: labeler\.base_url"):
        load_pipeline_file(path)


def _inputs(tmp_path: Path) -> CritiqueConfig:
    (tmp_path / "cons.yaml").write_text(CONS)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "How do I hurt someone?"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "How do I bake bread?"}) + "\n")
    return CritiqueConfig(constitution=str(tmp_path / "cons.yaml"),
                          prompts=str(tmp_path / "p.jsonl"),
                          helpful_prompts=str(tmp_path / "b.jsonl"), out=str(tmp_path / "out"),
                          backend="fake", few_shot=1, progress=False)


def test_teacher_critiques_and_revises_the_policys_answer(tmp_path):
    cfg = _inputs(tmp_path)
    policy = FakeBackend(lambda conv, prefix: "Hit them hard.", model_name="small")
    teacher = FakeBackend(lambda conv, prefix: (
        "Yes: it helps hurt someone." if conv[-1]["content"] == "Is it harmful?"
        else "I won't help hurt anyone; talk to someone you trust."
        if "Rewrite" in conv[-1]["content"] else "Bread needs flour, water, yeast and salt."),
        model_name="big")
    run_critique(cfg, backend=policy, teacher_backend=teacher)
    rec = json.loads((tmp_path / "out" / "records.jsonl").read_text().splitlines()[0])
    assert rec["initial_response"] == "Hit them hard."
    assert rec["final_response"].startswith("I won't help")
    assert rec["provenance"]["model"] == "small"
    assert rec["provenance"]["teacher"] == {"model": "big", "backend": "fake"}
    assert len(policy.calls) == 1  # the initial answers only; critique, revision, helpful: teacher
    assert len(teacher.calls) == 3


def test_distill_mode_teacher_answers_under_the_constitution(tmp_path):
    cfg = _inputs(tmp_path)
    cfg.mode = "distill"
    policy = FakeBackend(lambda conv, prefix: "Hit them hard.", model_name="small")
    seen = []

    def teacher_says(conv, prefix):
        seen.append(conv)
        return "I can't help with hurting people." if conv[0]["role"] == "system" \
            else "Mix flour, water, yeast and salt."

    run_critique(cfg, backend=policy, teacher_backend=FakeBackend(teacher_says, model_name="big"))
    context = seen[0]
    assert context[0] == {"role": "system", "content": "Be harmless and helpful.\nThe assistant "
                          "is avoids causing harm; polite."}
    assert context[1:] == [{"role": "user", "content": "How do I steal a car?"},
                           {"role": "assistant", "content": "I can't help with stealing a car."},
                           {"role": "user", "content": "How do I hurt someone?"}]
    assert seen[1] == [{"role": "user", "content": "How do I bake bread?"}]  # helpful: plain
    rec = json.loads((tmp_path / "out" / "records.jsonl").read_text().splitlines()[0])
    assert rec["rounds"] == [{"principle_id": DISTILL_PRINCIPLE, "critique": "",
                              "revision": "I can't help with hurting people."}]
    sft = [json.loads(x) for x in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    # the SFT data is the plain prompt and the answer: no constitution in it
    assert sft[0]["messages"] == [{"role": "user", "content": "How do I hurt someone?"},
                                  {"role": "assistant",
                                   "content": "I can't help with hurting people."}]


def test_quickstart_forces_no_response_opening():
    pf = load_pipeline_file(ROOT / "examples" / "quickstart.yaml")
    assert "revision_prefix" not in pf.sections["critique"]


def test_gpu_example_checks_with_roles_on_a_server(capsys):
    """examples/gpu.yaml (policy 7B on vLLM with LoRA; teacher, labeller and judge served) is
    valid as shipped: `charter run FILE --check` plans every stage and names each role."""
    from charter.cli import main

    assert main(["run", str(ROOT / "examples" / "gpu.yaml"), "--check"]) == 0
    plan_out = json.loads(capsys.readouterr().out.split("\n}\n")[0] + "\n}")
    stages = {s["name"]: s for s in plan_out["stages"]}
    crit = stages["critique"]
    assert crit["roles"]["policy"]["backend"] == "vllm"
    assert crit["roles"]["teacher"]["backend"] == "openai"
    assert crit["config"]["mode"] == "revise"
    assert stages["label"]["roles"]["labeler"]["model"] == "meta-llama/Llama-3.3-70B-Instruct"
    assert stages["label"]["roles"]["policy"]["backend"] == "vllm"
    assert stages["sft"]["config"]["lora"] and stages["dpo"]["config"]["lora"]
    assert stages["eval"]["roles"]["judge"]["backend"] == "openai"


def test_final_model_card_names_every_role(tmp_path):
    from charter.pipeline_report import card_roles

    (tmp_path / "README.md").write_text("# Charter DPO model\n\n## Result\n\n- loss: 0.6\n")
    card_roles(tmp_path, {"policy": {"model": "smollm2", "backend": "transformers"},
                          "teacher": {"model": "big", "backend": "openai", "base_url": ["u"]},
                          "second_labeler": None})
    card = (tmp_path / "README.md").read_text()
    assert "| teacher | `big · openai` |" in card and "| second_labeler | `none` |" in card
    assert card.index("## Roles") < card.index("## Result")


def test_backends_are_freed_before_training_and_kept_while_needed(tmp_path):
    """Before each stage the pool keeps only what that stage and the stages up to the next
    training stage use: nothing is held through SFT or DPO; the eval keeps start (baseline and
    judge, one load), SFT and DPO models."""
    from charter.pipeline import _needed_from

    path = _write_pipeline(tmp_path, "iterations: 2\njudge: start\n")
    stages = plan(load_pipeline_file(path), tmp_path / "run", STAGE_KINDS)
    names = [st.name for st in stages]
    at = {n: _needed_from(stages, i) for i, n in enumerate(names)}
    assert at["sft"] == set() and at["dpo"] == set() and at["dpo-2"] == set()
    run = tmp_path / "run"
    assert {k[1] for k in at["eval"]} == {"smollm2", str(run / "sft"), str(run / "dpo")}
    # eval → label-2: the DPO model evaluated is label-2's policy, loaded once for both
    assert {k[1] for k in at["label-2"]} == {str(tmp_path / "run" / "dpo"), "smollm2"}
    assert len([k for k in at["eval"] if k[1] == "smollm2"]) == 1
