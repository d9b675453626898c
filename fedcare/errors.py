"""The one exception type for errors a user can cause (bad config, data, certificates...).

The CLI prints such an error as one line and exits with code 2; anything else is a bug
and propagates with its traceback.

The error boundary of a site: the message of an error is for the site's own staff (it may
quote a value from the data or an absolute path); what leaves the site as a refusal reason
is ``public_reason(err)``, built only from a fixed vocabulary (``SiteProblem``: the kind of
problem, a file name relative to the site's folder, a line number, a column name, a
dataset.toml or policy key), never from an exception's text or a value of the data.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

#: kind of problem -> the words that leave the site for it
KINDS = {
    "description": "dataset.toml is not valid",
    "outside-folder": "a path leaves the site's data folder",
    "missing-file": "a file named by the site's data is missing",
    "unreadable-table": "a table file cannot be read in its format",
    "not-utf8": "a text file is not UTF-8",
    "missing-column": "a column is missing",
    "bad-value": "a value does not fit the run's data contract",
    "unknown-label": "a label is not one of the run's labels",
    "empty-value": "a required value is empty",
    "bad-split": "a split value is not train or test",
    "empty-split": "the train or test split is empty",
    "duplicate": "a value that must be unique repeats",
    "bad-image": "an image cannot be decoded",
    "bad-dicom": "a DICOM file cannot be used",
    "bad-json": "a record is not valid JSON of the described shape",
    "contract": "the site's data does not fit the run's data contract",
    "data": "the site's data cannot be read",
    "internal": "the site hit an unexpected error",
}
#: a name that may leave the site: relative, no "..", plain characters, short
_SAFE = re.compile(r"[\w][\w .+=@#%,-]{0,119}(/[\w][\w .+=@#%,-]{0,119}){0,7}")
_ABSOLUTE = re.compile(r"(?<![\w.])(~?/[^\s:;,()'\"]+|[A-Za-z]:\\[^\s:;,()'\"]*)")


@dataclass(frozen=True)
class SiteProblem:
    """What went wrong at a site, in words that may leave it (see ``KINDS``)."""

    kind: str
    file: str = ""      # relative to the site's folder
    line: int = 0       # 1-based line of the file (0: none)
    column: str = ""    # a column named by dataset.toml or the run's contract
    key: str = ""       # a dataset.toml or policy key

    def text(self) -> str:
        words = KINDS.get(self.kind, KINDS["data"])
        where = []
        if self.file:
            where.append(_name(self.file) + (f" line {int(self.line)}" if self.line else ""))
        if self.column:
            where.append(f"column {_name(self.column)}")
        if self.key:
            where.append(f"key {_name(self.key)}")
        return f"site refused ({self.kind if self.kind in KINDS else 'data'}): {words}" + \
            (f" ({', '.join(where)})" if where else "") + "; the site's log has the details"


def _name(text: str) -> str:
    text = str(text)
    return text if _SAFE.fullmatch(text) and ".." not in text.split("/") else "(name withheld)"


def public_reason(err: BaseException) -> str:
    """The reason that may leave the site for ``err`` (see the module's docstring).

    A data error says only its ``SiteProblem``; a policy, privacy or configuration refusal
    (built by fedcare from the run's settings and the site's policy, never from data) says
    its first line with any absolute path withheld; anything else says a fixed sentence."""
    problem = getattr(err, "problem", None)
    if isinstance(problem, SiteProblem):
        return problem.text()
    if isinstance(err, DataError):
        return SiteProblem("data").text()
    if isinstance(err, (PolicyRefusal, PrivacyError, ConfigError)):
        first = (str(err).splitlines() or [""])[0][:400]
        return _ABSOLUTE.sub("(path withheld)", first)
    if isinstance(err, FedcareError):
        return f"site refused: {type(err).__name__}; the site's log has the details"
    return SiteProblem("internal").text()


class FedcareError(Exception):
    """An error the user can fix; its message says what to fix. ``problem``: the same in
    words that may leave a site (``public_reason``)."""

    def __init__(self, *args: object, problem: SiteProblem | None = None) -> None:
        super().__init__(*args)
        self.problem = problem

    def __reduce__(self):   # the problem survives a copy or a trip between processes
        return _rebuild, (type(self), self.args, self.problem)


def _rebuild(cls: type, args: tuple, problem: SiteProblem | None) -> FedcareError:
    return cls(*args, problem=problem)


class ConfigError(FedcareError):
    """A configuration value is unknown, malformed or out of range."""


class DataError(FedcareError):
    """Site data is missing, corrupted or in the wrong format."""


class StoreError(FedcareError):
    """The SQL store cannot be reached or holds something unexpected."""


class PrivacyError(FedcareError):
    """A DP setting is impossible, or a site's privacy budget would be exceeded."""


class PolicyRefusal(FedcareError):
    """A site's policy refuses what the coordinator asked for."""


class ModelError(FedcareError):
    """An exported model folder is missing, malformed, altered or for another task."""


class ExportError(FedcareError):
    """A run cannot be exported as asked (unfinished, no such round, output folder in use)."""
