import json

import numpy as np
import pyarrow as pa
import pytest

from schemas import (
    MANIFEST_KINDS,
    METRIC_COLUMNS,
    RESULT_SCHEMA,
    ManifestError,
    ResultRow,
    check,
    result_table,
    validate,
)


def test_every_problem_of_a_broken_manifest_is_named():
    table = pa.table(
        {
            "id": ["a", "b", "a", None],
            "video": ["v.mp4", None, "w.mp4", "x.mp4"],
            "source_prompt": [1, 2, 3, 4],  # mistyped
            # target_prompt missing
            "my_extra_param": [0.1, 0.2, 0.3, 0.4],  # allowed: passes through
        }
    )
    problems = validate(table, "video")
    text = "\n".join(problems)
    assert "missing required column 'target_prompt'" in text
    assert "column 'source_prompt' has type int64, expected string" in text
    assert "duplicate id(s): 'a'" in text
    assert "column 'id' is null in 1 row(s): '<row 3>'" in text
    assert "required column 'video' is null in 1 row(s): 'b'" in text
    assert "my_extra_param" not in text
    assert len(problems) == 5
    with pytest.raises(ManifestError) as info:
        check(table, "video", "m.parquet")
    assert info.value.problems == problems
    assert "m.parquet has 5 problem(s)" in str(info.value)


@pytest.mark.parametrize("kind", sorted(MANIFEST_KINDS))
def test_a_table_with_every_known_column_validates(kind):
    schema = MANIFEST_KINDS[kind].schema()
    row = {}
    for f in schema:
        row[f.name] = {pa.string(): "x", pa.int64(): 1, pa.float64(): 1.0}.get(f.type, ["a", "b"])
    row["id"] = "only"
    assert validate(pa.Table.from_pylist([row], schema=schema), kind) == []


def test_validation_reads_only_the_id_and_required_columns_a_batch_at_a_time():
    """A manifest of a million rows is checked without holding its other columns (prompts, URI lists):
    only ids are kept, and a row's number counts across batches."""
    from schemas.manifests import validate_scan

    table = pa.table(
        {
            "id": ["a", "b", "c", None, "e"],
            "video": ["v.mp4", "v.mp4", "v.mp4", "v.mp4", None],
            "prompt": ["a long prompt " * 100] * 5,
        }
    )
    asked: list[list[str]] = []

    def scan(columns: list[str]) -> list[pa.RecordBatch]:
        asked.append(columns)
        return table.select(columns).to_batches(max_chunksize=2)

    problems, ids = validate_scan(table.schema, table.num_rows, scan, "eval")
    assert asked == [["id", "video", "prompt"]]  # text columns are read to check their UTF-8, not kept
    assert problems == [
        "column 'id' is null in 1 row(s): '<row 3>'",
        "required column 'video' is null in 1 row(s): 'e'",
    ]
    assert ids.to_pylist() == ["a", "b", "c", None, "e"] and ids.num_chunks == 3
    assert validate_scan(table.schema, 0, lambda columns: [], "eval")[0] == ["manifest has no rows"]


def test_narrow_integer_and_large_string_types_are_accepted_and_float_integers_only_when_whole():
    """pandas writes an integer column with a missing value as float64: whole values pass, any other
    value is named with its row."""
    table = pa.table(
        {
            "id": pa.array(["a", "b", "c", "d", "e"], pa.large_string()),
            "svg": ["s.svg"] * 5,
            "prompt": ["p"] * 5,
            "steps": pa.array([3] * 5, pa.int16()),
            "seed": [1.0, None, -(2.0**63), 2.0**62, 7.0],
        }
    )
    assert check(table, "sketch").column("seed").to_pylist() == [1, None, -(2**63), 2**62, 7]
    halves = pa.array(np.array([1.0, 1.5, 2.0, 0.0, 3.0], np.float16))  # float16 has no floor
    assert validate(table.set_column(4, "seed", halves), "sketch") == [
        "column 'seed' holds whole numbers (written as halffloat) but is not one in 1 row(s): 'b' (1.5)"
    ]
    table = table.set_column(4, "seed", pa.array([1.5, None, float("inf"), 2.0**63, 7.0]))
    assert validate(table, "sketch") == [
        "column 'seed' holds whole numbers (written as double) but is not one in 3 row(s): "
        "'a' (1.5), 'c' (inf), 'd' (9.223372036854776e+18)"
    ]
    many = pa.table({"id": [f"r{i}" for i in range(12)], "video": ["v.mp4"] * 12, "num_frames": [0.5] * 12})
    (problem,) = validate(many, "eval")
    assert problem.endswith(
        "in 12 row(s): 'r0' (0.5), " + ", ".join(f"'r{i}' (0.5)" for i in range(1, 10)) + " and 2 more"
    )
    table = table.set_column(4, "seed", pa.array(["1"] * 5))
    assert validate(table, "sketch") == ["column 'seed' has type string, expected int64"]


def test_empty_manifest_and_unknown_kind():
    empty = MANIFEST_KINDS["eval"].schema().empty_table()
    assert validate(empty, "eval") == ["manifest has no rows"]
    with pytest.raises(KeyError):
        validate(empty, "audio")


def test_result_rows_fill_the_fixed_schema():
    rows = [
        ResultRow(id="a", method="evaluate", metrics={"clip_text": 0.25}, outputs={"mp4": "x.mp4"}),
        ResultRow(id="b", method="evaluate", status="error", error="row 'b': bad"),
    ]
    table = result_table(rows)
    assert table.schema == RESULT_SCHEMA
    assert table.column("clip_text").to_pylist() == [0.25, None]
    assert table.column("outputs").to_pylist()[0] == [("mp4", "x.mp4")]
    assert set(METRIC_COLUMNS) <= set(table.column_names)
    with pytest.raises(KeyError, match="unknown metric"):
        ResultRow(id="c", method="m", metrics={"fid": 1.0}).as_record()


def test_a_seed_no_method_could_take_is_left_out_of_its_column_not_fatal_to_the_batchs_table():
    seeds = ["abc", 7.5, 2**70, True, 7.0, 3, None]
    rows = [ResultRow(id=f"r{n}", method="m", seed=s, params={"seed": s}) for n, s in enumerate(seeds)]
    table = result_table(rows)
    assert table.column("seed").to_pylist() == [None, None, None, None, 7, 3, None]
    assert json.loads(table.column("params")[0].as_py()) == {"seed": "abc"}  # as given


# "a::1" and "::": fsspec would open OUTPUT/artifacts/a (another row's folder) and OUTPUT/artifacts;
# s3fs would write "a?versionId=1" to the key OUTPUT/artifacts/a.
HOSTILE_IDS = [
    "../x", "a/b", "..", "", "x" * 300, "back\\slash", "nul\x00byte", "tab\tid", ".", "a::1", "::",
    "a?versionId=1", "a#1",
]  # fmt: skip


def test_ids_that_cannot_name_a_folder_are_refused_and_every_one_is_named():
    safe = ["ok-1", "café_02", "...", "a.b", "é" * 100]  # 200 bytes in UTF-8: the longest allowed
    table = pa.table({"id": HOSTILE_IDS + safe, "video": ["v.mp4"] * (len(HOSTILE_IDS) + len(safe))})
    problems = validate(table, "eval")
    assert len(problems) == 1, problems
    text = problems[0]
    assert f"{len(HOSTILE_IDS)} id(s) cannot name an artifact folder" in text
    for row_id in HOSTILE_IDS:
        assert repr(row_id) in text
    for row_id in safe:
        assert repr(row_id) not in text
    assert "'..' (is '..')" in text and "'' (empty)" in text and "(longer than 200 bytes)" in text
    assert "'a/b' (contains '/', '\\', '?', '#', '::', NUL or a control character)" in text
    assert validate(pa.table({"id": ["é" * 101], "video": ["v.mp4"]}), "eval")  # 202 bytes


def test_unsafe_id_reason_agrees_with_the_columnwise_check():
    from schemas import unsafe_id_reason

    for row_id in [*HOSTILE_IDS, "\x7f", "\x85"]:
        assert unsafe_id_reason(row_id), row_id
        assert validate(pa.table({"id": [row_id], "video": ["v.mp4"]}), "eval"), row_id
    for row_id in ["ok", "...", "white space", "ü" * 100, "youtube:abc", "a:b:c"]:  # one colon is fine
        assert unsafe_id_reason(row_id) is None
        assert not validate(pa.table({"id": [row_id], "video": ["v.mp4"]}), "eval")


@pytest.mark.parametrize("column", ["_decoded", "_decode_error", "_decode_retryable", "_attempt"])
def test_columns_anima_adds_to_rows_cannot_come_from_a_manifest(column):
    """A `_decoded` cell would be taken for the decode stage's frames: a row pointing at no file would be
    scored on frames of the manifest's choosing, past every media limit."""
    table = pa.table({"id": ["a"], "video": ["missing.mp4"], column: pa.array([None], pa.binary())})
    problems = validate(table, "eval")
    assert problems == [
        f"column(s) {column!r} are reserved for what anima adds to each row (the attempt number, the decoded "
        "inputs); rename or drop them"
    ]
    assert not validate(table.rename_columns(["id", "video", "decoded"]), "eval")  # any other name is fine


def _unchecked_text(values: list) -> pa.Array:
    """Text as a Parquet file may hold it: bytes that no reader checks are UTF-8."""
    if values and isinstance(values[0], list):
        flat = _unchecked_text([v for value in values for v in value])
        offsets = np.cumsum([0, *map(len, values)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), flat)
    raw = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(raw), raw.buffers(), raw.null_count)


def test_text_that_is_not_utf8_is_refused_naming_its_rows(tmp_path):
    """Such a row reached the actors, whose first `to_pylist` failed its whole batch; an id did the same
    to the driver's backfill of lost rows."""
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": _unchecked_text([b"a", b"b\xffd", b"c", b"d"]),
            "video": ["v.mp4"] * 4,
            "prompt": _unchecked_text([b"caf\xe9", b"x", None, b"fine"]),
            "style": _unchecked_text([[b"s.png"], [], [b"t.png", b"\xc3("], [b"u.png"]]),
            "note": _unchecked_text([b"ok", b"ok", b"ok", b"\x80"]),  # an extra column reaches actors too
            "meta": pa.StructArray.from_arrays([_unchecked_text([b"x", b"y", b"\xff", b"z"])], ["k"]),
            # As Polars writes an Array(String) column.
            "tags": pa.FixedSizeListArray.from_arrays(_unchecked_text([b"t", b"\xfe", b"t", b"t"]), 1),
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    expected = [
        "column 'id' holds text that is not valid UTF-8 in 1 row(s): '<row 1>'",
        "column 'prompt' holds text that is not valid UTF-8 in 1 row(s): 'a'",
        "column 'style' holds text that is not valid UTF-8 in 1 row(s): 'c'",
        "column 'note' holds text that is not valid UTF-8 in 1 row(s): 'd'",
        "column 'meta' holds text that is not valid UTF-8 in 1 row(s): 'c'",
        "column 'tags' holds text that is not valid UTF-8 in 1 row(s): '<row 1>'",
    ]
    assert validate(pq.read_table(tmp_path / "m.parquet"), "eval") == expected
    # As other writers type text (large strings, pandas categoricals), found all the same.
    other = pq.read_table(tmp_path / "m.parquet")
    other = other.set_column(2, "prompt", other.column("prompt").cast(pa.large_string()).dictionary_encode())
    assert validate(other, "eval") == [
        "column 'prompt' has type dictionary<values=large_string, indices=int32, ordered=0>, expected string",
        *expected,
    ]
    assert validate(pa.table({"id": ["a"], "video": ["v.mp4"], "style": [["é.png"]]}), "eval") == []


def test_a_list_of_inputs_longer_than_the_limit_is_refused_naming_its_rows():
    """A 1 KB manifest listed a million style images in one row, each read whole (7.6 GB per 1000)."""
    from schemas.manifests import MAX_LIST_ITEMS

    style = [["s.png"] * (MAX_LIST_ITEMS + 1), ["s.png"] * MAX_LIST_ITEMS, None, ["s.png"] * 10**4]
    table = pa.table({"id": list("abcd"), "prompt": ["p"] * 4, "style": style})
    assert validate(table, "style") == [
        "required column 'style' is null in 1 row(s): 'c'",
        f"column 'style' lists more than {MAX_LIST_ITEMS} inputs in 2 row(s): 'a', 'd'",
    ]


def test_a_text_over_the_size_limit_is_refused_naming_its_rows():
    """Parquet compresses a repeated text so well that a 70 KB manifest held eight prompts of 256 MB,
    which went to the driver's blocks and the actors."""
    from schemas.manifests import MAX_TEXT_BYTES

    big = "x" * (MAX_TEXT_BYTES + 1)
    table = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "prompt": ["p", big, "p", "x" * MAX_TEXT_BYTES],
            "style": [["s.png"], ["s.png"], ["s.png", big], ["s.png"]],
        }
    )
    assert validate(table, "style") == [
        "column 'prompt' holds a text over 1 MiB in 1 row(s): 'b'",
        "column 'style' holds a text over 1 MiB in 1 row(s): 'c'",
    ]
    as_written = table.set_column(1, "prompt", table.column("prompt").cast(pa.large_string()))
    assert validate(as_written, "style")[0] == "column 'prompt' holds a text over 1 MiB in 1 row(s): 'b'"
