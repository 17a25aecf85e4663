"""Typed dataclass configs as command-line flags: one `--field-name` per field, nested ones as `--model.d-model`.

Used by `python -m toy_moe.pretrain` and `python -m minirspo.train`, so every config field is overridable
from the command line with its default shown in `--help`.
"""
import argparse
from dataclasses import fields, is_dataclass
from types import NoneType, UnionType
from typing import Union, get_args, get_origin, get_type_hints


def _flag_type(kind):
    """argparse `type=` for a field's annotation: int/float/str, unions such as `float | str` or `X | None`
    ("none"), tuple[int, ...] ("0,2")."""
    if get_origin(kind) in (Union, UnionType):
        options = [_flag_type(option) for option in get_args(kind) if option is not NoneType]
        allows_none = NoneType in get_args(kind)

        def parse(text: str):
            if allows_none and text.lower() == "none":
                return None
            for option in options:  # in annotation order: `float | str` reads "0.8" as a float
                try:
                    return option(text)
                except ValueError:
                    continue
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind}")
        return parse
    if get_origin(kind) is tuple:
        return lambda text: tuple(int(item) for item in text.split(",") if item.strip())
    return kind


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, prefix: str = "",
                     defaults=None) -> None:
    """One flag per dataclass field, defaults included; booleans get `--flag / --no-flag`. A nested config
    takes its defaults from the outer field's default (`defaults`), not from its own class."""
    defaults = config_class() if defaults is None else defaults
    hints = get_type_hints(config_class)
    for config_field in fields(config_class):
        kind, default = hints[config_field.name], getattr(defaults, config_field.name)
        flag = f"--{prefix}{config_field.name.replace('_', '-')}"
        if is_dataclass(kind):
            add_config_flags(parser, kind, f"{prefix}{config_field.name}.", default)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=_flag_type(kind), default=default,
                                metavar=str(kind).replace("typing.", "").replace("<class '", "").replace("'>", ""),
                                help="(default: %(default)s)")


def config_from_flags(config_class: type, values: dict, prefix: str = ""):
    """Rebuild the (nested) dataclass from `vars(parser.parse_args())`."""
    hints = get_type_hints(config_class)
    return config_class(**{
        config_field.name: config_from_flags(hints[config_field.name], values, f"{prefix}{config_field.name}.")
        if is_dataclass(hints[config_field.name]) else values[f"{prefix}{config_field.name}"]
        for config_field in fields(config_class)
    })
