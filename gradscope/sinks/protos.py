"""The few TensorBoard protocol buffers gradscope builds itself.

``SummaryWriter.add_scalar`` makes one event per value (about 55 microseconds each, most of it
Python); a flush of a 50-layer model writes thousands. One ``Summary`` holding every value of a step
is one event: the same tags and steps for TensorBoard's readers, a fraction of the cost, still one
event file (``add_scalars`` would make a file per tag). The other helpers wrap strings (the
custom-scalars layout, gradscope's JSON records) the way TensorBoard's plugins expect them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["json_summary", "layout_summary_proto", "scalars_summary", "text_summary"]


def scalars_summary(values: Iterable[tuple[str, float]]) -> object:
    """One ``Summary`` with a ``simple_value`` per ``(tag, value)``, as ``add_scalar`` writes them."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values])


def _string_tensor_summary(tag: str, plugin_name: str, payload: bytes, *, data_class: int = 0) -> object:
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=plugin_name), data_class=data_class)
    tensor = TensorProto(dtype="DT_STRING", string_val=[payload], tensor_shape=TensorShapeProto())
    return Summary(value=[Summary.Value(tag=tag, tensor=tensor, metadata=meta)])


def layout_summary_proto(layout: Any) -> object:
    """The ``Summary`` that carries a custom-scalars ``Layout`` (what the Custom Scalars plugin reads)."""
    from tensorboard.plugins.custom_scalar import metadata

    return _string_tensor_summary(
        metadata.CONFIG_SUMMARY_TAG,
        metadata.PLUGIN_NAME,
        layout.SerializeToString(),
    )


def json_summary(tag: str, plugin_name: str, text: str) -> object:
    """A string tensor of a plugin TensorBoard does not display: machine-readable records."""
    # Data class "tensor": TensorBoard's loaders (the default fast data server included) keep only summaries
    # whose data class they know, so without it the gradscope tab could not read these records.
    from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_TENSOR

    return _string_tensor_summary(tag, plugin_name, text.encode("utf-8"), data_class=DATA_CLASS_TENSOR)


def text_summary(tag: str, markdown: str) -> object:
    """Markdown for TensorBoard's Text dashboard under exactly ``tag`` (``add_text`` appends ``/text_summary``)."""
    return _string_tensor_summary(tag, "text", markdown.encode("utf-8"))
