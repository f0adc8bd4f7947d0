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
rm -rf "$work"
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
step "root filesystem: Debian $suite minbase + kernel + systemd + appliance venv (mmdebstrap)"
packages="$(sed -e 's/#.*//' "$here/packages.txt" | xargs | tr ' ' ',')"
rootfs="$work/rootfs"
# Hooks run on this machine with "$1" = the new root; `chroot "$1"` runs inside it (with /proc, /sys, /dev).
mmdebstrap --variant=minbase --mode=root --format=directory \
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
  --essential-hook="sync-out /var/cache/apt/archives '$cache/debs'" \
  --customize-hook="sync-out /var/cache/apt/archives '$cache/debs'" \
  --customize-hook="IMAGE_VERSION='$version' IMAGE_BUILD_ID='$build_id' '$here/customize.sh' \"\$1\" '$here' '$work' '$cache/wheels'" \
  "$suite" "$rootfs" "$sources" >&2

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
"$here/loader_entry.sh" a "$version" "$build_id" > "$work/entry-a.conf"
# Factory entry has no boot counter: there is nothing to fall back to yet.
mcopy -i "$esp" "$work/entry-a.conf" "::/loader/entries/reidfleet-$build_id-a.conf"
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
printf '{"version": "%s", "build_id": "%s", "kernel": "%s"}\n' "$version" "$build_id" "$kver" > "$out/update/VERSION.json"

# ------------------------------------------------------------------------------------------------
step "report"
build_s=$(($(date +%s) - t0))
"$py" "$here/report.py" build --image "$final" --compressed "$final.zst" --root "$work/root.img" \
  --build-s "$build_s" --version "$version" --results "$repo/results/image.json"
rm -rf "$work"
