#!/bin/sh
# tmpfsboot's netroot handler, called by dracut's /sbin/netroot once IFACE is up:
#   tmpfsroot IFACE NETROOT NEWROOT
# The engine mounts the tmpfs on a staging point and fills it (the same Python steps as
# with initramfs-tools); only the finished root is moved to NEWROOT, so nothing (systemd
# included) sees a half-extracted root. Failure: /run/tmpfsboot/failed, the message in
# /run/tmpfsboot/error; the pre-mount hook turns it into dracut's emergency behaviour.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
# shellcheck source=/dev/null # part of dracut
type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh
# shellcheck source=tmpfsboot-lib.sh
. /lib/tmpfsboot-lib.sh

netif="$1"
newroot="${3:-${NEWROOT:-/sysroot}}"
state=/run/tmpfsboot
# systemd makes /run a shared mount, and the kernel moves no mount whose parent is shared:
# the staging point gets a private parent of its own
staging="${state}/staging"
stage="${staging}/root"

# once, for the first interface that comes up
mkdir -p "${state}"
mkdir "${state}/handler" 2> /dev/null || exit 0

# shellcheck disable=SC1091 # written by module-setup.sh
[ -f /etc/tmpfsboot/dracut.conf ] && . /etc/tmpfsboot/dracut.conf

# Run one step of the engine; x pressed while it waits (exit 3) opens dracut's emergency
# shell, then the step runs again.
tmpfs_engine() {
    while :; do
        read -r tmpfs_t0 _ < /proc/uptime
        TMPFSBOOT_T0="${tmpfs_t0}" TMPFSBOOT_NETCONF=dracut DEVICE="${netif}" \
            ROOTSIZE="${ROOTSIZE-}" DPKG_ARCH="${DPKG_ARCH-}" \
            /usr/bin/python3.11 -I -S -m tmpfsboot.boot.main "$@"
        case $? in
            0) return 0 ;;
            3) emergency_shell -n tmpfsboot "$(cat "${state}/error")" ;;
            *) return 1 ;;
        esac
    done
}

tmpfs_fail() {
    : > "${state}/failed"
    warn "$(cat "${state}/error" 2> /dev/null || echo "tmpfsboot: $1 failed")"
    exit 1
}

# the console, where x opens a shell (systemd gives the initqueue none)
[ -c /dev/console ] && exec 0< /dev/console
mkdir -p "${staging}"
{ mount --bind "${staging}" "${staging}" && mount --make-private "${staging}"; } \
    || tmpfs_fail "making ${staging} a private mount"
mkdir -p "${stage}"
tmpfs_engine mount "${stage}" || tmpfs_fail mount
tmpfs_run_scripts tmpfs-premount "${stage}"
tmpfs_engine fetch "${stage}" || tmpfs_fail fetch
tmpfs_run_scripts tmpfs-bottom "${stage}"
mount --move "${stage}" "${newroot}" || tmpfs_fail "moving the root to ${newroot}"
umount "${staging}"
: > "${state}/done"
