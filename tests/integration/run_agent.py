"""
The command of the C{credproxy run} tests, playing an agent in a sandbox.

    run_agent.py report STATUS   check and print what the agent sees, exit STATUS
    run_agent.py exit STATUS     exit STATUS at once
    run_agent.py wait READY [handle]
                                 create the file READY, then wait (30 s at most);
                                 with "handle", INT, TERM, HUP and WINCH print and
                                 exit 100 + N
    run_agent.py crash           die by SIGKILL

The report (one JSON object on stdout) holds what the test must judge
itself: the whole environment, /proc/self/environ, the tokens the agent was
given, and what the SDK and the credential socket answered.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from types import FrameType
from typing import Any

WAIT_LIMIT = 30.0


def report(status: int) -> int:
    import anthropic
    import httpx2 as httpx

    from credproxy.inner import socket_path_from_environment, take_capability_token
    from credproxy.wire import BlockingProxySocketClient, ProxyRequestError

    out: dict[str, Any] = {}
    out["environ"] = dict(os.environ)
    with open("/proc/self/environ", "rb") as f:
        out["proc_environ"] = f.read().decode("utf-8", "replace")
    out["stdin"] = sys.stdin.read()
    sockets = {name: os.environ[name] for name in ("CREDPROXY_SOCKET", "CREDPROXY_HTTP_SOCKET")}
    out["modes"] = {name: stat.S_IMODE(os.stat(path).st_mode) for name, path in sockets.items()} | {
        "dir": stat.S_IMODE(os.stat(os.path.dirname(sockets["CREDPROXY_SOCKET"])).st_mode)
    }

    descriptor = int(os.environ["CREDPROXY_CAPABILITY_TOKEN_FD"])
    token = take_capability_token()
    assert token is not None
    out["capability_token"] = token.reveal()
    out["token_fd_variable_left"] = "CREDPROXY_CAPABILITY_TOKEN_FD" in os.environ
    try:
        os.fstat(descriptor)
        out["token_fd_open_after_reading"] = True
    except OSError:
        out["token_fd_open_after_reading"] = False

    path = socket_path_from_environment()
    assert path is not None
    with BlockingProxySocketClient(path, capability_token=token, request_timeout=10) as client:
        out["get_token"] = client.request("get_token", {"provider": "anthropic"})
        try:
            client.request("save_token", {"provider": "anthropic", "token": {"access_token": "x"}})
            out["save_token"] = "saved"
        except ProxyRequestError as e:
            out["save_token"] = e.code

    # The SDK as an agent configures it: base URL and key from the environment.
    with anthropic.Anthropic(max_retries=0) as sdk:
        message = sdk.messages.create(
            model="claude-sonnet-4-6",
            max_tokens=16,
            messages=[{"role": "user", "content": "Hi"}],
        )
        out["tcp_text"] = message.content[0].text  # type: ignore[union-attr]
    # The credential socket's token opens nothing on the TCP endpoint.
    with anthropic.Anthropic(api_key=token.reveal(), max_retries=0) as sdk:
        try:
            sdk.messages.create(
                model="claude-sonnet-4-6",
                max_tokens=16,
                messages=[{"role": "user", "content": "Hi"}],
            )
            out["tcp_with_capability_token"] = 200
        except anthropic.APIStatusError as e:
            out["tcp_with_capability_token"] = e.status_code
    # The HTTP face's Unix socket takes any placeholder from our uid.
    transport = httpx.HTTPTransport(uds=os.environ["CREDPROXY_HTTP_SOCKET"])
    with anthropic.Anthropic(
        api_key="placeholder",
        base_url="http://localhost",
        http_client=httpx.Client(transport=transport),
        max_retries=0,
    ) as sdk:
        message = sdk.messages.create(
            model="claude-sonnet-4-6",
            max_tokens=16,
            messages=[{"role": "user", "content": "Hi"}],
        )
        out["unix_text"] = message.content[0].text  # type: ignore[union-attr]

    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    sys.stderr.write("agent-stderr\n")
    return status


def wait(ready: str, handle: bool) -> int:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        sys.stdout.write(f"got {signal.Signals(signum).name}\n")
        sys.stdout.flush()
        os._exit(100 + signum)

    if handle:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH):
            signal.signal(signum, on_signal)
    with open(ready, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + WAIT_LIMIT
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return 99


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "report":
        return report(int(argv[1]))
    if mode == "exit":
        return int(argv[1])
    if mode == "wait":
        return wait(argv[1], handle=argv[2:] == ["handle"])
    if mode == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
