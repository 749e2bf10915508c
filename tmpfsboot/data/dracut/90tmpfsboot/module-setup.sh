#!/bin/bash
# shellcheck disable=SC2154 # initdir, moddir, systemdsystemunitdir: set by dracut
# tmpfsboot's dracut module: a disk-less root on tmpfs, fetched over HTTP(S) by the same
# Python engine as with initramfs-tools. `tmpfsboot initramfs stage` decides what goes
# in (Debian's python3.11, the standard-library modules the engine imports as .pyc, the
# engine, decompressors, gpgv and the keyring, the CA bundle); this shim installs the
# programs with dracut's inst_multiple so their libraries follow, and the boot glue.
# Configuration (dracut.conf.d): ROOTSIZE, TMPFS_KEYRING, TMPFS_SCRIPTS as for
# initramfs-tools; TMPFS_SCRIPTS (default /etc/tmpfsboot/scripts) holds the hook
# directories tmpfs-top, tmpfs-premount and tmpfs-bottom.

# The Python that runs the tmpfsboot host package (filled in by `tmpfsboot initramfs`).
TMPFSBOOT_PYTHON="@PYTHON@"

# called by dracut
check() {
    require_binaries /usr/bin/python3.11 mount || return 1
    # only when asked for: --add tmpfsboot or add_dracutmodules+=" tmpfsboot "
    return 255
}

# called by dracut
depends() {
    echo network
    return 0
}

# called by dracut
installkernel() {
    # af_packet for DHCP where it is a module; tmpfs is built in
    hostonly='' instmods af_packet
}

# called by dracut
install() {
    local programs program scripts hook libs=''
    programs="$("${TMPFSBOOT_PYTHON}" -m tmpfsboot initramfs stage --destdir "${initdir}" \
        --rootsize "${ROOTSIZE:-50%}" ${TMPFS_KEYRING:+--keyring "${TMPFS_KEYRING}"})" || {
        derror "tmpfsboot: staging the boot engine failed"
        return 1
    }
    # shellcheck disable=SC2086 # one program or library per word
    inst_multiple ${programs} || return 1
    # dracut-install follows the libraries of executables only: the extension modules'
    # (libbz2, liblzma, libffi...) are named here
    for program in ${programs}; do
        case "${program}" in
            *.so | *.so.*) libs="${libs} $(ldd "${program}" | sed -n 's|.*=> \(/[^ ]*\) .*|\1|p')" ;;
        esac
    done
    # shellcheck disable=SC2086 # one library per word
    [ -z "${libs// /}" ] || inst_multiple ${libs} || return 1
    inst_multiple mount umount mkdir cat sleep

    mkdir -p "${initdir}/etc/tmpfsboot"
    {
        echo "ROOTSIZE='${ROOTSIZE:-}'"
        # %arch is the dpkg architecture (as initramfs-tools' DPKG_ARCH)
        echo "DPKG_ARCH='$(dpkg --print-architecture 2> /dev/null)'"
    } > "${initdir}/etc/tmpfsboot/dracut.conf"

    scripts="${TMPFS_SCRIPTS:-/etc/tmpfsboot/scripts}"
    for hook in tmpfs-top tmpfs-premount tmpfs-bottom; do
        mkdir -p "${initdir}/usr/lib/tmpfsboot/scripts/${hook}"
        [ -d "${scripts}/${hook}" ] || continue
        for program in "${scripts}/${hook}"/*; do
            [ -x "${program}" ] && inst_simple "${program}" \
                "/usr/lib/tmpfsboot/scripts/${hook}/${program##*/}"
        done
    done

    inst_script "${moddir}/tmpfsroot.sh" "/sbin/tmpfsroot"
    inst_simple "${moddir}/tmpfsboot-lib.sh" "/lib/tmpfsboot-lib.sh"
    inst_hook cmdline 90 "${moddir}/parse-tmpfsboot.sh"
    inst_hook pre-trigger 50 "${moddir}/tmpfsboot-top.sh"
    inst_hook pre-mount 10 "${moddir}/tmpfsboot-failed.sh"
    if dracut_module_included "systemd"; then
        # systemd's fstab-generator makes a sysroot.mount of root=URL: let it find the
        # finished tmpfs root mounted instead of trying to mount the URL
        inst_simple "${moddir}/sysroot-after-initqueue.conf" \
            "${systemdsystemunitdir}/sysroot.mount.d/tmpfsboot.conf"
    fi
    dracut_need_initqueue
}
