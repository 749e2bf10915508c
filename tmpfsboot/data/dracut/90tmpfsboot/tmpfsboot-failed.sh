#!/bin/sh
# pre-mount hook: a failed tmpfs boot ends in dracut's emergency shell (rd.shell=0: the
# rd.emergency action, halt by default) with the engine's message, as initramfs-tools' panic.

if [ -e /run/tmpfsboot/failed ]; then
    mkdir -p /run/initramfs && : > /run/initramfs/.die
    emergency_shell -n tmpfsboot "$(cat /run/tmpfsboot/error 2> /dev/null || echo "tmpfsboot: failed")"
fi
