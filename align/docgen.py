"""Generate `docs/configuration.md`, the configuration reference, from `align/config.py`.

Every top-level dataclass of `align.config` whose name ends in `Config` and that has a `validate`
method is a command config; its dataclass-typed fields are sections (nested as deep as they go).
Each key is listed as a dotted name with its type, its default (read from a default instance of
the command config, so a command that changes a section's default shows its own value) and its
description: the string literal written right after the field in the source (an attribute
docstring, as in CleanRL's config), read with `ast` because Python keeps no such docstrings at
runtime. Commands and sections are described by their class docstrings.

    python -m align.docgen           # rewrite docs/configuration.md
    python -m align.docgen --check   # exit 1 if it is out of date

`tests/test_docs.py` compares the file with `configuration_reference()`, so the reference cannot
drift from the code, and fails for any field without a description.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from align import config as config_module

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

HEADER = """\
# Configuration reference

<!-- Generated from align/config.py by `python -m align.docgen`; edit the field docstrings there, not this file. -->

Every command reads one YAML file whose keys map one-to-one onto the fields below; nested
sections are YAML mappings (`train: {lr: 1e-4}`) and are written here as dotted keys
(`train.lr`). Any key can be overridden on the command line with `--set key=value`, for example
`--set train.lr=1e-4 --set lora.target=[q_proj,v_proj]` (values are parsed as YAML). Loading
rejects unknown keys (naming the nearest valid one), values of the wrong type, and impossible
values (each config's `validate`), always with a one-line message naming the dotted key. The
resolved config is written to `<output_dir>/config.yaml` before the first step. Keys whose
description says "Required" must be set.
"""


@dataclasses.dataclass(frozen=True)
class Key:
    """One row of the reference: a leaf field of a command config."""

    name: str  # dotted, e.g. "train.lr"
    type: str
    default: str
    description: str


@dataclasses.dataclass
class Section:
    """A command config or one of its (possibly nested) sections, with its own leaf keys."""

    name: str  # dotted prefix ("" for the command's top level)
    cls: type
    description: str
    keys: list[Key]


# ----------------------------------------------------------------------------------------------
# Reading the source


@functools.cache
def _module_classes(module_name: str) -> dict[str, ast.ClassDef]:
    """Top-level class definitions of a module, parsed from its source ({} when it has none)."""
    try:
        tree = ast.parse(inspect.getsource(sys.modules[module_name]))
    except (KeyError, TypeError, OSError):  # not imported, built in, or no source file
        return {}
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def attribute_docstrings(cls: type) -> dict[str, str]:
    """Field name -> the string literal right after its annotated assignment, over the class and
    its dataclass bases (a subclass's docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        node = _module_classes(klass.__module__).get(klass.__name__)
        if node is None:
            continue
        body = node.body
        for stmt, after in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def command_configs(module: types.ModuleType = config_module) -> list[type]:
    """The command configs of `module`, in source order."""
    out = []
    for name in _module_classes(module.__name__):
        obj = getattr(module, name, None)
        if (name.endswith("Config") and isinstance(obj, type) and dataclasses.is_dataclass(obj)
                and callable(getattr(obj, "validate", None))):
            out.append(obj)
    return out


def class_doc(cls: type) -> str:
    return inspect.cleandoc(cls.__doc__) if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}(") else ""


# ----------------------------------------------------------------------------------------------
# Walking a config


def _default_instance(cls: type) -> Any:
    """`cls()` when every field has a default, else None (defaults then come from the fields)."""
    try:
        return cls()
    except TypeError:
        return None


def _field_default(f: dataclasses.Field, instance: Any) -> Any:
    if instance is not None:
        return getattr(instance, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def sections(cls: type, prefix: str = "", instance: Any = None, description: str | None = None) -> list[Section]:
    """`cls`'s leaf keys as one section, followed by each nested section, depth first."""
    if instance is None and prefix == "":
        instance = _default_instance(cls)
    hints = typing.get_type_hints(cls)
    docs = attribute_docstrings(cls)
    own = Section(prefix.rstrip("."), cls, class_doc(cls) if description is None else description, [])
    nested: list[Section] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        value = _field_default(f, instance)
        if dataclasses.is_dataclass(hint):
            sub = value if dataclasses.is_dataclass(value) else None
            # The field's own docstring says what the section is for in this command; the class
            # docstring what the section is in general.
            desc = "\n\n".join(d for d in (docs.get(f.name, ""), class_doc(hint)) if d)
            nested += sections(hint, f"{prefix}{f.name}.", sub, desc)
        else:
            own.keys.append(Key(f"{prefix}{f.name}", type_name(hint), format_default(value), docs.get(f.name, "")))
    return [own, *nested]


def type_name(hint: Any) -> str:
    """A YAML-minded name for a type annotation: `float`, `str or null`, `list of float`,
    `one of auto, no, bf16`."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"list of {type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "mapping"
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def format_default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return repr(value)


# ----------------------------------------------------------------------------------------------
# Rendering


def _cell(text: str) -> str:
    """Text for one Markdown table cell: on one line, with pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def render_section(sec: Section, level: int) -> str:
    lines = []
    if sec.name:
        lines += [f"{'#' * level} `{sec.name}`", ""]
        if sec.description:
            lines += [sec.description, ""]
    if sec.keys:
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        lines += [f"| `{k.name}` | {_cell(k.type)} | `{_cell(k.default)}` | {_cell(k.description)} |" for k in sec.keys]
        lines.append("")
    return "\n".join(lines)


def configuration_reference(module: types.ModuleType = config_module) -> str:
    """The text of docs/configuration.md."""
    commands = command_configs(module)
    parts = [HEADER]
    parts += ["Commands: " + ", ".join(f"[`{c.__name__}`](#{c.__name__.lower()})" for c in commands) + ".", ""]
    for cls in commands:
        secs = sections(cls)
        parts += [f"## {cls.__name__}", ""]
        if secs[0].description:
            parts += [secs[0].description, ""]
        parts.append(render_section(secs[0], 3))
        parts += [render_section(s, 3 + s.name.count(".")) for s in secs[1:]]
    return "\n".join(parts).rstrip("\n") + "\n"


def missing_descriptions(module: types.ModuleType = config_module) -> list[str]:
    """Dotted keys (with their command) that have no description, and undocumented classes."""
    out = []
    for cls in command_configs(module):
        for sec in sections(cls):
            if not sec.description:
                out.append(f"{cls.__name__}: section '{sec.name or '(top level)'}' ({sec.cls.__name__}) has no docstring")
            out += [f"{cls.__name__}: key '{k.name}' has no docstring" for k in sec.keys if not k.description]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = configuration_reference()
    if "--check" in argv:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.is_file() else ""
        if current != text:
            print(f"{DOC_PATH} is out of date; run `python -m align.docgen`", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {DOC_PATH}")
    for problem in missing_descriptions():
        print(f"warning: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
