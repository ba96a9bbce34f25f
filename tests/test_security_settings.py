"""Security settings checked before serving: switches, limits, TLS files and tokens files.

A bad TLS or tokens file stops the server at start with one line saying why (what an
operator reads), and the token lookup compares against every token.
"""

from __future__ import annotations

import asyncio
import hmac
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from pki import Pki, make_pki
from prometheus_client import CollectorRegistry, Counter
from server_process import PROJECT_ROOT

from server.api import security
from server.api.common import method_handler_kind
from server.config import parse_settings

TOKEN = "infer-3f9a2c7d1e"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(v, True) for v in ("1", "TRUE", "yes", "on")]
    + [(v, False) for v in ("0", "false", "No", "off")],
)
def test_model_control_switch_from_the_environment(value: str, expected: bool) -> None:
    env = {"SERVER_ENABLE_MODEL_CONTROL": value}
    assert parse_settings(["--model-repository", "."], env).enable_model_control is expected


def test_bad_switch_and_limit_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_settings(["--model-repository", "."], {}).enable_model_control is False
    switched = parse_settings(["--model-repository", ".", "--enable-model-control"], {})
    assert switched.enable_model_control is True
    largest = parse_settings(["--model-repository", ".", "--max-message-bytes", "2147483647"], {})
    assert largest.max_message_bytes == 2**31 - 1  # gRPC's limit is a signed 32-bit int
    for argv, env, message in (
        ([], {"SERVER_ENABLE_MODEL_CONTROL": "maybe"}, "is not one of 1/true/yes/on/0"),
        (["--max-message-bytes", "0"], {}, "max-message-bytes must be between 1 and 2147483647"),
        ([], {"SERVER_MAX_MESSAGE_BYTES": str(2**31)}, "must be between 1 and 2147483647"),
    ):
        with pytest.raises(SystemExit) as exited:
            parse_settings(["--model-repository", ".", *argv], env)
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


def test_environment_tokens_stay_out_of_the_settings_repr() -> None:
    settings = parse_settings(["--model-repository", "."], {"SERVER_AUTH_TOKENS": "a, b,,"})
    assert settings.auth_tokens == ("a", "b")
    assert "auth_tokens=" not in repr(settings)


def _tls_error(tmp_path: Path, *args: str) -> str:
    """Why the TLS files of `args` stop the server."""
    settings = parse_settings(["--model-repository", str(tmp_path), *args], {})
    with pytest.raises(security.SecurityConfigError) as caught:
        security.server_credentials(settings)
    return str(caught.value)


def _tokens_error(tmp_path: Path, *args: str) -> str:
    """Why the tokens of `args` stop the server."""
    settings = parse_settings(["--model-repository", str(tmp_path), *args], {})
    with pytest.raises(security.SecurityConfigError) as caught:
        security.load_tokens(settings)
    return str(caught.value)


def test_bad_tls_files_are_start_up_errors(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert, key = str(pki.server_cert), str(pki.server_key)
    cases = {
        "--tls-cert needs --tls-key": ["--tls-cert", cert],
        "--tls-key needs --tls-cert": ["--tls-key", key],
        "--tls-client-ca needs --tls-cert": ["--tls-client-ca", str(pki.ca)],
        "cannot read --tls-cert": ["--tls-cert", cert + ".missing", "--tls-key", key],
        "does not match the certificate": ["--tls-cert", cert, "--tls-key", str(pki.client_key)],
        "--tls-cert " + str(garbage) + " is not a PEM": [
            "--tls-cert",
            str(garbage),
            "--tls-key",
            key,
        ],
        "is not a PEM private key": ["--tls-cert", cert, "--tls-key", str(garbage)],
        "--tls-client-ca " + str(garbage): [*pki.server_args(), "--tls-client-ca", str(garbage)],
    }
    for expected, args in cases.items():
        assert expected in _tls_error(tmp_path, *args)


def test_bad_tokens_files_are_start_up_errors(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    for text, expected in (
        ("# only a comment\n\n", "holds no tokens"),
        (f"ok\n{TOKEN} root\n", "line 2: unknown scope"),
        (f"{TOKEN} infer extra\n", "line 1: expected `TOKEN [infer|admin]`"),
    ):
        tokens.write_text(text)
        message = _tokens_error(tmp_path, "--auth-tokens-file", str(tokens))
        assert expected in message and TOKEN not in message
    missing = str(tmp_path / "missing")
    assert "cannot read --auth-tokens-file" in _tokens_error(
        tmp_path, "--auth-tokens-file", missing
    )


def test_server_exits_with_the_reason(pki: Pki, tmp_path: Path) -> None:
    """The whole path: `python -m server` logs one line and exits 1, like other start-up errors.

    The files are checked before any model loads, so an empty repository folder will do.
    """
    argv = ["--model-repository", str(tmp_path), "--host", "127.0.0.1"]
    argv += ["--metrics-port", "0", "--http-port", "0"]
    argv += ["--grpc-port", "0", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.ca)]
    done = subprocess.run(
        [sys.executable, "-m", "server", *argv],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"cannot start: --tls-key {pki.ca} is not a PEM private key" in done.stderr + done.stdout


def _authenticator(tokens: dict[str, security.Scope]) -> security.TokenAuthenticator:
    registry = CollectorRegistry()
    return security.TokenAuthenticator(tokens, Counter("r", "r", ("code",), registry=registry))


def test_scope_lookup_compares_every_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hit and a miss cost the same comparisons: one per known token, whatever matches."""
    tokens = {
        "short": security.Scope.INFER,
        "a-much-longer-token": security.Scope.ADMIN,
        "third-token": security.Scope.INFER,
    }
    auth = _authenticator(tokens)
    compare = hmac.compare_digest
    calls: list[int] = []

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return compare(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    cases: list[tuple[str | None, security.Scope | None]] = [
        ("short", security.Scope.INFER),  # the first token
        ("a-much-longer-token", security.Scope.ADMIN),
        ("", None),
        ("shor", None),
        ("shortx", None),
        ("SHORT", None),
    ]
    for presented, expected in cases:
        calls.clear()
        assert auth.scope_of(presented) is expected, presented
        assert len(calls) == len(tokens), (presented, len(calls))
    calls.clear()
    assert auth.scope_of(None) is None  # no token at all: nothing to compare
    assert not calls


@pytest.mark.parametrize(
    ("request_streaming", "response_streaming"),
    [(False, False), (False, True), (True, False), (True, True)],
)
def test_refusals_never_parse_the_request(
    request_streaming: bool, response_streaming: bool
) -> None:
    """An unauthenticated caller cannot make the server parse its (up to 64 MiB) messages:
    the refusal has the method's kind but a deserializer that ignores the bytes."""
    parsed: list[bytes] = []

    def parse(data: bytes) -> object:
        parsed.append(data)
        return data

    kind = method_handler_kind(request_streaming, response_streaming)
    real = kind(lambda request, context: None, request_deserializer=parse)
    details = SimpleNamespace(method="/imgserve.classifier.v1.Classifier/Classify")
    details.invocation_metadata = (("authorization", "Bearer not-a-token"),)

    async def continuation(_: object) -> grpc.RpcMethodHandler:
        return real

    auth = _authenticator({TOKEN: security.Scope.INFER})
    refusal = asyncio.run(auth.intercept_service(continuation, details))  # type: ignore[arg-type]
    assert refusal is not real
    assert (refusal.request_streaming, refusal.response_streaming) == (
        request_streaming,
        response_streaming,
    )
    assert refusal.request_deserializer(b"\x0a" * 4096) is None
    assert not parsed


def test_each_method_needs_its_scope() -> None:
    """Both names of the KServe service (wire and package) are guarded alike."""
    open_, infer, admin = None, security.Scope.INFER, security.Scope.ADMIN
    expected = {
        "/grpc.health.v1.Health/Watch": open_,
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": open_,
        "/imgserve.classifier.v1.Classifier/Classify": infer,
        "/made.up.Service/Method": infer,  # anything not named is not open
    }
    for service in ("inference", "imgserve.inference"):
        prefix = f"/{service}.GRPCInferenceService/"
        expected |= {prefix + "ServerLive": open_, prefix + "ServerReady": open_}
        expected |= {prefix + "ModelReady": infer, prefix + "ModelInfer": infer}
        expected |= {prefix + "RepositoryIndex": admin, prefix + "RepositoryModelLoad": admin}
    assert {method: security.required_scope(method) for method in expected} == expected
