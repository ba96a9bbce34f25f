"""--apply: write the chosen config.pbtxt, only if the server would load it.

Before the file is replaced, the new text is loaded the way the server loads a model
(server.core.repository.read_model, then server.core.loading.prepare_version for every version it
serves: runtime sessions created, warmed up at batch 1 and max_batch_size, checked against
reference.npz), from a scratch repository that links to the model's files, with the
settings the tuned servers had (--server-args). The file is then replaced atomically, and
only if nobody changed it while the tuner ran.
"""

from __future__ import annotations

import difflib
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from benchmarks.ceiling import server_settings
from benchmarks.tune.servers import scratch_repository, write_atomically
from modelrepo.layout import CONFIG_FILE
from modelrepo.precision import PrecisionError
from server.core.loading import LoadCancelled, prepare_version
from server.core.repository import RepositoryError, read_model
from server.errors import ModelNotFoundError
from server.runtimes import RuntimeLoadError


class Refused(Exception):
    """The config is not written; str() says why."""


def check_loadable(model_dir: Path, text: str, server_args: Sequence[str]) -> None:
    """Raise Refused with the server's reason if it would not serve `text` as the config of
    the model in `model_dir`."""
    with tempfile.TemporaryDirectory(prefix="imgserve-tune-check-") as folder:
        repository = scratch_repository(model_dir, Path(folder) / "repository", text)
        settings = server_settings(repository, server_args)
        try:
            spec = read_model(repository, model_dir.name, settings)
        except (RepositoryError, ModelNotFoundError, PrecisionError) as error:
            raise Refused(f"the server would not read it: {error}") from None
        for version in spec.versions:
            try:
                loaded = prepare_version(spec, version, settings, threading.Event())
            except (RuntimeLoadError, LoadCancelled) as error:
                raise Refused(f"the server would not load version {version}: {error}") from None
            for runtime in loaded.runtimes:
                runtime.close()


def diff(before: str, after: str, name: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        f"{name} (before)",
        f"{name} (tuned)",
    )
    return "".join(lines)


def apply_config(model_dir: Path, original: str, text: str, server_args: Sequence[str]) -> None:
    """Replace the model's config.pbtxt, which must still read `original`, with `text`,
    once the server's own loading accepts it. Raises Refused and writes nothing otherwise."""
    path = model_dir / CONFIG_FILE
    try:
        now = path.read_text(encoding="utf-8")
    except OSError as error:
        raise Refused(f"cannot read {path}: {error.strerror or error}") from None
    if now != original:
        raise Refused(f"{path} changed while the tuner ran: tune again")
    check_loadable(model_dir, text, server_args)
    try:
        write_atomically(path, text)
    except OSError as error:
        raise Refused(f"cannot write {path}: {error.strerror or error}") from None
