"""Avro codec shared by every producer and consumer.

Default wire format is Avro *single-object encoding* (``C3 01`` + 8-byte little-endian
CRC-64-AVRO fingerprint of the writer schema + body): a consumer picks the writer schema from
the local set by fingerprint, so no schema registry has to run next to a shop's cameras. For
sites that run a Confluent Schema Registry, the registry wire format (``00`` + 4-byte
big-endian id) is decoded too when the codec is given an id → schema mapping.

Readers resolve every known writer version into their own reader schema (Avro schema
resolution), which is what makes old-writer → new-reader and new-writer → old-reader work as
long as fields are only added with defaults.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema

AVRO_DIR = Path(__file__).resolve().parent / "avro"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
_HEADER_LEN = len(SINGLE_OBJECT_MAGIC) + 8


class CodecError(ValueError):
    """A payload that cannot be decoded; ``error_type`` is the stable class used in dead letters."""

    error_type = "undecodable"


class NotAvroError(CodecError):
    error_type = "not_avro"


class UnknownSchemaError(CodecError):
    error_type = "unknown_schema"


class CorruptPayloadError(CodecError):
    error_type = "corrupt_payload"


def load_schema_file(path: Path) -> dict[str, Any]:
    """Parse one ``.avsc`` file; fastavro resolves named types inside it."""
    return fastavro.parse_schema(json.loads(path.read_text()))


def fingerprint(parsed: Mapping[str, Any]) -> bytes:
    """CRC-64-AVRO fingerprint as the 8 little-endian bytes single-object encoding puts on the wire."""
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    # fastavro returns the digest bytes already in little-endian order, as hex.
    return bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


@dataclass(frozen=True)
class SchemaSet:
    """All writer schemas a process knows, by fingerprint: current ones plus ``avro/history``."""

    by_fingerprint: Mapping[bytes, dict[str, Any]] = field(default_factory=dict)
    current: Mapping[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, root: Path = AVRO_DIR) -> SchemaSet:
        by_fp: dict[bytes, dict[str, Any]] = {}
        current: dict[str, dict[str, Any]] = {}
        for path in sorted(root.glob("*.avsc")):
            parsed = load_schema_file(path)
            current[path.stem] = parsed
            by_fp[fingerprint(parsed)] = parsed
        history = root / "history"
        if history.is_dir():
            for path in sorted(history.glob("*.avsc")):
                parsed = load_schema_file(path)
                by_fp[fingerprint(parsed)] = parsed
        return cls(by_fingerprint=by_fp, current=current)

    def with_schema(self, parsed: dict[str, Any]) -> SchemaSet:
        """A copy that also knows ``parsed`` as a writer schema (e.g. fetched from a registry)."""
        return SchemaSet({**self.by_fingerprint, fingerprint(parsed): parsed}, self.current)


@cache
def default_schema_set() -> SchemaSet:
    return SchemaSet.from_dir()


class AvroCodec:
    """Encoder/decoder for one message type (``edge_frame``, ``reid_output``, ``dead_letter``).

    ``reader`` defaults to the current schema of that name; pass an older parsed schema to
    act as an old consumer. ``confluent_ids`` maps registry ids to writer schemas for the
    optional registry wire format.
    """

    def __init__(
        self,
        name: str,
        *,
        schemas: SchemaSet | None = None,
        writer: dict[str, Any] | None = None,
        reader: dict[str, Any] | None = None,
        confluent_ids: Mapping[int, dict[str, Any]] | None = None,
    ) -> None:
        self.schemas = schemas or default_schema_set()
        if name not in self.schemas.current and writer is None:
            known = ", ".join(sorted(self.schemas.current))
            raise KeyError(f"unknown message type {name!r}; known: {known}")
        self.name = name
        self.writer = writer or self.schemas.current[name]
        self.reader = reader or self.schemas.current.get(name, self.writer)
        self._writer_header = SINGLE_OBJECT_MAGIC + fingerprint(self.writer)
        self._reader_name = self.reader["name"]
        self._known = dict(self.schemas.by_fingerprint)
        self._known[fingerprint(self.writer)] = self.writer
        self._confluent = dict(confluent_ids or {})

    @property
    def writer_fingerprint(self) -> bytes:
        return self._writer_header[2:]

    def encode(self, record: Mapping[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(self._writer_header)
        fastavro.schemaless_writer(buf, self.writer, record)
        return buf.getvalue()

    def decode(self, data: bytes) -> dict[str, Any]:
        """Decode one message or raise a :class:`CodecError` saying what is wrong with it."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise NotAvroError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < _HEADER_LEN:
                raise CorruptPayloadError(f"{len(data)} bytes: shorter than the single-object header")
            fp = data[2:_HEADER_LEN]
            writer = self._known.get(fp)
            if writer is None:
                raise UnknownSchemaError(
                    f"writer schema fingerprint {fp.hex()} is not known to this {self.name} reader; "
                    "add the writer's .avsc to schemas/avro/history or upgrade the consumer"
                )
            body_start = _HEADER_LEN
        elif data[:1] == CONFLUENT_MAGIC and len(data) >= 5 and self._confluent:
            schema_id = int.from_bytes(data[1:5], "big")
            writer = self._confluent.get(schema_id)
            if writer is None:
                raise UnknownSchemaError(f"schema registry id {schema_id} is not known to this reader")
            body_start = 5
        else:
            raise NotAvroError(
                f"no Avro single-object marker (first bytes {data[:4].hex() or 'empty'}, length {len(data)})"
            )
        if writer["name"] != self._reader_name:
            raise UnknownSchemaError(
                f"message is a {writer['name']}, this reader decodes {self._reader_name}"
            )
        buf = io.BytesIO(data)
        buf.seek(body_start)
        try:
            record = fastavro.schemaless_reader(buf, writer, self.reader)
        except (EOFError, ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError,
                OverflowError, MemoryError, StopIteration) as exc:
            # (fastavro names the buffer object in its messages: its address would make each reason unique)
            detail = str(exc).replace(repr(buf), "the body")
            why = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
            raise CorruptPayloadError(f"Avro body does not match {writer['name']}: {why}") from exc
        if buf.tell() != len(data):
            # fastavro reads short byte fields without complaint: a truncated or padded payload
            # shows up as a length mismatch, which we refuse rather than pass on half a frame.
            raise CorruptPayloadError(
                f"Avro body length mismatch: consumed {buf.tell()} of {len(data)} bytes"
            )
        return record  # type: ignore[return-value]
