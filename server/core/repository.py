"""Reads the model repository: model folders, config, labels, version policy, file paths.

Everything here is plain file reading and checking against the repository contract
(modelrepo.layout); nothing loads a runtime. Problems raise RepositoryError whose
message is the reason shown in the model's state: clients read it, so it names files
relative to the repository, never by their path on the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelrepo.config import ConfigError, ModelConfig, load_config
from modelrepo.layout import (
    CONFIG_FILE,
    INTRA_OP_THREADS_PARAMETER,
    MODEL_FILES,
    PLATFORM_ONNX,
    PLATFORM_TORCHSCRIPT,
    REFERENCE_FILE,
    TRAINING_DATASET_PARAMETER,
    list_versions,
    read_labels,
)
from modelrepo.precision import PrecisionError, precision_of
from server.config import Settings
from server.core.autocomplete import AutoCompleteError, complete_config, folder_platform
from server.core.imagemodel import ImageModel, image_model, is_own_export
from server.core.overrides import config_only
from server.core.queues import QueuePolicy, SchedulePolicy
from server.core.signature import Signature, SignatureError, from_config
from server.errors import ModelNotFoundError
from wire import model_config_pb2

# Triton's backend names, accepted where a config names a backend instead of a platform.
_BACKENDS = {"onnxruntime": PLATFORM_ONNX, "pytorch": PLATFORM_TORCHSCRIPT}
_KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU
# More intra-op threads than this per instance is a typo, not a setting.
MAX_INTRA_OP_THREADS = 1024


class RepositoryError(Exception):
    """A model folder that does not meet the repository contract; str() is the reason."""


@dataclass(frozen=True)
class ModelSpec:
    """What the server needs to load one model, as read (and defaulted) from its folder."""

    name: str
    directory: Path
    config: ModelConfig  # max_batch_size and dynamic_batching filled from Settings when unset
    platform: str
    signature: Signature
    labels: dict[str, list[str]]  # output name -> class names (outputs with a label_filename)
    image: ImageModel | None  # how to feed it images, when it is an image classifier
    max_batch_size: int  # 0: no batch dimension, requests run one at a time
    max_queue_delay_us: int
    schedule: SchedulePolicy  # dynamic_batching's priority levels and queue policies
    instance_count: int
    # Threads of each runtime instance: the config's intra_op_thread_count (onnxruntime
    # models), else the server's --intra-op-threads.
    intra_op_threads: int
    device_pref: str  # "auto" | "cpu" | "cuda"
    versions: tuple[int, ...]  # versions to load, ascending
    missing_versions: tuple[int, ...]  # versions the policy names that have no folder

    def model_path(self, version: int) -> Path:
        filename = self.config.default_model_filename or MODEL_FILES[self.platform]
        return self.directory / str(version) / filename

    def reference_path(self, version: int) -> Path:
        return self.directory / str(version) / REFERENCE_FILE

    def shown(self, path: Path) -> str:
        """`path` as callers may see it: relative to the repository ("name/1/model.onnx")."""
        return path.relative_to(self.directory.parent).as_posix()

    @property
    def training_dataset(self) -> str:
        """The dataset export recorded in config.pbtxt; "" when it recorded none."""
        parameters = self.config.parameters
        if TRAINING_DATASET_PARAMETER not in parameters:
            return ""
        return parameters[TRAINING_DATASET_PARAMETER].string_value

    @property
    def precision(self) -> str:
        """fp32, fp16 or int8, as export recorded in config.pbtxt (fp32 when it recorded none).
        read_model() has checked the value."""
        return precision_of(self.config)


# A filesystem's own folder at the root of a volume (ext4 creates it), never a model: on a
# mounted volume it would otherwise show up as a model that fails to load, forever.
NOT_MODELS = frozenset({"lost+found"})


def model_names(repository: Path) -> list[str]:
    """Every model folder of the repository (hidden folders, files and lost+found ignored)."""
    if not repository.is_dir():
        return []
    return sorted(
        p.name
        for p in repository.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_MODELS
    )


def model_dir(repository: Path, name: str) -> Path:
    """The folder of model `name`; ModelNotFoundError when there is none."""
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ModelNotFoundError(f"invalid model name {name!r}")
    directory = repository / name
    if not directory.is_dir():  # no path in the message: it goes to clients
        raise ModelNotFoundError(f"no model {name!r} in the repository")
    return directory


def select_versions(
    policy: model_config_pb2.ModelVersionPolicy, available: list[int]
) -> tuple[list[int], list[int]]:
    """Triton's version policy: (versions to load, versions asked for but absent).

    Default (no policy) is the latest version only.
    """
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return list(available), []
    if choice == "specific":
        wanted = sorted(set(policy.specific.versions))
        return [v for v in wanted if v in available], [v for v in wanted if v not in available]
    count = max(policy.latest.num_versions, 1) if choice == "latest" else 1
    return list(available[-count:]), []


def read_model(
    repository: Path, name: str, settings: Settings, override: Path | None = None
) -> ModelSpec:
    """Read and check one model folder. Raises ModelNotFoundError or RepositoryError.

    `override`: a load's override folder (server.core.overrides): its config.pbtxt replaces
    the repository's, and its files, when it has any, the whole model folder.
    """
    if override is None or config_only(override):
        directory = model_dir(repository, name)
    else:
        directory = override
    config_dir = directory if override is None else override
    complete = not settings.disable_auto_complete_config
    found = (config_dir / CONFIG_FILE).exists()
    try:
        # As in Triton, a folder without config.pbtxt is auto-completed unless that is off.
        config = (
            load_config(config_dir / CONFIG_FILE, shown=f"{name}/{CONFIG_FILE}")
            if found or not complete
            else ModelConfig()
        )
    except ConfigError as exc:
        off = "" if found else " (auto-complete is off: --disable-auto-complete-config)"
        raise RepositoryError(f"bad config: {exc}{off}") from None
    if config.name and config.name != name:
        raise RepositoryError(f"{CONFIG_FILE} names the model {config.name!r}, its folder {name!r}")
    config.name = name
    if complete:
        try:
            config = complete_config(config, directory, folder_platform(config, directory))
        except AutoCompleteError as exc:
            raise RepositoryError(str(exc)) from None
    platform = _platform(config)
    try:
        precision_of(config)
    except PrecisionError as exc:
        raise RepositoryError(f"{CONFIG_FILE} parameters: {exc}") from None
    scheduling = config.WhichOneof("scheduling_choice")
    if scheduling in ("sequence_batching", "ensemble_scheduling"):
        what = "stateful (sequence_batching)" if scheduling == "sequence_batching" else "ensemble"
        raise RepositoryError(
            f"{what} models are not served: each request here is answered on its own by one "
            "ONNX or TorchScript model"
        )
    if config.max_batch_size < 0:
        raise RepositoryError(f"max_batch_size cannot be negative ({config.max_batch_size})")
    if config.max_batch_size == 0 and is_own_export(config):
        # Our own exports before max_batch_size was written: batch as the server's default.
        config.max_batch_size = settings.max_batch_size
    try:
        signature = from_config(config)
    except SignatureError as exc:
        raise RepositoryError(f"{CONFIG_FILE}: {exc}") from None
    labels = _labels(directory, signature)
    try:
        image = image_model(config, signature)
    except ValueError as exc:  # the image-preparation keys; the message names the key
        raise RepositoryError(str(exc)) from None
    if config.max_batch_size > 0:
        config.dynamic_batching.SetInParent()  # a batching model always batches dynamically
        if config.dynamic_batching.max_queue_delay_microseconds == 0:
            # proto3 cannot tell 0 from unset: 0 means "the server's default".
            config.dynamic_batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    schedule = schedule_policy(config.dynamic_batching)
    groups = list(config.instance_group)
    if any(g.count < 0 for g in groups):
        raise RepositoryError("instance_group count cannot be negative")
    instance_count = sum(max(g.count, 1) for g in groups) if groups else 1
    cpu_only = bool(groups) and all(g.kind == _KIND_CPU for g in groups)
    threads = _intra_op_threads(config, platform, settings.intra_op_threads)
    available = list_versions(directory)
    versions, missing = select_versions(config.version_policy, available)
    if not versions and not missing:
        raise RepositoryError(f"no version folders (1, 2, ...) in {name}/")
    return ModelSpec(
        name=name,
        directory=directory,
        config=config,
        platform=platform,
        signature=signature,
        labels=labels,
        image=image,
        max_batch_size=config.max_batch_size,
        max_queue_delay_us=config.dynamic_batching.max_queue_delay_microseconds,
        schedule=schedule,
        instance_count=instance_count,
        intra_op_threads=threads,
        device_pref="cpu" if cpu_only else settings.device,
        versions=tuple(versions),
        missing_versions=tuple(missing),
    )


def schedule_policy(batching: model_config_pb2.ModelDynamicBatching) -> SchedulePolicy:
    """Triton's schedule policy of `dynamic_batching`, checked as Triton checks it.

    Without `default_queue_policy` the `timeout` parameter keeps its meaning here (override
    allowed, server.core.queues); a policy that is given is read as Triton reads it.
    """
    levels = batching.priority_levels
    default_level = batching.default_priority_level
    if levels and not 1 <= default_level <= levels:
        raise RepositoryError(
            f"dynamic_batching default_priority_level {default_level} must be in "
            f"[1, priority_levels {levels}]"
        )
    if not levels and default_level:
        raise RepositoryError("dynamic_batching default_priority_level needs priority_levels")
    for level in batching.priority_queue_policy:
        if not 1 <= level <= levels:
            raise RepositoryError(
                f"dynamic_batching priority_queue_policy level {level} must be in "
                f"[1, priority_levels {levels}]"
            )
    default = (
        _queue_policy(batching.default_queue_policy)
        if batching.HasField("default_queue_policy")
        else QueuePolicy()
    )
    per_level = {
        int(level): _queue_policy(policy)
        for level, policy in batching.priority_queue_policy.items()
    }
    return SchedulePolicy(int(levels), int(default_level), default, per_level)


def _queue_policy(policy: model_config_pb2.ModelQueuePolicy) -> QueuePolicy:
    return QueuePolicy(
        max_queue_size=policy.max_queue_size,
        default_timeout_us=policy.default_timeout_microseconds,
        allow_timeout_override=policy.allow_timeout_override,
        delay=policy.timeout_action == model_config_pb2.ModelQueuePolicy.DELAY,
    )


def _platform(config: ModelConfig) -> str:
    platform = config.platform or _BACKENDS.get(config.backend, "")
    if platform not in MODEL_FILES:
        shown = config.platform or config.backend or "(none)"
        raise RepositoryError(
            f"unsupported platform {shown!r} (expected {PLATFORM_ONNX} or {PLATFORM_TORCHSCRIPT})"
        )
    return platform


def _intra_op_threads(config: ModelConfig, platform: str, default: int) -> int:
    """Triton's onnxruntime backend parameter, for onnxruntime models; torch's thread pools
    belong to the process (server.runtimes.torchscript), so TorchScript models keep the
    server's setting, as Triton's pytorch backend ignores this key."""
    if platform != PLATFORM_ONNX or INTRA_OP_THREADS_PARAMETER not in config.parameters:
        return default
    text = config.parameters[INTRA_OP_THREADS_PARAMETER].string_value.strip()
    if not (text.isascii() and text.isdigit() and int(text) <= MAX_INTRA_OP_THREADS):
        raise RepositoryError(
            f"{CONFIG_FILE} parameters: {INTRA_OP_THREADS_PARAMETER} must be a number of "
            f"threads from 0 (onnxruntime's default) to {MAX_INTRA_OP_THREADS}, got {text!r}"
        )
    return int(text)


def _labels(directory: Path, signature: Signature) -> dict[str, list[str]]:
    """Class names of every output that names a label_filename (Triton: any output may)."""
    found = {}
    for spec in signature.outputs:
        if not spec.label_filename:
            continue
        path = directory / spec.label_filename
        shown = f"{directory.name}/{spec.label_filename}"
        try:
            found[spec.name] = read_labels(path)
        except OSError as exc:
            raise RepositoryError(f"cannot read labels {shown}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise RepositoryError(f"cannot read labels {shown}: not UTF-8 text") from None
        classes = spec.dims[-1] if spec.dims else 0
        if classes > 0 and len(found[spec.name]) != classes:
            raise RepositoryError(
                f"{shown} has {len(found[spec.name])} labels, the output has {classes} classes"
            )
    return found
