"""Manifest contracts: which columns each kind of input row must and may carry.

A manifest is checked on the driver before any actor starts, so one bad column costs seconds, not a
GPU-hour. Every problem is reported at once; columns not named here pass through as per-row parameters.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STRING = pa.string()
INT = pa.int64()
FLOAT = pa.float64()
STRINGS = pa.list_(pa.string())

# Hyperparameters every method accepts (DESIGN.md "common hyperparameters").
COMMON_PARAMS: dict[str, pa.DataType] = {
    "seed": INT,
    "steps": INT,
    "num_frames": INT,
    "height": INT,
    "width": INT,
}


@dataclass(frozen=True)
class ManifestKind:
    name: str
    required: dict[str, pa.DataType]
    optional: dict[str, pa.DataType]

    @property
    def columns(self) -> dict[str, pa.DataType]:
        return {**self.required, **self.optional}

    def schema(self) -> pa.Schema:
        """Arrow schema of a manifest holding every known column (required first)."""
        return pa.schema([pa.field(n, t, nullable=n != "id") for n, t in self.columns.items()])


MANIFEST_KINDS: dict[str, ManifestKind] = {
    kind.name: kind
    for kind in (
        ManifestKind(
            "sketch",
            required={"id": STRING, "svg": STRING, "prompt": STRING},
            optional=dict(COMMON_PARAMS),
        ),
        ManifestKind(
            "image",
            required={"id": STRING, "image": STRING, "prompt": STRING},
            optional={
                **COMMON_PARAMS,
                "end_image": STRING,
                "mode": STRING,
                "fps": INT,
                "frame_index": INT,
                "fs": INT,
                "cfg_scale": FLOAT,
                "cfg_image": FLOAT,
                "cfg_text": FLOAT,
            },
        ),
        ManifestKind(
            "video",
            required={"id": STRING, "video": STRING, "source_prompt": STRING, "target_prompt": STRING},
            optional={**COMMON_PARAMS, "mask": STRING},
        ),
        ManifestKind(
            "style",
            required={"id": STRING, "prompt": STRING, "style": STRINGS},
            optional={**COMMON_PARAMS, "cfg_text": FLOAT, "cfg_style": FLOAT},
        ),
        ManifestKind(
            "eval",
            required={"id": STRING, "video": STRING},
            optional={
                "prompt": STRING,
                "image": STRING,
                "source_video": STRING,
                "style": STRINGS,
                "mask": STRING,
                "num_frames": INT,
            },
        ),
    )
}


class ManifestError(ValueError):
    """A manifest that cannot be run; `problems` lists every reason, each naming columns or row ids."""

    def __init__(self, uri: str, problems: list[str]):
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"manifest {uri} has {len(problems)} problem(s):\n{listing}")


def plain_types(schema: pa.Schema) -> pa.Schema:
    """`schema` as anima reads a manifest: pandas categoricals (dictionary-encoded) decoded, and large or
    view strings and lists as plain ones, so that a manifest validates and reaches the actors the same
    whichever dataframe library wrote it, and its files' schemas can be unified."""
    return pa.schema([f.with_type(_plain(f.type)) for f in schema], metadata=schema.metadata)


def whole_numbers(schema: pa.Schema, kind: str) -> pa.Schema:
    """`schema` with the integer columns of a `kind` manifest that came as floats read as integers again:
    pandas writes an integer column with a missing value as float64. Validation has checked that their
    values are whole (`_floated_integers`)."""
    floated = set(_floated_integers(schema, kind))
    return pa.schema([f.with_type(INT) if f.name in floated else f for f in schema], metadata=schema.metadata)


def _floated_integers(schema: pa.Schema, kind: str) -> list[str]:
    """The integer columns of a `kind` manifest that `schema` holds as floats."""
    integers = [name for name, t in MANIFEST_KINDS[kind].columns.items() if t == INT]
    return [n for n in integers if n in schema.names and pa.types.is_floating(schema.field(n).type)]


def _not_whole(values: pa.Array) -> pa.Array:
    """Where a float column's value is no int64 (a fraction, NaN, infinite, out of range); nulls are
    whole (missing), and so is a batch of a file that wrote the column as integers."""
    if not pa.types.is_floating(values.type):
        return pa.nulls(len(values), pa.bool_()).fill_null(False)
    values = values.cast(pa.float64())  # float16 has no floor
    whole = pc.and_(
        pc.and_(pc.is_finite(values), pc.equal(pc.floor(values), values)),
        pc.and_(pc.greater_equal(values, -(2.0**63)), pc.less(values, 2.0**63)),
    )
    return pc.and_(pc.is_valid(values), pc.invert(pc.fill_null(whole, True)))


_LISTS = (pa.types.is_list, pa.types.is_large_list, pa.types.is_list_view, pa.types.is_large_list_view)
# Lists that hold text too, which `_as_bytes` reads as large lists (Polars writes `Array(String)` so).
_ANY_LISTS = (*_LISTS, pa.types.is_fixed_size_list)
_TEXTS = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)


def _holds_text(t: pa.DataType) -> bool:
    """Whether a column of type `t` holds text anywhere: itself, or in its lists, structs or maps."""
    if pa.types.is_dictionary(t):
        return _holds_text(t.value_type)
    if pa.types.is_struct(t):
        return any(_holds_text(f.type) for f in t)
    if pa.types.is_map(t):
        return _holds_text(t.key_type) or _holds_text(t.item_type)
    if any(is_list(t) for is_list in _ANY_LISTS):
        return _holds_text(t.value_type)
    return any(is_text(t) for is_text in _TEXTS)


def _text_bytes(values: pa.Array) -> pa.Array:
    """A text column with its text as bytes (`_as_bytes`), dictionaries decoded."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    return values.cast(_as_bytes(values.type))


def _as_bytes(t: pa.DataType) -> pa.DataType:
    """`t` with its text as bytes (and dictionaries decoded): the cast that reads invalid text without
    checking it."""
    if pa.types.is_dictionary(t):
        return _as_bytes(t.value_type)
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_as_bytes(f.type)) for f in t])
    if pa.types.is_map(t):
        return pa.map_(_as_bytes(t.key_type), _as_bytes(t.item_type))
    if any(is_list(t) for is_list in _ANY_LISTS):
        return pa.large_list(_as_bytes(t.value_type))
    return pa.large_binary() if any(is_text(t) for is_text in _TEXTS) else t


def _not_utf8(values: pa.Array) -> pa.Array | None:
    """Where a text column's value (or a text inside it) is not UTF-8; None when every one is. Parquet
    readers do not check, and the actors' first `to_pylist` of such a row fails its whole batch."""
    try:
        values.validate(full=True)
        return None
    except pa.ArrowInvalid:

        def broken(value: Any) -> bool:
            if isinstance(value, list | tuple):  # a list, or a map's entries
                return any(broken(v) for v in value)
            if isinstance(value, dict):  # a struct
                return any(broken(v) for v in value.values())
            try:
                isinstance(value, bytes) and value.decode("utf-8")
            except UnicodeDecodeError:
                return True
            return False

        return pa.array([broken(v) for v in _text_bytes(values).to_pylist()], pa.bool_())


def _too_many_items(values: pa.Array) -> pa.Array:
    return pc.greater(pc.list_value_length(values), MAX_LIST_ITEMS)


def _oversized(values: pa.Array) -> pa.Array:
    """Where a text column's value (or one of its list's) is over `MAX_TEXT_BYTES`."""
    values = _text_bytes(values)  # lengths of any text type, valid UTF-8 or not
    if not pa.types.is_large_list(values.type):
        return pc.greater(pc.binary_length(values), MAX_TEXT_BYTES)
    texts = pc.list_flatten(values)
    rows = pc.list_parent_indices(values).filter(pc.greater(pc.binary_length(texts), MAX_TEXT_BYTES))
    return pc.is_in(pa.array(np.arange(len(values))), value_set=rows)


def _plain(t: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(t):
        return _plain(t.value_type)
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return STRING
    if any(is_list(t) for is_list in _LISTS):
        return pa.list_(_plain(t.value_type))
    return t


def _type_matches(actual: pa.DataType, expected: pa.DataType) -> bool:
    if expected == STRING:
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if expected == INT:  # floats too, whose values validation checks are whole (`whole_numbers`)
        return pa.types.is_integer(actual) or pa.types.is_floating(actual)
    if expected == FLOAT:
        return pa.types.is_floating(actual) or pa.types.is_integer(actual)
    if expected == STRINGS:
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _type_matches(
            actual.value_type, STRING
        )
    return actual == expected


# Columns anima adds to each row on its way to the actors: the attempt number, and the decode stage's
# packed input arrays (`actors.read_stage.decode_rows`) or why they could not be read. A manifest may not
# bring them: its rows would choose their own inputs (frames no limit checked) and so their metrics.
ATTEMPT_COLUMN = "_attempt"
DECODED_COLUMN = "_decoded"
DECODE_ERROR_COLUMN = "_decode_error"
DECODE_RETRYABLE_COLUMN = "_decode_retryable"
RESERVED_COLUMNS = frozenset({ATTEMPT_COLUMN, DECODED_COLUMN, DECODE_ERROR_COLUMN, DECODE_RETRYABLE_COLUMN})

# A row id names the row's artifact folder, OUTPUT/artifacts/<id>/, so it must be one plain path component.
# fsspec reads "::" anywhere in a URL as a chain of filesystems and opens only the part before it, so an
# id holding it would write into another row's folder, or onto OUTPUT/artifacts itself. Object stores'
# filesystems cut a key at "?" (s3fs: `?versionId=`) or "#" (a generation): ids `a?versionId=1` and
# `a?versionId=2` would both write the object OUTPUT/artifacts/a.
ID_MAX_BYTES = 200
# Inputs of one row's list column (style images): each is read whole, and a kilobyte can list a million.
MAX_LIST_ITEMS = 64
# One text of a manifest (a prompt, a URI, an item of a list): Parquet compresses a repeated text so well
# that a 70 KB manifest held eight prompts of 256 MB, which went to the driver's blocks and the actors.
MAX_TEXT_BYTES = 2**20
_UNSAFE_ID_CHARACTERS = r"[/\\?#\x00-\x1f\x7f-\x9f]|::"
# Every offending id is named, up to this many (a manifest of a million bad ids would not fit a message).
_UNSAFE_IDS_SHOWN = 1000


def unsafe_id_reason(row_id: str) -> str | None:
    """Why `row_id` cannot name a folder under OUTPUT (None when it can): the rule validation applies."""
    if row_id in ("", ".", ".."):
        return "empty" if not row_id else f"is {row_id!r}"
    if re.search(_UNSAFE_ID_CHARACTERS, row_id):
        return "contains '/', '\\', '?', '#', '::', NUL or a control character"
    if len(row_id.encode("utf-8")) > ID_MAX_BYTES:
        return f"longer than {ID_MAX_BYTES} bytes"
    return None


def _unsafe_ids(ids: pa.ChunkedArray) -> tuple[int, list[str]]:
    """How many ids cannot name a folder, and each with its reason; found column-wise (a million in ms)."""
    special = pc.is_in(ids, pa.array(["", ".", ".."]))
    characters = pc.match_substring_regex(ids, _UNSAFE_ID_CHARACTERS)
    bad = pc.or_(pc.or_(special, characters), pc.greater(pc.binary_length(ids), ID_MAX_BYTES))
    offenders = ids.filter(pc.fill_null(bad, False)).to_pylist()
    shown = [f"{i!r} ({unsafe_id_reason(i)})" for i in offenders[:_UNSAFE_IDS_SHOWN]]
    if len(offenders) > _UNSAFE_IDS_SHOWN:
        shown.append(f"and {len(offenders) - _UNSAFE_IDS_SHOWN} more")
    return len(offenders), shown


def _describe_ids(
    ids: list, limit: int = 10, count: int | None = None, show: Callable[[Any], str] = repr
) -> str:
    """The first `limit` of `ids`, and how many more there are of `count` (default: `len(ids)`)."""
    shown = ", ".join(show(i) for i in ids[:limit])
    more = (count if count is not None else len(ids)) - limit
    return f"{shown} and {more} more" if more > 0 else shown


def _rows_where(
    ids: pa.Array, mask: pa.Array, first: int = 0, limit: int | None = None, values: pa.Array | None = None
) -> list[str]:
    """The ids of the rows where `mask` holds, in row order (the first `limit`); `<row n>` for a row
    without an id (`first`: the manifest row number of the first of `ids`); with `values`, each shown
    with its row's value."""
    where = pc.indices_nonzero(mask).slice(0, limit)
    found = pc.take(ids, where).to_pylist()
    named = [
        i if i is not None else f"<row {first + n}>" for n, i in zip(where.to_pylist(), found, strict=True)
    ]
    if values is None:
        return named
    return [f"{i!r} ({v})" for i, v in zip(named, pc.take(values, where).to_pylist(), strict=True)]


@dataclass
class _Offenders:
    """The rows whose `column` breaks one rule (`test`: where a batch's values do, None where none do):
    how many, and the first ten, named (a million offenders must not become a million strings), shown
    with their values when `with_values`."""

    column: str
    label: str
    test: Callable[[pa.Array], pa.Array | None]
    show: Callable[[Any], str] = repr
    with_values: bool = False
    count: int = 0
    shown: list[str] = field(default_factory=list)

    def add(self, batch: pa.RecordBatch, ids: pa.Array, first: int) -> None:
        values = batch.column(self.column)
        mask = self.test(values)
        if mask is None:
            return
        mask = pc.fill_null(mask, False)
        shown = values if self.with_values else None
        self.shown += _rows_where(ids, mask, first, limit=10 - len(self.shown), values=shown)
        self.count += pc.sum(mask).as_py() or 0

    def problem(self) -> list[str]:
        if not self.count:
            return []
        rows = _describe_ids(self.shown, count=self.count, show=self.show)
        return [f"{self.label} in {self.count} row(s): {rows}"]


def validate(table: pa.Table, kind: str) -> list[str]:
    """Every problem that stops `table` from running as a `kind` manifest; an empty list means runnable."""
    problems, _ = validate_scan(
        table.schema, table.num_rows, lambda names: table.select(names).to_batches(), kind
    )
    return problems


def validate_scan(
    schema: pa.Schema, rows: int, scan: Callable[[list[str]], Iterable[pa.RecordBatch]], kind: str
) -> tuple[list[str], pa.ChunkedArray | None]:
    """`validate` of a manifest of `schema` and `rows` rows read through `scan(columns)`, and its ids
    (None without a usable id column).

    Only the id, required and text columns are read, a batch at a time, and only ids are kept: a
    manifest's other columns (prompts, lists of URIs) are not held to check a million rows.
    """
    if kind not in MANIFEST_KINDS:
        raise KeyError(f"unknown manifest kind {kind!r}; known: {', '.join(MANIFEST_KINDS)}")
    spec = MANIFEST_KINDS[kind]
    problems: list[str] = []
    names = schema.names

    for name, expected in spec.required.items():
        if name not in names:
            problems.append(f"missing required column {name!r} ({expected})")
    for name, expected in spec.columns.items():
        if name in names and not _type_matches(schema.field(name).type, expected):
            problems.append(f"column {name!r} has type {schema.field(name).type}, expected {expected}")
    duplicated = [c for c, n in Counter(names).items() if n > 1]
    if duplicated:
        problems.append(f"duplicate column name(s): {', '.join(duplicated)}")
    reserved = sorted(set(names) & RESERVED_COLUMNS)
    if reserved:
        problems.append(
            f"column(s) {', '.join(map(repr, reserved))} are reserved for what anima adds to each row (the "
            "attempt number, the decoded inputs); rename or drop them"
        )

    ids = None
    if "id" in names and not duplicated:  # column-wise: only offending rows reach Python
        required = [n for n in spec.required if n != "id" and n in names]
        floated = _floated_integers(schema, kind)
        texts = [f.name for f in schema if _holds_text(f.type)]
        lists = [n for n, t in spec.columns.items() if t == STRINGS and n in names and n in texts]
        null_ids = _Offenders("id", "column 'id' is null", pc.is_null)
        # The rules each column's rows must keep, in the order their problems are told.
        offenders = [
            *(_Offenders(n, f"required column {n!r} is null", pc.is_null) for n in required),
            *(
                _Offenders(
                    n,
                    f"column {n!r} holds whole numbers (written as {schema.field(n).type}) but is not one",
                    _not_whole,
                    show=str,
                    with_values=True,
                )
                for n in floated
            ),
            *(
                _Offenders(n, f"column {n!r} lists more than {MAX_LIST_ITEMS} inputs", _too_many_items)
                for n in lists
            ),
            *(
                _Offenders(n, f"column {n!r} holds a text over {MAX_TEXT_BYTES // 2**20} MiB", _oversized)
                for n in texts
                if n != "id" and _plain(schema.field(n).type) in (STRING, STRINGS)
            ),
            *(_Offenders(n, f"column {n!r} holds text that is not valid UTF-8", _not_utf8) for n in texts),
        ]
        chunks: list[pa.Array] = []
        first = 0  # the manifest row number of the batch's first row
        for batch in scan(list(dict.fromkeys(["id", *required, *floated, *texts]))):
            batch_ids = batch.column("id")
            bad_ids = _not_utf8(batch_ids) if "id" in texts else None
            if bad_ids is not None:  # named by row number, as rows without an id
                batch_ids = pc.if_else(bad_ids, pa.scalar(None, batch_ids.type), batch_ids)
            for found in (null_ids, *offenders):
                found.add(batch, batch_ids, first)
            chunks.append(batch_ids)
            first += batch.num_rows
        ids = pa.chunked_array(chunks, type=schema.field("id").type)
        problems += null_ids.problem()
        counts = pc.value_counts(ids).flatten()
        repeated = pc.and_(pc.greater(counts[1], 1), pc.is_valid(counts[0]))
        repeats = sorted(counts[0].filter(repeated).to_pylist())
        if repeats:
            problems.append(f"duplicate id(s): {_describe_ids(repeats)}")
        textual = _type_matches(schema.field("id").type, STRING)
        count, unsafe = _unsafe_ids(ids) if textual else (0, [])
        if count:
            problems.append(
                f"{count} id(s) cannot name an artifact folder (an id is 1-{ID_MAX_BYTES} bytes, not '.' or "
                f"'..', without '/', '\\', '?', '#', '::', NUL or control characters): {', '.join(unsafe)}"
            )
        for found in offenders:
            problems += found.problem()
    if rows == 0:
        problems.append("manifest has no rows")
    return problems, ids


def check(table: pa.Table, kind: str, uri: str = "<table>") -> pa.Table:
    """`validate`, raising ManifestError with all problems; returns the table, its integer columns
    written as floats read as integers (`whole_numbers`)."""
    problems = validate(table, kind)
    if problems:
        raise ManifestError(uri, problems)
    return table.cast(whole_numbers(table.schema, kind))
