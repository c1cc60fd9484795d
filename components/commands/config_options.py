"""Command lines generated from a step's config dataclass: one option per settable field (its docstring is the
help, its default the default), plus ``--config FILE`` (params.yaml sections or a JSON config) and ``--set
key=value`` for any field, nested ones included.  Adding a field to the dataclass adds its option.

Precedence, lowest first: the dataclass (and step) defaults, ``--config``, ``--set``, the options."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from components import config as cfg

#: Options every generated command has, before the fields' own.
CONFIG_HELP = (
    "YAML/JSON settings file (local or s3://): params.yaml (its sections for this step are read) or a step's "
    "JSON config (the whole file)."
)
SECTION_HELP = "Sections of --config to read, in order (repeat; default: this step's sections that the file has)."
SET_HELP = "Set any field by its dotted name, e.g. --set trainer.lr=3e-4 (repeat; 'null' for None)."


def options_of(
    cls: type, renames: Mapping[str, str], fan_out: Mapping[str, tuple[str, ...]]
) -> dict[str, tuple[str, ...]]:
    """``{option name: dotted keys it sets}``: each scalar field by its own name (``trainer.lr`` -> ``lr``) unless
    ``renames`` names it (``trainer.output_dir`` -> ``output``); ``fan_out`` names one option for several fields
    (``seed`` -> the trainer's and the data's).  Two fields wanting one name is an error here, not at run time."""
    out: dict[str, tuple[str, ...]] = {name: tuple(keys) for name, keys in fan_out.items()}
    taken = {k for keys in fan_out.values() for k in keys}
    for leaf in cfg.leaves(cls):
        if leaf.key in taken:
            continue
        name = renames.get(leaf.key, leaf.key.rsplit(".", 1)[-1])
        if name in out:
            raise TypeError(f"{cls.__name__}: option --{name} would set {out[name]} and {leaf.key}; rename one")
        out[name] = (leaf.key,)
    return out


def _cli_type(tp: Any) -> Any:
    inner, _ = cfg._optional(tp)
    return str if inner is Path else inner


def _help(leaf: cfg.Leaf, default: Any, also: tuple[str, ...]) -> str:
    text = (leaf.doc or leaf.key).replace("``", "")
    if also:
        text += f" (sets {', '.join((leaf.key, *also))})"
    shown = "required" if default is cfg._MISSING else json.dumps(default, default=str)
    return f"{text} [{leaf.key}; default: {shown}]"


def config_command(
    cls: type,
    run: Callable[[Any], None],
    *,
    doc: str,
    renames: Mapping[str, str] | None = None,
    fan_out: Mapping[str, tuple[str, ...]] | None = None,
    first: tuple[str, ...] = (),
) -> Callable[..., None]:
    """A Typer command for the step config ``cls``: parses its options into :func:`components.config.load`'s
    layers and calls ``run(config)``.  ``first`` lists options to show first in ``--help``."""
    renames, fan_out = dict(renames or {}), dict(fan_out or {})
    options = options_of(cls, renames, fan_out)
    by_key = {leaf.key: leaf for leaf in cfg.leaves(cls)}
    defaults = cfg.defaults_of(cls)
    order = [*first, *(n for n in options if n not in first)]

    params = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Annotated[str | None, typer.Option("--config", metavar="FILE", help=CONFIG_HELP)]),
        inspect.Parameter("section", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Annotated[list[str] | None, typer.Option("--section", metavar="NAME", help=SECTION_HELP)]),
        inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help=SET_HELP)]),
    ]  # fmt: skip
    for name in order:
        keys = options[name]
        leaf = by_key[keys[0]]
        flag = "--" + name.replace("_", "-")
        tp = _cli_type(leaf.type)
        decl = f"{flag}/--no-{flag[2:]}" if tp is bool else flag
        option = typer.Option(decl, help=_help(leaf, defaults.get(leaf.key, cfg._MISSING), keys[1:]))
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[tp | None, option]))  # fmt: skip

    def command(**values: Any) -> None:
        try:
            config = from_options(cls, options, values)
        except cfg.ConfigError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        run(config)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    command.config_class = cls  # type: ignore[attr-defined]
    command.options = options  # type: ignore[attr-defined]
    return command


def from_options(cls: type, options: Mapping[str, tuple[str, ...]], values: Mapping[str, Any]) -> Any:
    """The config from a generated command's parsed values (also what tests call)."""
    values = dict(values)
    path, sections, pairs = values.pop("config", None), values.pop("section", None), values.pop("set_", None)
    layers: list[Mapping[str, Any]] = []
    if path:
        layers.append(cfg.file_layer(path, sections or (), getattr(cls, "SECTIONS", ())))
    elif sections:
        raise cfg.ConfigError("--section needs --config")
    layers.append(cfg.assignments(cls, pairs or ()))
    flags: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        for key in options[name]:
            flags = cfg.deep_merge(flags, cfg.nested(key, value))
    layers.append(flags)
    return cfg.load(cls, *layers)


#: The historical names of trainer and tracking fields on the command line (the rest are the field names).
TRAINER_RENAMES = {
    "trainer.output_dir": "output",
    "trainer.cpu_threads": "threads",
    "trainer.warmup_fraction": "warmup",
    "tracking.enabled": "track",
    "model_config_file": "model_config",
}
