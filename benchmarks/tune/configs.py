"""A setting as config.pbtxt text: the model's own file with only the tuned values changed.

The per-model dimensions a setting changes are edited into the operator's text
(modelrepo.config_edit), so comments and the fields this server does not read stay as they
were; the result is parsed back and must equal the original with those values set, or the
edit is refused. The text the tuner measures is the text --apply writes.
"""

from __future__ import annotations

from benchmarks.tune.space import Setting
from modelrepo.config import ModelConfig, parse_config
from modelrepo.config_edit import (
    ConfigEditError,
    set_instance_count,
    set_parameter,
    set_value,
)
from modelrepo.layout import INTRA_OP_THREADS_PARAMETER
from server.core.repository import ModelSpec
from wire import model_config_pb2


def current_setting(spec: ModelSpec, workers: int) -> Setting:
    """The setting the server serves the model with now (as server.core.repository reads it)."""
    return Setting(
        workers=workers,
        instances=spec.instance_count,
        threads=spec.intra_op_threads,
        max_batch_size=spec.max_batch_size,
        max_queue_delay_us=spec.max_queue_delay_us,
    )


def render(text: str, start: Setting, setting: Setting) -> str:
    """`text` (the config of `start`) with the per-model values in which `setting` differs.

    Raises ConfigEditError when the text cannot hold them (say, several instance groups) or
    the edit did not come out as intended.
    """
    edited = text
    expected = parse_config(text)
    if setting.max_batch_size != start.max_batch_size:
        edited = set_value(edited, ("max_batch_size",), str(setting.max_batch_size))
        expected.max_batch_size = setting.max_batch_size
    if setting.max_queue_delay_us != start.max_queue_delay_us:
        path = ("dynamic_batching", "max_queue_delay_microseconds")
        edited = set_value(edited, path, str(setting.max_queue_delay_us))
        expected.dynamic_batching.max_queue_delay_microseconds = setting.max_queue_delay_us
    if setting.instances != start.instances:
        edited = set_instance_count(edited, setting.instances)
        _set_count(expected, setting.instances)
    if setting.threads != start.threads:
        edited = set_parameter(edited, INTRA_OP_THREADS_PARAMETER, str(setting.threads))
        expected.parameters[INTRA_OP_THREADS_PARAMETER].string_value = str(setting.threads)
    if parse_config(edited) != expected:
        raise ConfigEditError(f"editing config.pbtxt for {setting.key} changed other values")
    return edited


def _set_count(config: ModelConfig, count: int) -> None:
    if config.instance_group:
        config.instance_group[0].count = count
    else:
        config.instance_group.add(count=count, kind=model_config_pb2.ModelInstanceGroup.KIND_AUTO)
