"""``tomllib`` is in the standard library from Python 3.11; on 3.10 the same parser is
the ``tomli`` package (declared for python_version < "3.11" in pyproject.toml)."""
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["tomllib"]
