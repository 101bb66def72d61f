"""Every public function, class and method has an example in its docstring (issue 7).

Public: the functions and classes in ``s3pipes.__all__`` (exceptions excepted: the tree in
``s3pipes.errors`` documents them) and the methods those classes define themselves
(properties excepted). An example is a doctest (``>>>``) or, where it cannot run without a
server or several processes, an ``Example::`` literal block.
"""

from __future__ import annotations

import inspect

import pytest

import s3pipes


def _has_example(obj: object) -> bool:
    doc = inspect.getdoc(obj) or ""
    return ">>>" in doc or "Example" in doc


def _missing_examples() -> list[str]:
    missing = []
    for name in s3pipes.__all__:
        obj = getattr(s3pipes, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            continue
        if not (inspect.isclass(obj) or callable(obj)):
            continue  # constants
        if not _has_example(obj):
            missing.append(name)
        if not inspect.isclass(obj):
            continue
        for attribute, member in vars(obj).items():
            if attribute.startswith("_") or isinstance(member, property):
                continue
            if isinstance(member, (classmethod, staticmethod)):
                member = member.__func__
            elif not callable(member):
                continue  # class constants
            if not _has_example(member):
                missing.append(f"{name}.{attribute}")
    return missing


def test_every_public_function_class_and_method_has_an_example() -> None:
    missing = _missing_examples()
    assert not missing, f"{len(missing)} public names have no example in their docstring: {', '.join(missing)}"


def test_the_audit_reports_what_lacks_an_example(monkeypatch: pytest.MonkeyPatch) -> None:
    class Bare:
        """Example: ``Bare().documented()``."""

        @property
        def size(self) -> int:  # properties are exempt
            return 0

        def documented(self) -> None:
            """>>> Bare().documented()"""

        def undocumented(self) -> None:
            """No example."""

    def helper() -> None:
        """Nothing to run."""

    monkeypatch.setattr(s3pipes, "Bare", Bare, raising=False)
    monkeypatch.setattr(s3pipes, "helper", helper, raising=False)
    monkeypatch.setattr(s3pipes, "__all__", [*s3pipes.__all__, "Bare", "helper"])
    assert _missing_examples()[-2:] == ["Bare.undocumented", "helper"]
