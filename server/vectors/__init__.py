"""Identity-prototype vector stores behind one Protocol (Qdrant local/server, in-memory numpy)."""

from server.vectors.base import Neighbour, Prototype, VectorStore, build_vectors

__all__ = ["Neighbour", "Prototype", "VectorStore", "build_vectors"]
