"""protocol/ is sans-IO: importing it pulls in no I/O library."""

import ast
import pathlib
import subprocess
import sys

FORBIDDEN = {"asyncio", "anyio", "trio", "socket", "ray", "asyncpg", "nats", "redis", "websockets", "httpx",
             "starlette", "uvloop", "subprocess", "threading"}
PROTOCOL_DIR = pathlib.Path(__file__).resolve().parents[2] / "protocol"


def test_protocol_sources_import_no_io_library():
    for path in PROTOCOL_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_importing_protocol_loads_no_io_library():
    code = ("import sys, dailydoco.protocol; "
            f"print(sorted(m for m in {sorted(FORBIDDEN - {'socket', 'threading', 'subprocess'})!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
