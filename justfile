# reidfleet recipes. On a fresh machine run them through ./just, which installs what they need.
set shell := ["bash", "-euo", "pipefail", "-c"]
set dotenv-load := false
export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")
export PYTHONUNBUFFERED := "1"
assets := env_var_or_default("REIDFLEET_ASSETS", justfile_directory() + "/../shared/assets")

# list recipes
default:
    @just --list

# run the whole system on embedded defaults (broker, appliance on a sample video, ...)
demo *ARGS:
    python -m demo {{ARGS}}

# fast unit + integration tests (CI runs this)
test *ARGS:
    ruff check .
    python -m pytest -q {{ARGS}}

# soak, boot and other slow tests
test-slow *ARGS:
    python -m pytest -q -m slow {{ARGS}}

# lint and format check
lint:
    ruff check .
    ruff format --check . || true

# run the embedded Kafka-protocol broker (tansu) with the reidfleet topics
broker port="9092":
    python -m common.tansu --port {{port}}

# run one appliance (see `python -m appliance --help`)
appliance *ARGS:
    python -m appliance {{ARGS}}

# create .venv-bench with the peer tools (Ultralytics + torch, pycocotools, trackeval)
bench-env:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -x .venv-bench/bin/python ] || ! .venv-bench/bin/python -c "import ultralytics, pycocotools, supervision; supervision.ByteTrack" 2>/dev/null; then
      python3 -m venv .venv-bench
      .venv-bench/bin/pip install -q --upgrade "pip>=24"
      .venv-bench/bin/pip install -q torch==2.14.1 torchvision==0.29.1
      .venv-bench/bin/pip install -q -e ".[appliance,bench]"
    fi

# detector: person AP50 / AP50:95 on the COCO subset, ours beside Ultralytics on the same IR → results/eval-detect.{json,png}
eval-detect assets=assets: bench-env
    .venv-bench/bin/python -m appliance.evaluate.detect_ap --assets {{assets}}

# detector + tracker: MOTA / IDF1 / HOTA on MOT15 PETS09-S2L1 + TUD-Campus beside Ultralytics track() → results/eval-track.{json,png}
eval-track assets=assets *ARGS: bench-env
    .venv-bench/bin/python -m appliance.evaluate.track_mot --assets {{assets}} {{ARGS}}

# detector FPS on 1 and 2 pinned cores (runtime variants, Ultralytics predict interleaved) → results/bench-detector.{json,png}
bench-detector assets=assets *ARGS: bench-env
    .venv-bench/bin/python -m appliance.evaluate.detector_speed --assets {{assets}} {{ARGS}}

# edge: full appliance loop vs bare detector vs Ultralytics track() on 1/2 pinned cores, 1080p; RSS, bytes/frame → results/bench-edge.{json,png}
bench-edge assets=assets *ARGS: bench-env
    python -m appliance.evaluate.edge_speed --assets {{assets}} {{ARGS}}

# Re-ID Rank-1/mAP of every embedder + gender accuracy on the Market subset → results/eval-reid.{json,png}
eval-reid assets=assets:
    python -m server.eval_reid {{assets}}

# embedding-stage throughput (crops/s) on this machine's CPU/GPU → results/bench-embed.{json,png}
bench-embed assets=assets *ARGS:
    python -m server.bench_embed {{assets}} {{ARGS}}

# GPU only: torchvision nvJPEG vs nvImageCodec (hardware JPEG engines) decode + embed, 1 and 3 processes → results/bench-jpeg-gpu.{json,png}
bench-jpeg-gpu assets=assets *ARGS:
    python -m server.bench_jpeg_gpu {{assets}} {{ARGS}}

# the Streamlit dashboard on 127.0.0.1 (config: --config FILE or $REIDFLEET_DASHBOARD_CONFIG)
dashboard *ARGS:
    python -m dashboard run {{ARGS}}

# flashable x86-64 UEFI appliance disk image (needs root; ~10 min, .debs/wheels cached) → image-build/out/*.img.zst + .sha256
image assets=assets:
    REIDFLEET_ASSETS={{assets}} PYTHON="{{justfile_directory()}}/.venv/bin/python" bash image-build/build.sh

# boot the built image under qemu (TCG) and check status page, health and Kafka delivery from the host → results/image.json
image-test *ARGS:
    python image-build/boot_test.py {{ARGS}}
    python image-build/boot_test.py --ab

# check the production deployment files offline (compose render, kustomize + Kubernetes schemas, linters, topic settings)
deploy-check:
    yamllint -c deploy/.yamllint.yaml deploy/
    hadolint --config deploy/.hadolint.yaml deploy/docker/*.Dockerfile
    python -m pytest -q tests/deploy

# fleet: N agents on a real broker; time to roll a model out to all and to roll a bad one back → results/bench-fleet.{json,png}
bench-fleet assets=assets agents="20" runs="3":
    python -m benchmarks.fleet_rollout --assets {{assets}} --agents {{agents}} --runs {{runs}}

# fleet admin CLI (see `just fleet --help`, docs/fleet.md)
fleet *ARGS:
    python -m fleet {{ARGS}}

# the Re-ID server: Kafka consumer → embed → match → analytics (see `python -m server --help`, docs/server.md)
server *ARGS:
    python -m server {{ARGS}}

# server: embedding and whole-consumer crops/s, identity-match p50/p95 at 1k/20k/100k (Qdrant local vs ours) → results/bench-server.{json,png}
bench-server assets=assets *ARGS:
    python -m server.bench {{assets}} {{ARGS}}

# server: the prepare thread's trip to the embedder workers beside a busy matcher thread, per GIL switch interval → results/gil-handoff.{json,png}
bench-gil *ARGS:
    python -m benchmarks.gil_handoff {{ARGS}}

# server: cross-camera id accuracy (pairwise precision/recall) of appliance output (detector+tracker+best shot) on two MOT15 frame ranges through the whole server, at the embedder's shipped threshold (server/embed/calibration.py; --threshold/--sweep to vary) → results/eval-xcam.{json,png}
eval-xcam seq_a="PETS09-S2L1:1-150" seq_b="PETS09-S2L1:151-300" assets=assets *ARGS:
    python -m benchmarks.eval_xcam {{seq_a}} {{seq_b}} --assets {{assets}} {{ARGS}}

# fill the server's stores for the dashboard: `pipeline` (appliances on the shared videos -> server) or `synthetic`
dashboard-seed mode="pipeline" *ARGS:
    python -m dashboard.seed {{mode}} {{ARGS}}

# load: the most cameras one server process sustains (real appliance output replayed at 15 FPS), capture → reid_output p50/p95 → results/bench-load.{json,png} (--step-s 120 for the real measurement)
bench-load *ARGS:
    python -m benchmarks.bench_load --assets {{assets}} {{ARGS}}

# soak (slow): 20 min at 80 % of the sustained load from results/bench-load.json; RSS start/end/peak of every process → results/soak.{json,png}
soak *ARGS:
    python -m benchmarks.soak --assets {{assets}} {{ARGS}}

# record real appliance output on the shared videos for the load tools (var/replay, gitignored)
replay-record assets=assets:
    python -m benchmarks.replay record --assets {{assets}}
