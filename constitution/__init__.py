"""Constitutions: principle files, their validation, sandboxed rendering and seeded sampling."""

from constitution.loader import (
    Constitution,
    ConstitutionError,
    FewShot,
    LabelFewShot,
    Principle,
    load_constitution,
    parse_constitution,
    transcript,
)
from constitution.sampling import draw, rng_for

__all__ = ["Constitution", "ConstitutionError", "FewShot", "LabelFewShot", "Principle",
           "load_constitution", "parse_constitution", "transcript", "draw", "rng_for"]
