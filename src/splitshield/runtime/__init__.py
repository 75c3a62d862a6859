"""Deployment runtime: the pieces that move features between edge and cloud.

The server (:mod:`splitshield.runtime.server`, needs the ``[serve]`` extra) is not imported here, so
the edge side works without FastAPI installed.
"""

from .client import EdgeClient, ServerError, load_images, read_token
from .codec import CodecOptions, decode, encode, read_header
from .transcript import TranscriptWriter, read_features, read_records

__all__ = [
    "CodecOptions",
    "EdgeClient",
    "ServerError",
    "TranscriptWriter",
    "decode",
    "encode",
    "load_images",
    "read_features",
    "read_header",
    "read_records",
    "read_token",
]
