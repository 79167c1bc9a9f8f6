"""Connecting to Elasticsearch: connection settings, the checks that must pass before work starts,
and requests with retries. See the package docstring for the supported client/server pairs."""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ...errors import ClusterError, ClusterUnavailable, InputError

ENV_API_KEY, ENV_USERNAME, ENV_PASSWORD = "ES_API_KEY", "ES_USERNAME", "ES_PASSWORD"

# (client major, server major) pairs that elasticsearch-py supports.
SUPPORTED_PAIRS = {(8, 8), (8, 9), (9, 9)}
PAIRS_HINT = ("Elasticsearch 8 needs the 8.x client (pip install 'elasticsearch>=8.15,<9'); "
              "Elasticsearch 9 pairs with the 9.x client (pip install 'elasticsearch>=9,<10')")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_BACKOFF_S = 30.0


def log(message: str) -> None:
    print(f"[elasticsearch] {message}", flush=True)


def describe(exc: BaseException) -> str:
    """A short reason for a client exception (status, error type, server reason), never its repr:
    the repr of an ApiError holds the request headers, credentials included."""
    from elastic_transport import ApiError

    if isinstance(exc, ApiError):
        error = exc.body.get("error") if isinstance(exc.body, dict) else None
        if isinstance(error, dict):
            return f"{exc.meta.status} {error_reason(error)}"
        return f"{exc.meta.status} {str(exc.message)[:300]}"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def error_reason(error: dict) -> str:
    """'type: reason (caused by: type: reason)' from an Elasticsearch error object."""
    text = f"{error.get('type', 'error')}: {error.get('reason', '')}".strip()
    cause = error.get("caused_by")
    if isinstance(cause, dict) and cause.get("reason"):
        text += f" (caused by {cause.get('type', 'error')}: {cause['reason']})"
    return text if len(text) <= 500 else f"{text[:240]} ... {text[-240:]}"  # the end often says what is wrong


# --- connecting -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """How to reach a cluster: URL(s), credentials, TLS, timeout and retries. Pickles to Ray actors;
    the secrets are left out of its repr. `keys` is the config-key prefix used in messages."""

    url: str
    api_key: str = field(default="", repr=False)
    username: str = ""
    password: str = field(default="", repr=False)
    ca_certs: str = ""
    verify_certs: bool = True
    request_timeout_s: float = 30.0
    max_retries: int = 5
    retry_backoff_s: float = 1.0
    keys: str = "es_"

    @property
    def hosts(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    @property
    def auth(self) -> str:
        return "api_key" if self.api_key else "basic" if self.username else "none"

    def client(self):
        """A new client (one per actor); the client's own retries are off, `call` retries with backoff."""
        from elasticsearch import Elasticsearch

        options: dict[str, Any] = {"request_timeout": self.request_timeout_s, "max_retries": 0,
                                   "retry_on_timeout": False, "verify_certs": self.verify_certs}
        if self.ca_certs:
            options["ca_certs"] = self.ca_certs
        if self.api_key:
            options["api_key"] = self.api_key
        elif self.username:
            options["basic_auth"] = (self.username, self.password)
        return Elasticsearch(self.hosts, **options)


def cluster(url: str, *, api_key: str = "", username: str = "", password: str = "", ca_certs: str = "",
            verify_certs: bool = True, request_timeout_s: float = 30.0, max_retries: int = 5,
            retry_backoff_s: float = 1.0, keys: str = "es_", environ: dict | None = None) -> Cluster:
    """Connection settings; credentials not given here come from ES_API_KEY / ES_USERNAME / ES_PASSWORD.

    Raises ClusterError naming the key to fix: no URL, a URL that is not http(s), credentials inside
    the URL (they would end up in logs and manifests), a username without a password, a CA bundle
    that is not a file.
    """
    env = os.environ if environ is None else environ
    hosts = [u.strip() for u in url.split(",") if u.strip()]
    if not hosts:
        raise ClusterError(f"{keys}url is empty; pass {keys}url=https://HOST:9200")
    for host in hosts:
        parts = urlsplit(host)
        if "@" in parts.netloc:
            raise ClusterError(f"{keys}url carries credentials; remove them from the URL and set {ENV_API_KEY} "
                               f"(or {ENV_USERNAME} and {ENV_PASSWORD}) in the environment instead")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClusterError(f"{keys}url {host!r} is not an http:// or https:// URL (e.g. https://localhost:9200)")
    api_key = api_key or env.get(ENV_API_KEY, "")
    username = username or env.get(ENV_USERNAME, "")
    password = password or env.get(ENV_PASSWORD, "")
    if username and not password and not api_key:
        raise ClusterError(f"a username is set ({keys}username or {ENV_USERNAME}) but no password; set {ENV_PASSWORD} "
                           f"(or {keys}password), or use an API key ({ENV_API_KEY})")
    if ca_certs and not Path(ca_certs).is_file():
        raise ClusterError(f"{keys}ca_certs={ca_certs} is not a file; pass the cluster's CA certificate (PEM), "
                           "e.g. config/certs/http_ca.crt of a self-managed Elasticsearch")
    return Cluster(url=",".join(hosts), api_key=api_key, username=username if not api_key else "",
                   password=password if not api_key else "", ca_certs=ca_certs, verify_certs=verify_certs,
                   request_timeout_s=request_timeout_s, max_retries=max_retries, retry_backoff_s=retry_backoff_s,
                   keys=keys)


def transient(exc: BaseException) -> bool:
    """Worth retrying: the connection failed or timed out, or the cluster said 429/502/503/504."""
    from elastic_transport import ApiError, ConnectionError, ConnectionTimeout, TlsError

    if isinstance(exc, TlsError):
        return False  # a certificate problem does not go away by waiting
    if isinstance(exc, (ConnectionError, ConnectionTimeout)):
        return True
    return isinstance(exc, ApiError) and exc.meta.status in RETRY_STATUSES


def backoff_s(cl: Cluster, attempt: int) -> float:
    """Wait before retry `attempt` (1-based): doubling from retry_backoff_s, capped, with jitter."""
    return min(cl.retry_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)


def call(cl: Cluster, what: str, request: Callable[[], Any]) -> Any:
    """`request()` with retries and backoff on transient failures.

    Raises ClusterUnavailable when the retries are spent, ClusterError for refused credentials, and
    re-raises any other error (a bad request is a bug, not a reason to wait).
    """
    from elastic_transport import ApiError

    attempt = 0
    while True:
        try:
            return request()
        except Exception as e:  # noqa: BLE001 - sorted into retry, stop with a line, or re-raise
            if isinstance(e, ApiError) and e.meta.status in (401, 403):
                raise ClusterError(credentials_message(cl, e)) from None
            if not transient(e):
                raise
            attempt += 1
            if attempt > cl.max_retries:
                raise ClusterUnavailable(
                    f"Elasticsearch at {cl.url} did not complete {what} after {attempt} tries ({describe(e)}); "
                    f"the job stopped: when the cluster answers again, rerun the same command, it resumes "
                    f"(raise {cl.keys}max_retries or {cl.keys}retry_backoff_s to wait longer)") from None
            wait = backoff_s(cl, attempt)
            log(f"{what}: {describe(e)}; retry {attempt}/{cl.max_retries} in {wait:.1f}s")
            time.sleep(wait)


def credentials_message(cl: Cluster, exc: BaseException) -> str:
    status = exc.meta.status  # type: ignore[attr-defined]
    if status == 403:
        return (f"Elasticsearch at {cl.url} refused the request for lack of a privilege ({describe(exc)}); the user or "
                "API key needs 'monitor' on the cluster, 'read' on the index to search it, and 'create_index', "
                "'write' and 'manage' on it to build it")
    if cl.auth == "none":
        return (f"Elasticsearch at {cl.url} wants credentials ({describe(exc)}); set {ENV_API_KEY}, or {ENV_USERNAME} "
                f"and {ENV_PASSWORD} (or {cl.keys}api_key / {cl.keys}username / {cl.keys}password)")
    given = f"API key ({ENV_API_KEY} or {cl.keys}api_key)" if cl.auth == "api_key" else (
        f"username and password ({ENV_USERNAME}/{ENV_PASSWORD} or {cl.keys}username/{cl.keys}password)")
    return f"Elasticsearch at {cl.url} refused the credentials ({describe(exc)}); check the {given}"


def connect(cl: Cluster):
    """A client and the server's `GET /` answer, after the checks that must pass before work starts.

    One request, no retries (a wrong URL should fail at once): reachable, TLS verified, credentials
    accepted, and a server major version that pairs with the installed client. Raises ClusterError.
    """
    from elastic_transport import ApiError, ConnectionError, ConnectionTimeout, TlsError
    from elasticsearch import UnsupportedProductError

    client = cl.client()
    try:
        info = client.info().body
    except TlsError as e:
        raise ClusterError(
            f"TLS certificate verification failed for {cl.url} ({describe(e)}); pass {cl.keys}ca_certs=PATH to the "
            "cluster's CA certificate (PEM; config/certs/http_ca.crt on a self-managed Elasticsearch)") from None
    except ConnectionTimeout as e:
        raise ClusterError(f"Elasticsearch at {cl.url} did not answer within {cl.request_timeout_s:g}s ({describe(e)}); "
                           f"check {cl.keys}url, or raise {cl.keys}request_timeout_s") from None
    except ConnectionError as e:
        raise ClusterError(f"cannot reach Elasticsearch at {cl.url} ({describe(e)}); check {cl.keys}url (scheme "
                           "http/https, host, port) and that the cluster is running") from None
    except UnsupportedProductError:
        raise ClusterError(f"{cl.url} answered but is not Elasticsearch (no 'X-Elastic-Product: Elasticsearch' "
                           f"header); check {cl.keys}url") from None
    except ApiError as e:
        if e.meta.status in (401, 403):
            raise ClusterError(credentials_message(cl, e)) from None
        if "media_type_header_exception" in describe(e):
            raise ClusterError(version_message(cl, _plain_version(client))) from None
        raise ClusterError(f"Elasticsearch at {cl.url} refused GET / ({describe(e)}); check {cl.keys}url") from None
    check_version(cl, info)
    return client, info


def _plain_version(client) -> str:
    """The server's version number asked without the client's compatibility headers (which an older
    server refuses); '' if that fails too."""
    try:
        _, body = client.transport.perform_request("GET", "/", headers={"accept": "application/json"})
        return str(body.get("version", {}).get("number", ""))
    except Exception:  # noqa: BLE001 - only used to make the message more precise
        return ""


def client_version() -> str:
    from elasticsearch import __versionstr__

    return __versionstr__


def version_message(cl: Cluster, server: str) -> str:
    server_text = f"Elasticsearch {server}" if server else "an older Elasticsearch"
    return (f"{cl.url} is {server_text} and the installed elasticsearch client is {client_version()}: they do "
            f"not pair. {PAIRS_HINT}")


def check_version(cl: Cluster, info: dict) -> None:
    """Stop on a client/server pair that elasticsearch-py does not support (see SUPPORTED_PAIRS)."""
    version = info.get("version") or {}
    number = str(version.get("number", ""))
    if version.get("build_flavor") == "serverless":
        return  # Elastic Cloud Serverless reports a fixed 8.11.0 and serves the current client
    client_major = int(client_version().split(".")[0])
    match = re.match(r"(\d+)\.", number)
    if not match:
        raise ClusterError(f"{cl.url} reports no Elasticsearch version (GET / gave {number!r}); check {cl.keys}url")
    server_major = int(match.group(1))
    if (client_major, server_major) in SUPPORTED_PAIRS:
        return
    if server_major == client_major - 1 >= 8:
        # Elasticsearch itself refuses a newer client's compatibility headers (handled in connect);
        # a server that accepted them is not Elasticsearch (an emulator or a proxy that rewrites).
        log(f"note: {cl.url} reports Elasticsearch {number}, which the {client_major}.x client does not support, "
            "but it accepted the client's requests; continuing")
        return
    raise ClusterError(version_message(cl, number))


def es_connection(cfg, keys: str) -> Cluster:
    """The Cluster of a config's Elasticsearch keys (config.ElasticsearchConnection); `keys` is their
    prefix in messages ('es_' for the build job, 'retrieval.es_' for synthesis and evaluation)."""
    return cluster(cfg.es_url, api_key=cfg.es_api_key, username=cfg.es_username, password=cfg.es_password,
                   ca_certs=cfg.es_ca_certs, verify_certs=cfg.es_verify_certs,
                   request_timeout_s=cfg.es_request_timeout_s, max_retries=cfg.es_max_retries,
                   retry_backoff_s=cfg.es_retry_backoff_s, keys=keys)


def require_client() -> None:
    """One line naming the extra to install when the elasticsearch client is missing."""
    import importlib.util

    if importlib.util.find_spec("elasticsearch") is None:
        raise InputError("the Elasticsearch backend needs the elasticsearch client: pip install 'instructrag-ray[es]'")
