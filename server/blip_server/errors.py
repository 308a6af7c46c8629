"""The operator's errors: what stops `blip-serve` or `blip-export`, each message saying what is wrong and what to do.

(A caller's failures, and their gRPC status codes, are the gateway's: `blip_server.gateway.status_mapping`.)
"""


class BlipServerError(Exception):
    """Base class: a failure with a message meant for the operator."""


class ExportError(BlipServerError):
    """A checkpoint cannot be exported (not BLIP captioning, missing files, failed verification)."""


class ModelNotFoundError(BlipServerError):
    """`--model` names neither a checkpoint nor an exported model repository."""


class TritonStartError(BlipServerError):
    """The embedded Triton server did not become ready; the message carries its log tail."""
