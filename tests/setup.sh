#!/bin/sh
# Installs what cellvm's build, tests and demo need on a fresh Debian machine (root,
# Rust toolchain present). Idempotent: installs only what is missing.
set -eu
packages="qemu-system-x86 qemu-utils iproute2 xz-utils zstd lz4 binutils gcc make \
    selinux-policy-dev selinux-policy-default checkpolicy semodule-utils setools strace attr \
    libvirt-daemon-system libvirt-clients acpica-tools libseccomp-dev libcap-ng-dev"
missing() {
    need=""
    for pkg in $packages; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need="$need $pkg"
    done
}
# Two rounds: apt may remove a package to install another (Debian 12's qemu-system-x86
# removes a newer qemu-utils from backports, and qemu-img with it); the second round
# puts back the version that fits.
for round in 1 2; do
    missing
    [ -n "$need" ] || break
    echo "setup: installing$need"
    export DEBIAN_FRONTEND=noninteractive
    [ "$round" = 2 ] || apt-get update -qq
    apt-get install -y -qq --no-install-recommends $need >/dev/null
done
missing
if [ -n "$need" ]; then
    echo "setup: still missing after install:$need" >&2
    exit 1
fi
if [ ! -c /dev/kvm ]; then
    echo "setup: /dev/kvm is missing: cellvm needs KVM" >&2
    exit 1
fi
# libvirt (the benchmark's control-plane peer) runs QEMU as libvirt-qemu, group kvm.
# Without udev nothing gives /dev/kvm the owner and mode Debian's udev rule gives it
# (root:kvm 0660); cellvm's cells never use this node (the jailer makes their own).
if getent group kvm >/dev/null && [ "$(stat -c %G:%a /dev/kvm)" != "kvm:660" ]; then
    chgrp kvm /dev/kvm
    chmod 0660 /dev/kvm
fi
# The example tenant's image directory and the disk its example VM spec names (a sparse
# 64 MiB raw image), for the README's launch command and the jailer tests.
images=/var/lib/cellvm/images/example
if [ ! -f "$images/disk.img" ]; then
    mkdir -p "$images"
    truncate -s 64M "$images/disk.img"
fi
# The example tenant's share (policy/vms/example-background.toml), the share owner's,
# holding the file the test guest's `fs` check reads.
share=/var/lib/cellvm/shares/example/demo
if [ ! -f "$share/hello.txt" ]; then
    mkdir -p "$share"
    printf 'hello from the host through virtiofsd\n' > "$share/hello.txt"
    chown -R 201000:201000 "$share"
fi
# The example tenant's network: a namespace of its own holding the tap its VM spec
# names; the host end (10.77.0.1/24) answers the guest's ARP and ping. The jailer only
# attaches to taps an administrator made, in the namespace the tenant policy names.
[ -e /run/netns/cellvm-example ] || ip netns add cellvm-example
ip -n cellvm-example link set lo up
if ! ip -n cellvm-example link show cvex0 >/dev/null 2>&1; then
    ip -n cellvm-example tuntap add dev cvex0 mode tap
    ip -n cellvm-example addr add 10.77.0.1/24 dev cvex0
fi
ip -n cellvm-example link set cvex0 up
# virtiofsd, the virtio-fs backend: the crates.io release, pinned, built statically
# (glibc, libseccomp and libcap-ng linked in) so that its cell holds no libraries. The
# jailer execs it from /usr/local/libexec/cellvm/virtiofsd (`--virtiofsd` elsewhere).
virtiofsd=/usr/local/libexec/cellvm/virtiofsd
virtiofsd_version=1.14.0
if ! "$virtiofsd" --version 2>/dev/null | grep -qx "virtiofsd $virtiofsd_version"; then
    echo "setup: building virtiofsd $virtiofsd_version (static)"
    build=$(mktemp -d)
    LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
    LIBCAPNG_LINK_TYPE=static LIBCAPNG_LIB_PATH=/usr/lib/x86_64-linux-gnu \
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo install --quiet virtiofsd --version "=$virtiofsd_version" --locked \
        --target x86_64-unknown-linux-gnu --root "$build" --target-dir "$build/target"
    mkdir -p "$(dirname "$virtiofsd")"
    install -m 0755 "$build/bin/virtiofsd" "$virtiofsd"
    rm -rf "$build"
fi
