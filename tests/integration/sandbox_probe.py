"""
The agent of the C{credproxy run --sandbox} tests: run once inside the
sandbox, it uses the official SDK and the credential socket as an agent
would, tries every way out the tests name, and prints one JSON object of
what happened, for the tests to judge one property each.

    sandbox_probe.py PLAN_JSON

PLAN_JSON names what to try: C{host_port} (a TCP listener on the host's
127.0.0.1), C{outside} (an address off the loopback), C{abstract} (the name
of an abstract Unix socket listening on the host), C{unix} (Unix sockets
listening on the host), C{read} (paths to
read), C{list} (directories to list), C{write} (paths to create), C{cover}
(a hidden path to try to unmount).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import sys
from typing import Any


def _error(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def connect_tcp(host: str, port: int) -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((host, port))
        return "connected"
    except OSError as e:
        return _error(e) if e.errno else type(e).__name__
    finally:
        s.close()


def connect_unix(address: str) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(address)
        return "connected"
    except OSError as e:
        return _error(e)
    finally:
        s.close()


def read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "read:" + f.read(4096)
    except OSError as e:
        return _error(e)


def listing(path: str) -> list[str] | str:
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        return _error(e)


def write(path: str) -> str:
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write("from the sandbox")
        return "written"
    except OSError as e:
        return _error(e)


def processes() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    found[name] = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
    return found


def capabilities() -> str:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return line.split()[1]
    return "?"


def unmount(path: str) -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(path.encode(), 2) == 0:  # MNT_DETACH
        return "unmounted"
    return errno.errorcode.get(ctypes.get_errno(), "?")


def sdk_calls(out: dict[str, Any]) -> None:
    import anthropic
    import httpx2 as httpx

    request = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    # The SDK as an agent configures it: base URL and key from the environment.
    with anthropic.Anthropic(max_retries=0) as sdk:
        message = sdk.messages.create(**request)  # type: ignore[call-overload]
        out["relay_text"] = message.content[0].text
    # The same through the bind-mounted HTTP socket, with the placeholder.
    transport = httpx.HTTPTransport(uds=os.environ["CREDPROXY_HTTP_SOCKET"])
    with anthropic.Anthropic(
        base_url="http://localhost",
        max_retries=0,
        http_client=httpx.Client(transport=transport),
    ) as sdk:
        message = sdk.messages.create(**request)  # type: ignore[call-overload]
        out["socket_text"] = message.content[0].text
    # Without this run's placeholder, neither way in forwards anything.
    wrong = "not-this-runs-placeholder"
    socket_client = httpx.Client(
        transport=httpx.HTTPTransport(uds=os.environ["CREDPROXY_HTTP_SOCKET"])
    )
    for route, sdk in (
        ("relay", anthropic.Anthropic(api_key=wrong, max_retries=0)),
        (
            "socket",
            anthropic.Anthropic(
                api_key=wrong,
                base_url="http://localhost",
                max_retries=0,
                http_client=socket_client,
            ),
        ),
    ):
        with sdk:
            try:
                sdk.messages.create(**request)  # type: ignore[call-overload]
                out[f"{route}_without_placeholder"] = 200
            except anthropic.APIStatusError as e:
                out[f"{route}_without_placeholder"] = e.status_code


def credential_socket(out: dict[str, Any]) -> None:
    from credproxy.inner import socket_path_from_environment, take_capability_token
    from credproxy.wire import BlockingProxySocketClient

    token = take_capability_token()
    assert token is not None
    path = socket_path_from_environment()
    assert path is not None
    with BlockingProxySocketClient(path, capability_token=token, request_timeout=10) as client:
        out["get_token"] = client.request("get_token", {"provider": "anthropic"})


def main(argv: list[str]) -> int:
    plan = json.loads(argv[0])
    out: dict[str, Any] = {"environ": dict(os.environ), "stdin": sys.stdin.read()}
    sdk_calls(out)
    credential_socket(out)
    out["host_loopback"] = connect_tcp("127.0.0.1", plan["host_port"])
    out["outside"] = connect_tcp(plan["outside"], 80)
    out["abstract"] = connect_unix("\0" + plan["abstract"])
    out["unix"] = {path: connect_unix(path) for path in plan["unix"]}
    out["processes"] = processes()
    out["own_pid"] = os.getpid()
    out["read"] = {path: read(path) for path in plan["read"]}
    out["list"] = {path: listing(path) for path in plan["list"]}
    out["write"] = {path: write(path) for path in plan["write"]}
    out["capabilities"] = capabilities()
    out["unmount"] = unmount(plan["cover"])
    out["hostname"] = socket.gethostname()
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stderr.write("probe-stderr\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
