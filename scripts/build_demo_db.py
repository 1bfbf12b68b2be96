"""Build the sql_query tool's demo database from its SQL source:

    python scripts/build_demo_db.py

writes orchestrator/tools/data/demo_sales.db from orchestrator/tools/data/demo_sales.sql
(a test checks that the committed database matches what this builds).
"""

from __future__ import annotations

from orchestrator.tools.sql_query import DEMO_DATABASE, DEMO_SQL, build_database

if __name__ == "__main__":
    build_database(DEMO_SQL, DEMO_DATABASE)
    print(f"wrote {DEMO_DATABASE}")
