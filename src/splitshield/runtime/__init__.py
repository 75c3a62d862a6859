"""Deployment runtime: the pieces that move features between edge and cloud.

:func:`export` turns a checkpoint into an edge artifact (head + defense, for the device) and a cloud
artifact (tail only, for the server); :mod:`.artifacts` documents both and their shared fingerprint.

The server (:mod:`splitshield.runtime.server`, needs the ``[serve]`` extra) is not imported here, so
the edge side works without FastAPI installed.
"""

from .artifacts import Exported, artifact_kind, export, load_cloud, load_edge
from .client import EdgeClient, ServerError, load_images, read_token
from .codec import CodecOptions, decode, encode, read_header
from .transcript import TranscriptWriter, read_features, read_records

__all__ = [
    "CodecOptions",
    "EdgeClient",
    "Exported",
    "ServerError",
    "TranscriptWriter",
    "artifact_kind",
    "decode",
    "encode",
    "export",
    "load_cloud",
    "load_edge",
    "load_images",
    "read_features",
    "read_header",
    "read_records",
    "read_token",
]
