"""Fetch a remote media URL for the OpenAI-compatible route, without becoming an SSRF proxy.

The checklist is what vLLM's own media fetcher got wrong (CVE-2025-6242; vllm#57157):
  - off unless SR3D_REMOTE_MEDIA_DOMAINS lists hosts; an empty list means OFF, never "any host";
  - http(s) only, no user:password@ (parser confusion), exact host names from the allowlist;
  - every address the name resolves to must be public (not private, loopback, link-local, shared,
    multicast, reserved or unspecified; IPv4-mapped / 6to4 / Teredo IPv6 unwrapped first), and the
    connection goes to the address that was checked (Host header and TLS SNI keep the name), so a
    second DNS answer cannot rebind it to an internal address;
  - no redirects (a 3xx is refused, not followed), no proxies from the environment;
  - one deadline for DNS + connect + download, a byte cap enforced while streaming, and the
    Content-Type and the first bytes (service/media/sniff.py) must both say an accepted media type;
  - `Accept-Encoding: identity`, any `Content-Encoding` other than identity refused, and the cap
    counted on the wire bytes (raw, never decoded): 1,827 bytes of `gzip, gzip` decompressed to
    1 GiB before a cap counted after decoding saw it (issue 30 item 4).
`allow_private` lifts only the address check; it exists for tests against a loopback server and is
unsafe anywhere else.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
import tempfile
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import httpx

from service.errors import ApiError
from service.media.sniff import HEAD_BYTES, sniff

SPOOL_BYTES = 1 << 20  # media beyond this spills to a temp file

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class FetchPolicy:
    allowed_domains: frozenset[str]
    max_bytes: int
    timeout_s: float
    allow_private: bool = False  # UNSAFE: tests only


def is_public(ip: IPAddress) -> bool:
    """True only for a globally routable unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not is_public(embedded):
            return False
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def check_url(url: str, policy: FetchPolicy) -> tuple[str, str, int]:
    """(scheme, host, port) of an allowed URL, or ApiError. No network."""
    if not policy.allowed_domains:
        raise ApiError("remote_media_disabled", "remote media URLs are disabled on this server; send a data: URL "
                       "or upload the file with POST /v1/files and reference it as sr3d-media://<file id>")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ApiError("invalid_media_reference", "malformed media URL") from None
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise ApiError("invalid_media_reference", "a media URL is data:, sr3d-media:// or http(s)://")
    if parts.username is not None or parts.password is not None:
        raise ApiError("invalid_media_reference", "media URLs must not carry credentials")
    if host not in policy.allowed_domains:
        raise ApiError("remote_domain_not_allowed", f"host {host!r} is not in this server's media allowlist")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


async def resolve_checked(host: str, port: int, policy: FetchPolicy) -> IPAddress:
    """The first address of `host`, after checking that EVERY address it resolves to is allowed
    (a name with one internal address among public ones is refused, whichever would be picked)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ApiError("remote_fetch_failed", f"cannot resolve {host!r}") from None
    addrs = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not addrs:
        raise ApiError("remote_fetch_failed", f"cannot resolve {host!r}")
    if not policy.allow_private:
        for ip in addrs:
            if not is_public(ip):
                raise ApiError("remote_address_forbidden", f"host {host!r} resolves to a non-public address")
    return addrs[0]


async def fetch(url: str, policy: FetchPolicy, families: frozenset[str], content_prefix: str) -> BinaryIO:
    """The body of `url` as a file positioned at 0, if it is one of `families` (service/media/sniff.py)
    and its Content-Type starts with `content_prefix` ("image/" or "video/")."""
    scheme, host, port = check_url(url, policy)
    try:
        async with asyncio.timeout(policy.timeout_s):
            ip = await resolve_checked(host, port, policy)
            return await _download(url, scheme, host, port, ip, policy, families, content_prefix)
    except (TimeoutError, httpx.TimeoutException):
        raise ApiError("remote_fetch_timeout", f"fetching the media URL took over {policy.timeout_s:g}s") from None
    except httpx.HTTPError as e:
        raise ApiError("remote_fetch_failed", f"fetching the media URL failed: {type(e).__name__}") from None


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every fetch. A client built without one builds its own, loading the CA
    bundle: ~20 ms of CPU that ran on the gateway's event loop for every remote media request."""
    return httpx.create_ssl_context()


async def _download(url: str, scheme: str, host: str, port: int, ip: IPAddress, policy: FetchPolicy,
                    families: frozenset[str], content_prefix: str) -> BinaryIO:
    parts = urlsplit(url)
    ip_host = f"[{ip}]" if ip.version == 6 else str(ip)
    pinned = urlunsplit((scheme, f"{ip_host}:{port}", parts.path or "/", parts.query, ""))
    default_port = port == (443 if scheme == "https" else 80)
    name = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets in Host
    headers = {"Host": name if default_port else f"{name}:{port}", "Accept": f"{content_prefix}*",
               "Accept-Encoding": "identity"}
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    try:
        tls = await asyncio.to_thread(_tls)  # built once, off the event loop
        async with httpx.AsyncClient(verify=tls, follow_redirects=False, trust_env=False, timeout=policy.timeout_s) as client:
            # sni_hostname: TLS name and certificate check use the host name, the socket uses the checked IP.
            async with client.stream("GET", pinned, headers=headers, extensions={"sni_hostname": host}) as r:
                if r.is_redirect or 300 <= r.status_code < 400:
                    raise ApiError("remote_redirect", "the media URL answered with a redirect; redirects are not followed")
                if r.status_code != 200:
                    raise ApiError("remote_fetch_failed", f"the media URL answered HTTP {r.status_code}")
                ctype = r.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                if not ctype.startswith(content_prefix):
                    raise ApiError("unsupported_media_type", f"the media URL's Content-Type {ctype or 'none'!r} "
                                   f"is not {content_prefix}*")
                encoding = r.headers.get("content-encoding", "").strip().lower()
                if encoding not in ("", "identity"):
                    raise ApiError("remote_content_encoded", f"the media URL answered with Content-Encoding "
                                   f"{encoding[:64]!r}; media must be sent unencoded (identity)")
                declared = r.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
                    raise ApiError("upload_too_large", f"remote media is over the {policy.max_bytes} byte cap")
                size = 0
                async for chunk in r.aiter_raw():  # wire bytes: nothing is decompressed
                    size += len(chunk)
                    if size > policy.max_bytes:
                        raise ApiError("upload_too_large", f"remote media is over the {policy.max_bytes} byte cap")
                    out.write(chunk)
        out.seek(0)
        family = sniff(out.read(HEAD_BYTES))
        if family not in families:
            raise ApiError("unsupported_media_type", f"remote media content is {family or 'unknown'}, "
                           f"not one of {sorted(families)}")
        out.seek(0)
        return out  # type: ignore[return-value]
    except BaseException:
        out.close()
        raise
