"""Data contracts: manifest kinds, validation, and the result table."""

from schemas.manifests import MANIFEST_KINDS, ManifestError, ManifestKind, check, validate
from schemas.results import ERROR, METRIC_COLUMNS, OK, RESULT_SCHEMA, ResultRow, result_table

__all__ = [
    "ERROR",
    "MANIFEST_KINDS",
    "METRIC_COLUMNS",
    "OK",
    "RESULT_SCHEMA",
    "ManifestError",
    "ManifestKind",
    "ResultRow",
    "check",
    "result_table",
    "validate",
]
