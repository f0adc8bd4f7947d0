"""Boot the built appliance disk image under qemu (TCG) and check it from the host (slow: minutes).

Builds the image first when image-build/out has none (needs root, mmdebstrap and ~10 minutes).
Run with `just test-slow` or `just image-test`; CI's `just test` leaves it out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "image-build"))
import boot_test  # noqa: E402

IMAGE = ROOT / "image-build" / "out" / "reidfleet-appliance.img"

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def image() -> Path:
    for tool in ("qemu-system-x86_64", "sfdisk", "mcopy"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: run ./just once (it installs apt-packages.txt)")
    if not IMAGE.exists():
        subprocess.run(["bash", str(ROOT / "image-build" / "build.sh")], check=True,
                       env={**os.environ, "PYTHON": sys.executable})
    return IMAGE.resolve()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Own temp folder: pytest prunes old basetemp roots when other pytest sessions start on a shared
    machine, which would pull the disk copy from under a boot that takes minutes."""
    d = Path(tempfile.mkdtemp(prefix="reidfleet-image-test-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_boots_provisions_and_delivers_frames_to_host_kafka(image: Path, workdir: Path) -> None:
    # Under TCG the INT8 detector takes tens of seconds a frame: two frames prove the path end to end.
    res = boot_test.run(image, workdir=workdir, boot_timeout_s=900, frames_timeout_s=600, want_frames=2)
    from report import merge

    merge(ROOT / "results" / "image.json", "boot", res)
    assert res["frames_received"] >= 2, res
    assert res["device_id"] == boot_test.DEVICE_ID
    assert res["frame_wh"] == [640, 360]  # the generated test clip, decoded inside the VM
    assert res["status"]["state"] == "provisioned"
    assert res["status"]["data_partition"].startswith("mounted"), res["status"]
    assert "grown=1" in res["status"]["data_partition"], "the data partition did not grow into the bigger disk"
    assert res["serial_has_status"], "no REIDFLEET-STATUS line on the serial console"
    assert res["clean_poweroff"], "the VM did not power off on the ACPI button within 150 s"


def test_without_bundle_it_says_so_on_the_status_page(image: Path, workdir: Path) -> None:
    res = boot_test.run(image, workdir=workdir, boot_timeout_s=900, frames_timeout_s=0, want_frames=0,
                        with_bundle=False)
    assert res["state"] == "waiting_for_bundle"
    assert "bundle" in res["message"]


def test_ab_update_slot_b_boots_first_and_is_blessed(image: Path, workdir: Path) -> None:
    res = boot_test.run_ab(image, workdir=workdir, boot_timeout_s=900)
    assert res["slot"] == "b", res
    staged = res["staged_entry"]
    assert "+3" in staged
    blessed = staged.replace("+3", "")
    # systemd-boot counted the start (+3 -> +2), reidfleet-boot-check passed, systemd-bless-boot removed it
    assert blessed in res["entries_after"], res["entries_after"]
    assert any(e.endswith("-a.conf") for e in res["entries_after"]), "slot a's entry must stay as the fallback"
