"""Run the three services of the platform locally, with interleaved, prefixed logs, until Ctrl-C.

Each service reads its configuration from the environment (see docs/configuration.md). Ctrl-C or SIGTERM
stops every service with SIGTERM and waits for each to finish.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
SERVICES = ("iot-api", "iot-realtime", "iot-ingest")
COLOURS = ("\033[36m", "\033[35m", "\033[33m")


def main() -> int:
    env = {**os.environ}
    env.setdefault("IOT_LOG_FORMAT", "console")
    procs = {
        name: subprocess.Popen([str(BIN / name)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for name in SERVICES
    }
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    api = env.get("IOT_API_PORT", "8000")
    ws = env.get("IOT_REALTIME_PORT", "8001")
    print(f"API        http://127.0.0.1:{api}/schema (OpenAPI docs)", flush=True)
    print(f"WebSocket  ws://127.0.0.1:{ws}/ws", flush=True)
    selector = selectors.DefaultSelector()
    width = max(map(len, SERVICES))
    for (name, proc), colour in zip(procs.items(), COLOURS, strict=True):
        assert proc.stdout is not None
        selector.register(proc.stdout, selectors.EVENT_READ, (name, colour))
    open_streams = len(procs)
    while open_streams:
        for key, _ in selector.select(timeout=1.0):
            name, colour = key.data
            line = key.fileobj.readline()  # type: ignore[union-attr]
            if not line:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            sys.stdout.write(f"{colour}{name:<{width}}\033[0m | {line.decode(errors='replace')}")
            sys.stdout.flush()
        if not stopping and any(p.poll() is not None for p in procs.values()):
            stop()
    codes = {name: proc.wait() for name, proc in procs.items()}
    failed = {n: c for n, c in codes.items() if c != 0}
    if failed:
        print(f"stopped with errors: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
