"""Names credproxy's ServiceMaker for twistd; imports nothing of credproxy's own."""

from twisted.application.service import ServiceMaker

credproxy = ServiceMaker(
    "credproxy",
    "credproxy.tap",
    "A credential broker for AI-agent sandboxes (Anthropic API proxy and credential socket).",
    "credproxy",
)
