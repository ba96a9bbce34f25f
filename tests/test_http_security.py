"""The HTTP/REST port's security is the gRPC port's: the same certificates (TLS, mutual TLS),
the same bearer tokens and scopes, the same open probes, refusals counted alike.

Certificates come from tests/pki.py; the clients are tritonclient.http and the standard
library's urllib with real ssl contexts.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from pki import Pki, make_pki
from server_process import ServerProcess, hostport
from tritonclient.utils import InferenceServerException

from server.api.security import PERMISSION_DENIED_MESSAGE, UNAUTHENTICATED_MESSAGE

INFER_TOKEN = "infer-77e0a1c2b4"
ADMIN_TOKEN = "admin-0c5d93fa61"
REJECTIONS = "imgserve_auth_rejections_total"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(
    serve: Callable[..., ServerProcess], pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"{INFER_TOKEN}\n{ADMIN_TOKEN} admin\n")
    return serve(*pki.server_args(), "--auth-tokens-file", str(tokens), models=["fashion_mnist"])


@pytest.fixture(scope="module")
def mtls_server(serve: Callable[..., ServerProcess], pki: Pki) -> ServerProcess:
    return serve(*pki.server_args(), "--tls-client-ca", str(pki.ca), models=["fashion_mnist"])


def _context(pki: Pki, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        context.load_cert_chain(*client)
    return context


def _call(
    server: ServerProcess,
    path: str,
    context: ssl.SSLContext,
    token: str | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    url = f"https://{hostport('localhost', server.http_port)}{path}"
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_the_log_names_the_https_address(tls_server: ServerProcess) -> None:
    assert f"rest https://127.0.0.1:{tls_server.http_port}" in tls_server.log
    assert "gRPC and HTTP ports security: TLS, 2 bearer token(s)" in tls_server.log


def test_tokens_and_scopes_are_the_grpc_ones(tls_server: ServerProcess, pki: Pki) -> None:
    context = _context(pki)
    before = tls_server.metric(REJECTIONS, code="UNAUTHENTICATED")
    denied_before = tls_server.metric(REJECTIONS, code="PERMISSION_DENIED")
    for probe in ("/v2/health/live", "/v2/health/ready"):  # open, like ServerLive/ServerReady
        assert _call(tls_server, probe, context)[0] == 200
    status, headers, answer = _call(tls_server, "/v2", context)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(answer) == {"error": UNAUTHENTICATED_MESSAGE}
    assert _call(tls_server, "/v2", context, token="not-a-token")[0] == 401
    assert _call(tls_server, "/v2/models/fashion_mnist/ready", context, token=INFER_TOKEN)[0] == 200
    status, _, answer = _call(
        tls_server, "/v2/repository/index", context, token=INFER_TOKEN, body=b"{}"
    )
    assert status == 403 and json.loads(answer) == {"error": PERMISSION_DENIED_MESSAGE}
    status, _, answer = _call(
        tls_server, "/v2/repository/index", context, token=ADMIN_TOKEN, body=b"{}"
    )
    assert status == 200 and json.loads(answer)[0]["name"] == "fashion_mnist"
    assert _call(tls_server, "/v2/nothing", context)[0] == 404  # no such endpoint: no token asked
    assert tls_server.metric(REJECTIONS, code="UNAUTHENTICATED") - before == 2
    assert tls_server.metric(REJECTIONS, code="PERMISSION_DENIED") - denied_before == 1


def test_tritonclient_http_over_tls_with_a_token(tls_server: ServerProcess, pki: Pki) -> None:
    target = hostport("localhost", tls_server.http_port)
    client = httpclient.InferenceServerClient(
        target, ssl=True, ssl_options={"ca_certs": str(pki.ca)}
    )
    try:
        images = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
        tensor = httpclient.InferInput("input", [2, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(images)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("fashion_mnist", [tensor])
        assert caught.value.status() == "401"
        headers = {"Authorization": f"Bearer {INFER_TOKEN}"}
        result = client.infer("fashion_mnist", [tensor], headers=headers)
        assert result.as_numpy("probabilities").shape == (2, 10)
    finally:
        client.close()


def test_plain_http_to_the_tls_port_gets_no_answer(tls_server: ServerProcess) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"{tls_server.http_url}/v2/health/live", timeout=10)


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(
    mtls_server: ServerProcess, pki: Pki
) -> None:
    trusted = _context(pki, pki.client())
    assert _call(mtls_server, "/v2/health/ready", trusted)[0] == 200
    for context in (_context(pki), _context(pki, pki.client(trusted=False))):
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _call(mtls_server, "/v2/health/ready", context)
    client = httpclient.InferenceServerClient(
        hostport("localhost", mtls_server.http_port),
        ssl=True,
        ssl_options={
            "ca_certs": str(pki.ca),
            "certfile": str(pki.client()[0]),
            "keyfile": str(pki.client()[1]),
        },
    )
    try:
        assert client.is_model_ready("fashion_mnist")
    finally:
        client.close()
