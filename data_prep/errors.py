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
        #: the whole message (Ray appends its own lines to ``args`` of an error it carries)
        self.message = str(self.args[0])
        self.file = None if file is None else str(file)
        self.column = column
        self.row = row

    def __reduce__(self):
        # keep file/column/row across processes (Ray workers raise it on the driver's behalf)
        return _rebuild, (self.message, self.file, self.column, self.row)


def _rebuild(message: str, file, column, row) -> DataPrepError:
    err = DataPrepError(message)
    err.file, err.column, err.row = file, column, row
    return err


def find_data_prep_error(exc: BaseException) -> DataPrepError | None:
    """The :class:`DataPrepError` behind ``exc``: itself, or the one a Ray task or Ray Data wrapped
    (Ray re-raises a task's error as a subclass that carries it as ``cause``); else None."""
    seen, todo, wrapped = set(), [exc], None
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataPrepError):
            if type(e) is DataPrepError and str(e) == e.message:
                return e
            if wrapped is None:
                wrapped = _rebuild(getattr(e, "message", str(e)), e.file, e.column, e.row)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return wrapped
