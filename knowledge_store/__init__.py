"""The DuckDB knowledge base: schema migrations, typed reads/writes, import/export.

Knows nothing about HTTP, torch or CLIP.
"""

from .io import export, import_descriptions, import_jsonl, run_sql, stats
from .migrations import MIGRATIONS, SCHEMA_VERSION
from .store import CallRecord, Description, KnowledgeStore, migrate, normalise_text, schema_version, upgrade

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "CallRecord", "Description", "KnowledgeStore", "export", "import_descriptions", "import_jsonl",
           "migrate", "normalise_text", "run_sql", "schema_version", "stats", "upgrade"]
