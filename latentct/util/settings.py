"""Settings: one dataclass at the top of each script, every field also a command-line flag.

A script declares

    @dataclass
    class Settings:
        size: int = setting(128, "side of the stored slices in pixels")

and calls ``cfg = parse_settings(Settings)``. ``--size 64`` and editing the default do the same thing.
Flags accept dashes or underscores (``--test-fraction`` = ``--test_fraction``); booleans take
``--flag``, ``--no-flag`` or ``--flag false``; a field may be ``None`` with ``--flag none``.
Presets (named override dicts) are chosen with ``--preset NAME``. A value the user gave explicitly (a flag, or a
value a caller such as pipeline.py passes) beats anything a preset sets, including what the preset derives:
a field declared with ``replaces=("epochs",)`` (TrainGAN's ``steps``) clears a preset's ``epochs`` when it is
given and ``epochs`` is not. Any unknown flag or bad value ends the program with one line naming the flag.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from latentct.util.io import atomic_write_text


class UserError(Exception):
    """A problem with the user's input (a file, a folder, a flag); the message names it, on one line."""


class SettingsError(UserError, ValueError):
    """A bad setting; the message names the flag."""


def setting(default: Any, help: str, choices: tuple | None = None, replaces: tuple = ()) -> Any:
    """A dataclass field with the help line shown by ``--help``, optional allowed values, and the fields that
    an explicit value of this one resets to their defaults when a preset set them (``replaces``)."""
    metadata = {"help": help, "choices": choices, "replaces": tuple(replaces)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def own_fields_first(cls) -> list:
    """The fields of a Settings class, those it declares itself before those it inherits (--help order)."""
    own = set(cls.__dict__.get("__annotations__", {}))
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _converter(hint: Any, optional: bool):
    def convert(text: str):
        if optional and text.strip().lower() == "none":
            return None
        if hint is bool:
            return parse_bool(text)
        try:
            return hint(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {getattr(hint, '__name__', hint)}, got {text!r}")
    return convert


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the whole usage block; we want one line
        message = message.replace("unrecognized arguments:", "unknown flag(s):")
        raise SettingsError(f"{self.prog}: error: {message}")


def _build_parser(cls, prog: str, presets: dict | None) -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, description=(cls.__doc__ or "").strip(),
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="a named set of defaults; explicit flags override it")
    hints = typing.get_type_hints(cls)
    for f in own_fields_first(cls):
        hint, optional = _unwrap_optional(hints[f.name])
        names = sorted({flag(f.name), "--" + f.name})
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        default = _default(f)
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{help_text} (default: {default!r})")
        if hint is bool:
            parser.add_argument(*names, nargs="?", const=True, type=_converter(bool, optional), **kw)
            parser.add_argument("--no-" + f.name.replace("_", "-"), "--no_" + f.name, dest=f.name,
                                action="store_false", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif typing.get_origin(hint) is tuple:
            item_types = typing.get_args(hint)
            item = item_types[0]
            nargs = "+" if (len(item_types) == 2 and item_types[1] is Ellipsis) else len(item_types)
            parser.add_argument(*names, nargs=nargs, type=_converter(item, False), **kw)
        elif typing.get_origin(hint) is list:
            item = typing.get_args(hint)[0]
            parser.add_argument(*names, nargs="*", type=_converter(item, False), **kw)
        else:
            parser.add_argument(*names, type=_converter(hint, optional), choices=choices, **kw)
    return parser


def parse_settings(cls, argv: list[str] | None = None, presets: dict | None = None, prog: str | None = None):
    """Build ``cls`` from its defaults, an optional ``--preset`` and command-line flags.

    Errors leave the program with a single line (``SystemExit``) when called from a script
    (``argv`` None); with an explicit ``argv`` they raise ``SettingsError`` for the caller.
    """
    from_cli = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or Path(sys.argv[0]).name
    try:
        parser = _build_parser(cls, prog, presets)
        namespace = vars(parser.parse_args(argv))
        preset = namespace.pop("preset", None)
        cfg = make_settings(cls, namespace, preset=preset, presets=presets)
    except SettingsError as err:
        if from_cli:
            raise SystemExit(str(err) if str(err).startswith(prog) else f"{prog}: error: {err}")
        raise
    return cfg


def with_preset(cls, explicit: dict, preset: str | None, presets: dict | None) -> dict:
    """The values to build ``cls`` from: the preset's, then the explicit ones over them. An explicit field
    that ``replaces`` others resets them to their defaults where only the preset set them."""
    if not preset:
        return dict(explicit)
    if preset not in (presets or {}):
        raise SettingsError(f"--preset: {preset!r} is not one of {', '.join(sorted(presets or {}))}")
    values = dict(presets[preset])
    _check_names(cls, values, preset)
    values.update(explicit)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in explicit:
        for other in fields[name].metadata.get("replaces", ()) if name in fields else ():
            if other in fields and other not in explicit and other in presets[preset]:
                values[other] = _default(fields[other])
    return values


def _check_names(cls, values: dict, preset: str | None = None) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SettingsError(f"unknown setting(s) {', '.join(flag(u) for u in unknown)}"
                            + (f" in preset {preset!r}" if preset else ""))


def make_settings(cls, values: dict, preset: str | None = None, presets: dict | None = None):
    """``cls(**values)`` over the named preset (explicit values win), with tuples restored and validation
    errors turned into SettingsError."""
    _check_names(cls, values)
    values = with_preset(cls, values, preset, presets)
    hints = typing.get_type_hints(cls)
    fixed = {k: (tuple(v) if typing.get_origin(_unwrap_optional(hints[k])[0]) is tuple and v is not None else v)
             for k, v in values.items()}
    try:
        cfg = cls(**fixed)
    except (TypeError, ValueError, UserError) as err:
        raise SettingsError(str(err)) from None
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise SettingsError(f"{flag(f.name)}: {value!r} is not one of {', '.join(map(str, choices))}")
    return cfg


def check(condition: bool, name: str, problem: str) -> None:
    """Validation helper for ``__post_init__``: raise a one-line error naming the flag."""
    if not condition:
        raise SettingsError(f"{flag(name)}: {problem}")


def settings_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def save_settings(cfg, path: str | Path) -> None:
    """Write the resolved settings as JSON (atomically) next to a stage's outputs."""
    atomic_write_text(path, json.dumps(settings_dict(cfg), indent=2, sort_keys=True) + "\n")


def load_settings(cls, path: str | Path):
    return make_settings(cls, json.loads(Path(path).read_text()))


@contextlib.contextmanager
def user_errors(context: str = ""):
    """Turn a ValueError raised by a pure module (a model that rejects its arguments) into a UserError."""
    try:
        yield
    except ValueError as err:
        raise UserError(f"{context}{err}") from None


def run_cli(main, cls, presets: dict | None = None, prog: str | None = None):
    """Entry point of a script: parse flags, run ``main(cfg)``; a UserError ends with one line, exit 2."""
    prog = prog or Path(sys.argv[0]).name
    cfg = parse_settings(cls, presets=presets, prog=prog)
    try:
        return main(cfg)
    except (UserError, FileNotFoundError, FileExistsError) as err:
        raise SystemExit(f"{prog}: error: {err}")


def machine_name() -> str:
    """This machine's processor as /proc/cpuinfo names it (else platform's), with its core count. A run's summary
    keeps it, so its figures name the machine that made them."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        name = models[0] if models else name
    return f"{name}, {os.cpu_count()} cores"


def code_version(folder) -> str | None:
    """The git commit checked out at ``folder`` (short), with "+changes" where tracked files differ from it; None
    outside a git checkout. A run's summary keeps it, so its figures name the code that made them."""
    import subprocess

    def git(*args):
        try:
            out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return None
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
