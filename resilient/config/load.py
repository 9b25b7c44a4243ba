"""Reading a spec: TOML or YAML, `--set` overrides, validation into one clear message.

Contract: `load_spec(path, overrides)` reads TOML (`.toml`) or YAML (`.yaml`/`.yml`), applies
`--set dotted.key=value` overrides and returns a frozen, fully validated `JobSpec`, or raises
`SpecError` whose message names every offending field and what to do about it.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from resilient.config.spec import JobSpec
from resilient.errors import SpecError


def parse_value(raw: str) -> Any:
    """A --set value: TOML literal if it parses (40, 1e-3, true, [1,2], "x"), else the raw
    string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a raw spec tree (in place) and return it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.steps=40")
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if p == "chaos" and node is tree and isinstance(node.get(p), list):
                node[p] = {"plan": node[p]}  # [[chaos]] entries, as the [chaos] table's plan
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {item!r}: {p!r} is not a table")
        node[parts[-1]] = parse_value(raw.strip())
    return tree


def read_tree(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a spec file into a raw tree; SpecError on a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(
            f"spec file {str(p)!r} does not exist; pass the path of a .toml or .yaml job spec"
        )
    kind = "YAML" if p.suffix in (".yaml", ".yml") else "TOML"
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise SpecError(
            f"spec file {str(p)!r} is not a readable text file ({e}); pass a "
            ".toml or .yaml job spec"
        ) from None
    try:
        tree = (yaml.safe_load(text) or {}) if kind == "YAML" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, ValueError) as e:
        raise SpecError(f"spec file {str(p)!r} is not valid {kind}: {e}") from None
    if not isinstance(tree, dict):
        raise SpecError(f"spec file {str(p)!r} must hold a table of keys at the top level")
    return tree


def _near(loc: tuple) -> str:
    """ "did you mean SECTION.KEY? " for an unknown key close to one of its section's keys."""
    model: Any = JobSpec
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:  # in a list ([[chaos]]) or a free-form table: no names to offer
            return ""
        model = field.annotation
    near = difflib.get_close_matches(str(loc[-1]), list(getattr(model, "model_fields", {})), n=1)
    return f"did you mean {'.'.join([*map(str, loc[:-1]), near[0]])}? " if near else ""


def _describe(err: ValidationError, entries_as_list: bool = False) -> str:
    """One line per bad field, named as the user wrote it (`chaos.0.fault` for a [[chaos]] list)."""
    lines = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"])  # none: a check across sections
        if entries_as_list and field.startswith("chaos.plan."):
            field = "chaos." + field.removeprefix("chaos.plan.")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = (
                f"unknown key; {_near(e['loc'])}remove it or check its spelling against the "
                "README's spec reference"
            )
        elif e["type"] == "missing":
            msg = "required; add it to the spec"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {field}: {msg}" if field else f"  {msg}")  # the message names them
    return "invalid job spec:\n" + "\n".join(lines)


def validate_tree(tree: dict[str, Any]) -> JobSpec:
    """Validate a raw tree into a JobSpec; SpecError lists every bad field with its fix."""
    try:
        return JobSpec.model_validate(tree)
    except ValidationError as e:
        raise SpecError(_describe(e, isinstance(tree.get("chaos"), list))) from None


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a job spec file."""
    return validate_tree(apply_overrides(read_tree(path), overrides or []))
