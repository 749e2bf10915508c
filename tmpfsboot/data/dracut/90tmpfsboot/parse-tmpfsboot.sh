#!/bin/sh
# shellcheck disable=SC2154 # hookdir: set by dracut
# cmdline hook: root=http(s)://... (or boot=tmpfs) is a tmpfs boot. netroot=tmpfs:ROOT
# makes dracut's network modules bring the network up (DHCP unless ip= says otherwise)
# and call /sbin/tmpfsroot once it is; the initqueue is finished when that has ended.

# shellcheck source=/dev/null # part of dracut
type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh

[ -z "${root}" ] && root=$(getarg root=)
case "${root}" in
    http://* | https://*) ;;
    *) getarg boot=tmpfs > /dev/null || return 0 ;;
esac

# shellcheck disable=SC2034 # read by dracut's cmdline parsing and netroot
rootok=1
# shellcheck disable=SC2034
netroot="tmpfs:${root}"
echo "rd.neednet=1" > /etc/cmdline.d/90tmpfsboot.conf
echo '[ -e /run/tmpfsboot/done ] || [ -e /run/tmpfsboot/failed ]' \
    > "${hookdir}/initqueue/finished/tmpfsboot.sh"
