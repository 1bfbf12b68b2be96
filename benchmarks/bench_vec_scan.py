"""The vector scan alone: sqlite-vec (cosine, L2, int8) against numpy on the same vectors.

    PYTHONPATH=. python benchmarks/bench_vec_scan.py [--vectors 10000] [--queries 100]

Random unit vectors of 384 floats in one `vec0` partition; each query asks for the 50
nearest (k = 50, the hybrid search's depth); medians in ms, two rounds. It shows how much
of the index's vector ranking is sqlite-vec's scan itself (its PyPI build has no SIMD
flags: `vec_debug()`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from orchestrator.retrieval.index import load_sqlite_vec, sqlite_module

SCALE = 127 / 0.4  # unit vectors' components stay well inside +-0.4


def _int8(v: np.ndarray) -> bytes:
    return np.clip(np.round(v * SCALE), -127, 127).astype(np.int8).tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((args.vectors, 384)).astype("<f4")
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    queries = rng.standard_normal((args.queries, 384)).astype("<f4")
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    con = sqlite_module().connect(":memory:")
    con.enable_load_extension(True)
    load_sqlite_vec(con)
    print(con.execute("SELECT vec_debug()").fetchone()[0].replace("\n", "; "))
    kinds = {"cosine": "float[384] distance_metric=cosine", "l2": "float[384]", "int8": "int8[384]"}
    for name, column in kinds.items():
        con.execute(
            f"CREATE VIRTUAL TABLE v_{name} USING vec0(id INTEGER PRIMARY KEY, "
            f"p TEXT PARTITION KEY, embedding {column})"
        )
        wrap = "vec_int8(?)" if name == "int8" else "?"
        encode = _int8 if name == "int8" else (lambda v: v.tobytes())
        con.executemany(
            f"INSERT INTO v_{name}(id, p, embedding) VALUES (?, 'vs', {wrap})",
            [(i + 1, encode(v)) for i, v in enumerate(matrix)],
        )

    def median_ms(run: Callable[[np.ndarray], object]) -> float:
        times = []
        for q in queries:
            started = time.perf_counter()
            run(q)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    for _ in range(2):
        for name in kinds:
            wrap = "vec_int8(?)" if name == "int8" else "?"
            encode = _int8 if name == "int8" else (lambda v: v.tobytes())
            sql = (
                f"SELECT id, distance FROM v_{name} WHERE embedding MATCH {wrap} "
                "AND k = 50 AND p = 'vs'"
            )
            scan_ms = median_ms(lambda q, s=sql, e=encode: con.execute(s, (e(q),)).fetchall())
            print(f"sqlite-vec {name:<7} {scan_ms:6.2f} ms")
        numpy_ms = median_ms(lambda q: np.argpartition(-(matrix @ q), 50)[:50])
        print(f"numpy             {numpy_ms:6.2f} ms")


if __name__ == "__main__":
    main()
