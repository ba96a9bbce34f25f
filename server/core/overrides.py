"""Loads with an override: Triton's `config` and `file:<path>` load parameters.

A load may carry a model configuration (protobuf's JSON mapping of ModelConfig) to use
instead of config.pbtxt, and model files that form the model's folder instead of the
repository's. Triton writes them into a temporary folder of its own and loads from there;
so does this server, in OverrideFolders, never in the user's repository. With several
workers the folder is in the supervisor's run folder: written once by the worker that took
the call, read by every worker, and read again by a worker that restarts, so it serves what
the others serve.

A malformed override is refused before anything loads, as Triton refuses it: INTERNAL,
"failed to load 'NAME', failed to poll from model repository" (Triton's own model-control
example checks both), followed here by the reason, which Triton only logs.
"""

from __future__ import annotations

import posixpath
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from modelrepo.config import ConfigError, ModelConfig, format_config, parse_json_config
from modelrepo.layout import CONFIG_FILE
from server.errors import InvalidInputError, RepositoryPollError

CONFIG_PARAMETER = "config"
FILE_PREFIX = "file:"
# What a Triton client is told when a load cannot start (the reason follows here).
POLL_FAILED = "failed to load '{name}', failed to poll from model repository"
# Longest name of one file or folder on Linux file systems, in bytes.
NAME_MAX = 255
_STAGING = ".load-"


@dataclass(frozen=True)
class Override:
    """A load's config, and its model files by path inside the model folder (none: the
    repository's files, with this config)."""

    config: ModelConfig
    files: dict[str, bytes]


def parse_override(name: str, config: str | None, files: Mapping[str, bytes]) -> Override | None:
    """The override of a load of `name`, checked as Triton checks it; None when the load has
    none. `files`: the `file:<path>` parameters, by parameter name. Raises RepositoryPollError
    (InvalidInputError for a name that would leave the folder, as Triton answers it)."""
    if config is None and not files:
        return None
    _check_name(name)
    if config is None:
        raise _refused(name, "Load parameter 'config' must be specified for model file override")
    try:
        parsed = parse_json_config(config)
    except ConfigError as exc:
        raise _refused(name, f"Invalid config override: {exc}") from None
    if parsed.name and parsed.name != name:
        raise _refused(name, f"the config override names the model '{parsed.name}', not '{name}'")
    paths = {_file_path(name, parameter): content for parameter, content in files.items()}
    for path in paths:
        parent = posixpath.dirname(path)
        while parent:
            if parent in paths:
                raise _refused(
                    name,
                    f"Invalid file parameter '{FILE_PREFIX}{path}', directory has been "
                    "created as a file",
                )
            parent = posixpath.dirname(parent)
    return Override(parsed, paths)


def _refused(name: str, reason: str) -> RepositoryPollError:
    return RepositoryPollError(f"{POLL_FAILED.format(name=name)}: {reason}")


def _check_name(name: str) -> None:
    """The name becomes a folder's: nothing that leaves the folder of overrides (Triton's rule,
    and, as in the repository, no hidden folder)."""
    if not name.strip() or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise InvalidInputError(
            f"invalid model name '{name}', model name must not contain path traversal characters"
        )


def _file_path(name: str, parameter: str) -> str:
    """The path of a `file:` parameter inside the model folder, normalised."""
    relative = parameter[len(FILE_PREFIX) :]
    path = posixpath.normpath(relative) if relative else ""
    if (
        not path
        or "\0" in path
        or path.startswith("/")
        or path in (".", "..")
        or path.startswith("../")
    ):
        raise _refused(
            name, f"Invalid file parameter '{parameter}' must stay within model directory."
        )
    if path == CONFIG_FILE:
        raise _refused(
            name,
            f"Invalid file parameter '{parameter}': the model configuration is the "
            f"'{CONFIG_PARAMETER}' parameter",
        )
    if any(len(part.encode()) > NAME_MAX for part in path.split("/")):
        raise _refused(
            name, f"Invalid file parameter '{parameter}': a name is longer than {NAME_MAX} bytes"
        )
    return path


def config_only(folder: Path) -> bool:
    """The override in `folder` replaces the config alone: the files are the repository's."""
    return [p.name for p in folder.iterdir()] == [CONFIG_FILE]


class OverrideFolders:
    """The server's own folder of overridden models.

    `ROOT/NAME` holds the override NAME serves now (a restarted worker loads it);
    `ROOT/.load-TOKEN/NAME` one being loaded: it replaces `ROOT/NAME` once every worker
    serves it (keep), or is removed (discard). A folder with config.pbtxt alone overrides
    the config; with files, it is the whole model folder, as in Triton.

    `root`: a folder every worker reads (in the run folder); None for a lone server, which
    creates a temporary folder on its first override and removes it on close.
    """

    def __init__(self, root: Path | None = None) -> None:
        self._root = root
        self._owned = False

    @property
    def root(self) -> Path | None:
        return self._root

    def stage(self, name: str, override: Override) -> Path:
        """Write `override` into a new folder named `name`; returns it."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="imgserve-overrides-"))  # mode 0700
            self._owned = True
        self._root.mkdir(mode=0o700, exist_ok=True)
        folder = self._root / f"{_STAGING}{secrets.token_hex(8)}" / name
        folder.mkdir(parents=True)
        (folder / CONFIG_FILE).write_text(format_config(override.config), encoding="utf-8")
        for path, content in override.files.items():
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        return folder

    def current(self, name: str) -> Path | None:
        """The override `name` serves now, or None when it serves from the repository."""
        if self._root is None or not name or name.startswith("."):
            return None
        folder = self._root / name
        return folder if folder.is_dir() else None

    def keep(self, name: str, staged: Path | None) -> None:
        """`name` now serves `staged` (None: the repository again): it becomes the current
        override, and the one before is removed."""
        self.drop(name)
        if staged is not None:
            assert self._root is not None
            staged.rename(self._root / name)
            staged.parent.rmdir()

    def drop(self, name: str) -> None:
        """`name` serves no override any more (unloaded, or loaded from the repository)."""
        current = self.current(name)
        if current is not None:
            shutil.rmtree(current, ignore_errors=True)

    def discard(self, staged: Path) -> None:
        """Remove a staged override that no worker serves."""
        shutil.rmtree(staged.parent, ignore_errors=True)

    def close(self) -> None:
        if self._owned and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
