"""Write docs/configuration.md's key reference from dalle2/config.py itself.

Every key, its default and what it accepts are read from the pydantic models, and the note
beside each is the comment the field carries in the source, so the page cannot drift from
the code (tests/test_docs.py regenerates it and compares):

    .venv/bin/python scripts/config_reference.py            # rewrite the page's reference
    .venv/bin/python scripts/config_reference.py --check    # exit 1 when the page is stale
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dalle2.config import UnclipConfig  # noqa: E402

PAGE = ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- reference: begin -->", "<!-- reference: end -->"
BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _notes(model: type[BaseModel]) -> dict[str, str]:
    """Each field's comment: the one on its line, else the comment lines just above it."""
    notes: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(model).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        field = re.match(r"(\w+)\s*:", text)
        if field and field.group(1) in model.model_fields:
            inline = text.split("  # ", 1)[1] if "  # " in text else ""
            notes[field.group(1)] = inline or " ".join(above)
        above = []
    return notes


def _accepts(annotation: object, metadata: list[object]) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        text = " / ".join(str(a) for a in typing.get_args(annotation))
    else:
        text = re.sub(r"typing\.|<class '(\w+)'>", r"\1", str(annotation))
        text = text.replace("NoneType", "null").replace(" | None", " or null")
        text = re.sub(r"\b\w+\.config\.|\bdalle2\.", "", text)
        text = re.sub(r"Annotated\[int, Gt\(gt=0\)\]", "int > 0", text)
    bounds = [
        f"{sign} {getattr(m, key)}"
        for m in metadata
        for key, sign in BOUNDS.items()
        if getattr(m, key, None) is not None
    ]
    return f"{text}, {', '.join(bounds)}" if bounds else text


def _default(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(_default(v) for v in value) + "]"
    if isinstance(value, BaseModel):
        return "{...}"
    return str(value)


def _item_model(annotation: object) -> type[BaseModel] | None:
    """The model of a list-of-sections key (`decoder`, `data.holdout_rules`), else None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple and args and isinstance(args[0], type):
        return args[0] if issubclass(args[0], BaseModel) else None
    return None


def _tables(path: str, cls: type[BaseModel], model: BaseModel | None, out: list[str]) -> None:
    """One table per section, then the sections nested in it, each under its dotted path;
    `model` gives the defaults (a section's defaults can differ from its class's: clip.train)."""
    notes = _notes(cls)
    rows, nested = [], []
    for name, info in cls.model_fields.items():
        value = getattr(model, name) if model is not None else info.default
        key = f"{path}.{name}" if path else name
        if isinstance(value, BaseModel):
            nested.append((key, type(value), value))
            continue
        item = _item_model(info.annotation)
        if item is not None:
            nested.append((f"{key}[i]", item, item() if name == "decoder" else None))
            value = "one section" if name == "decoder" else value
        elif value is PydanticUndefined:
            value = "required"
        note = notes.get(name, "").replace("|", "\\|")
        accepts = _accepts(info.annotation, info.metadata).replace("|", "\\|")
        rows.append(f"| `{key}` | `{_default(value)}` | {accepts} | {note} |")
    doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    out += [f"### `{path or 'top level'}`", "", doc, ""]
    if rows:
        out += ["| key | default | accepts | note |", "|---|---|---|---|", *rows, ""]
    for key, item, value in nested:
        _tables(key, item, value, out)


def reference() -> str:
    out: list[str] = []
    _tables("", UnclipConfig, UnclipConfig(), out)
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    args = parser.parse_args()
    page = PAGE.read_text()
    head, rest = page.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    new = f"{head}{BEGIN}\n{reference()}{END}{tail}"
    if args.check:
        if new != page:
            print(f"{PAGE.relative_to(ROOT)} is stale: run scripts/config_reference.py")
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
