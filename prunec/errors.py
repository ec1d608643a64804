"""Error types. Every user-facing failure is a PrunecError; the CLI prints it and exits 2."""
from __future__ import annotations

from dataclasses import dataclass


def first_line(exc: BaseException) -> str:
    """An exception's first message line (torch.export errors run to pages), or its type name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PrunecError(Exception):
    """Base class: a failure caused by the user's input, reported without a traceback."""


@dataclass(frozen=True)
class Location:
    """Where a value sits in a spec file: 1-based line and column, and its JSON pointer."""

    file: str
    line: int
    col: int
    pointer: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class SpecError(PrunecError):
    """A spec is malformed or does not fit the model. Carries the location of the bad value."""

    def __init__(self, message: str, location: Location | None = None):
        self.message = message
        self.location = location
        super().__init__(self.format())

    def format(self) -> str:
        if self.location is None:
            return f"error: {self.message}"
        pointer = self.location.pointer or "/"
        return f"{self.location}: error at {pointer}: {self.message}"


class SpecErrors(PrunecError):
    """Several spec errors found in one validation layer, reported together."""

    def __init__(self, errors: list[SpecError]):
        self.errors = errors
        super().__init__("\n".join(e.format() for e in errors))


class BuildError(PrunecError):
    """Capture, a graph pass or emission failed. Names the pass that failed."""


class PrunecInputError(PrunecError, ValueError):
    """An input given to an artifact at run time that it does not accept: names the input and what
    the artifact takes."""
