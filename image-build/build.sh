#!/usr/bin/env bash
# Builds the flashable x86-64 UEFI appliance disk image from this repository (`just image`).
#
# Layout (GPT):  1 ESP (FAT32: systemd-boot, a kernel + initrd per root slot, loader entries)
#                2 REIDFLEET (FAT, "basic data" so any laptop mounts it: the installer drops the device bundle here)
#                3 reidfleet-root-a (erofs, read-only)   4 reidfleet-root-b (empty until the first A/B update)
#                5 reidfleet-data (ext4, mounted at /var by the initrd, grown to the disk's end on first boot)
#
# Why no mkosi / systemd-repart Format=: both need to mount vfat on the build host, which these build
# machines (and many CI sandboxes) cannot. Every filesystem here is made from a directory or a file
# (mkfs.erofs, mke2fs -d, mkfs.vfat -C + mcopy) and the disk is assembled with sfdisk + dd on a plain file,
# so the build needs root (for the chroot) but no loop devices and no mounts of its own.
#
# Environment: REIDFLEET_ASSETS (factory detector model), IMAGE_OUT (default image-build/out),
# IMAGE_CACHE (default image-build/cache: .debs and wheels kept between runs), ROOT_SLOT_MIB, DATA_MIB.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${IMAGE_OUT:-$here/out}"
cache="${IMAGE_CACHE:-$here/cache}"
assets="${REIDFLEET_ASSETS:-$repo/../shared/assets}"
py="${PYTHON:-$repo/.venv/bin/python}"
root_slot_mib="${ROOT_SLOT_MIB:-1024}"
data_mib="${DATA_MIB:-512}"
esp_mib=256
bundle_mib=32
suite=bookworm
version="$(cd "$repo" && git describe --always --dirty 2>/dev/null || echo unknown)"
build_id="$(date -u +%Y%m%d%H%M%S)"
name="reidfleet-appliance"

t0=$(date +%s)
step_no=0
steps=9
step() { step_no=$((step_no + 1)); printf '\n==> [%d/%d] %s  (t+%ds)\n' "$step_no" "$steps" "$*" "$(($(date +%s) - t0))" >&2; }
die() { echo "error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "the rootfs build needs root (chroot into the new tree); run as root or via sudo"
need=(mmdebstrap mkfs.erofs mke2fs mkfs.vfat mcopy mmd sfdisk zstd sha256sum)
missing=()
for t in "${need[@]}"; do command -v "$t" >/dev/null || missing+=("$t"); done
[ ${#missing[@]} -eq 0 ] || die "missing host tools: ${missing[*]} (apt-get install mmdebstrap erofs-utils e2fsprogs dosfstools mtools fdisk zstd)"
[ -x "$py" ] || die "no Python at $py (run ./just once, or set PYTHON)"

# The apt sources of the build machine are the mirror (no host name is baked into this script).
sources="${MIRROR_SOURCES:-}"
if [ -z "$sources" ]; then
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$f" ] && grep -q "$suite" "$f"; then sources="$f"; break; fi
  done
fi
[ -n "$sources" ] || die "no Debian $suite apt sources found on this machine; set MIRROR_SOURCES to a sources file"

work="$out/work"
# A killed earlier run may have left /proc, /sys, /dev mounted in its tree: unmount, and never let rm cross
# into another filesystem (an rbind of the host's /dev).
awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
rm -rf --one-file-system "$work"
mkdir -p "$out" "$work" "$cache/debs" "$cache/wheels"

# ------------------------------------------------------------------------------------------------
step "wheels: the project + the appliance extra, binary only (cached in $cache/wheels)"
rm -f "$cache/wheels"/reidfleet-*.whl
rm -rf "$cache/wheels/project"
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$cache/wheels/project" "$repo" >&2
wheel="$(ls "$cache/wheels/project"/reidfleet-*.whl)"
# The build machine is the target platform (Debian bookworm, CPython 3.11, x86-64), so no --platform.
if ! "$py" -m pip download -q --only-binary=:all: -d "$cache/wheels" "reidfleet[appliance] @ file://$wheel" \
     > "$work/pip-download.log" 2>&1; then
  grep -v "is ignored: it is neither a file nor a directory" "$work/pip-download.log" >&2
  die "pip download of the appliance wheels failed"
fi
rm -f "$cache/wheels"/reidfleet-*.whl  # pip download copies the project wheel in; it is built fresh each time
cp "$wheel" "$work/"
echo "    $(ls "$cache/wheels"/*.whl | wc -l) wheels, $(du -sh "$cache/wheels" | cut -f1)" >&2

# ------------------------------------------------------------------------------------------------
step "factory model and test clip"
model_src="$assets/models/yolo11n_int8_openvino_model"
[ -f "$model_src/yolo11n.xml" ] || die "factory detector model not found at $model_src (set REIDFLEET_ASSETS)"
(cd "$assets/models" && grep ' yolo11n_int8_openvino_model/' SHA256SUMS | sha256sum -c --quiet -) \
  || die "factory model does not match $assets/models/SHA256SUMS"
mkdir -p "$work/payload/models"
cp -r "$model_src" "$work/payload/models/yolo11n_coco_int8_640"
"$py" "$here/make_testclip.py" "$work/payload/testclip.mp4" >&2

# ------------------------------------------------------------------------------------------------
step "root filesystem: Debian $suite minbase + kernel + systemd (mmdebstrap, cached) + appliance venv"
packages="$(sed -e 's/#.*//' "$here/packages.txt" | xargs | tr ' ' ',')"
rootfs="$work/rootfs"
# The Debian part is cached as a tarball keyed by the package list (IMAGE_REFRESH=1 rebuilds it, e.g. for
# security updates); only the reidfleet part (customize.sh) runs on every build.
base_key="$(printf '%s %s' "$suite" "$packages" | sha256sum | cut -c1-16)"
base_tar="$cache/base-$base_key.tar"
if [ ! -s "$base_tar" ] || [ "${IMAGE_REFRESH:-0}" = 1 ]; then
  mmdebstrap --variant=minbase --mode=root --format=tar \
    --include="$packages" \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --skip=essential/unlink \
    --setup-hook='mkdir -p "$1/var/cache/apt/archives/"' \
    --setup-hook="sync-in '$cache/debs' /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives '$cache/debs'" \
    "$suite" "$base_tar.tmp" "$sources" >&2
  rm -f "$cache"/base-*.tar
  mv "$base_tar.tmp" "$base_tar"
else
  echo "    Debian base from cache: $(basename "$base_tar") (IMAGE_REFRESH=1 to rebuild)" >&2
fi
mkdir -p "$rootfs"
tar -C "$rootfs" --numeric-owner --xattrs --xattrs-include='*' -xpf "$base_tar"
# customize.sh runs `chroot`: give the tree /proc, /sys and /dev the way mmdebstrap's hooks have them.
mounts=()
cleanup_mounts() { local i; for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[i]}" 2>/dev/null || true; done; mounts=(); }
trap cleanup_mounts EXIT
for fs in proc sys dev; do
  case $fs in
    proc) mount -t proc proc "$rootfs/proc" ;;
    sys) mount -t sysfs sys "$rootfs/sys" ;;
    dev) mount --rbind /dev "$rootfs/dev" ;;
  esac
  mounts+=("$rootfs/$fs")
done
IMAGE_VERSION="$version" IMAGE_BUILD_ID="$build_id" "$here/customize.sh" "$rootfs" "$here" "$work" "$cache/wheels"
cleanup_mounts

# ------------------------------------------------------------------------------------------------
step "boot files out of the root (kernel, initrd, systemd-boot) and the root image (erofs lz4hc)"
boot="$work/boot"
mkdir -p "$boot"
kver="$(ls "$rootfs/lib/modules" | sort -V | tail -1)"
cp "$rootfs/boot/vmlinuz-$kver" "$boot/vmlinuz"
cp "$rootfs/boot/initrd.img-$kver" "$boot/initrd.img"
cp "$rootfs/usr/lib/systemd/boot/efi/systemd-bootx64.efi" "$boot/systemd-bootx64.efi"
# The ESP carries kernel + initrd per slot; keeping copies in the root would only cost space.
rm -f "$rootfs/boot/vmlinuz-"* "$rootfs/boot/initrd.img-"* "$rootfs/vmlinuz"* "$rootfs/initrd.img"*
rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"* "$rootfs/tmp/"*
mkfs.erofs -zlz4hc,12 -T "$(date +%s)" --quiet "$work/root.img" "$rootfs"
root_bytes=$(stat -c %s "$work/root.img")
root_need_mib=$(( (root_bytes + 1048575) / 1048576 ))
[ "$root_need_mib" -lt "$root_slot_mib" ] \
  || die "root image is ${root_need_mib} MiB, larger than the ${root_slot_mib} MiB slot (set ROOT_SLOT_MIB)"
echo "    kernel $kver, root image ${root_need_mib} MiB (slot ${root_slot_mib} MiB)" >&2

# ------------------------------------------------------------------------------------------------
step "data partition (ext4, label reidfleet-data): factory skeleton"
data_stage="$work/data"
install -d -m 0755 "$data_stage/lib/reidfleet"
printf '%s\n' "$version" > "$data_stage/lib/reidfleet/factory-version"
mke2fs -q -t ext4 -L reidfleet-data -d "$data_stage" "$work/data.img" "${data_mib}M"

# ------------------------------------------------------------------------------------------------
step "ESP (systemd-boot, slot a entry) and the REIDFLEET installer partition"
esp="$work/esp.img"
rm -f "$esp"
mkfs.vfat -C -F 32 -n ESP "$esp" $((esp_mib * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/loader ::/loader/entries ::/reidfleet ::/reidfleet/a ::/reidfleet/b
mcopy -i "$esp" "$boot/systemd-bootx64.efi" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" "$boot/systemd-bootx64.efi" ::/EFI/systemd/systemd-bootx64.efi
mcopy -i "$esp" "$boot/vmlinuz" ::/reidfleet/a/vmlinuz
mcopy -i "$esp" "$boot/initrd.img" ::/reidfleet/a/initrd.img
# editor no: nobody can add init=/bin/sh at the boot menu. timeout 0: straight into the default entry.
printf 'timeout 0\neditor no\nconsole-mode keep\nauto-entries no\nauto-firmware no\n' > "$work/loader.conf"
mcopy -i "$esp" "$work/loader.conf" ::/loader/loader.conf
# Factory entry has no boot counter: there is nothing to fall back to yet. The renderer is the one the
# device's A/B updater uses (stdlib only, so the build machine's Python runs it).
helper="$here/overlay/usr/lib/reidfleet/reidfleet_boot.py"
"$py" "$helper" loader-entry a "$version" "$build_id" > "$work/entry-a.conf"
mcopy -i "$esp" "$work/entry-a.conf" "::/loader/entries/$("$py" "$helper" loader-entry a "$version" "$build_id" --name-only)"
printf '%s %s\n' "$version" "$build_id" > "$work/slot-version"
mcopy -i "$esp" "$work/slot-version" ::/reidfleet/a/VERSION

bundle="$work/bundle.img"
rm -f "$bundle"
mkfs.vfat -C -n REIDFLEET "$bundle" $((bundle_mib * 1024)) >/dev/null
mcopy -i "$bundle" "$here/overlay/usr/share/reidfleet/README.TXT" ::/README.TXT

# ------------------------------------------------------------------------------------------------
step "assemble the GPT disk (sfdisk + dd on a plain file)"
disk="$work/$name.img"
lead_mib=1
total_mib=$((lead_mib + esp_mib + bundle_mib + 2 * root_slot_mib + data_mib + 1))
truncate -s 0 "$disk"
truncate -s "${total_mib}M" "$disk"
off_esp=$lead_mib
off_bundle=$((off_esp + esp_mib))
off_a=$((off_bundle + bundle_mib))
off_b=$((off_a + root_slot_mib))
off_data=$((off_b + root_slot_mib))
sfdisk --quiet --no-reread --no-tell-kernel "$disk" >&2 <<EOF
label: gpt
unit: sectors
start=$((off_esp * 2048)), size=$((esp_mib * 2048)), type=uefi, name="ESP"
start=$((off_bundle * 2048)), size=$((bundle_mib * 2048)), type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name="REIDFLEET"
start=$((off_a * 2048)), size=$((root_slot_mib * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="reidfleet-root-a"
start=$((off_b * 2048)), size=$((root_slot_mib * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="reidfleet-root-b"
start=$((off_data * 2048)), size=$((data_mib * 2048)), type=linux, name="reidfleet-data"
EOF
dd if="$esp" of="$disk" bs=1M seek=$off_esp conv=notrunc,sparse status=none
dd if="$bundle" of="$disk" bs=1M seek=$off_bundle conv=notrunc,sparse status=none
dd if="$work/root.img" of="$disk" bs=1M seek=$off_a conv=notrunc,sparse status=none
dd if="$work/data.img" of="$disk" bs=1M seek=$off_data conv=notrunc,sparse status=none

# ------------------------------------------------------------------------------------------------
step "compress (zstd) + sha256"
final="$out/$name-$version.img"
mv "$disk" "$final"
zstd -q -f -T0 -10 --sparse "$final" -o "$final.zst" 2>&1 | grep -v '^$' >&2 || true
(cd "$out" && sha256sum "$(basename "$final.zst")" > "$(basename "$final.zst").sha256")
ln -sfn "$(basename "$final")" "$out/$name.img"
ln -sfn "$(basename "$final.zst")" "$out/$name.img.zst"
ln -sfn "$(basename "$final.zst").sha256" "$out/$name.img.zst.sha256"
# The pieces an A/B update needs (root image, kernel, initrd) stay beside the disk image.
mkdir -p "$out/update"
cp "$work/root.img" "$out/update/root.img"
cp "$boot/vmlinuz" "$boot/initrd.img" "$out/update/"
"$py" -c "import sys; sys.path.insert(0, sys.argv[1]); import reidfleet_boot as rb; from pathlib import Path; \
rb.write_os_manifest(Path(sys.argv[2]), sys.argv[3], sys.argv[4])" "$(dirname "$helper")" "$out/update" "$version" "$build_id"
echo "    A/B update payload in $out/update (sign manifest.json with the fleet key to ship it)" >&2

# ------------------------------------------------------------------------------------------------
step "report"
build_s=$(($(date +%s) - t0))
"$py" "$here/report.py" build --image "$final" --compressed "$final.zst" --root "$work/root.img" \
  --build-s "$build_s" --version "$version" --results "$repo/results/image.json"
rm -rf --one-file-system "$work"
