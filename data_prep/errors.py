"""The one error type data_prep raises for bad input."""

from __future__ import annotations

import os


class DataPrepError(ValueError):
    """Bad input or configuration. The message names the file, the column and (where it applies)
    the 1-based data row (header excluded) of the first offending value."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None,
                 column: str | None = None, row: int | None = None):
        parts = []
        if file is not None:
            parts.append(str(file))
        if column is not None:
            parts.append(f"column {column!r}")
        if row is not None:
            parts.append(f"row {row}")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.file = None if file is None else str(file)
        self.column = column
        self.row = row
