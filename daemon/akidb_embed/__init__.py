"""akidb-embed: an on-device embedding daemon serving ONNX models over a ZeroMQ Unix socket."""

__version__ = "0.1.0"
