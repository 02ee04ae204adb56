"""
A clean environment for the store factories: none of the variables they
read set, a private state directory, and the factories' singletons
forgotten before and after, so no test sees another's stores or token.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from credproxy.inner import (
    CAPABILITY_TOKEN_FD_ENV,
    CAPABILITY_TOKEN_FILE_ENV,
    STORE_ENV,
    reset_store_factories,
)

SOCKET_VARIABLES = ("LLXPRT_CREDENTIAL_SOCKET", "CREDPROXY_SOCKET")
VARIABLES = (*SOCKET_VARIABLES, CAPABILITY_TOKEN_FD_ENV, CAPABILITY_TOKEN_FILE_ENV, STORE_ENV)


def isolate(state_home: str, add_cleanup: Callable[[Callable[[], object]], None]) -> None:
    """
    Clear the factories' variables, point C{XDG_STATE_HOME} at
    C{state_home}, and restore both (and forget the singletons) at cleanup.
    """
    saved = {name: os.environ.get(name) for name in (*VARIABLES, "XDG_STATE_HOME")}

    def restore() -> None:
        reset_store_factories()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    add_cleanup(restore)
    for name in VARIABLES:
        os.environ.pop(name, None)
    os.environ["XDG_STATE_HOME"] = os.path.abspath(state_home)
    reset_store_factories()
