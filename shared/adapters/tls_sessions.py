"""requests Sessions for the outside systems: the configured CA bundle always wins, and every request has a hard
deadline and a size cap.

- ``PinnedSession``: its own ``verify``/``cert`` beat REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (decision 22 in
  docs/decisions.md); proxies from the environment still apply.
- ``ContextAdapter``: one prepared SSLContext (trust anchors, optionally a client certificate) for every HTTPS
  connection, over connections ``shared.adapters.deadline`` can cut; ``trust_context`` builds the context from a
  CA bundle, or explicitly from the system store.
- ``BoundedSession``: a PinnedSession whose every request (connect, TLS, headers and body, redirects included)
  runs under ``shared.adapters.deadline.deadline``: a server that drips its answer is cut off at the deadline. The
  body is read at once and refused beyond ``max_bytes``.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from shared.adapters.deadline import DeadlineAdapter, deadline

_READ_CHUNK = 64 * 1024


class ResponseTooLarge(requests.RequestException):
    """A response body beyond the session's cap; reading stopped there."""


class PinnedSession(requests.Session):
    """A requests Session whose own ``verify`` and ``cert`` win over REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[no-untyped-def]
        merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
        merged["verify"] = self.verify
        merged["cert"] = self.cert
        return merged


def trust_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """TLS 1.2+ verifying against ``ca_bundle``, or the system store when None (never SSL_CERT_FILE's say alone)."""
    if ca_bundle is not None:
        context = ssl.create_default_context(cafile=str(ca_bundle))
    else:
        paths = ssl.get_default_verify_paths()
        context = ssl.create_default_context(cafile=paths.openssl_cafile if Path(paths.openssl_cafile).is_file() else None,
                                             capath=paths.openssl_capath if Path(paths.openssl_capath).is_dir() else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ContextAdapter(DeadlineAdapter):
    """Uses one prepared SSLContext for every HTTPS connection; its sockets are under the deadline of the call."""

    def __init__(self, context: ssl.SSLContext, pool_maxsize: int = 10) -> None:
        self._context = context
        super().__init__(pool_connections=4, pool_maxsize=pool_maxsize)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(*args, **kwargs)


class BoundedSession(PinnedSession):
    """Every request ends within ``deadline_seconds`` and reads at most ``max_bytes`` of body; see the module doc."""

    def __init__(self, context: ssl.SSLContext, deadline_seconds: float, max_bytes: int, pool_maxsize: int = 10) -> None:
        super().__init__()
        self.deadline_seconds = deadline_seconds
        self.max_bytes = max_bytes
        self.verify = True
        self.cert = None
        adapter = ContextAdapter(context, pool_maxsize)
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["stream"] = True
        kwargs.setdefault("timeout", (self.deadline_seconds, self.deadline_seconds))
        text = url.decode() if isinstance(url, bytes) else url
        what = f"{method!s} {urlsplit(text).hostname}"   # host only: paths name mailboxes and ids
        with deadline(self.deadline_seconds, what):
            response = super().request(method, url, *args, **kwargs)
            try:
                response._content = self._body(response)
            finally:
                response.close()
        return response

    def _body(self, response: requests.Response) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise ResponseTooLarge(f"response of {declared} bytes exceeds the cap of {self.max_bytes}")
        chunks, total = [], 0
        for chunk in response.iter_content(_READ_CHUNK):
            total += len(chunk)
            if total > self.max_bytes:
                raise ResponseTooLarge(f"response exceeds the cap of {self.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
