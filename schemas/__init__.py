"""Data contracts: manifest kinds, validation, and the result table."""

from schemas.manifests import (
    ID_MAX_BYTES,
    MANIFEST_KINDS,
    ManifestError,
    ManifestKind,
    check,
    unsafe_id_reason,
    validate,
)
from schemas.results import ERROR, METRIC_COLUMNS, OK, RESULT_SCHEMA, ResultRow, result_table

__all__ = [
    "ERROR",
    "ID_MAX_BYTES",
    "MANIFEST_KINDS",
    "METRIC_COLUMNS",
    "OK",
    "RESULT_SCHEMA",
    "ManifestError",
    "ManifestKind",
    "ResultRow",
    "check",
    "result_table",
    "unsafe_id_reason",
    "validate",
]
