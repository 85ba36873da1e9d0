"""Faults of a real Postgres on demand: a TCP proxy in front of it that fails
one statement, and a disk that is full for some purchases.

It makes the faults no test against the server alone can: a statement's
request, or its reply, is lost on the way, and the connection is cut at
once or held open with nothing more passing (a network that drops packets
without closing, or a server that hangs, until the client's command
timeout gives up). A reply lost means the database executed, and may have
committed, what the writer never hears of; a request lost, that it never
saw it. The proxy reads the wire protocol just far enough to recognise the
statement: asyncpg prepares a statement once per connection (Parse,
carrying its text) and then only binds it by name.
"""

from __future__ import annotations

import asyncio
import enum
import struct
import urllib.parse

SERVER_REPLY_WAIT_S = 10.0  # a connection losing a reply is cut once the server has answered, or after this


class Fault(enum.Enum):
    REPLY_LOST = "the server executes the statement; its reply is lost and the connection cut"
    REQUEST_LOST = "the statement never reaches the server; the connection is cut"
    REPLY_HELD = "the server executes the statement; nothing more comes back, the connection stays open"
    REQUEST_HELD = "the statement never reaches the server; nothing more passes, the connection stays open"


class FaultyPostgresProxy:
    """Forwards every connection to `upstream`; `fail(marker, fault)` arms it
    to fail the next execution of a statement whose text contains `marker`,
    on whichever connection runs it. A held connection ends when its client
    closes it, and the proxy then closes its side to the server."""

    def __init__(self, url: str):
        """`url`: the Postgres to forward to; `self.url` (after start) reaches it through the proxy."""
        parts = urllib.parse.urlsplit(url)
        self.upstream = (parts.hostname, parts.port or 5432)
        self._url = parts
        self.url: str | None = None
        self._armed: tuple[bytes, Fault] | None = None
        self.fired = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._pumps: set[asyncio.Task] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        credentials = self._url.netloc.rpartition("@")[0]
        # Without TLS, which the proxy could not read.
        self.url = urllib.parse.urlunsplit(self._url._replace(
            netloc=f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}",
            query="sslmode=disable"))
        return self.url

    def fail(self, marker: str, fault: Fault) -> None:
        self._armed = marker.encode(), fault
        self.fired.clear()

    async def close(self) -> None:
        self._server.close()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _connection(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        failing: list[Fault] = []  # the fault this connection has met, once it has
        pumps = [asyncio.create_task(self._client_to_server(client_reader, server_writer, failing)),
                 asyncio.create_task(self._server_to_client(server_reader, client_writer, failing))]
        self._pumps.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps.difference_update(pumps)
            for writer in (client_writer, server_writer):
                writer.close()

    def _meets_armed(self, kind: bytes, body: bytes, statements: dict[bytes, bytes]) -> bool:
        if self._armed is None:
            return False
        text = None
        if kind == b"B":
            text = statements.get(body.split(b"\0", 2)[1], b"")
        elif kind == b"Q":
            text = body
        return text is not None and self._armed[0] in text

    async def _client_to_server(self, reader, writer, failing: list[Fault]) -> None:
        statements: dict[bytes, bytes] = {}  # prepared statement name -> its text
        # The startup message has no type byte; every later one does.
        length = struct.unpack("!i", await reader.readexactly(4))[0]
        writer.write(struct.pack("!i", length) + await reader.readexactly(length - 4))
        while True:
            kind = await reader.readexactly(1)
            length = struct.unpack("!i", await reader.readexactly(4))[0]
            body = await reader.readexactly(length - 4)
            if kind == b"P":
                name, text = body.split(b"\0", 2)[:2]
                statements[name] = text
            elif not failing and self._meets_armed(kind, body, statements):
                failing.append(self._armed[1])
                self._armed = None
                self.fired.set()
            if failing == [Fault.REQUEST_LOST]:
                return
            if failing == [Fault.REQUEST_HELD]:
                while await reader.read(65_536):  # until the client gives up and closes
                    pass
                return
            writer.write(kind + struct.pack("!i", length) + body)
            await writer.drain()

    async def _server_to_client(self, reader, writer, failing: list[Fault]) -> None:
        while True:
            reply_wait_s = SERVER_REPLY_WAIT_S if failing == [Fault.REPLY_LOST] else None
            try:
                kind = await asyncio.wait_for(reader.readexactly(1), reply_wait_s)
            except asyncio.TimeoutError:
                return
            length = struct.unpack("!i", await reader.readexactly(4))[0]
            body = await reader.readexactly(length - 4)
            if failing == [Fault.REPLY_HELD]:
                continue
            if failing == [Fault.REPLY_LOST]:
                if kind == b"Z":  # ReadyForQuery: the server is done with the statement, and its transaction
                    return
                continue
            writer.write(kind + struct.pack("!i", length) + body)
            await writer.drain()


def disk_full(on_insert: str | None = None, at_commit: str | None = None,
              table: str = "transactions", key: str = "transaction_id") -> tuple[str, str]:
    """SQL that makes Postgres refuse the rows of `table` whose `key` starts
    with a prefix given, as it refuses a write when a data file cannot grow
    (SQLSTATE 53100, disk_full): at the row's insert, or at the commit of its
    transaction; and the SQL that puts things back."""
    install = [
        """CREATE FUNCTION test_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF to_jsonb(NEW) ->> TG_ARGV[1] LIKE TG_ARGV[0] || '%' THEN
                RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full';
            END IF;
            RETURN NEW;
        END $$"""]
    if on_insert is not None:
        install.append(f"CREATE TRIGGER test_disk_full_on_insert BEFORE INSERT ON {table}"
                       f" FOR EACH ROW EXECUTE FUNCTION test_disk_full('{on_insert}', '{key}')")
    if at_commit is not None:
        install.append(f"CREATE CONSTRAINT TRIGGER test_disk_full_at_commit AFTER INSERT ON {table}"
                       f" DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_disk_full('{at_commit}', '{key}')")
    return "; ".join(install), "DROP FUNCTION test_disk_full() CASCADE"
