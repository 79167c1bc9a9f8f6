"""Fixtures for the Elasticsearch path: a real `noida-db` server (an Elasticsearch-API emulator, PyPI
`noida-db==0.2.3`) started on a free port with a fresh data directory, and `Front`, a small HTTP(S)
reverse proxy on 127.0.0.1 for what noida cannot show by itself: TLS, required credentials, and a
server stopped at an exact point of a run. All traffic stays on the loopback interface."""

from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Noida:
    """One noida-db process serving only Elasticsearch; stop() and start() keep the port and the data."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir, self.port = Path(data_dir), port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        binary = files("noida_db") / "noida-db"
        os.chmod(binary, 0o755)  # the wheel may install it without the executable bit (its CLI does the same)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(binary), "start", "--only", "elasticsearch", "--elasticsearch-port", str(self.port),
                 "--data-dir", str(self.data_dir)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"noida-db exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"noida-db did not answer on {self.url} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="session")
def noida(tmp_path_factory):
    """The session's noida-db server (shared by the tests that do not stop it)."""
    server = Noida(tmp_path_factory.mktemp("noida") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fresh_noida(tmp_path):
    """A noida-db server of its own, for tests that stop and restart it."""
    server = Noida(tmp_path / "noida-data")
    server.start()
    yield server
    server.stop()


# --- TLS material ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "instructrag test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = out / "ca.pem", out / "cert.pem", out / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return tuple(str(p) for p in paths)


# --- the front --------------------------------------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}


class Front:
    """A reverse proxy to a Noida server on 127.0.0.1.

    - tls=(cert, key): serve HTTPS with that certificate;
    - api_key / basic=(user, password): require these credentials and answer anything else with
      Elasticsearch's 401 security_exception;
    - on_request(method, path): called before each request is forwarded (a test stops the server
      there); when the server is down, the client's connection is dropped, as by a dead node.
    `requests` lists (method, path, Authorization header) of every request received.
    """

    def __init__(self, upstream: Noida, *, tls=None, api_key=None, basic=None, on_request=None):
        self.upstream, self.api_key, self.basic, self.on_request = upstream, api_key, basic, on_request
        self.requests: list[tuple[str, str, str | None]] = []
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                auth = self.headers.get("Authorization")
                front.requests.append((self.command, self.path, auth))
                if not front.authorized(auth):
                    reason = ("missing authentication credentials for REST request" if not auth
                              else "unable to authenticate with provided credentials")
                    error = {"type": "security_exception", "reason": reason,
                             "header": {"WWW-Authenticate": ["Basic realm=\"security\"", "ApiKey"]}}
                    self._reply(401, {"Content-Type": "application/json",
                                      "WWW-Authenticate": "Basic realm=\"security\", ApiKey"},
                                json.dumps({"error": {"root_cause": [error], **error}, "status": 401}).encode())
                    return
                if front.on_request:
                    front.on_request(self.command, self.path)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", front.upstream.port, timeout=60)
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    conn.close()
                except OSError:
                    self.close_connection = True  # drop the client's connection: a dead node
                    return
                self._reply(response.status, {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP},
                            data)

            def _reply(self, status, headers, data):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def authorized(self, header: str | None) -> bool:
        if self.api_key is None and self.basic is None:
            return True
        if self.api_key is not None and header == f"ApiKey {self.api_key}":
            return True
        if self.basic is not None:
            token = base64.b64encode(f"{self.basic[0]}:{self.basic[1]}".encode()).decode()
            return header == f"Basic {token}"
        return False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def make_front():
    fronts = []

    def make(upstream, **kwargs):
        fronts.append(Front(upstream, **kwargs))
        return fronts[-1]

    yield make
    for f in fronts:
        f.close()
