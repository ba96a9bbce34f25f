"""Security settings checked before serving: switches, limits, TLS files and tokens files.

A bad TLS or tokens file stops the server at start with one line saying why (what an
operator reads), and the token lookup compares against every token.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pki import Pki, make_pki
from prometheus_client import CollectorRegistry, Counter
from server_process import PROJECT_ROOT

from server import security
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
    assert parse_settings(["--model-repository", ".", "--enable-model-control"], {})
    for argv, env, message in (
        ([], {"SERVER_ENABLE_MODEL_CONTROL": "maybe"}, "is not one of 1/true/yes/on/0"),
        (["--max-message-bytes", "0"], {}, "max-message-bytes must be at least 1"),
    ):
        with pytest.raises(SystemExit) as exited:
            parse_settings(["--model-repository", ".", *argv], env)
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


def test_environment_tokens_stay_out_of_the_settings_repr() -> None:
    settings = parse_settings(["--model-repository", "."], {"SERVER_AUTH_TOKENS": "a, b,,"})
    assert settings.auth_tokens == ("a", "b")
    assert "auth_tokens=" not in repr(settings)


def _start_error(pki: Pki, tmp_path: Path, *args: str) -> str:
    settings = parse_settings(["--model-repository", str(tmp_path), *args], {})
    with pytest.raises(security.SecurityConfigError) as caught:
        security.server_credentials(settings)
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
        assert expected in _start_error(pki, tmp_path, *args)


def test_bad_tokens_files_are_start_up_errors(pki: Pki, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    for text, expected in (
        ("# only a comment\n\n", "holds no tokens"),
        (f"ok\n{TOKEN} root\n", "line 2: unknown scope"),
        (f"{TOKEN} infer extra\n", "line 1: expected `TOKEN [infer|admin]`"),
    ):
        tokens.write_text(text)
        message = _start_error(pki, tmp_path, "--auth-tokens-file", str(tokens))
        assert expected in message and TOKEN not in message
    missing = str(tmp_path / "missing")
    assert "cannot read --auth-tokens-file" in _start_error(
        pki, tmp_path, "--auth-tokens-file", missing
    )


def test_server_exits_with_the_reason(pki: Pki, tmp_path: Path) -> None:
    """The whole path: `python -m server` logs one line and exits 1, like other start-up errors.

    The files are checked before any model loads, so an empty repository folder will do.
    """
    argv = ["--model-repository", str(tmp_path), "--host", "127.0.0.1"]
    argv += ["--metrics-port", "0"]
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


def test_scope_lookup_compares_every_token() -> None:
    tokens = {"short": security.Scope.INFER, "a-much-longer-token": security.Scope.ADMIN}
    registry = CollectorRegistry()
    auth = security.TokenAuthenticator(tokens, Counter("r", "r", ("code",), registry=registry))
    assert auth.scope_of("short") is security.Scope.INFER
    assert auth.scope_of("a-much-longer-token") is security.Scope.ADMIN
    for wrong in ("", "shor", "shortx", "SHORT", None):
        assert auth.scope_of(wrong) is None


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
