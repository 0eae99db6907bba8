"""One store for the dashboard and the command line: the CLI hands its work to the dashboard.

DuckDB lets one process at a time open a database file for writing, and a running dashboard
holds its store. Rather than have every reader and writer open and close the file around
each query (a page makes dozens; each open costs ~15 ms and any long write would still lock
the others out), the process that holds the store serves it: the dashboard starts a small
HTTP server on the loopback interface and writes `<store>.server.json` (port, pid and a
random token, readable by its user only). A CLI call that finds the store locked reads that
file and sends its argument list to the dashboard, which runs the very same subcommand in its
own process, against its own open store, and sends back the JSON payload. So:

- nothing is lost or written twice when the CLI and the dashboard (or two CLIs) write at once:
  every write goes through the one process's store, whose writes are serialised there and
  each done in one transaction;
- the dashboard shows what the CLI computed at its next rerun, without a restart: it is the
  same store connection;
- a forwarded job runs in a thread of the dashboard; it takes the model's lock like any page
  computation, while stored views (reads) stay interactive in every session.

The token keeps other local users from driving the dashboard's process; the server binds
127.0.0.1 only.

Scripts side by side, no dashboard: the first CLI process that opens the store serves it the
same way (backend/cli.py), so a second, third … command started meanwhile runs in the first
one's process instead of failing with store_locked. When its own command is done, the first
process keeps serving while any forwarded call is still running, and closes the store once it
is idle (`stop_when_idle`); a command that arrives in that moment is told to retry (HTTP 503)
and opens the store itself. A waiting command prints one line on stderr and gives up with
store_locked after DASHBOARD_STORE_WAIT seconds (default 120).
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from .errors import DashboardError, StoreLocked

_server: ThreadingHTTPServer | None = None
_guard = threading.Lock()
_active = 0               # forwarded calls running now
_closing = False          # stop_when_idle ran: new calls are told to retry elsewhere
_idle = threading.Condition(_guard)


class Retry(StoreLocked):
    """The holder is closing (or went away) between finding it and calling it: try again."""


def server_file(store_path: Path) -> Path:
    return Path(str(store_path) + ".server.json")


class _Handler(BaseHTTPRequestHandler):
    token = ""
    run: Callable[[list[str]], tuple[int, dict]]     # the CLI's execute, given to start()

    def log_message(self, *args):  # quiet: the dashboard's log is for the dashboard
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self._reply(200, {"ok": True, "pid": os.getpid()})
        self._reply(404, {"error": {"type": "NotFound", "code": "not_found", "message": self.path}})

    def do_POST(self):
        try:
            n = int(self.headers.get("Content-Length", "0"))
            req = json.loads(self.rfile.read(n) or b"{}")
        except (ValueError, json.JSONDecodeError):
            return self._reply(400, {"error": {"type": "BadRequest", "code": "bad_request", "message": "not JSON"}})
        if not secrets.compare_digest(str(req.get("token", "")), self.token):
            return self._reply(403, {"error": {"type": "Forbidden", "code": "forbidden", "message": "bad token"}})
        argv = req.get("argv")
        if self.path != "/run" or not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            return self._reply(400, {"error": {"type": "BadRequest", "code": "bad_request",
                                               "message": "POST /run with {token, argv: [str]}"}})
        global _active
        with _guard:
            if _closing:
                return self._reply(503, {"error": {"type": "Retry", "code": "retry",
                                                   "message": "the store's holder is closing; open it yourself"}})
            _active += 1
        try:
            code, payload = type(self).run(argv)
        finally:
            with _guard:
                _active -= 1
                _idle.notify_all()
        self._reply(200, {"code": code, "payload": payload})


def start(store_path: Path, run: Callable[[list[str]], tuple[int, dict]]) -> Path:
    """Serve the store this process holds (once per process) to CLI calls, answering each with
    `run(argv) -> (exit code, payload)` (backend.cli.execute: passed in, so this module does not
    import the CLI that imports it); returns the server file."""
    global _server, _closing
    store_path = Path(store_path).resolve()
    info_path = server_file(store_path)
    with _guard:
        if _server is None:
            _closing = False
            token = secrets.token_hex(16)
            handler = type("Handler", (_Handler,), {"token": token, "run": staticmethod(run)})
            _server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            _server.daemon_threads = True
            threading.Thread(target=_server.serve_forever, name="store-server", daemon=True).start()
            info = {"port": _server.server_address[1], "pid": os.getpid(), "token": token,
                    "store": str(store_path)}
            tmp = info_path.with_name(info_path.name + f".{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            os.replace(tmp, info_path)
            _served.add(info_path)
            atexit.register(_remove, info_path, os.getpid())
    return info_path


def stop_when_idle(timeout: float | None = None) -> bool:
    """Stop serving once no forwarded call runs (new calls keep being accepted until then), and
    remove the server file; True when stopped (False: `timeout` seconds passed first)."""
    global _server, _closing
    with _guard:
        if _server is None:
            return True
        if not _idle.wait_for(lambda: _active == 0, timeout=timeout):
            return False
        _closing = True
        srv, _server = _server, None
    srv.shutdown()
    srv.server_close()
    for info_path in list(_served):
        _remove(info_path, os.getpid())
    return True


_served: set[Path] = set()


def _remove(info_path: Path, pid: int) -> None:
    try:
        if json.loads(info_path.read_text()).get("pid") == pid:
            info_path.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def holder(store_path: Path) -> dict | None:
    """The server info of the live process serving this store, or None."""
    path = server_file(Path(store_path).resolve())
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and _alive(int(info.get("pid", -1))) else None


def forward(argv: list[str], store_path: Path, timeout: float | None = None) -> tuple[int, dict]:
    """Run a CLI call in the process that holds the store; (exit code, payload)."""
    info = holder(store_path)
    if info is None:
        raise StoreLocked(f"The store {store_path} is in use by another process that does not serve it "
                          "(another command?). Wait for it, or set DASHBOARD_STORE to another file.")
    body = json.dumps({"token": info["token"], "argv": argv}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{info['port']}/run", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        if e.code == 503:
            raise Retry(f"The store {store_path}'s holder (pid {info['pid']}) is closing.") from None
        raise StoreLocked(f"The store {store_path} is held by pid {info['pid']}, which refused the call ({e}).") from None
    except (urllib.error.URLError, ConnectionError) as e:
        # gone between reading its file and calling it (or killed while running the call): retry
        raise Retry(f"The store {store_path}'s holder (pid {info['pid']}) did not answer ({e}).") from None
    except (OSError, ValueError) as e:
        raise StoreLocked(f"The store {store_path} is held by the dashboard (pid {info['pid']}), which did not "
                          f"answer ({e}).") from None
    return int(out["code"]), out["payload"]


__all__ = ["start", "stop_when_idle", "forward", "holder", "server_file", "Retry", "DashboardError"]
