"""
Choosing the host's stores: memory, file, keyring (a Secret Service that
answers, and nothing else: not keyrings.alt's plaintext file, not fail or
null, not a chainer without a Secret Service), auto (keyring when usable,
else file, saying why), the refusal of --store keyring with advice, and the
default state directory.

Backends the keyring library picks by itself (its chainer, or
PYTHON_KEYRING_BACKEND) are examined in subprocesses: the library caches its
choice for the life of a process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
from keyring.backends import fail as fail_backend
from keyring.backends import null as null_backend
from keyring.backends.SecretService import Keyring as SecretServiceKeyring
from keyrings.alt.file import PlaintextKeyring  # type: ignore[import-untyped]

from credproxy.stores import (
    STORE_KINDS,
    FileProviderKeyStore,
    FileTokenStore,
    HostStores,
    KeyringProviderKeyStore,
    KeyringTokenStore,
    MemoryProviderKeyStore,
    MemoryTokenStore,
    StoreUnavailable,
    default_state_dir,
    open_host_stores,
    usable_keyring,
)
from credproxy.testing import InlineBlockingCalls
from tests.stores.conftest import SecretServiceBus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def state_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="cp-select-")
    yield os.path.join(path, "credproxy")
    subprocess.run(["rm", "-rf", path], check=True)


@pytest.fixture
def plaintext(monkeypatch: pytest.MonkeyPatch, state_dir: str) -> Any:
    """
    keyrings.alt's plaintext backend, keeping its file in a throwaway place.
    """
    monkeypatch.setenv("XDG_DATA_HOME", os.path.dirname(state_dir))
    return PlaintextKeyring()


def test_kinds() -> None:
    assert STORE_KINDS == ("auto", "keyring", "file", "memory")


def test_memory(state_dir: str) -> None:
    stores = open_host_stores("memory", state_dir, InlineBlockingCalls())
    assert isinstance(stores, HostStores)
    assert isinstance(stores.tokens, MemoryTokenStore)
    assert isinstance(stores.keys, MemoryProviderKeyStore)
    assert stores.description == "memory (forgotten at exit)"
    assert not os.path.exists(state_dir)


def test_file(state_dir: str) -> None:
    stores = open_host_stores(
        "file", state_dir, InlineBlockingCalls(), backend=fail_backend.Keyring()
    )
    assert isinstance(stores.tokens, FileTokenStore)
    assert isinstance(stores.keys, FileProviderKeyStore)
    tokens, keys = os.path.join(state_dir, "tokens.json"), os.path.join(state_dir, "keys.json")
    assert stores.description == f"file ({tokens}, {keys})"
    assert stores.tokens.description == f"file ({tokens})"


def test_unknown_kind(state_dir: str) -> None:
    with pytest.raises(ValueError, match="auto, keyring, file, memory"):
        open_host_stores("redis", state_dir, InlineBlockingCalls())


def test_frozen(state_dir: str) -> None:
    stores = open_host_stores("memory", state_dir, InlineBlockingCalls())
    with pytest.raises(AttributeError):
        stores.description = "other"  # type: ignore[misc]


# -- a real Secret Service ------------------------------------------------------------


def test_secret_service_is_usable(secret_service: SecretServiceBus) -> None:
    assert usable_keyring(SecretServiceKeyring()) is True


@pytest.mark.parametrize("kind", ["keyring", "auto"])
def test_keyring_chosen(secret_service: SecretServiceBus, state_dir: str, kind: str) -> None:
    backend = SecretServiceKeyring()
    stores = open_host_stores(kind, state_dir, InlineBlockingCalls(), backend=backend)
    assert isinstance(stores.tokens, KeyringTokenStore)
    assert isinstance(stores.keys, KeyringProviderKeyStore)
    assert stores.tokens.backend is backend and stores.keys.backend is backend
    assert stores.description == 'keyring (SecretService, service "credproxy")'
    # Both watch the state directory's change marker, as the file stores do.
    for store in (stores.tokens, stores.keys):
        assert store.marker is not None
        assert store.marker.path == os.path.join(state_dir, "changed")


def test_secret_service_that_is_not_running(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/credproxy-bus")
    assert usable_keyring(SecretServiceKeyring()) is False


def test_secret_service_that_never_answers(monkeypatch: pytest.MonkeyPatch, state_dir: str) -> None:
    os.makedirs(state_dir)
    path = os.path.join(state_dir, "bus")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.bind(path)
        silent.listen(8)  # connections are queued and never answered
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", f"unix:path={path}")
        started = time.monotonic()
        assert usable_keyring(SecretServiceKeyring(), timeout=0.5) is False
        with pytest.raises(StoreUnavailable, match=r"did not answer within 0\.5 s"):
            open_host_stores(
                "keyring",
                state_dir,
                InlineBlockingCalls(),
                backend=SecretServiceKeyring(),
                probe_timeout=0.5,
            )
        assert time.monotonic() - started < 5.0
    finally:
        silent.close()  # the probes' connections are reset, and their threads end


# -- backends that never count ------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [PlaintextKeyring, fail_backend.Keyring, null_backend.Keyring],
    ids=["keyrings.alt-plaintext", "fail", "null"],
)
def test_not_a_secret_service(make: Any, plaintext: Any) -> None:
    backend = plaintext if make is PlaintextKeyring else make()
    assert usable_keyring(backend) is False


def test_plaintext_works_but_is_refused(plaintext: Any, state_dir: str) -> None:
    plaintext.set_password("credproxy-test", "probe", "value")  # a working backend ...
    assert plaintext.get_password("credproxy-test", "probe") == "value"
    assert usable_keyring(plaintext) is False  # ... that keeps secrets in a plain file
    with pytest.raises(StoreUnavailable) as raised:
        open_host_stores("keyring", state_dir, InlineBlockingCalls(), backend=plaintext)
    message = str(raised.value)
    assert "keyrings.alt.file.PlaintextKeyring, not a Secret Service" in message
    assert "gnome-keyring" in message
    assert "--store file" in message


def test_auto_falls_back_to_file(plaintext: Any, state_dir: str) -> None:
    stores = open_host_stores("auto", state_dir, InlineBlockingCalls(), backend=plaintext)
    assert isinstance(stores.tokens, FileTokenStore)
    assert stores.description.startswith(f"file ({os.path.join(state_dir, 'tokens.json')}")
    assert "no usable Secret Service" in stores.description
    assert "PlaintextKeyring" in stores.description


def test_keyring_refused_when_the_service_is_down(
    monkeypatch: pytest.MonkeyPatch, state_dir: str
) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/credproxy-bus")
    with pytest.raises(StoreUnavailable) as raised:
        open_host_stores(
            "keyring", state_dir, InlineBlockingCalls(), backend=SecretServiceKeyring()
        )
    message = str(raised.value)
    assert message.startswith("--store keyring: no usable Secret Service: the Secret Service did")
    assert "apt-get install gnome-keyring" in message and "--store file" in message


# -- the keyring library's own choice, in a fresh process ------------------------------

CHOOSE = textwrap.dedent(
    """
    import json, sys
    import keyring
    from keyring.backends.chainer import ChainerBackend
    from credproxy.stores import open_host_stores, usable_keyring
    from credproxy.testing import InlineBlockingCalls

    def name(backend):
        return f"{type(backend).__module__}.{type(backend).__qualname__}"

    backend = ChainerBackend() if sys.argv[2] == "chainer" else None
    chosen = backend if backend is not None else keyring.get_keyring()
    members = [name(b) for b in getattr(chosen, "backends", [chosen])]
    stores = open_host_stores("auto", sys.argv[1], InlineBlockingCalls(), backend=backend)
    print(json.dumps({
        "members": members,
        "usable": usable_keyring(backend),
        "description": stores.description,
        "store_backend": name(stores.tokens.backend) if hasattr(stores.tokens, "backend") else None,
    }))
    """
)


def choose(state_dir: str, mode: str, **environ: str) -> dict[str, Any]:
    base = os.path.dirname(state_dir)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": base,
        "XDG_CONFIG_HOME": os.path.join(base, "config"),  # no keyringrc of the developer's
        "XDG_DATA_HOME": os.path.join(base, "data"),  # where a plaintext keyring would write
        "DBUS_SESSION_BUS_ADDRESS": "unix:path=/nonexistent/credproxy-bus",
        **environ,
    }
    result = subprocess.run(
        [sys.executable, "-c", CHOOSE, state_dir, mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
        check=True,
    )
    answer: dict[str, Any] = json.loads(result.stdout.decode().strip().splitlines()[-1])
    return answer


@pytest.mark.slow
def test_chainer_without_a_secret_service(state_dir: str) -> None:
    answer = choose(state_dir, "chainer")
    assert "keyrings.alt.file.PlaintextKeyring" in answer["members"]
    assert not any("SecretService" in m for m in answer["members"])
    assert answer["usable"] is False
    assert answer["description"].startswith("file (")


@pytest.mark.slow
def test_chainer_with_a_secret_service_uses_it_alone(
    secret_service: SecretServiceBus, state_dir: str
) -> None:
    answer = choose(state_dir, "chainer", DBUS_SESSION_BUS_ADDRESS=secret_service.address)
    assert "keyring.backends.SecretService.Keyring" in answer["members"]
    assert "keyrings.alt.file.PlaintextKeyring" in answer["members"]
    assert answer["usable"] is True
    assert answer["description"] == 'keyring (SecretService, service "credproxy")'
    # Not the chainer: it would fall through to the plaintext file when the service fails.
    assert answer["store_backend"] == "keyring.backends.SecretService.Keyring"


@pytest.mark.slow
def test_library_choice_of_plaintext_is_refused(state_dir: str) -> None:
    answer = choose(
        state_dir, "default", PYTHON_KEYRING_BACKEND="keyrings.alt.file.PlaintextKeyring"
    )
    assert answer["members"] == ["keyrings.alt.file.PlaintextKeyring"]
    assert answer["usable"] is False
    assert "PlaintextKeyring, not a Secret Service" in answer["description"]


# -- the state directory --------------------------------------------------------------


def test_default_state_dir() -> None:
    assert default_state_dir({"XDG_STATE_HOME": "/x/state", "HOME": "/h"}) == "/x/state/credproxy"
    assert default_state_dir({"HOME": "/h"}) == "/h/.local/state/credproxy"
    assert default_state_dir({"XDG_STATE_HOME": "relative", "HOME": "/h"}) == (
        "/h/.local/state/credproxy"
    )
    assert default_state_dir({"XDG_STATE_HOME": "", "HOME": "/h"}) == "/h/.local/state/credproxy"
    import pwd

    home = pwd.getpwuid(os.getuid()).pw_dir
    assert default_state_dir({}) == os.path.join(home, ".local", "state", "credproxy")
