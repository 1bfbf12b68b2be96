"""The composition root's process-wide settings (engine/serve.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import gc, weakref
    from engine.serve import settle_heap

    class Node:
        pass

    kept = [Node() for _ in range(50_000)]  # long-lived, like the model and its modules
    cycle = Node()
    cycle.self = cycle  # garbage that only the collector can free
    dead = weakref.ref(cycle)
    del cycle
    settle_heap()
    print(dead() is None, gc.get_freeze_count() >= len(kept), len(gc.get_objects(2)) < 1000)
    """
)


def test_settle_heap_frees_garbage_then_keeps_survivors_out_of_full_collections():
    """In a fresh interpreter, since freezing is process-wide: the cycle is collected
    (not frozen forever), and the survivors leave the generation a full collection walks."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["True", "True", "True"], done.stdout + done.stderr


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """One line and status 1 at once, not uvicorn's status 3 after a model load."""
    import socket

    from engine import serve

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded although the port is taken")

    monkeypatch.setattr(serve, "AsyncLLM", load)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code = serve.main(["--port", str(port), "--data-dir", str(tmp_path), "--no-embeddings"])
    assert code == 1
    assert f"error: cannot listen on 127.0.0.1 port {port}: Address already in use" in (
        capsys.readouterr().err
    )


def test_a_sqlite_database_another_server_holds_is_refused_by_any_option(
    tmp_path, monkeypatch, capsys
):
    """A server on the data directory holds its database too: a second one naming that
    file by --database-url would otherwise end the first one's running turns as its own
    start-up recovery, and write their usage twice."""
    from engine import serve
    from orchestrator.store import hold_data_dir, hold_database, sqlite_url

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded although the database is held")

    monkeypatch.setattr(serve, "AsyncLLM", load)
    first = tmp_path / "first"
    url = sqlite_url(first)
    held = [hold_data_dir(first), hold_database(url)]  # what a server on --data-dir holds
    argv = ["--port", "0", "--data-dir", str(tmp_path / "second"), "--no-embeddings"]
    code = serve.main([*argv, "--database-url", url])
    for lock in held:
        lock.close()
    assert code == 1
    err = capsys.readouterr().err
    assert f"error: the database {first / 'tokenmill.db'} is in use by another tokenmill" in err
    assert "another --database-url" in err


def test_connections_to_the_bound_address_send_small_writes_at_once():
    """The socket bound before the model loads is a TCP one to asyncio, which then turns
    Nagle's algorithm off (TCP_NODELAY) on each connection: otherwise each small SSE write
    could wait for the client's delayed ACK."""
    import asyncio
    import socket

    from engine.serve import bind_address

    async def nodelay_of_accepted() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.Transport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        sock = bind_address("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            try:
                return await asyncio.wait_for(accepted, 10)
            finally:
                writer.close()

    assert asyncio.run(nodelay_of_accepted()) != 0


def test_a_kv_budget_without_room_for_one_block_is_one_line(tmp_path, capsys):
    from engine import serve

    argv = ["--kv-cache-memory-gib", "1e-9", "--compile", "off", "--no-embeddings"]
    assert serve.main([*argv, "--port", "0", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error: no room for a KV cache" in err and "Traceback" not in err
