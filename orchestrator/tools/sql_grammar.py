"""The shape of a SQLite database, read once when `sql_query` starts, and what is made
of it: the compact description the model reads, and the regular expression its `sql`
argument is decoded under.

The regular expression is a SELECT subset that only names what exists: one table per
query, that table's columns, aggregates (SUM and AVG of numeric columns, COUNT, MIN,
MAX), WHERE with comparisons on some of the columns (in the table's order, each once,
joined by AND; a number may take a range, a text column OR-ed alternatives), GROUP BY,
ORDER BY and LIMIT. A low-cardinality TEXT column (at most `MAX_VALUES` distinct
values) is compared only with one of its own values, so a filter cannot name a region
or a quarter the data does not hold; other TEXT columns take a plain quoted string,
numeric ones a number. Every string it accepts is one runnable statement
(tests/orchestrator/test_sql_grammar.py checks that by sampling it). It uses only
syntax that Python's `re` and llguidance's regex share, with single spaces and
upper-case keywords, so the model has no free whitespace to fill; for the demo database
it is about 4,400 characters and compiles in a few milliseconds.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field

MAX_VALUES = 24  # a TEXT column with at most this many distinct values is categorical
MAX_VALUE_CHARS = 64  # longer values make the column free text
MAX_TABLES = 16
MAX_COLUMNS = 32
MAX_FILTER_COLUMNS = 12  # the WHERE grammar grows with the square of this
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Words that cannot stand as a bare column or table name in SQLite: such names are quoted.
_KEYWORD_TEXT = """abort action add after all alter always analyze and as asc attach autoincrement
    before begin between by cascade case cast check collate column commit conflict
    constraint create cross current current_date current_time current_timestamp database
    default deferrable deferred delete desc detach distinct do drop each else end escape
    except exclude exclusive exists explain fail filter first following for foreign from
    full generated glob group groups having if ignore immediate in index indexed initially
    inner insert instead intersect into is isnull join key last left like limit match
    materialized natural no not nothing notnull null nulls of offset on or order others
    outer over partition plan pragma preceding primary query raise range recursive
    references regexp reindex release rename replace restrict returning right rollback row
    rows savepoint select set table temp temporary then ties to transaction trigger
    unbounded union unique update using vacuum values view virtual when where window with
    without"""
_KEYWORDS = frozenset(_KEYWORD_TEXT.split())
_META = re.compile(r"([\\.+*?()|\[\]{}^$])")
NUMBER = r"-?[0-9]{1,12}(\.[0-9]{1,6})?"
# A literal for a column whose values are not listed (SQLite refuses a NUL in a query).
FREE_TEXT = r"'[^'\\\"\n\x00]{0,40}'"
COMPARISON = "(=|!=|<|>|<=|>=)"
MONEY_WORDS = ("usd", "eur", "dollar", "euro", "price", "revenue", "amount", "cost", "money")
YEAR_FIRST = re.compile(r"\d{4}\b")  # dates, months, quarters: sorted, the last is latest


@dataclass
class Column:
    name: str
    type: str
    note: str = ""  # the comment after the column in its CREATE TABLE
    values: list[str] | None = None  # sorted distinct values of a categorical TEXT column

    @property
    def numeric(self) -> bool:
        """SQLite's type affinity: INTEGER, REAL or NUMERIC."""
        kind = self.type.upper()
        return any(word in kind for word in ("INT", "REAL", "FLOA", "DOUB", "NUM", "DEC"))


@dataclass
class Table:
    name: str
    columns: list[Column] = field(default_factory=list)


def identifier(name: str) -> str:
    """`name` as SQL writes it: bare when it can be, else double-quoted."""
    if _IDENTIFIER.fullmatch(name) and name.lower() not in _KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    """`value` as a SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def escape(text: str) -> str:
    """`text` as a regular expression matching only itself, escaping just the characters
    that are special in both Python's and llguidance's (Rust) syntax."""
    return _META.sub(r"\\\1", text)


def _column_notes(create_sql: str) -> dict[str, str]:
    """Column name -> the `-- comment` on its line of a CREATE TABLE statement: the
    operator's own words for what a column holds (a unit, a currency, a format)."""
    notes = {}
    for line in create_sql.splitlines():
        match = re.match(r'\s*"?([A-Za-z_][A-Za-z0-9_ ]*?)"?\s+\w.*?--\s*(.+?)\s*$', line)
        if match:
            notes[match.group(1)] = match.group(2)
    return notes


def _distinct_values(db: sqlite3.Connection, table: str, column: str) -> list[str] | None:
    """The sorted distinct values of a TEXT column with few short ones, else None."""
    rows = db.execute(
        f"SELECT DISTINCT {identifier(column)} FROM {identifier(table)} "
        f"WHERE {identifier(column)} IS NOT NULL LIMIT {MAX_VALUES + 1}"
    ).fetchall()
    values = [r[0] for r in rows]
    if not values or len(values) > MAX_VALUES:
        return None
    if not all(isinstance(v, str) and 0 < len(v) <= MAX_VALUE_CHARS for v in values):
        return None
    if any(c in v for v in values for c in "\n\\\x00"):
        return None
    return sorted(values)


def read_shape(db: sqlite3.Connection) -> list[Table]:
    """The tables of `db` (without SQLite's own), their columns, notes and categorical
    values. Tables and columns past MAX_TABLES / MAX_COLUMNS are left out."""
    tables = []
    listed = db.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' "
        "AND name NOT LIKE 'sqlite_%' ORDER BY name"
    ).fetchall()
    for name, create_sql in listed[:MAX_TABLES]:
        notes = _column_notes(create_sql or "")
        table = Table(name)
        info = db.execute("SELECT name, type FROM pragma_table_info(?)", (name,)).fetchall()
        for column, kind in info[:MAX_COLUMNS]:
            col = Column(column, kind or "", notes.get(column, ""))
            if not col.numeric:
                col.values = _distinct_values(db, name, column)
            table.columns.append(col)
        if table.columns:
            tables.append(table)
    return tables


def _listed_values(values: list[str], column: str) -> str:
    """A categorical column's values as the description lists them: dates and periods
    latest first, the first named for what a question calls it (`'2026-Q3' (the last
    quarter)` for a column `quarter`), so that "last quarter" reads as the first value
    (the default model picks early entries of a list, and matches words more readily than
    it reasons about order); other values sorted."""
    if not all(YEAR_FIRST.match(v) for v in values):
        return ", ".join(map(literal, values))
    latest, *earlier = [literal(v) for v in reversed(values)]
    return ", ".join([f"{latest} (the last {column.replace('_', ' ')})", *earlier])


def _value_lines(tables: list[Table]) -> list[str]:
    """One line per distinct value set, naming every column that holds it (a key and
    the column referring to it share theirs): a list repeated would cost tokens and
    weigh its first values more."""
    holders: dict[tuple[str, ...], list[tuple[str, str]]] = {}  # values -> (table, column)
    for table in tables:
        for col in table.columns:
            if col.values is not None:
                holders.setdefault(tuple(col.values), []).append((table.name, col.name))
    lines = []
    for values, names in holders.items():
        listed = _listed_values(list(values), names[0][1])
        lines.append(f"{', '.join(f'{t}.{c}' for t, c in names)} values: {listed}.")
    return lines


def describe(tables: list[Table]) -> str:
    """The schema as the model reads it: each table with its columns (type, note), the
    values of the categorical columns, and an example query."""
    parts = []
    for table in tables:
        columns = []
        for col in table.columns:
            text = f"{col.name} {col.type}".strip()
            columns.append(f"{text} -- {col.note}" if col.note else text)
        parts.append(f"{table.name}({', '.join(columns)})")
    lines = ["Tables: " + "; ".join(parts) + ".", *_value_lines(tables)]
    example = example_query(tables)
    if example:
        lines.append(f"Example: {example}")
    return "\n".join(lines)


def _measure_rank(col: Column) -> tuple[bool, bool]:
    """A column holding money sorts first, then a REAL one (amounts more than counts)."""
    words = f"{col.name} {col.note}".lower()
    money = any(w in words for w in MONEY_WORDS)
    return (not money, "REAL" not in col.type.upper())


def example_query(tables: list[Table]) -> str | None:
    """A query of the form most questions take, with a neutral placeholder `'...'` for
    the values: the sum of the table's amount filtered by its first two categorical
    columns. (A small model copies the form: given real values, it copies those instead
    of the question's, and given `'<region>'` it writes the first region listed.)
    The table is the one with the most categorical columns; None if none has any."""
    table = max(tables, key=lambda t: sum(c.values is not None for c in t.columns))
    categorical = [c for c in table.columns if c.values is not None][:2]
    if not categorical:
        return None
    numeric = sorted((c for c in table.columns if c.numeric), key=_measure_rank)
    measure = f"SUM({identifier(numeric[0].name)})" if numeric else "COUNT(*)"
    filters = " AND ".join(f"{identifier(c.name)} = '...'" for c in categorical)
    return f"SELECT {measure} FROM {identifier(table.name)} WHERE {filters}"


def _alternatives(options: list[str]) -> str:
    return "(" + "|".join(options) + ")"


def _comparison(col: Column) -> str:
    name = escape(identifier(col.name))
    if col.numeric:
        value = NUMBER
    elif col.values is not None:
        value = _alternatives([escape(literal(v)) for v in col.values])
    else:
        value = FREE_TEXT
    return f"{name} {COMPARISON} {value}"


def _filter(col: Column) -> str:
    """One column's part of a WHERE: a comparison; for a number, also a range (two
    comparisons joined by AND); for text, also alternatives joined by OR in parentheses."""
    one = _comparison(col)
    if col.numeric:
        return f"{one}( AND {one})?"
    return f"({one}|\\({one}( OR {one}){{1,3}}\\))"


def _where(columns: list[Column]) -> str:
    """Filters on some of `columns`, in the table's column order, each column at most
    once, joined by AND: `region = 'A' AND region = 'B'` (which no row matches) cannot be
    written. A filter list picks its first column, then any of those after it."""
    filters = [_filter(c) for c in columns[:MAX_FILTER_COLUMNS]]
    starts = [
        filters[i] + "".join(f"( AND {f})?" for f in filters[i + 1 :]) for i in range(len(filters))
    ]
    return " WHERE " + _alternatives(starts)


def _select(table: Table) -> str:
    """The regex of one SELECT over `table`."""
    names = [escape(identifier(c.name)) for c in table.columns]
    numeric = [escape(identifier(c.name)) for c in table.columns if c.numeric]
    column = _alternatives(names)
    aggregates = [f"(MIN|MAX|COUNT)\\({column}\\)", r"COUNT\(\*\)"]
    if numeric:
        aggregates.insert(0, f"(SUM|AVG)\\({_alternatives(numeric)}\\)")
    item = _alternatives([column, *aggregates])
    return (
        f"SELECT {item}(, {item}){{0,3}} FROM {escape(identifier(table.name))}"
        f"({_where(table.columns)})?"
        # An aggregate in ORDER BY needs a grouped query (SQLite: "misuse of aggregate").
        f"( GROUP BY {column}(, {column}){{0,2}}( ORDER BY {item}( ASC| DESC)?)?"
        f"| ORDER BY {column}( ASC| DESC)?)?"
        r"( LIMIT [1-9][0-9]{0,3})?"
    )


def select_pattern(tables: list[Table]) -> str:
    """The anchored regex every query must match: a SELECT over one of `tables`."""
    return "^" + _alternatives([_select(t) for t in tables]) + "$"
