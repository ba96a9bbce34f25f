"""TLS, mutual TLS, bearer tokens, model control and message limits, on real servers.

Certificates come from tests/pki.py. The clients are the real ones: the project's client
library and CLI, tritonclient, raw gRPC stubs. Tokens and limits are checked on both gRPC
transports (plain TCP); TLS on grpcio, which `--grpc-transport auto` takes for it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pki import Pki, make_pki
from server_process import ServerProcess, kserve_method
from tritonclient.utils import InferenceServerException

from client import AsyncClassifierClient, ClassifierClient, ClientError, Credentials
from client.api import error_from_rpc
from client.cli import main as client_main
from server.api.status import TRANSPORT_KEY
from wire import classifier_pb2, classifier_pb2_grpc
from wire import grpc_service_pb2 as pb

INFER_TOKEN = "infer-3f9a2c7d1e"
ADMIN_TOKEN = "admin-8b41e07c55"
ENV_TOKEN = "env-admin-52d1a9"
MESSAGE_LIMIT = 64 * 1024
REJECTIONS = "imgserve_auth_rejections_total"


# --- servers ---


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(
        "# TOKEN [scope]: infer (the default) or admin\n"
        f"{INFER_TOKEN}\n"
        "\n"
        f"{ADMIN_TOKEN} admin  # operators\n"
    )
    return path


@pytest.fixture(scope="module")
def tls_server(serve: Callable[..., ServerProcess], pki: Pki, tokens_file: Path) -> ServerProcess:
    """TLS and tokens from a file; model control left off; the transport auto chooses."""
    args = ("--auth-tokens-file", str(tokens_file), "--grpc-transport", "auto")
    return serve(*pki.server_args(), *args, models=["fashion_mnist"])


@pytest.fixture(scope="module")
def mtls_server(serve: Callable[..., ServerProcess], pki: Pki) -> ServerProcess:
    """TLS requiring client certificates signed by the test CA; no tokens."""
    mtls = ("--tls-client-ca", str(pki.ca), "--grpc-transport", "auto")
    return serve(*pki.server_args(), *mtls, models=["fashion_mnist"])


@pytest.fixture(scope="module")
def plain_server(serve: Callable[..., ServerProcess], tokens_file: Path) -> ServerProcess:
    """Plain TCP (both transports serve it), tokens from a file and an admin token from the
    environment, a small message limit, debug logs."""
    return serve(
        "--auth-tokens-file", str(tokens_file),
        "--max-message-bytes", str(MESSAGE_LIMIT),
        "--log-level", "debug",
        models=["fashion_mnist"],
        env={"SERVER_AUTH_TOKENS": f" {ENV_TOKEN} ,"},
    )  # fmt: skip


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 28, 28), dtype=np.float32)


def _classify_request(images: int = 1) -> classifier_pb2.ClassifyRequest:
    pixels = np.stack([_image(i) for i in range(images)])
    tensors = [
        classifier_pb2.Tensor(shape=[1, 28, 28], datatype="FP32", data=image.tobytes())
        for image in pixels
    ]
    return classifier_pb2.ClassifyRequest(
        model="fashion_mnist", images=[classifier_pb2.Image(tensor=t) for t in tensors], top_k=1
    )


@pytest.fixture(scope="module")
def tls_channel(tls_server: ServerProcess, pki: Pki) -> Iterator[grpc.Channel]:
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    with grpc.secure_channel(tls_server.target, credentials) as channel:
        yield channel


@pytest.fixture(scope="module")
def plain_channel(plain_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(plain_server.target) as channel:
        yield channel


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


# --- TLS ---


def test_tls_serves_clients_that_trust_its_ca(tls_server: ServerProcess, pki: Pki) -> None:
    credentials = Credentials.from_files(ca=pki.ca, token=INFER_TOKEN)
    for host in ("127.0.0.1", "localhost"):  # both are in the certificate
        target = f"{host}:{tls_server.grpc_port}"
        with ClassifierClient(target, credentials=credentials) as client:
            [result] = client.classify("fashion_mnist", _image())
        assert result.label and result.probabilities.shape == (10,)

    async def list_async() -> list[str]:
        async with AsyncClassifierClient(tls_server.target, credentials=credentials) as client:
            return [m.name for m in await client.list_models()]

    assert asyncio.run(list_async()) == ["fashion_mnist"]

    client = triton.InferenceServerClient(
        tls_server.target, ssl=True, root_certificates=str(pki.ca)
    )
    with client:
        tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(_image()[np.newaxis])
        result = client.infer("fashion_mnist", [tensor], headers=dict(_bearer(INFER_TOKEN)))
    assert result.as_numpy("probabilities").shape == (1, 10)


def test_tls_server_refuses_plain_and_untrusting_clients(
    tls_server: ServerProcess, pki: Pki
) -> None:
    for credentials, why in (
        (Credentials(token=INFER_TOKEN), "it may require TLS"),
        (
            Credentials.from_files(ca=pki.other_ca, token=INFER_TOKEN),
            "not signed by a CA this client trusts",
        ),
    ):
        client = ClassifierClient(tls_server.target, 5, credentials)
        with client, pytest.raises(ClientError) as caught:
            client.list_models()
        assert caught.value.code == "UNAVAILABLE"
        assert why in caught.value.message, caught.value.message

    # A certificate for other names: dial it as example.com.
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    other_name = [("grpc.ssl_target_name_override", "example.com")]
    with grpc.secure_channel(tls_server.target, credentials, options=other_name) as channel:
        probe = health_pb2_grpc.HealthStub(channel).Check
        with pytest.raises(grpc.RpcError) as raised:
            probe(health_pb2.HealthCheckRequest(), timeout=10)
    error = error_from_rpc(raised.value, tls_server.target, 10)
    assert "its certificate is not issued for this host name" in error.message


def test_auto_serves_tls_on_grpcio_and_says_why(
    tls_server: ServerProcess, tls_channel: grpc.Channel
) -> None:
    assert "gRPC transport: grpcio (auto: pygrpc-native serves no TLS" in tls_server.log
    _, call = kserve_method(tls_channel, "ServerLive").with_call(pb.ServerLiveRequest())
    assert dict(call.trailing_metadata())[TRANSPORT_KEY] == "grpcio"


def test_cli_over_tls_with_a_token(
    tls_server: ServerProcess, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["models", "--server", tls_server.target, "--json"]
    assert client_main([*common, "--tls-ca", str(pki.ca), "--token", INFER_TOKEN]) == 0
    assert '"name": "fashion_mnist"' in capsys.readouterr().out

    assert client_main([*common, "--tls-ca", str(pki.ca)]) == 1
    error = capsys.readouterr().err.strip()
    assert "UNAUTHENTICATED" in error and "--token" in error and "\n" not in error

    assert client_main([*common, "--tls-ca", str(pki.other_ca), "--token", INFER_TOKEN]) == 1
    assert "not signed by a CA this client trusts" in capsys.readouterr().err

    assert client_main([*common, "--tls-ca", str(pki.ca) + ".missing"]) == 1
    assert "cannot read CA file" in capsys.readouterr().err

    # A token gRPC cannot send is refused before any call, in words (not "Invalid metadata").
    assert client_main([*common, "--tls-ca", str(pki.ca), "--token", "caf\u00e9-token"]) == 1
    error = capsys.readouterr().err
    assert "a token must be printable ASCII" in error and "caf" not in error


@pytest.mark.parametrize("token", ["", "two words", "t\u00f6ken", "bell\x07", "tab\tx", "a#b"])
def test_tokens_a_server_cannot_accept_are_refused_by_the_client(token: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII characters without spaces or '#'"):
        Credentials(token=token)


@pytest.mark.parametrize(
    "details",
    [
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
        "Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL",
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
        "Handshake failed",
        "connections to all backends failing; last error: HANDSHAKE_FAILURE",
    ],
)
def test_handshake_failures_in_any_wording(details: str) -> None:
    empty = grpc.aio.Metadata()
    raised = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, empty, empty, details)
    error = error_from_rpc(raised, "gpu-box:8001", 10)
    assert error.message == "cannot connect to the server at gpu-box:8001: the TLS handshake failed"


def test_mutual_tls_requires_a_trusted_client_certificate(
    mtls_server: ServerProcess, pki: Pki
) -> None:
    for client_cert in (None, pki.client(trusted=False)):
        cert, key = client_cert or (None, None)
        credentials = Credentials.from_files(ca=pki.ca, cert=cert, key=key)
        client = ClassifierClient(mtls_server.target, 5, credentials)
        with client, pytest.raises(ClientError) as caught:
            client.list_models()
        assert caught.value.code == "UNAVAILABLE", caught.value

    cert, key = pki.client()
    credentials = Credentials.from_files(ca=pki.ca, cert=cert, key=key)
    with ClassifierClient(mtls_server.target, 5, credentials) as client:
        assert [m.name for m in client.list_models() if m.ready] == ["fashion_mnist"]
    with triton.InferenceServerClient(
        mtls_server.target,
        ssl=True,
        root_certificates=str(pki.ca),
        private_key=str(key),
        certificate_chain=str(cert),
    ) as client:
        assert client.is_model_ready("fashion_mnist")


def test_cli_with_a_client_certificate(
    mtls_server: ServerProcess, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = pki.client()
    argv = ["models", "--server", mtls_server.target, "--tls-ca", str(pki.ca)]
    assert client_main([*argv, "--tls-cert", str(cert), "--tls-key", str(key)]) == 0
    assert "fashion_mnist" in capsys.readouterr().out
    assert client_main([*argv, "--tls-cert", str(cert)]) == 1
    assert "needs its private key" in capsys.readouterr().err


# --- tokens ---


@pytest.mark.both_transports
def test_tokens_none_malformed_wrong_and_right(
    plain_server: ServerProcess, plain_channel: grpc.Channel
) -> None:
    stub = classifier_pb2_grpc.ClassifierStub(plain_channel)
    request = _classify_request()
    before = plain_server.metric(REJECTIONS, code="UNAUTHENTICATED")
    refused = [
        (),
        _bearer("not-a-token"),
        _bearer(INFER_TOKEN[:-1]),  # a prefix of a real token
        _bearer(INFER_TOKEN + "x"),
        (("authorization", f"Basic {INFER_TOKEN}"),),
        (("authorization", INFER_TOKEN),),
    ]
    for metadata in refused:
        code, details = _code(lambda m=metadata: stub.Classify(request, timeout=10, metadata=m))
        assert (code, details) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid bearer token",
        )
    # Streams (both APIs) are refused the same way.
    code, details = _code(lambda: list(stub.ClassifyStream(iter([request]), timeout=10)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    kserve_stream = kserve_method(plain_channel, "ModelStreamInfer")
    code, _ = _code(lambda: list(kserve_stream(iter([pb.ModelInferRequest()]), timeout=10)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    refusals = len(refused) + 2
    assert plain_server.metric(REJECTIONS, code="UNAUTHENTICATED") - before == refusals

    for token in (INFER_TOKEN, ADMIN_TOKEN):
        response = stub.Classify(request, timeout=10, metadata=_bearer(token))
        assert response.model == "fashion_mnist" and len(response.results) == 1
    lowercase_scheme = (("authorization", f"bearer {INFER_TOKEN}"),)
    assert stub.ListModels(classifier_pb2.ListModelsRequest(), metadata=lowercase_scheme).models


@pytest.mark.both_transports
def test_infer_scope_cannot_use_the_repository(
    plain_server: ServerProcess, plain_channel: grpc.Channel
) -> None:
    before = plain_server.metric(REJECTIONS, code="PERMISSION_DENIED")
    index = kserve_method(plain_channel, "RepositoryIndex")
    load = kserve_method(plain_channel, "RepositoryModelLoad")
    unload = kserve_method(plain_channel, "RepositoryModelUnload")
    model = "fashion_mnist"
    calls = (
        lambda m: index(pb.RepositoryIndexRequest(), timeout=10, metadata=m),
        lambda m: load(pb.RepositoryModelLoadRequest(model_name=model), timeout=10, metadata=m),
        lambda m: unload(pb.RepositoryModelUnloadRequest(model_name=model), timeout=10, metadata=m),
    )
    for call in calls:
        code, details = _code(lambda c=call: c(_bearer(INFER_TOKEN)))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert INFER_TOKEN not in details and "admin" in details
    assert plain_server.metric(REJECTIONS, code="PERMISSION_DENIED") - before == len(calls)

    admin = _bearer(ADMIN_TOKEN)
    assert [m.name for m in index(pb.RepositoryIndexRequest(), metadata=admin).models] == [
        "fashion_mnist"
    ]
    # Authorised, then refused by the model-control switch: it is off unless asked for.
    for call in calls[1:]:
        code, details = _code(lambda c=call: c(admin))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "start the server with --enable-model-control" in details


def _refused_id(call: Callable[[], object], code: grpc.StatusCode) -> str:
    """The request id in the trailing metadata of a call refused with `code`."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code
    return dict(caught.value.trailing_metadata() or ())["x-request-id"]


@pytest.mark.both_transports
def test_refusals_carry_the_request_id(
    plain_channel: grpc.Channel, plain_server: ServerProcess
) -> None:
    """Refused calls get their id back like any other, and their log line carries it."""
    stub = classifier_pb2_grpc.ClassifierStub(plain_channel)
    request = _classify_request()
    unauthenticated, denied = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
    sent = (("x-request-id", "refused-1"),)
    assert (
        _refused_id(lambda: stub.Classify(request, timeout=10, metadata=sent), unauthenticated)
        == "refused-1"
    )
    generated = _refused_id(lambda: stub.Classify(request, timeout=10), unauthenticated)
    assert len(generated) == 32 and int(generated, 16) >= 0  # a uuid4 in hex
    stream = (("x-request-id", "refused-stream"),)
    assert (
        _refused_id(
            lambda: list(stub.ClassifyStream(iter([request]), timeout=10, metadata=stream)),
            unauthenticated,
        )
        == "refused-stream"
    )
    index = kserve_method(plain_channel, "RepositoryIndex")
    infer_scope = (*_bearer(INFER_TOKEN), ("x-request-id", "refused-2"))
    assert (
        _refused_id(
            lambda: index(pb.RepositoryIndexRequest(), timeout=10, metadata=infer_scope), denied
        )
        == "refused-2"
    )

    logged = (("x-request-id", "refused-logged"),)
    assert (
        _refused_id(lambda: stub.Classify(request, timeout=10, metadata=logged), unauthenticated)
        == "refused-logged"
    )
    line = plain_server.wait_for(re.compile(r".*\[refused-logged\].*"), timeout=10)[0]
    assert "refused /imgserve.classifier.v1.Classifier/Classify: UNAUTHENTICATED" in line


@pytest.mark.both_transports
def test_probes_and_reflection_need_no_token(plain_channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(plain_channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    live = kserve_method(plain_channel, "ServerLive")(pb.ServerLiveRequest(), timeout=10)
    ready = kserve_method(plain_channel, "ServerReady")(pb.ServerReadyRequest(), timeout=10)
    assert live.live and ready.ready
    reflection = reflection_pb2_grpc.ServerReflectionStub(plain_channel)
    [answer] = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    assert "inference.GRPCInferenceService" in {
        s.name for s in answer.list_services_response.service
    }
    # Everything else needs a token, metadata included.
    code, _ = _code(
        lambda: kserve_method(plain_channel, "ServerMetadata")(pb.ServerMetadataRequest())
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.both_transports
def test_environment_tokens_are_admin_and_plain_tcp_warns(plain_server: ServerProcess) -> None:
    assert "bearer tokens travel in clear text" in plain_server.log
    assert ENV_TOKEN not in plain_server.log
    with triton.InferenceServerClient(plain_server.target) as client:
        assert client.is_server_live()  # a probe: no token
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_repository_index()
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
        index = client.get_model_repository_index(headers=dict(_bearer(ENV_TOKEN)))
        assert [m.name for m in index.models] == ["fashion_mnist"]


# --- message size ---


@pytest.mark.both_transports
def test_message_limit_refuses_large_requests_and_keeps_serving(
    plain_server: ServerProcess,
) -> None:
    images = MESSAGE_LIMIT // (28 * 28 * 4) + 1
    with grpc.insecure_channel(plain_server.target) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        metadata = _bearer(ENV_TOKEN)
        large = _classify_request(images)
        assert large.ByteSize() > MESSAGE_LIMIT
        code, details = _code(lambda: stub.Classify(large, timeout=10, metadata=metadata))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"larger than max ({large.ByteSize()} vs. {MESSAGE_LIMIT})" in details
        response = stub.Classify(_classify_request(images - 2), timeout=10, metadata=metadata)
        assert len(response.results) == images - 2
