"""Readers: raw logs -> one validated interaction table (+ an optional item metadata table).

The interaction table (:data:`INTERACTION_COLUMNS`) has one row per event:

* ``user_id``, ``item_id`` -- strings
* ``ts`` -- int64 epoch milliseconds (orders events)
* ``day`` -- int64 ``YYYYMMDD`` (day windows)
* ``polarity`` -- int8, ``1`` like / ``-1`` dislike (neutral events are dropped and counted)
* ``weight`` -- float32 (1.0 unless a weight column is mapped)

sorted by ``(user_id, ts, item_id)``. The item table has ``item_id`` plus optional ``title``,
``description``, ``category`` and numeric feature columns.

Every problem is one :class:`~data_prep.errors.DataPrepError` naming the file, the column and the
first bad row (1-based, header excluded).
"""

from __future__ import annotations

import difflib
import glob
import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from conrec_verl.data_prep.errors import DataPrepError

INTERACTION_COLUMNS = ["user_id", "item_id", "ts", "day", "polarity", "weight"]
SAMPLE_PATH = Path(__file__).resolve().parent / "sample" / "kuairand_like_hate.tsv.gz"

# u.item genre flag columns of MovieLens-100K, in file order
ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


@dataclass
class ReadResult:
    #: None when the log stays on a Ray cluster (engine=ray)
    interactions: pd.DataFrame | None
    items: pd.DataFrame | None
    files: list[str]
    stats: dict[str, Any] = field(default_factory=dict)


# -- low-level helpers ---------------------------------------------------------------------------

def _check_file(path, key: str = "input.path") -> str:
    if path is None or path == "???":
        raise DataPrepError(f"no input path given (set {key}=<file>)")
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise DataPrepError("file not found", file=p)
    return p


def read_table(path, sep: str | None = None, encoding: str = "utf-8", names: Sequence[str] | None = None,
               text_columns: Sequence[str] = ()) -> pd.DataFrame:
    """CSV/TSV (optionally .gz), ``::``-separated ``.dat`` or parquet into a DataFrame.

    ``text_columns`` (ids) are read as text from CSV/TSV, so ``03381812`` stays distinct from
    ``3381812`` (a number-typed read would merge them)."""
    p = _check_file(path)
    lower = p.lower()
    try:
        if lower.endswith((".parquet", ".pq", ".parquet.brotli")):
            df = pd.read_parquet(p)
            if names is not None:
                df.columns = list(names)[: len(df.columns)]
            return df
        if sep is None:
            base = lower[:-3] if lower.endswith(".gz") else lower
            sep = "\t" if base.endswith((".tsv", ".tab", ".data")) else ("::" if base.endswith(".dat") else ",")
        kwargs = dict(sep=sep, encoding=encoding, header=None if names is not None else "infer",
                      names=list(names) if names is not None else None)
        if text_columns:
            kwargs["dtype"] = {c: str for c in text_columns}
        if len(sep) > 1:
            kwargs["engine"] = "python"
        else:
            kwargs["low_memory"] = False
        return pd.read_csv(p, **kwargs)
    except DataPrepError:
        raise
    except UnicodeDecodeError as exc:
        row, detail = _first_undecodable_row(p, encoding, header=names is None)
        raise DataPrepError(f"not valid {encoding} text ({detail or exc.reason}); set the file's encoding, "
                            "e.g. input.encoding=latin-1", file=p, row=row) from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataPrepError(f"the compressed file is truncated or corrupt ({type(exc).__name__}: {exc}); "
                            "download or copy it again", file=p) from None
    except (pd.errors.ParserError, OSError, ValueError) as exc:
        raise DataPrepError(f"cannot parse as a table ({type(exc).__name__}: {exc})", file=p) from exc


def _first_undecodable_row(path: str, encoding: str, header: bool = True) -> tuple[int | None, str]:
    """The first data row (1-based, header excluded) that does not decode, and why."""
    try:
        opener = gzip.open if path.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            for i, line in enumerate(fh):
                try:
                    line.decode(encoding)
                except UnicodeDecodeError as exc:
                    return (i if header else i + 1) or None, f"{exc.reason}: {line[max(0, exc.start - 10):exc.end + 10]!r}"
    except (OSError, EOFError, zlib.error, LookupError):
        pass
    return None, ""


def _require_columns(df: pd.DataFrame, file: str, wanted: Mapping[str, str | None]) -> None:
    cols = [str(c) for c in df.columns]
    for role, col in wanted.items():
        if col is None:
            continue
        if col not in cols:
            close = difflib.get_close_matches(str(col), cols, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise DataPrepError(
                f"missing column for {role} (available: {cols}{hint}); set input.columns.{role}",
                file=file, column=str(col))


def _show(value) -> str:
    """A value for an error message: strings quoted, numbers plain (no ``np.int64(...)``)."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0]) + 1


def _check_scalar(series: pd.Series, file: str, column: str) -> None:
    """One value per cell: a nested parquet column (struct, list, map) is refused, not stringified."""
    if series.dtype != object:
        return
    nested = series.map(lambda v: isinstance(v, (dict, list, tuple, set, np.ndarray))).to_numpy(dtype=bool)
    if nested.any():
        r = _first_bad(nested)
        raise DataPrepError(f"expected one value per cell, got a nested value {_show(series.iloc[r - 1])!s:.80}; "
                            "flatten the column (e.g. select the id field) before data_prep", file=file, column=column,
                            row=r)


#: the timestamps a log may plausibly hold (epoch ms): 1990-01-01 .. 2100-01-01
PLAUSIBLE_MS = (631_152_000_000, 4_102_444_800_000)


def _check_plausible(ms: np.ndarray, raw: np.ndarray, file: str, column: str, unit: str, declared: str) -> None:
    bad = (ms < PLAUSIBLE_MS[0]) | (ms >= PLAUSIBLE_MS[1])
    if not bad.any():
        return
    r = _first_bad(bad)
    when = pd.Timestamp(int(ms[r - 1]), unit="ms") if -9e15 < ms[r - 1] < 9e15 else "out of range"
    low = ms < PLAUSIBLE_MS[0]
    mixed = " (the log mixes units: some values look like seconds, others like milliseconds)" \
        if declared == "auto" and low.any() and (~low).any() and unit == "ms" else ""
    raise DataPrepError(f"timestamp {_show(raw[r - 1])} read as {'seconds' if unit == 's' else 'milliseconds'} is "
                        f"{when}, outside 1990..2100{mixed}; set input.timestamp_unit to the log's unit (s or ms; "
                        "convert microseconds first)", file=file, column=column, row=r)


def _ids(series: pd.Series, file: str, column: str) -> np.ndarray:
    _check_scalar(series, file, column)
    null = series.isna().to_numpy()
    if null.any():
        raise DataPrepError("missing id value", file=file, column=column, row=_first_bad(null))
    if pd.api.types.is_float_dtype(series):
        frac = (series % 1 != 0).to_numpy()
        if frac.any():
            raise DataPrepError(f"id must be an integer or a string, got {_show(series.iloc[_first_bad(frac) - 1])}",
                                file=file, column=column, row=_first_bad(frac))
        series = series.astype(np.int64)
    if pd.api.types.is_integer_dtype(series):  # integer ids: text once per distinct id
        uniq, inverse = np.unique(series.to_numpy(), return_inverse=True)
        return np.array([str(v) for v in uniq.tolist()], dtype=object)[inverse]
    out = series.astype(str).str.strip()
    empty = (out == "").to_numpy()
    if empty.any():
        raise DataPrepError("empty id value", file=file, column=column, row=_first_bad(empty))
    return out.to_numpy(dtype=object)


def parse_timestamps(series: pd.Series, file: str, column: str, unit: str = "auto") -> np.ndarray:
    """Epoch milliseconds (int64) from numbers (``unit`` s/ms/auto) or date-time text."""
    null = series.isna().to_numpy()
    if null.any():
        raise DataPrepError("missing timestamp", file=file, column=column, row=_first_bad(null))
    if pd.api.types.is_bool_dtype(series):
        raise DataPrepError("timestamp column is boolean", file=file, column=column, row=1)
    if pd.api.types.is_numeric_dtype(series):
        values = series.to_numpy(dtype=np.float64)
        declared = unit
        if unit == "auto":
            unit = "ms" if np.nanmax(np.abs(values)) > 1e11 else "s"
        if unit not in ("s", "ms"):
            raise DataPrepError(f"timestamp unit must be s, ms or auto, got {unit!r}", column=column)
        neg = values < 0
        if neg.any():
            raise DataPrepError(f"negative timestamp {values[neg][0]}", file=file, column=column, row=_first_bad(neg))
        ms = np.round(values * (1000.0 if unit == "s" else 1.0))
        _check_plausible(ms, series.to_numpy(), file, column, unit, declared)
        return ms.astype(np.int64)
    _check_scalar(series, file, column)
    text = series.astype(str)
    numeric = pd.to_numeric(text, errors="coerce")
    if numeric.notna().all():
        return parse_timestamps(numeric, file, column, unit)
    if numeric.notna().mean() >= 0.5:  # mostly epoch numbers: the non-numbers are the bad rows
        r = _first_bad(numeric.isna().to_numpy())
        raise DataPrepError(f"unparsable timestamp {_show(text.iloc[r - 1])}", file=file, column=column, row=r)
    parsed = pd.to_datetime(text, errors="coerce", utc=True, format="mixed")
    bad = parsed.isna().to_numpy()
    if bad.any():
        r = _first_bad(bad)
        raise DataPrepError(f"unparsable timestamp {_show(text.iloc[r - 1])}", file=file, column=column, row=r)
    return (parsed.astype("datetime64[ms, UTC]").astype("int64")).to_numpy()


def days_from_ts(ts_ms: np.ndarray, timezone: str = "UTC") -> np.ndarray:
    """``YYYYMMDD`` int64 of each epoch-ms timestamp in ``timezone``."""
    # one conversion per distinct quarter hour (every real UTC offset is a multiple of 15 min)
    quarters, inverse = np.unique(np.asarray(ts_ms, dtype=np.int64) // 900_000, return_inverse=True)
    t = pd.to_datetime(pd.Series(quarters * 900_000), unit="ms", utc=True)
    if timezone and timezone != "UTC":
        t = t.dt.tz_convert(timezone)
    return (t.dt.year * 10000 + t.dt.month * 100 + t.dt.day).to_numpy(dtype=np.int64)[inverse]


def parse_day_column(series: pd.Series, file: str, column: str) -> np.ndarray:
    """A ``YYYYMMDD`` day column (ints or text), validated as real dates."""
    uniq, inverse = np.unique(series.to_numpy(dtype=object).astype(str), return_inverse=True)
    series_u = pd.Series(uniq)
    try:
        _check_days(series_u)
    except _BadDay as bad:
        r = int(np.flatnonzero(inverse == bad.pos)[0]) + 1
        raise DataPrepError(f"day must be YYYYMMDD, got {_show(series.iloc[r - 1])}", file=file, column=column, row=r)
    return series_u.astype(np.int64).to_numpy()[inverse]


class _BadDay(Exception):
    def __init__(self, pos: int):
        self.pos = pos


def _check_days(series: pd.Series) -> None:
    num = pd.to_numeric(series, errors="coerce")
    bad = num.isna().to_numpy() | ((num % 1) != 0).to_numpy()
    if bad.any():
        raise _BadDay(_first_bad(bad) - 1)
    days = num.astype(np.int64)
    parsed = pd.to_datetime(days.astype(str), format="%Y%m%d", errors="coerce")
    bad = parsed.isna().to_numpy()
    if bad.any():
        raise _BadDay(_first_bad(bad) - 1)


def _as_number_set(values) -> tuple[set, set]:
    nums, texts = set(), set()
    for v in values or []:
        texts.add(str(v))
        try:
            nums.add(float(v))
        except (TypeError, ValueError):
            pass
    return nums, texts


def polarity_from_labels(series: pd.Series, file: str, column: str, negative_values, positive_values,
                         other: str = "error") -> np.ndarray:
    """+1 / -1 / 0 (neither; only when ``other == 'drop'``) from a label column."""
    neg_n, neg_t = _as_number_set(negative_values)
    pos_n, pos_t = _as_number_set(positive_values)
    if not (neg_n or neg_t) or not (pos_n or pos_t):
        raise DataPrepError("input.polarity.negative_values and positive_values must both be set", column=column)
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        vals = series.to_numpy(dtype=np.float64)
        is_neg = np.isin(vals, list(neg_n))
        is_pos = np.isin(vals, list(pos_n))
    else:
        vals = series.astype(str).str.strip()
        is_neg = vals.isin(neg_t).to_numpy()
        is_pos = vals.isin(pos_t).to_numpy()
    both = is_neg & is_pos
    if both.any():
        raise DataPrepError("a label value is listed as both negative and positive", column=column)
    pol = np.zeros(len(series), dtype=np.int8)
    pol[is_neg] = -1
    pol[is_pos] = 1
    unknown = pol == 0
    if unknown.any() and other == "error":
        r = _first_bad(unknown)
        raise DataPrepError(
            f"label {_show(series.iloc[r - 1])} is neither negative {sorted(neg_t)} nor positive {sorted(pos_t)} "
            "(set input.polarity.other_labels=drop to ignore such rows)", file=file, column=column, row=r)
    return pol


def polarity_from_ratings(series: pd.Series, file: str, column: str, dislike_max: float, like_min: float) -> np.ndarray:
    """-1 for ratings <= dislike_max, +1 for >= like_min, 0 (neutral, dropped) in between."""
    if dislike_max >= like_min:
        raise DataPrepError(f"input.polarity.dislike_max ({dislike_max}) must be below like_min ({like_min})")
    num = pd.to_numeric(series, errors="coerce")
    bad = num.isna().to_numpy()
    if bad.any():
        r = _first_bad(bad)
        raise DataPrepError(f"rating must be a number, got {_show(series.iloc[r - 1])}", file=file, column=column, row=r)
    v = num.to_numpy(dtype=np.float64)
    pol = np.zeros(len(v), dtype=np.int8)
    pol[v <= dislike_max] = -1
    pol[v >= like_min] = 1
    return pol


def _weights(series: pd.Series | None, n: int, file: str, column: str | None) -> np.ndarray:
    if series is None:
        return np.ones(n, dtype=np.float32)
    num = pd.to_numeric(series, errors="coerce")
    # finite in float32 too (the dtype it is kept in): an infinite weight would poison the embeddings' sums
    bad = (num.isna() | (num < 0) | ~(num <= np.finfo(np.float32).max)).to_numpy()
    if bad.any():
        r = _first_bad(bad)
        raise DataPrepError(f"weight must be a finite non-negative number, got {_show(series.iloc[r - 1])}",
                            file=file, column=column, row=r)
    return num.to_numpy(dtype=np.float32)


# -- the interaction table -----------------------------------------------------------------------

def interactions_from_frame(df: pd.DataFrame, file: str, columns: Mapping[str, str | None], polarity: Mapping,
                            timestamp_unit: str = "auto", timezone: str = "UTC",
                            duplicates: str = "keep") -> tuple[pd.DataFrame, dict]:
    """Validate a raw frame and map it to the interaction table. ``columns`` maps the roles
    ``user``, ``item``, ``timestamp`` and optionally ``day``, ``label``, ``rating``, ``weight``.
    Identical events (user, item, timestamp, polarity) are counted (``duplicate_events``) and kept
    or dropped (``duplicates``)."""
    events = events_from_frame(df, file, columns, polarity, timestamp_unit, timezone)
    return finish_log([events], file, duplicates, polarity_column(columns, polarity))


def polarity_column(columns: Mapping[str, str | None], polarity: Mapping) -> str | None:
    """The column the polarity is read from (``label`` or ``rating``), for error messages."""
    return columns.get("label" if polarity.get("mode", "label") == "label" else "rating")


def events_from_frame(df: pd.DataFrame, file: str, columns: Mapping[str, str | None], polarity: Mapping,
                      timestamp_unit: str = "auto", timezone: str = "UTC", allow_empty: bool = False) -> pd.DataFrame:
    """The row checks of one file of the log (every error names ``file``, the column and the row in
    that file): its events in file order, neutral ones kept with polarity 0. The checks that need
    the whole log (any dislike at all, duplicates, the order) are :func:`finish_log`'s, so a log
    in many files gives the same table and the same errors as one file.
    ``allow_empty``: a file with a header and no rows is one empty shard of a sharded log."""
    mode = polarity.get("mode", "label")
    roles = {"user": columns.get("user"), "item": columns.get("item"), "timestamp": columns.get("timestamp"),
             "day": columns.get("day"), "weight": columns.get("weight")}
    roles["label" if mode == "label" else "rating"] = columns.get("label" if mode == "label" else "rating")
    for required in ("user", "item", "timestamp", "label" if mode == "label" else "rating"):
        if not roles.get(required):
            raise DataPrepError(f"input.columns.{required} is not set", file=file)
    df.columns = [str(c) for c in df.columns]
    _require_columns(df, file, roles)
    if len(df) == 0:
        if allow_empty:
            return pd.DataFrame({"user_id": pd.Series(dtype=object), "item_id": pd.Series(dtype=object),
                                 "ts": pd.Series(dtype=np.int64), "day": pd.Series(dtype=np.int64),
                                 "polarity": pd.Series(dtype=np.int8), "weight": pd.Series(dtype=np.float32)})
        raise DataPrepError("the interaction log is empty", file=file)
    for role in ("label", "rating", "weight", "day"):
        if roles.get(role):
            _check_scalar(df[roles[role]], file, roles[role])
    users = _ids(df[roles["user"]], file, roles["user"])
    items = _ids(df[roles["item"]], file, roles["item"])
    ts = parse_timestamps(df[roles["timestamp"]], file, roles["timestamp"], timestamp_unit)
    day = (parse_day_column(df[roles["day"]], file, roles["day"]) if roles.get("day")
           else days_from_ts(ts, timezone))
    if mode == "label":
        pol = polarity_from_labels(df[roles["label"]], file, roles["label"], polarity.get("negative_values"),
                                   polarity.get("positive_values"), polarity.get("other_labels", "error"))
    elif mode == "rating":
        pol = polarity_from_ratings(df[roles["rating"]], file, roles["rating"],
                                    float(polarity.get("dislike_max")), float(polarity.get("like_min")))
    else:
        raise DataPrepError(f"input.polarity.mode must be 'label' or 'rating', got {mode!r}")
    weight = _weights(df[roles["weight"]] if roles.get("weight") else None, len(df), file, roles.get("weight"))
    return pd.DataFrame({"user_id": users, "item_id": items, "ts": ts, "day": day, "polarity": pol, "weight": weight})


#: identical events: the same user, item, timestamp and polarity
DUPLICATE_KEY = ["user_id", "item_id", "ts", "polarity"]


def check_duplicates_option(duplicates: str) -> None:
    if duplicates not in ("keep", "drop"):
        raise DataPrepError(f"input.duplicates must be 'keep' or 'drop', got {duplicates!r}")


def no_dislike_error(source: str, column: str | None) -> DataPrepError:
    return DataPrepError("the log has no negative (dislike) events; CoNRec needs explicit negative feedback "
                         "(check input.polarity)", file=source, column=column)


def finish_log(frames: Sequence[pd.DataFrame], source: str, duplicates: str = "keep",
               polarity_col: str | None = None) -> tuple[pd.DataFrame, dict]:
    """The interaction table of a log from its files' events (:func:`events_from_frame`, in file
    order): neutral events dropped and counted, identical events counted and kept or dropped (the
    first in file order stays), sorted; ``source`` (the file, folder or pattern) names the log in
    the errors about it as a whole."""
    check_duplicates_option(duplicates)
    raw = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    if len(raw) == 0:
        raise DataPrepError("the interaction log is empty (every file has a header and no rows)", file=source)
    n_neutral = int((raw["polarity"] == 0).sum())
    out = raw[raw["polarity"] != 0]
    dup = out.duplicated(subset=DUPLICATE_KEY).to_numpy()
    if duplicates == "drop":
        out = out[~dup]
    stats = {"raw_rows": int(len(raw)), "neutral_dropped": n_neutral, "duplicate_events": int(dup.sum()),
             "duplicates": duplicates}
    if not (out["polarity"] < 0).any():
        raise no_dislike_error(source, polarity_col)
    return finish_interactions(out), stats


def finish_interactions(df: pd.DataFrame) -> pd.DataFrame:
    df = df.astype({"user_id": object, "item_id": object, "ts": np.int64, "day": np.int64,
                    "polarity": np.int8, "weight": np.float32})
    # sort by (user_id, ts, item_id) through sorted integer codes: much faster than sorting strings
    u_codes, _ = pd.factorize(df["user_id"], sort=True)
    i_codes, _ = pd.factorize(df["item_id"], sort=True)
    order = np.lexsort((i_codes, df["ts"].to_numpy(), u_codes))
    return df.iloc[order].reset_index(drop=True)


# -- item metadata --------------------------------------------------------------------------------

def items_from_frame(df: pd.DataFrame, file: str, columns: Mapping[str, Any], known_items: set | None,
                     unknown_ids: str = "drop") -> tuple[pd.DataFrame, dict]:
    """Validate an item table: ``columns`` maps ``item`` and optionally ``title``, ``description``,
    ``category`` (strings) and ``numeric`` (a list of numeric columns)."""
    df.columns = [str(c) for c in df.columns]
    roles = {k: columns.get(k) for k in ("item", "title", "description", "category")}
    if not roles["item"]:
        raise DataPrepError("input.items.columns.item is not set", file=file)
    _require_columns(df, file, roles)
    numeric = list(columns.get("numeric") or [])
    _require_columns(df, file, {f"numeric[{i}]": c for i, c in enumerate(numeric)})
    ids = _ids(df[roles["item"]], file, roles["item"])
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        r = _first_bad(dup)
        raise DataPrepError(f"duplicate item id {ids[r - 1]!r}", file=file, column=roles["item"], row=r)
    out = pd.DataFrame({"item_id": ids})
    for role in ("title", "description", "category"):
        if roles[role]:
            out[role] = df[roles[role]].fillna("").astype(str).to_numpy(dtype=object)
    for col in numeric:
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna().to_numpy()
        if bad.any():
            r = _first_bad(bad)
            raise DataPrepError(f"numeric feature must be a number, got {_show(df[col].iloc[r - 1])}",
                                file=file, column=col, row=r)
        out[f"num_{col}"] = num.to_numpy(dtype=np.float64)
    stats = {"item_rows": int(len(out)), "unknown_item_rows_dropped": 0}
    if unknown_ids not in ("drop", "error"):
        raise DataPrepError(f"input.items.unknown_ids must be 'drop' or 'error', got {unknown_ids!r}")
    if known_items is not None:
        unknown = ~out["item_id"].isin(known_items).to_numpy()
        if unknown.any():
            if unknown_ids == "error":
                r = _first_bad(unknown)
                raise DataPrepError(
                    f"item id {ids[r - 1]!r} does not occur in the interaction log "
                    "(set input.items.unknown_ids=drop to ignore such rows)", file=file, column=roles["item"], row=r)
            stats["unknown_item_rows_dropped"] = int(unknown.sum())
            out = out[~unknown]
    return out.reset_index(drop=True), stats


# -- format readers -------------------------------------------------------------------------------

#: the files a folder of shards may hold (others, e.g. a README or ``schema.json``, are skipped)
DATA_SUFFIXES = (".csv", ".tsv", ".tab", ".txt", ".data", ".dat", ".parquet", ".pq", ".gz")


def _skipped(parts: Sequence[str]) -> bool:
    """Hidden and ``_``-prefixed files or folders (Spark's ``_SUCCESS``, ``_temporary/``, ``.crc``)."""
    return any(part.startswith((".", "_")) for part in parts)


def input_files(path, key: str = "input.path") -> list[str]:
    """The files of a log, as absolute paths (Ray workers open them from another working folder;
    they must see the same paths): one file; a folder (every data file under it by extension,
    :data:`DATA_SUFFIXES`, sorted by path); or a glob pattern (``logs/part-*.parquet``, ``**`` for
    sub-folders; sorted). Hidden and ``_``-prefixed files and folders are skipped in both. The order
    is the log's file order. Values in folder names (Hive's ``day=2``) are not read as columns."""
    if path is None or path == "???":
        raise DataPrepError(f"no input path given (set {key}=<file, folder or glob>)")
    p = os.path.abspath(os.fspath(Path(os.fspath(path)).expanduser()))
    if os.path.isfile(p):
        return [p]
    if os.path.isdir(p):
        root = Path(p)
        files = sorted(str(f) for f in root.rglob("*") if f.is_file() and f.name.lower().endswith(DATA_SUFFIXES)
                       and not _skipped(f.relative_to(root).parts))
        if not files:
            raise DataPrepError(f"the folder holds no data file ({', '.join(DATA_SUFFIXES)})", file=p)
        return files
    if glob.has_magic(p):
        fixed = next(i for i, part in enumerate(Path(p).parts) if glob.has_magic(part))  # folders before the pattern
        files = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f)
                       and not _skipped(Path(f).parts[fixed:]))
        if not files:
            raise DataPrepError("no file matches the pattern", file=p)
        return files
    raise DataPrepError("file not found", file=p)


def read_events_file(cfg: Mapping, path: str, allow_empty: bool = False) -> pd.DataFrame:
    """One file of a generic/kuairand log, read and checked (:func:`events_from_frame`)."""
    cols = cfg.get("columns") or {}
    ids = [c for c in (cols.get("user"), cols.get("item")) if c]
    df = read_table(path, sep=cfg.get("sep"), encoding=cfg.get("encoding") or "utf-8", text_columns=ids)
    return events_from_frame(df, path, cols, cfg["polarity"], cfg.get("timestamp_unit", "auto"),
                             cfg.get("timezone", "UTC"), allow_empty)


def _generic(cfg: Mapping, paths: Sequence[str], source: str) -> tuple[pd.DataFrame, dict]:
    check_duplicates_option(cfg.get("duplicates", "keep"))
    frames = [read_events_file(cfg, p, allow_empty=len(paths) > 1) for p in paths]
    inter, stats = finish_log(frames, source, cfg.get("duplicates", "keep"),
                              polarity_column(cfg.get("columns") or {}, cfg["polarity"]))
    if len(paths) > 1:
        stats["input_files"] = len(paths)
    return inter, stats


def _movielens_paths(cfg: Mapping) -> tuple[str, str | None, str]:
    """(ratings file, movies file or None, flavour '100k'|'1m'). ``input.path`` may be a folder."""
    path = cfg.get("path")
    if path is None or path == "???":
        raise DataPrepError("no input path given (set input.path to u.data, ratings.dat or their folder)")
    p = Path(path)
    if p.is_dir():
        for ratings, movies, flavour in (("u.data", "u.item", "100k"), ("ratings.dat", "movies.dat", "1m")):
            if (p / ratings).is_file():
                items = cfg.get("items_path") or (str(p / movies) if (p / movies).is_file() else None)
                return str(p / ratings), items, flavour
        raise DataPrepError("folder holds neither u.data nor ratings.dat", file=p)
    flavour = "1m" if p.name.lower().endswith(".dat") else "100k"
    items = cfg.get("items_path")
    if items is None:
        guess = p.parent / ("movies.dat" if flavour == "1m" else "u.item")
        items = str(guess) if guess.is_file() else None
    return str(_check_file(p)), items, flavour


def _movielens(cfg: Mapping) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str], dict]:
    ratings_path, movies_path, flavour = _movielens_paths(cfg)
    names = ["user_id", "item_id", "rating", "timestamp"]
    sep = "\t" if flavour == "100k" else "::"
    df = read_table(ratings_path, sep=sep, names=names)
    if df.shape[1] != 4 or df.iloc[:, 3].isna().any():
        bad = df.iloc[:, 3].isna().to_numpy() if df.shape[1] >= 4 else np.ones(len(df), bool)
        raise DataPrepError(f"expected 4 fields per line separated by {sep!r} (user, item, rating, timestamp)",
                            file=ratings_path, column="timestamp", row=_first_bad(bad) if bad.any() else None)
    pol = dict(cfg["polarity"], mode="rating")
    inter, stats = interactions_from_frame(
        df, ratings_path, {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "rating": "rating"},
        pol, "s", cfg.get("timezone", "UTC"))
    files = [ratings_path]
    items = None
    if movies_path is not None:
        files.append(movies_path)
        enc = cfg.get("items_encoding") or "latin-1"
        if flavour == "100k":
            raw = read_table(movies_path, sep="|", encoding=enc,
                             names=["item_id", "title", "release_date", "video_release_date", "url"] + ML100K_GENRES)
            if raw.shape[1] != 5 + len(ML100K_GENRES):
                raise DataPrepError(f"expected {5 + len(ML100K_GENRES)} '|'-separated fields per line", file=movies_path)
            flags = raw[ML100K_GENRES].fillna(0).to_numpy() > 0
            raw["category"] = ["|".join(g for g, f in zip(ML100K_GENRES, row) if f) for row in flags]
        else:
            raw = read_table(movies_path, sep="::", encoding=enc, names=["item_id", "title", "category"])
        items, istats = items_from_frame(raw, movies_path, {"item": "item_id", "title": "title", "category": "category"},
                                         set(inter["item_id"].unique()), cfg.get("items", {}).get("unknown_ids", "drop"))
        stats.update(istats)
    return inter, items, files, stats


def read_input(cfg: Mapping, read_events: Callable | None = None) -> ReadResult:
    """Read ``cfg`` (the ``input`` config group) into a :class:`ReadResult`. ``read_events(cfg,
    files, source) -> (interactions, stats)`` reads a generic/kuairand log's files in place of the
    in-process reader (``engine=ray``: :func:`data_prep.distributed.read_log_ray`, whose table stays
    on the cluster: ``interactions`` is None and ``stats`` already holds the log's counts and, under
    ``item_ids``, its distinct items)."""
    fmt = cfg.get("format")
    if fmt == "movielens":
        inter, items, files, stats = _movielens(cfg)
    elif fmt in ("kuairand", "generic"):
        path = cfg.get("path")
        if fmt == "kuairand" and path is None:
            path = SAMPLE_PATH
        files = input_files(path)
        inter, stats = (read_events or _generic)(cfg, files, files[0] if len(files) == 1 else os.fspath(path))
        items = None
        icfg = cfg.get("items") or {}
        if icfg.get("path"):
            ipath = _check_file(icfg["path"], "input.items.path")
            item_col = (icfg.get("columns") or {}).get("item")
            raw = read_table(ipath, sep=icfg.get("sep"), encoding=icfg.get("encoding") or "utf-8",
                             text_columns=[item_col] if item_col else ())
            known = set(inter["item_id"].unique()) if inter is not None else set(stats["item_ids"])
            items, istats = items_from_frame(raw, ipath, icfg.get("columns") or {}, known,
                                             icfg.get("unknown_ids", "drop"))
            stats.update(istats)
            files.append(ipath)
    else:
        raise DataPrepError(f"input.format must be kuairand, movielens or generic, got {fmt!r}")
    stats.pop("item_ids", None)
    if inter is not None:
        stats.update(events=int(len(inter)), users=int(inter["user_id"].nunique()),
                     items=int(inter["item_id"].nunique()), likes=int((inter["polarity"] > 0).sum()),
                     dislikes=int((inter["polarity"] < 0).sum()))
    return ReadResult(inter, items, [os.fspath(f) for f in files], stats)
