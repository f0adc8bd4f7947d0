#!/usr/bin/env bash
# Prints the systemd-boot entry (Boot Loader Specification type #1) for one root slot.
# Usage: loader_entry.sh SLOT VERSION BUILD_ID
# Entries sort by `version` newest first, so after an A/B update the new slot is the default; while its
# boot counter (file name +N) runs out, systemd-boot moves it to the end and boots the older slot.
# panic=10 makes the initrd reboot instead of dropping to a shell; no console login exists anywhere.
set -euo pipefail
slot="$1"; version="$2"; build_id="$3"
cat <<ENTRY
title      reidfleet appliance $version (slot $slot)
sort-key   reidfleet
version    $build_id
linux      /reidfleet/$slot/vmlinuz
initrd     /reidfleet/$slot/initrd.img
options    root=PARTLABEL=reidfleet-root-$slot ro rootfstype=erofs reidfleet.slot=$slot panic=10 console=tty0 console=ttyS0,115200n8 quiet loglevel=3 systemd.show_status=error rd.udev.log_level=3
ENTRY
