"""Griffe extension for the API reference: the package's docstrings, read as Markdown.

The docstrings are Google style, with habits of reStructuredText, and section names, that
Markdown or the Google parser would show verbatim or misread:

- Sphinx roles name other objects (``:class:`Executor```, ``:func:`~pyhf_dist.protocol.make_task```):
  each becomes inline code of the name (a leading ``~`` keeps the last part, as in Sphinx).
- Doctests stand as bare ``>>>`` paragraphs outside an ``Example:`` section, where Markdown would
  read ``[0]["m2"]`` as a link: each such run of lines becomes a fenced ``pycon`` block. A
  paragraph ending in ``::`` (a literal block follows) ends in ``:``.
- ``Example:`` sections become ``Examples:`` (the parser's name for them), and ``Options:`` (the
  scan's declared options, in :func:`pyhf_dist.map_fits`) ``Other Parameters:``.

The docstrings themselves stay as they are: their doctests run under pytest.
"""

from __future__ import annotations

import importlib
import inspect
import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`(~?)([^`]+)`")
SECTION = re.compile(r"^(\s*)([A-Z][A-Za-z ]*):\s*$")
#: Sections the Google parser knows under another name: ``Example:`` would be an admonition, whose
#: doctest Markdown reads as nested quotes; ``Options:`` (the scan's declared options,
#: :mod:`pyhf_dist.scan.options`) are keyword arguments, shown as a table.
RENAMED = {"Example": "Examples", "Options": "Other Parameters"}
#: A line of a docstring that is filled in at import.
PLACEHOLDER = re.compile(r"^\s*\{\w+\}\s*$", flags=re.MULTILINE)


def _role(match: re.Match) -> str:
    short, name = match.group(1), match.group(2)
    return f"`{name.rsplit('.', 1)[-1] if short else name}`"


def markdown(text: str) -> str:
    """The docstring ``text`` with roles as code, bare doctests fenced and sections renamed."""
    lines = ROLE.sub(_role, text).split("\n")
    out: list[str] = []
    in_example, in_doctest, indent = None, False, ""
    for line in lines:
        section = SECTION.match(line)
        if section and not in_doctest:
            in_example = len(section.group(1)) if section.group(2) in ("Example", "Examples") else None
        elif in_example is not None and line.strip() and len(line) - len(line.lstrip()) <= in_example:
            in_example = None
        if in_doctest and not line.strip():
            out.append(f"{indent}```")
            in_doctest = False
        elif not in_doctest and in_example is None and line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}```pycon")
            in_doctest = True
        if section and not in_doctest and section.group(2) in RENAMED:
            line = f"{section.group(1)}{RENAMED[section.group(2)]}:"
        if line.rstrip().endswith("::") and not in_doctest:
            line = line.rstrip()[:-1]
        out.append(line)
    if in_doctest:
        out.append(f"{indent}```")
    return "\n".join(out)


def _parameters(function) -> griffe.Parameters:
    """The parameters of ``function``'s signature at run time, as griffe describes them."""
    found = []
    for parameter in inspect.signature(function).parameters.values():
        annotation = parameter.annotation
        found.append(griffe.Parameter(
            parameter.name,
            kind=griffe.ParameterKind(parameter.kind.description),
            annotation=None if annotation is inspect.Parameter.empty else
            annotation if isinstance(annotation, str) else inspect.formatannotation(annotation),
            default=None if parameter.default is inspect.Parameter.empty else repr(parameter.default),
        ))
    return griffe.Parameters(*found)


class MarkdownDocstrings(griffe.Extension):
    """Rewrites every docstring before the Google parser reads it.

    A function whose docstring is a template filled in at import (a ``{placeholder}`` line:
    :func:`pyhf_dist.map_fits` and :func:`pyhf_dist.iter_fits` list the options declared in
    :mod:`pyhf_dist.scan.options`) is documented as Python sees it: its filled-in docstring and
    the signature it is given at import.
    """

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        """Rewrite ``obj``'s docstring, if it has one."""
        if obj.docstring is None:
            return
        if obj.is_function and PLACEHOLDER.search(obj.docstring.value):
            function = getattr(importlib.import_module(obj.module.path), obj.name)
            obj.docstring.value = inspect.getdoc(function)
            obj.parameters = _parameters(function)
        obj.docstring.value = markdown(obj.docstring.value)
