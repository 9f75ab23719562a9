"""Generate docs/reference/config.md and docs/reference/cli.md from the code.

``python scripts/gen_reference.py [OUT_DIR]`` (default: docs/reference). The config reference walks
:class:`pipeline.config.PrecomputeConfig` and :class:`pipeline.config.TrainStudentConfig`
and :class:`pipeline.config.GenerateConfig`
recursively through their nested sections; descriptions are the fields' ``description`` or, where
a field is documented by an attribute docstring (the string literal under it), that docstring.
The CLI reference is the ``--help`` text of every console script. tests/test_docs.py regenerates
both files and compares them with the committed ones, so the reference cannot drift from the code.
"""
from __future__ import annotations

import ast
import contextlib
import enum
import importlib
import inspect
import io
import os
import re
import sys
import textwrap
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

CONSOLE_SCRIPTS = [  # (command, module), as in pyproject.toml [project.scripts], plus the demo
    ("precompute-teacher", "stages.precompute_teacher"),
    ("train-student", "stages.train_student"),
    ("inspect-losses", "stages.inspect_losses"),
    ("inspect-cache", "stages.inspect_cache"),
    ("generate-completions", "stages.generate_completions"),
    ("distill-rounds", "stages.distill_rounds"),
    ("python -m stages.demo", "stages.demo"),
]
HELP_COLUMNS = "100"  # argparse wraps --help to $COLUMNS: fixed so the output does not depend on the terminal


# ----------------------------------------------------------------------------- config
def attribute_docstrings(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for the string literals written under annotated fields of ``cls``
    and its bases (a base's docstring is overridden by a subclass's)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass in (object, BaseModel) or not issubclass(klass, BaseModel):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(src).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def rst_to_md(text: str) -> str:
    """Sphinx-flavoured docstring text → one line of Markdown for a table cell."""
    text = re.sub(r":(?:class|func|data|meth|attr|mod):`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    text = " ".join(text.split())
    return text.replace("|", "\\|")


def type_name(tp: object) -> str:
    """A short, stable rendering of a field annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if tp is type(None):
        return "None"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def default_repr(field) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory taking the validated data
            return "(computed)"
    else:
        return "**required**"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value!r}`"


def nested_models(tp: object) -> list[tuple[type[BaseModel], str]]:
    """The BaseModel classes inside an annotation, each with the path suffix it adds
    (``""`` for ``X`` or ``X | None``, ``"[]"`` for ``list[X]``)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [(tp, "")]
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return [m for a in typing.get_args(tp) for m in nested_models(a)]
    if origin in (list, tuple, set):
        return [(m, suffix + "[]") for a in typing.get_args(tp) for m, suffix in nested_models(a)]
    return []


def walk(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted key, type, default, description)`` for every field of ``model``, depth first."""
    rows = []
    docs = attribute_docstrings(model)
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        desc = field.description or docs.get(name, "")
        subs = nested_models(field.annotation)
        if not desc and subs:
            desc = inspect.cleandoc(subs[0][0].__doc__ or "")
        rows.append((key, type_name(field.annotation), default_repr(field), rst_to_md(desc)))
        for sub, suffix in subs:
            rows += walk(sub, f"{key}{suffix}.")
    return rows


def config_md() -> str:
    from pipeline.config import DistillRoundsConfig, GenerateConfig, PrecomputeConfig, TrainStudentConfig

    out = ["<!-- Generated by scripts/gen_reference.py from pipeline/config; do not edit by hand. -->",
           "# Configuration reference", "",
           "Every key of the stages' configs, as a dotted path (`a.b` is key `b` of section `a`;",
           "`a[].b` is key `b` of each entry of the list `a`). Set them in the YAML file given to",
           "`--config`, or on the command line as `a.b=value` (values are YAML). Unknown keys and",
           "wrong types stop the command with a one-line error naming the key. Types are Python",
           "annotations; `**required**` keys have no default.", ""]
    for cmd, cls in (("precompute-teacher", PrecomputeConfig), ("train-student", TrainStudentConfig),
                     ("generate-completions", GenerateConfig), ("distill-rounds", DistillRoundsConfig)):
        out += [f"## `{cmd}`: `{cls.__name__}`", "", rst_to_md(inspect.cleandoc(cls.__doc__ or "")), "",
                "| key | type | default | description |", "|---|---|---|---|"]
        out += [f"| `{k}` | {t} | {d} | {desc} |" for k, t, d, desc in walk(cls)]
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- CLI
def help_text(module: str) -> str:
    """``--help`` of a console script's ``main``, captured in-process."""
    mod = importlib.import_module(module)
    buf = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            mod.main(["--help"])
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    # Python 3.10 titles the options section "optional arguments:"; later versions "options:".
    return buf.getvalue().rstrip().replace("\noptional arguments:\n", "\noptions:\n")


def cli_md() -> str:
    out = ["<!-- Generated by scripts/gen_reference.py from the stages' parsers; do not edit by hand. -->",
           "# Command-line reference", "",
           "The console scripts installed with the package (`pyproject.toml`, `[project.scripts]`) and",
           "the demo. Each stage also runs as `python -m stages.<name>` and under `torchrun`",
           "(`torchrun --nproc_per_node=N -m stages.train_student --config ...`).", ""]
    for cmd, module in CONSOLE_SCRIPTS:
        out += [f"## `{cmd}`", "", f"Module `{module}`.", "", "```text", help_text(module), "```", ""]
    return "\n".join(out)


def generate(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("config.md", config_md()), ("cli.md", cli_md())):
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "reference"
    for p in generate(target):
        print(f"wrote {p}")
