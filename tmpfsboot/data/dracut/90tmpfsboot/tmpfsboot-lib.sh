#!/bin/sh
# shellcheck disable=SC2154 # netroot: set by dracut's cmdline hooks
# tmpfsboot's dracut glue, shared by its hooks and /sbin/tmpfsroot.

# True on a tmpfs boot (parse-tmpfsboot.sh set netroot=tmpfs:...).
tmpfs_is_boot() {
    case "${netroot}" in
        tmpfs:*) return 0 ;;
    esac
    return 1
}

# Run the programs of one hook directory (tmpfs-top, tmpfs-premount, tmpfs-bottom) in
# order, as initramfs-tools' run_scripts does; rootmnt is where the root is mounted now.
# Their output goes to stderr: systemd sends a service's stdout to the journal only, its
# stderr to the console too (dracut's units), where initramfs-tools shows hook output.
tmpfs_run_scripts() {
    for tmpfs_script in /usr/lib/tmpfsboot/scripts/"$1"/*; do
        [ -x "${tmpfs_script}" ] || continue
        rootmnt="${2:-}" "${tmpfs_script}" >&2 || warn "tmpfsboot: ${tmpfs_script} failed"
    done
    unset tmpfs_script
}
