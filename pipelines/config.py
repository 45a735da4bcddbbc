"""Job configs: nested dataclasses are the one source of truth for every verb's options.

A config is filled from defaults ← `--config` YAML ← the verb's flags ← `--set section.option=value`
overrides (later wins), and checked on the way: unknown keys are errors that list the known ones, values
are typed, `Literal` fields accept only their choices, and a key given twice in one YAML mapping is an
error (YAML alone keeps the last). So a typo never silently falls back to a default. A `--config` file
that cannot be read as YAML (a folder, a binary file, a syntax error) is one `ConfigError` line naming the
file, what is wrong and where.

Flags are generated, not declared: each verb names which fields get a flag (`FlagTable`: flag → field
path), and the flag's type, choices, default and help text come from the field itself (`option(default,
help)`), so each of them is written once. Every other field stays reachable with `--set`, and `--print-config`
prints the resolved config as YAML that `--config` accepts back.

Fields a job derives itself (the model's channels from the dataset, the per-worker batch from the global
one) are listed in the config class's `DERIVED` and refused as user input with a message saying where
their value comes from.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
FlagTable = dict[str, str]  # "--flag" (or a positional NAME) → "section.field"


class ConfigError(ValueError):
    """A user's config is wrong: the message says which option and what is allowed."""


def option(default: Any, help: str) -> Any:
    """A config field with its help text: the one place where its default and its meaning are written."""
    if isinstance(default, list | dict | set):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------------------
# YAML as a config means it
# ----------------------------------------------------------------------------------------------------------


class _Int(int):
    """An integer read from a config, with the text it was written as (a text option takes that back)."""

    text: str


class _Float(float):
    """A number with a fraction or an exponent read from a config, with the text it was written as."""

    text: str


class ConfigLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, whose plain scalars surprise in a config: 1e-4 is text (no dot), 010 is
    eight, yes/no/on/off are booleans, 2024-06-01 is a date. Here they follow YAML 1.2's core schema
    (1e-4 a number, 010 ten, only true/false booleans, dates text), and a number keeps its spelling for a
    text option (`_coerce`): `--set mlflow.experiment=1.10` stays "1.10". A key given twice in one mapping
    is a `ConfigError`: YAML alone keeps the last, so a second `model:` block dropped the whole first one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            # The mapping's own keys, before `<<` merges are flattened in: those may be overridden.
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, mark = self.construct_object(key_node), key_node.start_mark
                if key in seen:
                    first = seen[key]
                    where = (
                        f"line {mark.line + 1}, columns {first.column + 1} and {mark.column + 1}"
                        if first.line == mark.line
                        else f"lines {first.line + 1} and {mark.line + 1}"
                    )
                    raise ConfigError(f"key {key_node.value!r} appears twice ({where}): merge them into one")
                seen[key] = mark
        return super().construct_mapping(node, deep)


_REPLACED = {f"tag:yaml.org,2002:{name}" for name in ("bool", "int", "float", "timestamp")}
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
ConfigLoader.add_implicit_resolver(  # before float: its pattern also matches plain digits
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Int:
    text = str(loader.construct_scalar(node))
    digits = text.lstrip("+-")
    base = {"0x": 16, "0o": 8}.get(digits[:2], 10)
    number = _Int(int(digits[2:] if base != 10 else digits, base) * (-1 if text.startswith("-") else 1))
    number.text = text
    return number


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Float:
    text = str(loader.construct_scalar(node))
    lowered = text.lower()
    value = float(lowered.replace(".inf", "inf").replace(".nan", "nan"))
    number = _Float(value)
    number.text = text
    return number


ConfigLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
ConfigLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class _ConfigDumper(yaml.SafeDumper):
    """Dumps what `ConfigLoader` read (its numbers as plain numbers)."""


_ConfigDumper.add_representer(_Int, yaml.SafeDumper.represent_int)
_ConfigDumper.add_representer(_Float, yaml.SafeDumper.represent_float)


def load_yaml(text: str) -> Any:
    """A config's YAML text (a file, a `--set` value) as `ConfigLoader` reads it."""
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: builds no Python objects


def yaml_problem(exc: yaml.YAMLError, name: str) -> str:
    """A YAML syntax error as one line: what is wrong, where (1-based), and what was being read there.
    PyYAML's own text starts with the context and spreads over six lines, so its first ones miss the point."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        text = exc.problem + _at(exc.problem_mark)
        if exc.context:
            text += f" ({exc.context}{_at(exc.context_mark, ' from')})"
        return text
    return " ".join(str(exc).replace('"<unicode string>"', name).split())  # e.g. a control character


def _at(mark: yaml.Mark | None, word: str = " at") -> str:
    return f"{word} line {mark.line + 1}, column {mark.column + 1}" if mark else ""


# ----------------------------------------------------------------------------------------------------------
# dict ↔ dataclass
# ----------------------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(value, args[0], where)
        # e.g. `int | Literal["auto"]`: the first member that accepts the value, else every reason.
        reasons = []
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                reasons.append(str(exc).removeprefix(f"{where}: "))
        raise ConfigError(f"{where}: {value!r} is not accepted ({'; or '.join(reasons)})")
    if origin is list and value is not None:
        (item,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return allowed[allowed.index(value)]
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        if isinstance(value, int | float) and not isinstance(value, bool):
            # `--set run_name=2024` or a numeric version: YAML reads it as a number; as typed, if known.
            return getattr(value, "text", str(value))
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a (nested) dict, checking names and simple types. A nested section given
    in part keeps `cls`'s own default for the rest (the train job's model has 5 + 5 epochs, not the 100 +
    100 of a bare Pix2PixConfig), so that `--set model.ngf=32` changes ngf and nothing else."""
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(types_)}")
    kwargs = {}
    for key, value in values.items():
        default = _section_default(cls, key)
        if default is not None and isinstance(value, dict):
            value = merge(default, value)
        kwargs[key] = _coerce(value, types_[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


def _section_default(cls: type, name: str) -> dict[str, Any] | None:
    """Field `name`'s default in `cls` as a dict when it is a dataclass (a nested section), else None."""
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return dataclasses.asdict(default)
    return None


def to_yaml(config: Any) -> str:
    """The resolved config as YAML, loadable with `--config` (derived fields are left out)."""
    values = dataclasses.asdict(config)
    for path in getattr(config, "DERIVED", {}):
        *parents, last = path.split(".")
        node = values
        for key in parents:
            node = node[key]
        node.pop(last, None)
    return yaml.dump(
        values, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` → (["a", "b"], value parsed as YAML, so 3 → int, true → bool, [1, 2] → list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.option=value")
    path, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except ConfigError as exc:
        raise ConfigError(f"override {text!r}: {exc}") from exc
    except yaml.YAMLError as exc:
        reason = yaml_problem(exc, "the value")
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {reason}") from exc
    return path.strip().split("."), value


def nest(keys: list[str], value: Any) -> dict[str, Any]:
    nested: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        nested = {key: nested}
    return nested


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = (
            merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
        )
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The options of a `--config` file; a file that cannot be read as YAML is one ConfigError naming it."""
    where = f"--config {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")  # YAML's encoding, whatever the locale's
    except FileNotFoundError as exc:
        raise ConfigError(f"{where}: no such file") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{where}: is a folder, not a YAML file") from exc
    except PermissionError as exc:
        raise ConfigError(
            f"{where}: not readable (permission denied): give a file this user can read"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise ConfigError(
            f"{where}: not a text file (byte {byte:#04x} at offset {exc.start} is not UTF-8): give YAML text"
        ) from exc
    try:
        loaded = load_yaml(text) or {}
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {yaml_problem(exc, str(path))}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of options")
    return loaded


def user_values(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The nested dict a user gave: the YAML file, then `section.option=value` overrides."""
    values = read_yaml(path) if path else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        values = merge(values, nest(keys, value))
    return values


def flat_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted paths of the leaves of nested dicts (a list is one leaf)."""
    out: list[str] = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += flat_paths(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def value_at(values: dict[str, Any], path: str, default: Any = None) -> Any:
    """The value at a dotted path of nested dicts, or `default` where the path is missing."""
    node: Any = values
    for key in path.split("."):
        node = node.get(key, MISSING) if isinstance(node, dict) else MISSING
    return default if node is MISSING else node


def check_not_derived(cls: type, values: dict[str, Any]) -> None:
    """Refuse user values for the fields a job derives itself (`cls.DERIVED`: path → where it comes from)."""
    refuse_derived(getattr(cls, "DERIVED", {}), values)


def refuse_derived(derived: dict[str, str], values: dict[str, Any], where: str = "") -> None:
    """Refuse user values at the paths of `derived` (path → where its value comes from)."""
    for path, source in derived.items():
        if value_at(values, path, MISSING) is not MISSING:
            raise ConfigError(f"{where}{path} is not an option: it is derived from {source}")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """`cls` from defaults ← YAML file ← overrides (later wins)."""
    values = user_values(path, overrides)
    check_not_derived(cls, values)
    return from_dict(cls, values)


# ----------------------------------------------------------------------------------------------------------
# Flags generated from fields
# ----------------------------------------------------------------------------------------------------------


def resolve_field(cls: type, path: str) -> tuple[dataclasses.Field[Any], Any, Any]:
    """(field, type hint, default) of `section.option` in dataclass `cls`."""
    owner: Any = cls
    default_owner: Any = None
    keys = path.split(".")
    for i, key in enumerate(keys):
        fields = {f.name: f for f in dataclasses.fields(owner)}
        if key not in fields:
            raise KeyError(f"{cls.__name__} has no field {path!r}")
        f, hint = fields[key], _field_types(owner)[key]
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = getattr(default_owner, key, None)
        if i == len(keys) - 1:
            return f, hint, default
        owner, default_owner = hint, default
    raise AssertionError("unreachable")


def _flag_kind(hint: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """(argparse type, choices) for a field's type hint."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) > 1:  # e.g. `int | Literal["auto"]`: YAML-parse the flag so 3 is an int, auto a word
            return yaml.safe_load, None
        hint = args[0]
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices
    if hint in (int, float, str, bool):
        return hint, None
    return str, None


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, flags: FlagTable, yaml_flags: bool = True
) -> None:
    """The verb's flags from `flags` (type, choices, default and help from the fields), plus --config,
    --set and --print-config when `yaml_flags`. A second flag of one field (a former name) is an alias,
    hidden from --help (the field's help names it) and refused together with the first."""
    first: set[str] = set()
    for flag, path in flags.items():
        f, hint, default = resolve_field(cls, path)
        kind, choices = _flag_kind(hint)
        if path in first and flag.startswith("-"):
            if kind is bool:  # --x / --no-x pairs would need their own alias pair: none is needed yet
                raise TypeError(f"{flag}: a second flag of a boolean option is not supported")
            parser.add_argument(
                flag,
                dest=alias_dest(path, flag),
                type=kind,
                choices=choices,
                default=None,
                help=argparse.SUPPRESS,
            )
            continue
        first.add(path)
        text = f.metadata.get("help", "")
        shown = "" if default in ("", None) or kind is bool else f" (default: {default})"
        help_text = (text + shown).replace("%", "%%")
        if not flag.startswith("-"):
            parser.add_argument(flag, nargs="?", default=None, help=help_text, metavar=flag.upper())
        elif kind is bool:
            parser.add_argument(
                flag, dest=path, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            metavar = None if choices else flag.lstrip("-").upper().replace("-", "_")
            parser.add_argument(
                flag, dest=path, type=kind, choices=choices, default=None, help=help_text, metavar=metavar
            )
    if yaml_flags:
        parser.add_argument("--config", metavar="YAML", help=f"YAML file of {cls.__name__} options")
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SECTION.OPTION=VALUE",
            help="set any option, including those without a flag (repeatable)",
        )
        parser.add_argument(
            "--print-config",
            action="store_true",
            help="print the resolved config as YAML (usable as --config) and exit",
        )


def flag_overrides(args: argparse.Namespace, flags: FlagTable) -> dict[str, Any]:
    """The nested values of the flags a user gave (unset flags are None and left out)."""
    values: dict[str, Any] = {}
    seen: set[str] = set()
    given: dict[str, str] = {}  # path -> the flag that set it
    for flag, path in flags.items():
        # As `add_config_flags` named it.
        name = flag if not flag.startswith("-") else alias_dest(path, flag) if path in seen else path
        seen.add(path)
        value = getattr(args, name, None)
        if value is None:
            continue
        if path in given:
            raise ConfigError(f"{given[path]} and {flag} are one option (one its former name): give one")
        given[path] = flag
        values = merge(values, nest(path.split("."), value))
    return values


def alias_dest(path: str, flag: str) -> str:
    return f"{path}|{flag}"


def config_from_args(cls: type[T], args: argparse.Namespace, flags: FlagTable) -> T:
    """`cls` from defaults ← --config ← flags ← --set."""
    values = merge(
        read_yaml(args.config) if getattr(args, "config", None) else {}, flag_overrides(args, flags)
    )
    values = merge(values, user_values(None, getattr(args, "set", [])))
    check_not_derived(cls, values)
    return from_dict(cls, values)
