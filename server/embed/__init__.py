"""Person appearance embedders (OSNet in torch or OpenVINO, Intel OMZ Re-ID IRs) behind one Protocol."""

from server.embed.base import Embedder, EmbedderConfig, build_embedder

__all__ = ["Embedder", "EmbedderConfig", "build_embedder"]
