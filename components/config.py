"""The configuration plane: a step's config dataclass is the one declaration of its parameters.

Every engine builds the same frozen dataclass from plain mappings, layered lowest first:

1. the dataclass defaults, and the step's own defaults for shared parts (``STEP_DEFAULTS``, e.g. fine-tuning's
   trainer learning rate);
2. sections of a YAML / JSON file (``params.yaml``'s ``model`` and ``pretrain``; or a whole JSON config);
3. dotted assignments (``--set trainer.lr=3e-4``, ``-p pretrain.trainer.lr=3e-4``);
4. the command line's flags, which are generated from the same fields (help from the field docstrings).

:func:`build` turns the merged mapping into the dataclass: nested dataclasses, type checks and coercion from the
type hints, unknown keys and missing required fields reported with their dotted path.  The CLI, ``dvc repro``
(``vilbert pretrain --config params.yaml``), the Kubeflow ops (one JSON config each) and the PyTorchJob (the same
JSON file) all go through it, so a new field reaches all of them without another edit.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, Union

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config file, section, assignment or value is invalid; the message names the dotted key."""


# ---- mappings --------------------------------------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: nested mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def merge_all(layers: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        out = deep_merge(out, layer)
    return out


def nested(key: str, value: Any) -> dict[str, Any]:
    """``nested("trainer.lr", 3e-4) == {"trainer": {"lr": 3e-4}}``."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"bad key {key!r}")
    out: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def read_file(path: str) -> dict[str, Any]:
    """A YAML or JSON file (local or s3://) as a mapping."""
    import yaml

    from components import storage

    if not storage.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    text = storage.read_bytes(path).decode()
    try:
        # JSON through json: YAML 1.1 would read 1e-06 as a string
        data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def file_layer(path: str, sections: Sequence[str], default_sections: Sequence[str] = ()) -> dict[str, Any]:
    """The settings a config file gives a step: the named ``sections`` merged in order; without names, the
    step's ``default_sections`` that the file has (``params.yaml``), else the whole file (a step's JSON config)."""
    data = read_file(path)
    if not sections:
        sections = [s for s in default_sections if s in data]
        if not sections:
            return data
    missing = [s for s in sections if s not in data]
    if missing:
        raise ConfigError(f"config file {path} has no section {', '.join(missing)} (it has {', '.join(data)})")
    layers = []
    for name in sections:
        if not isinstance(data[name], Mapping):
            raise ConfigError(f"section {name!r} of {path} must be a mapping")
        layers.append(data[name])
    return merge_all(layers)


# ---- the dataclass side ----------------------------------------------------------------------------------------


@cache
def hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings (the string right after each field) of a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            target = node.target if isinstance(node, ast.AnnAssign) else None
            doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else None
            if isinstance(target, ast.Name) and isinstance(doc, str):
                docs[target.id] = " ".join(doc.split())
    return docs


def _optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against the type hint ``tp`` (ints become floats, lists tuples, strings Paths)."""
    inner, optional = _optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key} must not be null")
    tp = inner
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `lr: 3e-4` (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
            if len(args) == len(value):
                return tuple(coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (arg,) = typing.get_args(tp) or (Any,)
            return [coerce(arg, v, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:  # a type we do not know: trust the dataclass's own checks
        return value
    raise ConfigError(f"{key} must be {type_name(tp)}{' or null' if optional else ''}, got {value!r}")


def type_name(tp: Any) -> str:
    inner, optional = _optional(tp)
    name = getattr(inner, "__name__", str(inner))
    if typing.get_origin(inner) is not None:
        name = str(inner).replace("typing.", "")
    return f"{name} | None" if optional else name


def build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """The dataclass ``cls`` from ``data`` (nested mappings for nested dataclasses); every problem is listed."""
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    errors = [f"unknown key {prefix}{k}" + _suggest(k, known) for k in data if k not in known]
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name in data:
            try:
                values[name] = coerce(hints(typing.cast(Any, cls))[name], data[name], prefix + name)
            except ConfigError as err:
                errors.append(str(err))
        elif f.default is _MISSING and f.default_factory is _MISSING and f.init:
            errors.append(f"{prefix}{name} is required")
    if errors:
        raise ConfigError("; ".join(errors))
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # the dataclass's own checks (TrainerConfigError, StepError, ...)
        where = f" ({prefix.rstrip('.')})" if prefix else ""
        raise ConfigError(f"{err}{where}") from None


def _suggest(key: str, known: Mapping[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def to_mapping(config: Any) -> dict[str, Any]:
    """A (nested) config dataclass as plain JSON values; ``build(type(c), to_mapping(c)) == c``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        out[f.name] = _plain(getattr(config, f.name))
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_mapping(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def field_type(cls: type, key: str) -> Any:
    """The type hint of the dotted field ``key`` of ``cls`` (ConfigError when there is none)."""
    tp: Any = cls
    for i, part in enumerate(key.split(".")):
        inner, _ = _optional(tp)
        if not _is_dataclass_type(inner) or part not in {f.name for f in dataclasses.fields(inner)}:
            where = ".".join(key.split(".")[:i]) or cls.__name__
            raise ConfigError(f"unknown key {key} ({where} has no field {part!r})")
        tp = hints(inner)[part]
    return tp


def parse_text(tp: Any, text: str, key: str) -> Any:
    """A value written on the command line, read as the field's type (``null`` / ``none``: None)."""
    import yaml

    inner, optional = _optional(tp)
    if text.strip().lower() in ("null", "none", "~"):
        if optional:
            return None
        raise ConfigError(f"{key} must not be null")
    try:
        if inner is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise ValueError(text)
        if inner is int:
            return int(text)
        if inner is float:
            return float(text)  # yaml would read 3e-4 as a string
        if inner in (str, Path):
            return text
        return yaml.safe_load(text)  # lists, tuples, mappings
    except (ValueError, yaml.YAMLError):
        raise ConfigError(f"{key}={text!r}: not a valid {type_name(tp)}") from None


def assignments(cls: type, pairs: Iterable[str]) -> dict[str, Any]:
    """``["trainer.lr=3e-4", "data.masked_pairs=all"]`` as a nested mapping, each value read as its field's type."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set wants key=value with a dotted key (e.g. trainer.lr=3e-4), got {pair!r}")
        field_key = key
        variants = getattr(cls, "VARIANTS", None)
        if variants is not None and key.startswith(variants[0] + "."):  # by_task.vqa.trainer.lr: trainer.lr's type
            field_key = key.split(".", 2)[2] if key.count(".") >= 2 else ""
            if not field_key:
                raise ConfigError(f"{key}: name a field after {variants[0]}.<{variants[1]}>, e.g. trainer.lr")
        out = deep_merge(out, nested(key, parse_text(field_type(cls, field_key), text, key)))
    return out


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A settable scalar field of a (nested) config dataclass."""

    key: str
    """Dotted path, e.g. ``trainer.lr``."""
    type: Any
    """The type hint."""
    default: Any
    """The dataclass default (``MISSING`` when required)."""
    doc: str
    """The field's docstring."""


def leaves(cls: type, prefix: str = "") -> list[Leaf]:
    """Every scalar field (bool, int, float, str, Path, or one of them | None), nested dataclasses walked."""
    out = []
    for f in dataclasses.fields(cls):
        tp = hints(cls)[f.name]
        inner, _ = _optional(tp)
        if _is_dataclass_type(inner):
            out.extend(leaves(inner, f"{prefix}{f.name}."))
        elif inner in (bool, int, float, str, Path):
            out.append(Leaf(prefix + f.name, tp, f.default, field_docs(cls).get(f.name, "")))
    return out


def dumps(config: Any) -> str:
    """The config as indented JSON (what a KFP op hands a PyTorchJob)."""
    return json.dumps(to_mapping(config), indent=2, sort_keys=True)


def load(cls: type[T], *layers: Mapping[str, Any]) -> T:
    """The step config ``cls`` from ``layers`` (lowest first) over its ``STEP_DEFAULTS``.

    A step with ``VARIANTS = (key, field)`` (fine-tuning: ``("by_task", "task")``) lets each layer carry
    settings for one value of the field: ``trainer: {max_steps: 300}`` with ``by_task: {<task>: {trainer:
    {max_steps: 600}}}`` gives that task 600 steps and every other task 300.  They apply inside their own layer, so a
    later layer (``--set``, an option) still overrides them.

    A trainer given neither ``epochs`` nor ``max_steps`` trains for the step's ``DEFAULT_EPOCHS``; one given
    ``max_steps`` alone stops only at the step limit (the two together: whichever comes first)."""
    stack: list[Mapping[str, Any]] = [getattr(cls, "STEP_DEFAULTS", {}), *layers]
    variants = getattr(cls, "VARIANTS", None)
    if variants is not None:
        key, by = variants
        value = merge_all(stack).get(by)
        values_of = getattr(cls, "variant_values", None)
        known: tuple[Any, ...] | None = tuple(values_of()) if values_of is not None else None
        resolved: list[Mapping[str, Any]] = []
        for layer in stack:
            layer = dict(layer)
            table = layer.pop(key, None) or {}
            if not isinstance(table, Mapping):
                raise ConfigError(f"{key} must map each {by} to its settings, got {table!r}")
            if known is not None and (unknown := sorted(set(table) - set(known))):
                raise ConfigError(f"{key} names unknown {by} {', '.join(map(str, unknown))} (known: "
                                  f"{', '.join(map(str, known))})")  # fmt: skip
            chosen = table.get(value, {})
            if not isinstance(chosen, Mapping):
                raise ConfigError(f"{key}.{value} must be a mapping of settings, got {chosen!r}")
            resolved.append(deep_merge(layer, chosen))
        stack = resolved
    merged = merge_all(stack)
    trainer = merged.get("trainer")
    default_epochs = getattr(cls, "DEFAULT_EPOCHS", None)
    if isinstance(trainer, Mapping) and default_epochs is not None and "epochs" not in trainer:
        merged["trainer"] = {**trainer, "epochs": default_epochs if trainer.get("max_steps") is None else None}
    return build(cls, merged)


def defaults_of(cls: type) -> dict[str, Any]:
    """The dotted defaults a step starts from: the dataclass defaults under the step's ``STEP_DEFAULTS``."""
    out = {leaf.key: leaf.default for leaf in leaves(cls) if leaf.default is not _MISSING}

    def walk(mapping: Mapping[str, Any], prefix: str) -> None:
        for key, value in mapping.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value

    walk(getattr(cls, "STEP_DEFAULTS", {}), "")
    if getattr(cls, "DEFAULT_EPOCHS", None) is not None:
        out["trainer.epochs"] = cls.DEFAULT_EPOCHS  # type: ignore[attr-defined]
    return out
