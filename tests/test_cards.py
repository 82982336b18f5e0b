"""Model and dataset cards: YAML front matter the Hub indexes (base_model a Hub id, never a
local path; library_name; tags with the stage; datasets), constitution name and hash."""

from __future__ import annotations

import json

from training.cards import (
    EMBEDDED_HUB_ID,
    dataset_card,
    front_matter,
    hub_base_model,
    model_card,
    read_front_matter,
)


def meta_of(text: str, tmp_path) -> dict:
    f = tmp_path / "README.md"
    f.write_text(text)
    return read_front_matter(f)


def test_base_model_is_a_hub_id_never_a_local_path(tmp_path):
    assert hub_base_model(None, "/cache/charter/models/smollm2") == EMBEDDED_HUB_ID
    assert hub_base_model("smollm2", "/cache/charter/models/smollm2") == EMBEDDED_HUB_ID
    assert hub_base_model("org/model", "org/model") == "org/model"
    # a previous Charter run: its card's base_model carries through (SFT → DPO)
    sft = tmp_path / "sft" / "final"
    sft.mkdir(parents=True)
    (sft / "README.md").write_text(front_matter({"base_model": EMBEDDED_HUB_ID}) + "# x\n")
    assert hub_base_model(str(tmp_path / "sft"), str(sft)) == EMBEDDED_HUB_ID
    # a local folder that names no hub id anywhere: left out rather than a path
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"_name_or_path": str(plain)}))
    assert hub_base_model(str(plain), str(plain)) is None


def test_model_card_front_matter(tmp_path):
    prov = {"data": "runs/critique/sft.jsonl", "constitution_sha256": "ab" * 32,
            "constitution_name": "harmless"}
    card = model_card("dpo", {"model": None, "lora": False}, prov,
                      "/var/cache/charter/models/smollm2", {"steps": 3},
                      roles={"policy": "smollm2", "labeller": "org/judge-70b"},
                      headline={"harmful refusal": "25.0% -> 57.5%"})
    meta = meta_of(card, tmp_path)
    assert meta["base_model"] == EMBEDDED_HUB_ID and meta["library_name"] == "transformers"
    assert {"dpo", "charter", "constitutional-ai"} <= set(meta["tags"])
    assert "datasets" not in meta  # a local file is no Hub dataset
    assert "/var/cache/" not in card.split("## Config")[0]  # no local cache path above the config
    assert f"`harmless`, sha256 `{'ab' * 32}`" in card
    assert "| labeller | `org/judge-70b` |" in card and "harmful refusal: 25.0% -> 57.5%" in card
    hub = model_card("sft", {"model": "org/base", "lora": True}, {"data": "org/prefs"}, "org/base",
                     {})
    meta = meta_of(hub, tmp_path)
    assert meta["datasets"] == ["org/prefs"] and meta["library_name"] == "peft"
    assert "sft" in meta["tags"] and "lora" in meta["tags"]


def test_dataset_card_front_matter(tmp_path):
    card = dataset_card(source="runs/quick", constitution={"name": "harmless", "sha256": "cd" * 32},
                        configs={"sft": "sft/train.jsonl", "preference": "preference/train.jsonl"},
                        counts={"sft": 3, "preference": 2}, fmt="conversational",
                        options={"min_margin": 0.1})
    meta = meta_of(card, tmp_path)
    assert meta["license"] == "other" and meta["task_categories"] == ["text-generation"]
    assert {"charter", "constitutional-ai", "dpo", "sft"} <= set(meta["tags"])
    assert meta["configs"][1] == {"config_name": "preference", "data_files": [
        {"split": "train", "path": "preference/train.jsonl"}]}
    assert "`harmless`, sha256 `" + "cd" * 32 in card and "runs/quick" in card


def test_roles_and_eval_headline_go_into_an_existing_card(tmp_path):
    from training.cards import add_to_card

    readme = tmp_path / "README.md"
    readme.write_text(model_card("dpo", {"model": None}, {"data": "d"}, "p", {"steps": 2}))
    assert add_to_card(readme, roles={"labeller": "org/big"},
                       headline={"model_harmful_refusal": 0.575})
    assert add_to_card(readme, headline={"model_harmful_refusal": 0.6})  # replaced, not added
    text = readme.read_text()
    assert text.count("## Evaluation") == 1 and "model_harmful_refusal: 0.6\n" in text
    assert text.index("## Roles") < text.index("## Evaluation") < text.index("## Result")
    assert read_front_matter(readme)["base_model"] == EMBEDDED_HUB_ID
    assert not add_to_card(tmp_path / "missing" / "README.md", headline={"a": 1})
