"""Every public module, class and function of ``dcrouter/`` says what it is for.

The walk uses :mod:`ast` to find public definitions (names not starting with
``_``, at module level or inside public classes; functions nested in
functions are private by nature).  A method that overrides a documented
method of a base class (Twisted's ``dataReceived``, ``startService``...)
inherits that docstring, as :func:`inspect.getdoc` and Sphinx do, and so does
a method declared by a zope interface the class implements; the check imports
the module for methods without their own docstring.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
from typing import Any, Iterator

from zope.interface import implementedBy

from tests.support.proc import REPO

PACKAGE = os.path.join(REPO, "dcrouter")


def _modules() -> list[str]:
    found = []
    for root, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                found.append(os.path.join(root, name))
    return sorted(found)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _public_definitions(tree: ast.Module) -> Iterator[tuple[list[str], ast.AST]]:
    """(qualified name parts, node) of every public class and function."""
    def walk(node: ast.AST, prefix: list[str]) -> Iterator[tuple[list[str], ast.AST]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name.startswith("_"):
                    continue
                yield prefix + [child.name], child
                if isinstance(child, ast.ClassDef):
                    yield from walk(child, prefix + [child.name])
    yield from walk(tree, [])


def _inherited_doc(module_name: str, parts: list[str]) -> bool:
    """Does the method get a docstring from a base class (``inspect.getdoc``)?"""
    if len(parts) < 2:
        return False
    obj: Any = importlib.import_module(module_name)
    for part in parts[:-1]:
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    if not inspect.isclass(obj):
        return False
    for base in obj.__mro__[1:]:
        member = base.__dict__.get(parts[-1])
        if member is not None and getattr(member, "__doc__", None):
            return True
    # a method a zope interface declares (IRealm.requestAvatar, IService.startService...)
    for iface in implementedBy(obj).flattened():
        if parts[-1] in iface.names() and iface[parts[-1]].getDoc():
            return True
    return False


def missing_docstrings() -> list[str]:
    """``path:line name`` of every public definition without a docstring."""
    missing = []
    for path in _modules():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        rel = os.path.relpath(path, REPO)
        if not ast.get_docstring(tree):
            missing.append(f"{rel}: module docstring")
        module_name = _module_name(path)
        for parts, node in _public_definitions(tree):
            if ast.get_docstring(node):  # type: ignore[arg-type]
                continue
            if _inherited_doc(module_name, parts):
                continue
            missing.append(f"{rel}:{node.lineno} {'.'.join(parts)}")  # type: ignore[attr-defined]
    return missing


def test_every_public_definition_has_a_docstring():
    missing = missing_docstrings()
    assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)


def test_the_walk_finds_definitions():
    # the check itself must see the package: many modules, classes and methods
    total = 0
    for path in _modules():
        with open(path, encoding="utf-8") as f:
            total += sum(1 for _ in _public_definitions(ast.parse(f.read())))
    assert len(_modules()) > 50 and total > 500
