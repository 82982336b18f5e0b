"""charter/core/config.py: YAML values overridden by flags; errors name the file, line and key."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from charter.core.config import add_config_args, build_config, field_docs
from charter.core.errors import CharterError


@dataclass(kw_only=True)
class DemoConfig:
    out: str
    """Where results go."""
    model: str | None = None
    """Model name."""
    batch_size: int = 8
    """Rows per batch."""
    temperature: float = 0.0
    """Sampling temperature."""
    resume: bool = True
    """Skip finished work."""
    stops: list[str] | None = None
    """Stop strings."""

    def validate(self) -> None:
        if self.batch_size < 1:
            raise CharterError("must be >= 1", field="batch_size")


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_config_args(p, DemoConfig)
    return p.parse_args(argv)


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("out: from-yaml\nbatch_size: 4\ntemperature: 0.5\n")
    cfg = build_config(DemoConfig, parse(["--batch-size", "2"]), y)
    assert (cfg.out, cfg.batch_size, cfg.temperature, cfg.model) == ("from-yaml", 2, 0.5, None)
    cfg = build_config(DemoConfig, parse(["--out", "cli", "--stops", "a", "b"]), y)
    assert cfg.out == "cli" and cfg.stops == ["a", "b"] and cfg.batch_size == 4


def test_bool_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("out: x\nresume: false\n")
    assert build_config(DemoConfig, parse([]), y).resume is False
    assert build_config(DemoConfig, parse(["--resume"]), y).resume is True
    assert build_config(DemoConfig, parse(["--out", "x", "--no-resume"])).resume is False
    assert build_config(DemoConfig, parse(["--out", "x"])).resume is True


def test_unknown_key_names_file_and_line(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("out: x\n\nbatch_sise: 3\n")
    with pytest.raises(CharterError, match=r"c\.yaml:3: batch_sise: unknown config key"):
        build_config(DemoConfig, parse([]), y)


def test_wrong_types(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("out: x\nbatch_size: lots\n")
    with pytest.raises(CharterError, match=r"c\.yaml:2: batch_size: expected an integer"):
        build_config(DemoConfig, parse([]), y)
    y.write_text("out: x\nresume: maybe\n")
    with pytest.raises(CharterError, match=r"c\.yaml:2: resume: expected true or false"):
        build_config(DemoConfig, parse([]), y)
    y.write_text("out: [1, 2]\n")
    with pytest.raises(CharterError, match=r"c\.yaml:1: out: expected a string"):
        build_config(DemoConfig, parse([]), y)
    # a bad flag value is blamed on the flag, not on the YAML file
    y.write_text("out: x\n")
    with pytest.raises(CharterError, match=r"^--temperature: expected a number, got 'hot'"):
        build_config(DemoConfig, parse(["--temperature", "hot"]), y)


def test_missing_required_invalid_yaml_and_validate(tmp_path):
    with pytest.raises(CharterError, match=r"missing required setting\(s\): --out"):
        build_config(DemoConfig, parse([]))
    y = tmp_path / "c.yaml"
    y.write_text("out: x\nbatch_size: [1\n")
    with pytest.raises(CharterError, match=r"c\.yaml:\d+: invalid YAML"):
        build_config(DemoConfig, parse([]), y)
    y.write_text("- just\n- a list\n")
    with pytest.raises(CharterError, match=r"c\.yaml:1: expected a mapping"):
        build_config(DemoConfig, parse([]), y)
    with pytest.raises(CharterError, match="config file not found"):
        build_config(DemoConfig, parse([]), tmp_path / "none.yaml")
    with pytest.raises(CharterError, match=r"^batch_size: must be >= 1"):
        build_config(DemoConfig, parse(["--out", "x", "--batch-size", "0"]))


def test_field_docs_become_help():
    assert field_docs(DemoConfig)["batch_size"] == "Rows per batch."
    help_text = argparse.ArgumentParser()
    add_config_args(help_text, DemoConfig)
    assert "Rows per batch. (default: 8)" in help_text.format_help()
    assert "Where results go. (required)" in help_text.format_help()


@dataclass
class PercentConfig:
    slow: bool = False
    """recompute activations (less memory, ~30% slower)"""
    fmt: str = "%(prog)s-%d"
    """a format string"""


def test_percent_in_docs_and_defaults_shows_literally():
    # argparse %-formats help: an unescaped "30% s" read as a conversion and printed the
    # action's dict into --help
    parser = argparse.ArgumentParser()
    add_config_args(parser, PercentConfig)
    text = " ".join(parser.format_help().split())
    assert "(less memory, ~30% slower) (default: False)" in text
    assert "(default: %(prog)s-%d)" in text


def test_every_command_help_renders():
    """Each subcommand's --help formats (a bad "%" anywhere raises or garbles it)."""
    from charter.cli import build_parser

    parser = build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    seen = 0
    stack = [p for s in subs for p in s.choices.values()]
    while stack:
        p = stack.pop()
        text = p.format_help()
        assert "option_strings" not in text, p.prog
        seen += 1
        stack += [q for a in p._actions if isinstance(a, argparse._SubParsersAction)
                  for q in a.choices.values()]
    assert seen >= 8


def test_generate_config_fields_all_documented():
    import dataclasses

    from charter.commands.generate import GenerateConfig

    docs = field_docs(GenerateConfig)
    assert {f.name for f in dataclasses.fields(GenerateConfig)} == set(docs)
