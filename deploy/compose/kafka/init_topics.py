"""Create the reidfleet Kafka topics on a production cluster, then check the live topics against the spec.

Run once per cluster (the compose ``kafka-init`` job does). The spec is ``schemas.topics.PRODUCTION_TOPICS``
itself, so the deployment cannot drift from what the code expects. Why a job and not broker auto-creation:
auto-created topics get the broker defaults (1 partition, no 20 MB limit, 7 days retention).

It waits until ``--min-brokers`` brokers are registered: creating RF-3 topics on a half-started cluster
fails, and lowering RF to fit would lose the durability the settings exist for. Existing topics are never
altered (an operator may have added partitions on purpose); the check afterwards fails on what would break
the system (fewer partitions than the spec, lower replication, min ISR or message size limits missing) and
warns on anything else that differs (retention tuned by hand).

Exit status: 0 topics exist and match, 1 a topic is unusable as configured, 2 the cluster never came up.
"""

from __future__ import annotations

import argparse
import sys
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource

from common.kafka import ensure_topics
from schemas.topics import PRODUCTION_TOPICS, TopicSpec

#: Settings whose absence breaks the system (the rest, e.g. retention, only warns when it differs).
CRITICAL_CONFIGS = ("min.insync.replicas", "max.message.bytes")


def wait_for_brokers(admin: AdminClient, min_brokers: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    seen = 0
    while True:
        try:
            seen = len(admin.list_topics(timeout=5).brokers)
        except KafkaException as exc:
            print(f"waiting for the cluster: {exc}", file=sys.stderr)
        if seen >= min_brokers:
            return seen
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {seen} of {min_brokers} brokers registered after {timeout_s:.0f} s")
        print(f"waiting for brokers: {seen}/{min_brokers}", file=sys.stderr)
        time.sleep(2)


def check_topics(admin: AdminClient, specs: list[TopicSpec]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of the live topics against ``specs``."""
    errors: list[str] = []
    warnings: list[str] = []
    md = admin.list_topics(timeout=10)
    for spec in specs:
        topic = md.topics.get(spec.name)
        if topic is None or topic.error is not None:
            errors.append(f"{spec.name}: missing ({topic.error if topic else 'not in metadata'})")
            continue
        partitions = len(topic.partitions)
        if partitions < spec.partitions:
            errors.append(f"{spec.name}: {partitions} partitions, spec says {spec.partitions}")
        elif partitions > spec.partitions:
            warnings.append(f"{spec.name}: {partitions} partitions (spec {spec.partitions}; scaled out by hand?)")
        rf = min(len(p.replicas) for p in topic.partitions.values())
        if rf < spec.replication_factor:
            errors.append(f"{spec.name}: replication factor {rf}, spec says {spec.replication_factor}")
    resources = [ConfigResource(ConfigResource.Type.TOPIC, s.name) for s in specs if s.name in md.topics]
    if not resources:
        return errors, warnings
    try:
        described = admin.describe_configs(resources, request_timeout=10)
    except KafkaException as exc:  # brokers without DescribeConfigs (the embedded dev broker)
        warnings.append(f"topic configs not checked: {exc}")
        return errors, warnings
    by_name = {s.name: s for s in specs}
    for res, fut in described.items():
        spec = by_name[res.name]
        try:
            live = {k: v.value for k, v in fut.result().items()}
        except KafkaException as exc:
            warnings.append(f"{res.name}: configs not checked: {exc}")
            continue
        for key, want in spec.config.items():
            have = live.get(key)
            if have == want:
                continue
            msg = f"{res.name}: {key}={have!r}, spec says {want!r}"
            (errors if key in CRITICAL_CONFIGS else warnings).append(msg)
    return errors, warnings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True, help="host:port[,host:port...]")
    p.add_argument("--min-brokers", type=int, default=3,
                   help="brokers that must be registered before topics are created (default 3 = RF)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="how long to wait for the brokers")
    p.add_argument("--single-broker", action="store_true",
                   help="dev/test only: create the topics with RF 1 and no min ISR (schemas.topics.for_single_broker)")
    args = p.parse_args(argv)
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    try:
        brokers = wait_for_brokers(admin, args.min_brokers, args.timeout_s)
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    specs = [s.for_single_broker() if args.single_broker else s for s in PRODUCTION_TOPICS]
    created = ensure_topics(args.bootstrap, specs, single_broker=False)
    print(f"{brokers} brokers; created {created or 'nothing (all topics existed)'}")
    errors, warnings = check_topics(admin, specs)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        return 1
    print("topics ok: " + ", ".join(f"{s.name} ({s.partitions}p, RF {s.replication_factor})" for s in specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
