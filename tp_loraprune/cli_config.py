"""`--config FILE`: flag values of a `tp-loraprune` subcommand read from a YAML or JSON file.

The file is a mapping whose keys are the subcommand's flag names, with dashes or underscores (`lora-r: 16` or
`lora_r: 16`, as in accelerate's and HfArgumentParser's YAML/JSON files); flags on the command line override
the file. Values are checked as the flags are: numbers by the flag's type, choices against its choices, on/off
flags as booleans; comma-separated flags (`target-modules`, `ppl`, `tasks`) also take lists. An unknown key is
refused with the list of valid ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

_NOT_IN_FILE = ("help", "config")


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest → action of every option a config file may set."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in _NOT_IN_FILE}


def _flag_name(action: argparse.Action) -> str:
    return next(s for s in action.option_strings if s.startswith("--")).removeprefix("--")


def _load(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml  # PyYAML, a dependency of transformers
        except ImportError:
            raise ValueError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or use .json") from None

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise ValueError(f"--config {path}: not valid YAML{line}.") from None
    raise ValueError(f"--config {path}: the file must end in .yaml, .yml or .json.")


_KINDS = {int: "an integer", float: "a number"}


def _value(action: argparse.Action, value: Any) -> Any:
    """`value` as the flag would give it, or a ValueError saying what the flag takes."""
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        if not isinstance(value, bool):
            raise ValueError(f"takes true or false, got {value!r}")
        return value
    if value is None:
        if action.default is not None:
            raise ValueError(f"cannot be null (default: {action.default!r})")
        return None
    if action.type is None and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # comma-separated flags
    converted: Any
    if action.type is None:
        if not isinstance(value, str):
            raise ValueError(f"takes a string, got {value!r}")
        converted = value
    else:
        kind = _KINDS.get(action.type, "a value of its type")  # type: ignore[call-overload]
        if isinstance(value, (bool, list, dict)):
            raise ValueError(f"takes {kind}, got {value!r}")
        try:
            converted = action.type(str(value))  # type: ignore[operator]
        except (TypeError, ValueError):
            raise ValueError(f"takes {kind}, got {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"must be one of {list(action.choices)}, got {value!r}")
    return converted


def read_config_file(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """dest → value of every flag the file at `path` sets for `parser` (a subcommand's parser), checked.

    Raises ValueError (one line) for a missing or unreadable file, a file that is not a mapping, an unknown key
    (listing the valid ones) and a value the flag would not take."""
    path = Path(path)
    data = _load(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got a {type(data).__name__}.")
    flags = _flags(parser)
    values: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        dest = str(key).removeprefix("--").replace("-", "_")
        if dest not in flags:
            unknown.append(str(key))
            continue
        if dest in values:
            raise ValueError(f"--config {path}: {key!r} sets --{_flag_name(flags[dest])} a second time.")
        try:
            values[dest] = _value(flags[dest], value)
        except ValueError as e:
            raise ValueError(f"--config {path}: {key}: --{_flag_name(flags[dest])} {e}.") from None
    if unknown:
        valid = ", ".join(sorted(_flag_name(a) for a in flags.values()))
        raise ValueError(f"--config {path}: unknown key(s) {', '.join(unknown)}; valid keys: {valid}.")
    return values


def given_on_command_line(build_parser, argv: list[str]) -> set[str]:
    """The dests of the options `argv` sets (a parse in which no option has a default)."""
    parser = build_parser()
    for sub in _subparsers(parser).values():
        for action in sub._actions:
            action.default = argparse.SUPPRESS
        sub._defaults.clear()
    return {k for k in vars(parser.parse_args(argv)) if k != "command"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return _subparsers(parser)[name]
