"""Command-line options derived from a method's config dataclass, so no method needs CLI code.

Every field of ``method.config_class`` becomes ``--field-name`` (underscores as dashes), typed
from the field's annotation: numbers and strings as themselves, ``bool`` as ``--x/--no-x``,
sequences as comma-separated values, mappings as a JSON object, ``None`` as ``none`` for optional
fields. A field holding another adapter config (MoSA's ``base``) becomes ``--base-method`` plus
that config's own fields as ``--base-...``; the nested config shares the outer selection fields
(``target_modules``, ``bits``, ...). Help comes from the ``Attributes:`` section of the docstrings.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import json
import re
import types
import typing
from typing import Any, Callable, Iterator, Mapping

from ..core.config import AdapterConfig
from ..core.registry import get_method, registered_methods
from ..errors import ConfigError

#: CLI defaults that differ from the config's (the bundled MiniLM sentence classifier, as before)
CLI_DEFAULTS = {"target_modules": "query,value", "modules_to_save": "classifier"}
REGEX_CHARACTERS = "*()[]|^$\\"
DEST = "config:"  # prefix of the argparse destinations of config fields


class UsageError(ConfigError):
    """A command line the parser cannot accept (unknown option, bad value)."""


@dataclasses.dataclass(frozen=True)
class Nested:
    """A field whose value is another adapter config: the candidate classes, by method name."""

    choices: Mapping[str, type[AdapterConfig]]

    @property
    def default(self) -> str:
        return next(iter(self.choices))


def flag(name: str, prefix: str = "") -> str:
    return "--" + (prefix + name).replace("_", "-")


def parse_targets(text: str) -> str | tuple[str, ...]:
    """``all-linear`` or a regex stays a string; otherwise comma-separated names."""
    if text == "all-linear" or any(c in text for c in REGEX_CHARACTERS):
        return text
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _list_of(convert: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(convert(t.strip()) for t in text.split(",") if t.strip())
    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not a JSON object ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def _optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


def _converter(hint: Any) -> Nested | Callable[[str], Any] | type[bool]:
    """How a field's command-line text becomes its value, from its type annotation."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = [m for m in (typing.get_args(hint) if union else (hint,)) if m is not type(None)]
    optional = union and len(members) < len(typing.get_args(hint))
    configs = [m for m in members if isinstance(m, type) and issubclass(m, AdapterConfig)]
    if configs:
        return Nested({c.method: c for c in configs})
    origins = {typing.get_origin(m) or m for m in members}
    if origins & {collections.abc.Mapping, dict}:
        convert: Callable[[str], Any] = _json_object
    elif origins & {collections.abc.Sequence, tuple, list}:
        sequence = next(m for m in members if (typing.get_origin(m) or m) in (collections.abc.Sequence, tuple, list))
        element = (typing.get_args(sequence) or (str,))[0]
        convert = parse_targets if str in members else _list_of(element if element in (int, float) else str)
    elif bool in members:
        return bool
    else:
        convert = next((m for m in members if m in (int, float, str)), str)
    return _optional(convert) if optional else convert


def field_help(config_class: type) -> dict[str, str]:
    """Field descriptions from the ``Attributes:`` sections of the class's and its bases' docstrings."""
    found: dict[str, str] = {}
    for cls in reversed(config_class.__mro__):
        doc = cls.__dict__.get("__doc__") or ""
        section = doc.partition("Attributes:")[2]
        current: list[str] = []
        for line in section.splitlines():
            match = re.match(r"^ {8}([a-z_][a-z0-9_ /]*):\s*(.*)$", line)
            if match:
                current = [n.strip() for n in match.group(1).split("/")]
                for name in current:
                    found[name] = match.group(2)
            elif line.startswith(" " * 12) and current:
                for name in current:
                    found[name] += " " + line.strip()
            elif line.strip():
                current = []
    return found


@dataclasses.dataclass(frozen=True)
class FieldOption:
    """One config field as a command-line option."""

    name: str
    flag: str
    dest: str
    convert: Any
    default: Any
    help: str


def field_options(config_class: type[AdapterConfig], prefix: str = "", inherited: bool = True) -> list[FieldOption]:
    """The options of ``config_class``'s fields (without :class:`AdapterConfig`'s own when not ``inherited``)."""
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # annotations naming types the module cannot resolve (e.g. a class defined in a function)
        hints = {}
    docs = field_help(config_class)
    base_fields = {f.name for f in dataclasses.fields(AdapterConfig)}
    options = []
    for field in dataclasses.fields(config_class):
        if not inherited and field.name in base_fields:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        else:  # a required field (no default) stays None here; the config then names it missing
            default = None if field.default_factory is dataclasses.MISSING else field.default_factory()
        text = docs.get(field.name) or f"{config_class.__name__}.{field.name} (see the class docstring)"
        text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text).replace("``", "")  # reST markup reads badly in a terminal
        options.append(FieldOption(field.name, flag(field.name, prefix), DEST + prefix + field.name,
                                   _converter(hints.get(field.name, str)), CLI_DEFAULTS.get(field.name, default),
                                   text.replace("%", "%%")))
    return options


def add_config_options(parser: argparse.ArgumentParser, config_class: type[AdapterConfig],
                       selected: Mapping[str, str], taken: set[str], prefix: str = "", inherited: bool = True) -> None:
    """Add ``config_class``'s options to ``parser``; fields whose flag is in ``taken`` (an option the
    command already has, e.g. ``--seed``) take that option's value instead. ``selected`` holds the
    chosen class of nested config fields (``{"base": "lora"}``)."""
    group = parser.add_argument_group(f"{config_class.method} options" if not prefix else
                                      f"{prefix.rstrip('_')} ({config_class.method}) options")
    for option in field_options(config_class, prefix, inherited):
        if option.flag in taken:
            continue
        if isinstance(option.convert, Nested):
            choice = selected.get(prefix + option.name, option.convert.default)
            group.add_argument(option.flag + "-method", dest=option.dest, choices=list(option.convert.choices),
                               default=option.convert.default, help=f"the method of {option.name} ({option.help.rstrip('.')})")
            add_config_options(parser, option.convert.choices[choice], selected, taken, prefix + option.name + "_",
                               inherited=False)
        elif option.convert is bool:
            group.add_argument(option.flag, dest=option.dest, action=argparse.BooleanOptionalAction,
                               default=option.default, help=option.help)
        else:
            group.add_argument(option.flag, dest=option.dest, type=option.convert, default=option.default,
                               help=option.help, metavar=option.name.upper())


def build_config(config_class: type[AdapterConfig], args: argparse.Namespace, prefix: str = "",
                 outer: Mapping[str, Any] | None = None) -> AdapterConfig:
    """The config from parsed options; nested configs share the outer :class:`AdapterConfig` fields."""
    values = vars(args)
    kwargs: dict[str, Any] = {}
    for option in field_options(config_class, prefix, inherited=outer is None):
        if isinstance(option.convert, Nested):
            kwargs[option.name] = build_config(option.convert.choices[values[option.dest]], args,
                                               prefix + option.name + "_", kwargs)
        elif option.dest in values:
            kwargs[option.name] = values[option.dest]
        elif option.name in values:  # a field shadowed by a command option of the same name (--seed)
            kwargs[option.name] = values[option.name]
    if outer is not None:
        kwargs.update({f.name: outer[f.name] for f in dataclasses.fields(AdapterConfig) if f.name in outer})
    try:
        return config_class(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{config_class.__name__}: {exc}") from None


def nested_selectors() -> Iterator[tuple[str, str, str]]:
    """``(flag, key, default)`` of every nested-config selector of every registered method."""
    for method in registered_methods():
        for option in field_options(method.config_class):
            if isinstance(option.convert, Nested):
                yield option.flag + "-method", option.name, option.convert.default


def all_flags(config_class: type[AdapterConfig], prefix: str = "", inherited: bool = True) -> set[str]:
    """Every flag ``config_class`` can take, over every choice of its nested configs."""
    flags = set()
    for option in field_options(config_class, prefix, inherited):
        if isinstance(option.convert, Nested):
            flags.add(option.flag + "-method")
            for choice in option.convert.choices.values():
                flags |= all_flags(choice, prefix + option.name + "_", inherited=False)
        else:
            flags |= {option.flag, "--no-" + option.flag[2:]} if option.convert is bool else {option.flag}
    return flags


def unknown_option_message(extra: list[str], method_name: str | None) -> str:
    """One line for the first unrecognised argument, naming the methods an option belongs to."""
    first = next((a for a in extra if a.startswith("-")), extra[0])
    name = first.split("=", 1)[0]
    if method_name is None or not name.startswith("--"):
        return f"unrecognised argument {first!r}"
    owners = [m.name for m in registered_methods() if m.name != method_name and name in all_flags(m.config_class)]
    method = get_method(method_name)
    hint = f"see: adapterkit train --method {method_name} --help"
    if name in all_flags(method.config_class):  # the method's own nested option under another choice
        return f"{name} does not apply with the chosen nested method; {hint}"
    if owners:
        return f"{name} is not an option of method {method_name!r} (it belongs to {', '.join(owners)}); {hint}"
    return f"unknown option {name} for method {method_name!r}; {hint}"


def nested_commands(command: Callable[..., argparse.ArgumentParser], name: str, help: str,
                    choices: str) -> Callable[..., argparse.ArgumentParser]:
    """Add command group ``name`` (``adapterkit NAME SUB ...``) and return a factory for its
    subcommands; each subcommand gets ``--debug`` and ``--threads``."""

    def no_subcommand(args: argparse.Namespace) -> int:  # argparse requires the subcommand first
        raise ConfigError(f"choose a {name} subcommand: {choices}")

    group = command(name, no_subcommand, help=help)
    nested = group.add_subparsers(dest=f"{name}_command", required=True)

    def sub_command(sub: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = nested.add_parser(sub, help=help, description=help, formatter_class=group.formatter_class, allow_abbrev=False)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="re-raise errors with their traceback")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        p.set_defaults(run=run)
        return p

    return sub_command
