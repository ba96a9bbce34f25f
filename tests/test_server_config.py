"""Server settings: flags win over SERVER_* variables, which win over defaults; bad values
are usage errors (exit 2, one line, no traceback), on the real command line too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.api import transport
from server.config import Settings, parse_settings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_then_environment_then_flags() -> None:
    env = {"SERVER_MODEL_REPOSITORY": "/srv/models", "SERVER_GRPC_PORT": "0"}
    assert parse_settings([], env) == Settings(model_repository=Path("/srv/models"), grpc_port=0)

    env |= {"SERVER_DEVICE": "cpu", "SERVER_MAX_QUEUE_DELAY_US": "500", "SERVER_MODELS": "a, b"}
    settings = parse_settings(["--grpc-port", "9001", "--models", "c"], env)
    assert settings.grpc_port == 9001  # the flag wins over SERVER_GRPC_PORT
    assert settings.device == "cpu" and settings.max_queue_delay_us == 500
    assert settings.models == ("c",)
    assert parse_settings([], env).models == ("a", "b")
    assert settings.metrics_port == 8002 and settings.intra_op_threads == 1  # defaults


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "--model-repository is required"),
        (["--model-repository", "r"], {"SERVER_GRPC_PORT": "high"}, "SERVER_GRPC_PORT='high'"),
        (["--model-repository", "r"], {"SERVER_DEVICE": "tpu"}, "SERVER_DEVICE must be one of"),
        (["--model-repository", "r", "--grpc-port", "70000"], {}, "between 0 and 65535"),
        (["--model-repository", "r", "--max-batch-size", "0"], {}, "at least 1"),
        (["--model-repository", "r", "--grace-period-s", "-1"], {}, "cannot be negative"),
        (["--model-repository", "r"], {"SERVER_GRPC_TRANSPORT": "h3"}, "must be one of auto"),
        (
            ["--model-repository", "r", "--grpc-transport", "native", "--tls-cert", "c.pem"],
            {},
            "--grpc-transport native serves no TLS",
        ),
    ],
)
def test_bad_settings_are_usage_errors(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(argv, env)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_command_line_help_and_errors() -> None:
    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "server", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    shown = run("--help")
    assert shown.returncode == 0
    for flag, variable in [
        ("--grpc-port", "SERVER_GRPC_PORT"),
        ("--max-queue-size", "SERVER_MAX_QUEUE_SIZE"),
        ("--log-format", "SERVER_LOG_FORMAT"),
    ]:
        assert flag in shown.stdout and variable in shown.stdout

    bad = run("--model-repository", str(ROOT), "--log-format", "xml")
    assert bad.returncode == 2
    assert "invalid choice: 'xml'" in bad.stderr and "Traceback" not in bad.stderr


def test_auto_transport_is_native_unless_tls_is_on() -> None:
    plain = Settings(model_repository=Path("r"), grpc_transport="auto")
    assert transport.choose(plain) == transport.Transport("native")
    tls = Settings(model_repository=Path("r"), grpc_transport="auto", tls_cert=Path("c.pem"))
    chosen = transport.choose(tls)
    assert chosen.name == "grpcio" and "serves no TLS" in chosen.why
    assert chosen.why in chosen.line()
    assert transport.choose(Settings(model_repository=Path("r"), grpc_transport="grpcio")) == (
        transport.Transport("grpcio")
    )
