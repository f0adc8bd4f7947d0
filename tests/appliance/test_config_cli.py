"""Config validation with key paths, live-settings merging, and the CLI's answers to bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.config import ApplianceConfig, load, merge_settings
from common.assets import REPO_ROOT, data_path
from common.configfile import ConfigError


def test_defaults_point_at_the_sample_video_and_local_broker() -> None:
    cfg = load()
    assert cfg.source.url == str(data_path("videos", "one-by-one-person-detection.mp4"))
    assert cfg.kafka.bootstrap == "127.0.0.1:9092" and cfg.kafka.topic == "reid_input"


def test_invalid_file_lists_every_problem_with_its_path(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("device_id: 'bad id/with slash'\nsource: {reconnect_initial_s: 10, reconnect_max_s: 1}\n"
                 "sending: {crop_jpeg_quality: 0}\nspool: {max_bytes: 2097152, segment_bytes: 2097152}\n"
                 "detector: {type: tensorrt}\nkafak: {}\n")
    with pytest.raises(ConfigError) as err:
        load(f)
    text = str(err.value)
    for path in ("device_id:", "source:", "sending.crop_jpeg_quality:", "spool:", "detector.type:", "kafak:"):
        assert path in text, (path, text)
    assert "reconnect_max_s must be >= reconnect_initial_s" in text and "unknown detector type" in text


def test_merge_settings_whole_or_nothing() -> None:
    cfg = ApplianceConfig()
    new = merge_settings(cfg, {"sending": {"mode": "full"}, "detector": {"conf_threshold": 0.4}})
    assert new.sending.mode == "full" and new.detector.conf_threshold == 0.4
    assert new.sending.crop_jpeg_quality == cfg.sending.crop_jpeg_quality
    with pytest.raises(ConfigError, match="spool: not live-tunable"):
        merge_settings(cfg, {"spool": {"dir": "/tmp"}})
    with pytest.raises(ConfigError, match="sending: expected a mapping"):
        merge_settings(cfg, {"sending": 3})


def test_cli_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--set", "sending.mode=track"]) == 0
    assert "config ok" in capsys.readouterr().out
    assert main(["check-config", "--set", "kafka.flush_timeout_s=-1"]) == 2
    assert "kafka.flush_timeout_s" in capsys.readouterr().err
    assert main(["check-config", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
    bad_yaml = tmp_path / "b.yaml"
    bad_yaml.write_text("source: [unclosed\n")
    assert main(["check-config", "--config", str(bad_yaml)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["print-config", "--set", "camera_id=door"]) == 0
    assert "camera_id: door" in capsys.readouterr().out


def test_cli_run_on_a_missing_video_exits_with_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "appliance", "run", "--set", f"source.url={tmp_path / 'cam.mp4'}",
         "--set", "http.port=0", "--set", f"spool.dir={tmp_path / 'spool'}", "--set", "kafka.flush_timeout_s=0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 1
    assert f"error: video file not found: {tmp_path / 'cam.mp4'}" in r.stderr


@pytest.mark.integration
def test_cli_sigterm_flushes_and_exits_cleanly(kafka_bootstrap: str, unique_topic_prefix: str,
                                               tmp_path: Path) -> None:
    """SIGTERM mid-video: exit 0, and every frame the loop processed is in Kafka (flushed, not lost)."""
    import json
    import signal
    import time

    from confluent_kafka import Consumer

    from common.kafka import consumer_config, ensure_topics
    from schemas.codec import AvroCodec
    from schemas.topics import TopicSpec

    topic = unique_topic_prefix + "sig"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 1, 1)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "run",
         "--set", f"source.url={data_path('videos', 'PETS09-S2L1_frames0001-0300.mp4')}",
         "--set", "source.realtime=true", "--set", f"kafka.bootstrap={kafka_bootstrap}",
         "--set", f"kafka.topic={topic}", "--set", "http.port=0", "--set", f"spool.dir={tmp_path / 'spool'}"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(12)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    final = [json.loads(line) for line in err.splitlines() if line.startswith("{") and '"stopped"' in line][-1]
    tele = json.loads(final["telemetry"])
    n = tele["frames_processed"]
    assert 0 < n < 300 and tele["kafka"]["spool_messages"] == 0
    c = Consumer(consumer_config(kafka_bootstrap, unique_topic_prefix + "g", "t", **{"enable.auto.offset.store": True}))
    c.subscribe([topic])
    codec = AvroCodec("edge_frame")
    got: list[int] = []
    deadline = time.monotonic() + 60
    try:
        while len(got) < n and time.monotonic() < deadline:
            m = c.poll(0.3)
            if m is not None and not m.error():
                got.append(codec.decode(m.value())["frame_index"])
    finally:
        c.close()
    assert got == list(range(n))
