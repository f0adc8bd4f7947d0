"""The server's one root config: Kafka, batching, models, identity matching, vectors, analytics store.

Defaults are the embedded setup (broker on 127.0.0.1:9092, Qdrant local mode and SQLite under
./var/server) so ``python -m server run`` works with no file at all; production overrides the
broker, ``vectors`` (Qdrant server URL) and ``store.url`` (PostgreSQL). Validators do no I/O.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from common.configfile import StrictModel
from schemas.topics import REID_DLQ, REID_INPUT, REID_OUTPUT
from server.attributes import IntelGenderConfig
from server.embed.base import IntelReidConfig, OsnetOpenVinoConfig, OsnetTorchConfig


class KafkaSettings(StrictModel):
    """Consumer-group settings. Only the knobs that matter for this workload are exposed; the rest
    come from :func:`common.kafka.consumer_config` (fetch sizes sized for 20 MB messages)."""

    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers (host:port[,host:port]).")
    group_id: str = Field("reidfleet-server", min_length=1, description="Consumer group; scale out by "
                          "starting more consumers with the same group (up to the reid_input partition count).")
    client_id: str = Field("reidfleet-server", min_length=1)
    input_topic: str = REID_INPUT
    output_topic: str = REID_OUTPUT
    dlq_topic: str = REID_DLQ
    session_timeout_ms: int = Field(
        6_000, ge=3_000, le=300_000,
        description="How fast a dead consumer's partitions move to a live one. Joins take ~half of it on tansu.")
    max_poll_interval_ms: int = Field(
        300_000, ge=10_000, le=3_600_000,
        description="Longest gap between polls before the group evicts us: a cold model load or a slow GPU "
                    "batch must fit well inside.")
    fetch_max_wait_ms: int = Field(20, ge=0, le=1_000, description="Broker-side wait for fetch.min.bytes; kept "
                                   "small so the batching deadline, not the fetch, bounds latency.")
    produce_results: bool = Field(True, description="Write reid_output messages (one per edge frame).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Raw librdkafka overrides (e.g. security).")


class BatchSettings(StrictModel):
    """Dynamic batching across cameras: a batch closes at ``max_crops`` crops, ``max_messages`` messages
    or ``max_wait_ms`` after its first message, whichever comes first."""

    max_crops: int = Field(512, ge=1, le=65_536, description="Crops per embedding batch (GPU: 512-4096).")
    max_messages: int = Field(2_000, ge=1, le=100_000)
    max_wait_ms: float = Field(50.0, ge=0.0, le=10_000.0, description="Latency deadline of a batch.")
    decode_threads: int = Field(0, ge=0, le=256, description="JPEG decode threads (0 = allowed CPUs).")
    pipelined_commit: bool = Field(True, description="Commit a batch (SQL, Qdrant mirror hand-off, reid_output) on "
                                   "a writer thread while the next batch is collected and matched; offsets are still "
                                   "stored strictly in order and only after their batch committed.")
    commit_queue: int = Field(2, ge=1, le=8, description="Batches handed to the commit stage (the commit process "
                              "or thread) before the consumer waits for the oldest to be durable. Above 1 the "
                              "matcher does not stall on one slow commit (an fsync, a broker ack); a batch after a "
                              "failed one is never committed, and offsets are still stored strictly in order.")
    gpu_jpeg: bool = Field(True, description="When the embedder runs on CUDA with nvJPEG and gender is off, hand "
                           "it the JPEG bytes (decoded and resized on the GPU) instead of decoding on the CPU; "
                           "a batch with a crop nvJPEG rejects is redone on the CPU path.")
    overlap: bool = Field(False, description="Decode and embed the next batch in a worker thread while this one is "
                          "matched and stored (offsets are still stored strictly in batch order).")
    prepare_ahead: int = Field(1, ge=1, le=4, description="With overlap: batches collected and queued for the "
                               "prepare worker beyond the one being matched. 2 keeps the worker busy when one "
                               "batch's matching outlasts the next one's embedding; each costs a batch of memory; "
                               "on a partition revoke the queued messages of that partition are dropped unmatched "
                               "(their next owner fetches them again).")
    commit_process: bool = Field(False, description="Commit each batch (SQL transaction, reid_output, dead letters) "
                                 "in a child process (server/writer.py) while the next batch is matched, instead of "
                                 "on a writer thread that shares the matcher's GIL; same order and offset rules.")
    embed_process: bool = Field(False, description="Run the embedder in a child process (server/embed/remote.py): on "
                                "a GPU box its host work then no longer shares the matcher's GIL. Use with overlap.")
    embed_workers: int = Field(1, ge=1, le=16, description="Child processes of the embedder (with embed_process): "
                               "a large batch is split between them. On a GPU each decodes its part's JPEGs with "
                               "nvJPEG, whose entropy decoding runs on one CPU thread per process: 2-3 workers "
                               "keep a 10k crops/s stream fed.")
    switch_interval_ms: float | None = Field(None, gt=0.0, le=100.0, description="The interpreter's thread switch "
                                             "interval (sys.setswitchinterval) while the consumer runs; None keeps "
                                             "Python's 5 ms. Every blocking call (a pipe read, a Kafka poll) hands "
                                             "the GIL to the other thread, and getting it back waits up to this long "
                                             "while the other computes.")
    remote_intake: bool = Field(True, description="With embed_process and gender off: the embedder processes also "
                                "decode and check the raw messages (server/intake.py), and send back records "
                                "without JPEG bytes; the consumer's interpreter keeps to matching. A batch then "
                                "closes at max_crops crops as estimated from message sizes.")


class ValidationSettings(StrictModel):
    """What counts as an absurd edge frame (such frames go to the dead-letter topic with the reason)."""

    max_frame_side_px: int = Field(16_384, ge=64)
    box_tolerance_frac: float = Field(0.02, ge=0.0, le=0.5, description="How far a box may poke out of the "
                                      "frame, as a fraction of the frame size (detectors overshoot a little).")
    max_detections: int = Field(2_000, ge=1)
    max_crops: int = Field(500, ge=1)
    max_crop_bytes: int = Field(8 * 1024 * 1024, ge=1_024)
    min_crop_side_px: int = Field(4, ge=1)
    max_clock_skew_s: float = Field(86_400.0, ge=0.0, description="captured_at_us may lie at most this far in "
                                    "the future of the server's clock.")
    min_captured_at_us: int = Field(946_684_800_000_000, description="Earliest plausible capture time "
                                    "(default 2000-01-01).")


GenderMode = Literal["off", "filter", "soft"]


class GenderSettings(StrictModel):
    """Gender in matching: ``off`` ignores it, ``filter`` drops candidates confidently of the other gender,
    ``soft`` adds ``soft_weight * gender_agreement`` to the cosine score (default: a single crop is
    ~81 % right, so a hard filter throws away true matches; see DESIGN.md)."""

    mode: GenderMode = "soft"
    model: IntelGenderConfig = Field(default_factory=IntelGenderConfig)
    soft_weight: float = Field(0.02, ge=0.0, le=1.0, description="Weight of the log-odds agreement term.")
    filter_confidence: float = Field(0.8, gt=0.5, lt=1.0, description="filter mode: both the track's and the "
                                     "identity's probability must be at least this sure (or 1 - it) to exclude.")


class IdentitySettings(StrictModel):
    """Per-track matching against the gallery of global identities."""

    match_threshold: float | None = Field(None, ge=-1.0, le=1.0, description="Cosine (plus gender term) at or "
                                          "above which a track joins an existing identity; below it a new identity "
                                          "is made. None = the value measured for the configured embedder "
                                          "(server/embed/calibration.py): cosine scales differ by model.")
    prototypes_per_identity: int = Field(8, ge=1, le=256, description="Bank size: one fused vector per track, "
                                         "the oldest evicted first.")
    candidates: int = Field(16, ge=1, le=1_000, description="Gallery neighbours examined per query.")
    retention_s: float = Field(24 * 3600.0, gt=0.0, description="Identities unseen this long (event time) "
                               "leave the gallery; analytics rows stay.")
    expiry_interval_s: float = Field(60.0, gt=0.0)
    min_crop_quality: float = Field(0.0, ge=0.0, le=1.0, description="Crops below this best-shot quality are "
                                    "not embedded (the track waits for a better one).")
    exclude_co_visible: bool = Field(True, description="Two tracks on the same camera at the same time are two "
                                     "people: never join a track to an identity visible there right now.")
    co_visible_gap_s: float = Field(1.0, ge=0.0, description="How recent 'right now' is for exclude_co_visible.")
    track_resume_gap_s: float = Field(60.0, gt=0.0, description="A local track id seen again after this long "
                                      "(or after it ended) is a new track: appliances reuse ids after restarts.")
    rematch_new_identities: bool = Field(True, description="A track that founded its identity alone re-queries "
                                         "the gallery when a better crop arrives and joins an existing identity "
                                         "if it now matches (fixes identities split by a poor first crop).")


class QdrantLocalSettings(StrictModel):
    type: Literal["qdrant_local"] = "qdrant_local"
    path: str = Field("./var/server/qdrant", description="Qdrant local-mode folder (one process per folder).")
    collection: str | None = Field(None, description="None = reid_<embedder model id>: vectors of different "
                                   "models are not comparable, so each model gets its own gallery.")
    cache: bool = Field(True, description="Serve searches from an exact in-memory copy loaded from the analytics "
                        "store; Qdrant becomes an asynchronous mirror (local mode is slow past ~20k points and "
                        "writes ~8 ms a point). Single consumer process only.")
    mirror_max_pending: int = Field(50_000, ge=1, description="Prototype changes the Qdrant mirror may lag "
                                    "behind before the consumer waits for it (memory bound, ~1-2 KB a point).")
    mirror_process: bool = Field(True, description="With cache: the Qdrant mirror runs in a child process of its "
                                 "own, not as a thread of the consumer (qdrant-client is Python: as a thread it "
                                 "took the interpreter from the matcher; measured on an H200 box, 7.3k against "
                                 "8.3k crops/s). False: one process, a thread.")


class QdrantServerSettings(StrictModel):
    type: Literal["qdrant_server"] = "qdrant_server"
    url: str = Field("http://127.0.0.1:6333", description="Qdrant server URL.")
    api_key_env: str | None = Field(None, description="Name of the env variable holding the API key.")
    collection: str | None = Field(None, description="None = reid_<embedder model id>.")
    cache: bool = Field(False, description="In-memory copy in front, Qdrant an asynchronous mirror; only safe "
                        "with a single consumer.")
    mirror_max_pending: int = Field(50_000, ge=1, description="See qdrant_local.mirror_max_pending.")
    mirror_process: bool = Field(True, description="See qdrant_local.mirror_process.")
    timeout_s: float = Field(10.0, gt=0)


class MemorySettings(StrictModel):
    """No Qdrant: exact in-memory search over the prototypes kept in the analytics store (loaded at start).
    The fastest option for one consumer; the dashboard's search-by-image needs a Qdrant backend."""

    type: Literal["memory"] = "memory"


VectorSettings = Annotated[QdrantLocalSettings | QdrantServerSettings | MemorySettings, Field(discriminator="type")]


class StoreSettings(StrictModel):
    url: str = Field("sqlite:///./var/server/analytics.db", description="SQLAlchemy URL: sqlite:///path "
                     "(WAL mode) or postgresql+psycopg://user@host/db (password via env).")
    sighting_bucket_s: int = Field(10, ge=1, le=3_600, description="Sightings are kept per track per bucket.")

    @field_validator("url")
    @classmethod
    def _dialect(cls, v: str) -> str:
        if not (v.startswith("sqlite") or v.startswith("postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return v


EmbedderSettings = Annotated[OsnetTorchConfig | OsnetOpenVinoConfig | IntelReidConfig, Field(discriminator="type")]


class HealthSettings(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(9310, ge=0, le=65_535, description="0 = any free port.")


class ServerConfig(StrictModel):
    """Root config of ``python -m server``."""

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    embedder: EmbedderSettings = Field(default_factory=IntelReidConfig)
    gender: GenderSettings = Field(default_factory=GenderSettings)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    vectors: VectorSettings = Field(default_factory=QdrantLocalSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    assets: str | None = Field(None, description="Shared assets folder (default ../shared/assets or "
                               "$REIDFLEET_ASSETS).")
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _topics_differ(self) -> ServerConfig:
        k = self.kafka
        if len({k.input_topic, k.output_topic, k.dlq_topic}) != 3:
            raise ValueError("kafka.input_topic, output_topic and dlq_topic must be three different topics")
        return self
