#!/bin/sh
# pre-trigger hook: initramfs-tools' tmpfs-top point, before networking.

# shellcheck source=tmpfsboot-lib.sh
type tmpfs_is_boot > /dev/null 2>&1 || . /lib/tmpfsboot-lib.sh
tmpfs_is_boot && tmpfs_run_scripts tmpfs-top
