"""
A real Secret Service for the keyring tests: a private D-Bus session bus and
gnome-keyring-daemon (secrets component, unlocked with a throwaway password),
with a throwaway HOME and XDG directories, started once per test session and
torn down after it. Only tests that ask for it see its bus (through
C{DBUS_SESSION_BUS_ADDRESS} set for that test alone), so the developer's own
keyring is never touched.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from credproxy.stores._keyring import SERVICE

START_TIMEOUT = 15.0  # a loaded 2-core machine can take a while to start gnome-keyring
DAEMON_ATTEMPTS = 3
PASSWORD = b"credproxy-test-password"


@dataclass(frozen=True)
class SecretServiceBus:
    """
    Where the test Secret Service listens, and the environment of its session
    (for subprocesses such as secret-tool).
    """

    address: str
    environ: dict[str, str]

    def clear(self) -> None:
        """
        Delete every item of service C{credproxy}, so each test starts empty.
        """
        import secretstorage
        from jeepney.io.blocking import open_dbus_connection  # type: ignore[import-untyped]

        with contextlib.closing(open_dbus_connection(self.address)) as connection:
            collection = secretstorage.get_default_collection(connection)
            for item in collection.search_items({"service": SERVICE}):
                item.delete()


def _missing_tools() -> list[str]:
    tools = ("dbus-daemon", "gnome-keyring-daemon", "secret-tool")
    return [t for t in tools if shutil.which(t) is None]


def _read_address(process: subprocess.Popen[bytes]) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    if not ready:
        raise RuntimeError("dbus-daemon did not print its address")
    return process.stdout.readline().decode().strip()


def _wait_for_collection(address: str) -> None:
    """
    Wait until the daemon has made its unlocked login collection the default.
    Only look: asking for the default collection before it exists would make
    secretstorage ask the daemon to create one, which needs a prompt that
    nobody answers, and that dismissed prompt can leave the daemon without
    a default collection for good.
    """
    import secretstorage
    from jeepney.io.blocking import open_dbus_connection

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with contextlib.closing(open_dbus_connection(address)) as connection:
                collection = secretstorage.collection.get_collection_by_alias(connection, "default")
                if not collection.is_locked():
                    return
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise RuntimeError("the test keyring's login collection stayed locked")
        time.sleep(0.05)


def _stop_daemons_of(base: str) -> None:
    """
    A daemonized gnome-keyring is nobody's child: find the ones started
    with this session's directories and end them (they would leave with the
    session bus anyway, a little later).
    """
    marker = f"XDG_RUNTIME_DIR={base}/run".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/comm", "rb") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith(b"gnome-keyring") and marker in environ:
            with contextlib.suppress(OSError):
                os.kill(int(entry), signal.SIGTERM)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture(scope="session")
def secret_service_session() -> Iterator[SecretServiceBus]:
    missing = _missing_tools()
    if missing:
        if os.getuid() != 0:
            pytest.skip(
                f"no Secret Service to test against: {', '.join(missing)} not installed"
                " (apt-get install gnome-keyring dbus libsecret-tools; ./scripts/test does"
                " this itself when run as root)"
            )
        pytest.fail(f"{', '.join(missing)} missing although root: run ./scripts/test")
    base = tempfile.mkdtemp(prefix="cp-secrets-", dir="/tmp")
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    for name, sub in [
        ("HOME", "home"),
        ("XDG_DATA_HOME", "data"),
        ("XDG_CONFIG_HOME", "config"),
        ("XDG_CACHE_HOME", "cache"),
        ("XDG_RUNTIME_DIR", "run"),
    ]:
        os.makedirs(os.path.join(base, sub), mode=0o700)
        environ[name] = os.path.join(base, sub)
    log = open(os.path.join(base, "daemons.log"), "wb")  # noqa: SIM115
    processes: list[subprocess.Popen[bytes]] = []
    try:
        bus = subprocess.Popen(
            [
                "dbus-daemon",
                "--session",
                "--nofork",
                "--print-address=1",
                f"--address=unix:path={base}/run/bus",
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            env=environ,
        )
        processes.append(bus)
        address = _read_address(bus)
        environ["DBUS_SESSION_BUS_ADDRESS"] = address
        # gnome-keyring now and then comes up with its login collection locked
        # (a first look that races its start can leave it so): start it again
        # with fresh keyring files, a bounded number of times.
        for attempt in range(1, DAEMON_ATTEMPTS + 1):
            data = os.path.join(base, f"data{attempt}")
            os.makedirs(data, mode=0o700)
            environ["XDG_DATA_HOME"] = data
            # --daemonize returns once the daemon has read the password and
            # set up its collections; the daemon leaves with the session bus.
            daemon = subprocess.Popen(
                [
                    "gnome-keyring-daemon",
                    "--daemonize",
                    "--unlock",
                    "--components=secrets",
                ],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
                env=environ,
            )
            processes.append(daemon)
            assert daemon.stdin is not None
            daemon.stdin.write(PASSWORD)
            daemon.stdin.close()
            daemon.wait(START_TIMEOUT)
            try:
                _wait_for_collection(address)
                break
            except Exception:
                if attempt == DAEMON_ATTEMPTS:
                    raise
                _stop_daemons_of(base)
                processes.remove(daemon)
        yield SecretServiceBus(address, environ)
    finally:
        _stop_daemons_of(base)
        for process in reversed(processes):
            _stop(process)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def secret_service(
    secret_service_session: SecretServiceBus, monkeypatch: pytest.MonkeyPatch
) -> SecretServiceBus:
    """
    The session's Secret Service, emptied of credproxy's items, as this
    test's session bus (the keyring library's SecretService backend reads
    the address from the environment on every call).
    """
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", secret_service_session.address)
    secret_service_session.clear()
    return secret_service_session
