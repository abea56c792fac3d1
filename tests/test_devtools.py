"""lab.devtools.GuardServer as the benches use it: a bench stopped with SIGTERM stops its servers too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HEALTHY = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

BENCH = """
import sys, time
from lab.devtools import GuardServer, free_port
port = free_port()
srv = GuardServer([sys.executable, "-c", sys.argv[1], str(port)], port=port).start(timeout=60)
print(srv.proc.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_bench_stopped_with_sigterm_stops_its_servers():
    bench = subprocess.Popen([sys.executable, "-c", BENCH, HEALTHY], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        server_pid = int(bench.stdout.readline())
        assert _alive(server_pid)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server_pid), "the server outlived the bench that started it"
    finally:
        bench.kill()
