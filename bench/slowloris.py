"""How long a slow client holds a connection: uvicorn's defaults against prefixserve's guarded protocol.

    python bench/slowloris.py [--quick] [--cap SECONDS]

Starts the real app (tiny model, auth off) twice on free loopback ports: once under a plain
`uvicorn.Config` (what `prefixserve serve` ran before issue 15), once under `uvicorn_config` (the
guarded protocol, default deadlines). Against each, three slow clients run at once, each on its own
raw socket, and we time how long the server keeps the connection open (capped at --cap seconds):

- idle: connects and sends nothing;
- slow headers (slowloris): a request line, then one header byte per second, never finishing;
- slow body (R.U.D.Y.): complete headers of a POST with Content-Length 1000, then one body byte per second.

A normal request is sent on another connection while they are held and must be served. Prints a
table; writes bench/results/slowloris[-quick].json; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefix_store.redis_server import free_port
from prefixserve.app import create_app
from prefixserve.serve import DrainingServer, uvicorn_config
from prefixserve.settings import ServerSettings
from prefixserve.tiny import write_tiny_model

RESULTS = Path(__file__).resolve().parent / "results"


def held_for(port: int, opening: bytes, drip: bytes, cap_s: float) -> float:
    """Seconds until the server closes a connection that sent `opening`, then one `drip` byte a second."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(1.0)
    start = time.monotonic()
    sock.sendall(opening)
    try:
        while time.monotonic() - start < cap_s:
            try:
                if not sock.recv(4096):  # EOF: the server closed it (after a 408, or silently)
                    return time.monotonic() - start
            except TimeoutError:
                if drip:
                    try:
                        sock.sendall(drip)
                    except OSError:  # reset: closed by the server
                        return time.monotonic() - start
            except OSError:
                return time.monotonic() - start
        return float("inf")
    finally:
        sock.close()


SCENARIOS: dict[str, tuple[bytes, bytes]] = {
    "idle": (b"", b""),
    "slow headers": (b"GET /health HTTP/1.1\r\nHost: x\r\n", b"X"),
    "slow body": (
        b"POST /prefixes HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 1000\r\n\r\n{",
        b" ",
    ),
}


def run_server(make: Callable[[int], uvicorn.Server], port: int) -> uvicorn.Server:
    server = make(port)
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not start")


def measure(label: str, make: Callable[[int], uvicorn.Server], cap_s: float) -> dict[str, float | bool]:
    port = free_port()
    server = run_server(make, port)
    out: dict[str, float | bool] = {}
    threads = [
        threading.Thread(target=lambda n=n, o=o, d=d: out.__setitem__(n, held_for(port, o, d, cap_s)))
        for n, (o, d) in SCENARIOS.items()
    ]
    for t in threads:
        t.start()
    time.sleep(2)
    out["others served meanwhile"] = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).is_success
    for t in threads:
        t.join()
    server.should_exit = True
    print(f"  {label}: done", file=sys.stderr)
    return out


def cell(value: float | bool, cap: float) -> str:
    if isinstance(value, bool):
        return str(value)
    return f"> {cap:g} (open)" if value == float("inf") else f"{value:.1f}"


def finite(value: float | bool) -> float | bool | None:
    return None if value == float("inf") else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cap at 20 s instead of 75 s")
    parser.add_argument("--cap", type=float, default=None, help="longest hold measured, seconds")
    args = parser.parse_args()
    cap = args.cap or (20.0 if args.quick else 75.0)
    tmp = Path(tempfile.mkdtemp(prefix="slowloris-"))
    model_dir = write_tiny_model(tmp / "tiny")
    settings = ServerSettings(model=str(model_dir), data_dir=str(tmp), auth="false")

    def plain(port: int) -> uvicorn.Server:
        app = create_app(settings)
        return uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    def guarded(port: int) -> uvicorn.Server:
        app = create_app(settings)
        config = uvicorn_config(app, settings, host="127.0.0.1", port=port, log_level="warning")
        return DrainingServer(config, app)

    results = {"uvicorn defaults": measure("uvicorn defaults", plain, cap)}
    results["prefixserve"] = measure("prefixserve", guarded, cap)
    limits = settings.connection_limits()
    print(
        f"\nconnection held (s), capped at {cap:g} s; prefixserve deadlines: headers"
        f" {limits.header_timeout_s:g} s, body {limits.body_timeout_s:g} s windows at"
        f" >= {limits.body_min_bytes_per_s} B/s"
    )
    print(f"| client | {' | '.join(results)} |\n|---|---|---|")
    for scenario in [*SCENARIOS, "others served meanwhile"]:
        print(f"| {scenario} | {' | '.join(cell(r[scenario], cap) for r in results.values())} |")
    held = {k: {s: finite(v) for s, v in r.items()} for k, r in results.items()}
    summary = {
        "cap_s": cap,
        "limits": {"header_timeout_s": limits.header_timeout_s, "body_timeout_s": limits.body_timeout_s},
        "held_s": held,  # null: still open at the cap
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"slowloris{'-quick' if args.quick else ''}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
