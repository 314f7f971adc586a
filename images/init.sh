#!/bin/sh
# /init (PID 1) of the vhostni test guest.  Built into the initramfs by vhostni/images.py
# (`vhostni images build`, or images/build.py in a checkout).
#
# Configuration comes from the kernel command line (all keys optional):
#   vhostni.hostname=NAME            host name (default: vhostni-guest)
#   vhostni.ip=CONF[,CONF...]        one CONF per NIC, in order eth0, eth1, ...:
#                                      ADDR/PREFIX   static address, e.g. 10.77.0.1/24
#                                      dhcp          run udhcpc on that NIC
#                                      none or ""    bring the link up without an address
#   vhostni.gw=ADDR                  default route via ADDR
#   vhostni.mtu=N[,N...]             MTU per NIC, in the same order as vhostni.ip
#   vhostni.dns=ADDR[,ADDR...]       nameservers written to /etc/resolv.conf
# Kernel messages are silenced once the guest is up (dmesg -n 1) so they do not interleave with command
# output; `dmesg` still shows them.  When everything is configured the console prints the line
#   VHOSTNI-GUEST-READY
# and a shell runs on the console (respawned if it exits).  Problems are reported as lines starting with
#   VHOSTNI-GUEST-ERROR:
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root TERM=vt100

err() { echo "VHOSTNI-GUEST-ERROR: $*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || err "cannot mount devtmpfs"
mkdir -p /dev/pts /dev/shm
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run

HOSTNAME=vhostni-guest IPS= GW= MTUS= DNS=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vhostni.hostname=*) HOSTNAME=${arg#*=} ;;
        vhostni.ip=*) IPS=${arg#*=} ;;
        vhostni.gw=*) GW=${arg#*=} ;;
        vhostni.mtu=*) MTUS=${arg#*=} ;;
        vhostni.dns=*) DNS=${arg#*=} ;;
    esac
done
hostname "$HOSTNAME"
echo "$HOSTNAME" > /etc/hostname

# Kernel modules, in the dependency order images/build.py derived from their .modinfo.
while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "$mod" || err "insmod $mod failed"
done < /etc/vhostni/modules

ip link set lo up

# NICs: eth0, eth1, ... in the order of vhostni.ip.  A NIC that is not there yet gets 5 s to appear.
n=0
IFS_SAVE=$IFS
IFS=,
set -- $IPS
IFS=$IFS_SAVE
for conf in "$@"; do
    dev=eth$n
    i=0
    while [ ! -e /sys/class/net/$dev ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    if [ ! -e /sys/class/net/$dev ]; then
        err "no network interface $dev (vhostni.ip has a configuration for it)"
        n=$((n + 1)); continue
    fi
    mtu=$(echo "$MTUS" | cut -d, -f$((n + 1)))
    [ -n "$mtu" ] && { ip link set "$dev" mtu "$mtu" || err "cannot set mtu $mtu on $dev"; }
    ip link set "$dev" up || err "cannot bring up $dev"
    case "$conf" in
        ""|none) ;;
        dhcp) udhcpc -i "$dev" -q -n -t 5 -T 1 -s /etc/vhostni/udhcpc.script >/dev/null 2>&1 \
                  || err "DHCP on $dev failed" ;;
        */*) ip addr add "$conf" dev "$dev" || err "cannot add address $conf to $dev" ;;
        *) err "bad vhostni.ip entry '$conf' for $dev (want ADDR/PREFIX, dhcp or none)" ;;
    esac
    n=$((n + 1))
done
[ -n "$GW" ] && { ip route add default via "$GW" || err "cannot add default route via $GW"; }
if [ -n "$DNS" ]; then
    for ns in $(echo "$DNS" | tr , ' '); do echo "nameserver $ns"; done > /etc/resolv.conf
fi

# Boot hooks (`vhostni images build --hook SCRIPT`), in order, with the network up.  A hook that starts a
# server must put it in the background; a hook that fails is a boot error.
for hook in /etc/vhostni/hooks/*; do
    [ -f "$hook" ] || continue
    sh "$hook" || err "boot hook ${hook##*/} failed (status $?)"
done

dmesg -n 1
echo "VHOSTNI-GUEST-READY hostname=$HOSTNAME kernel=$(uname -r)"

export PS1='vni@\h:\w# '
cd /root
while true; do
    setsid cttyhack sh
    echo "vhostni guest: shell exited ($?), starting a new one"
    sleep 1
done
