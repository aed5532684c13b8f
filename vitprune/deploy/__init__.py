"""Export and measurement: ONNX (``onnx``), the ``.pt2`` (``pt2``), ONNX Runtime latency (``bench``) and
all-or-nothing output files (``outputs``)."""

#: The lowest opset the dynamo exporter emits without a (lossy) version conversion. Here, not in
#: ``onnx``, so the CLI's help can show it without importing the exporter.
DEFAULT_OPSET = 18
