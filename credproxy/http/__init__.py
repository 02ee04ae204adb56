"""
The HTTP face: an Anthropic Messages API endpoint for sandboxed agents that
injects the real credential and streams answers back.
"""

from credproxy.http._admission import FORWARDED_PATHS
from credproxy.http._config import HTTPProxyConfig
from credproxy.http._errors import ErrorKind
from credproxy.http._face import HTTPFace, HTTPFaceConfigError, build_proxy_site
from credproxy.http._site import ProxySite

__all__ = [
    "FORWARDED_PATHS",
    "ErrorKind",
    "HTTPFace",
    "HTTPFaceConfigError",
    "HTTPProxyConfig",
    "ProxySite",
    "build_proxy_site",
]
