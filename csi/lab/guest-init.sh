#!/bin/sh
# PID 1 of a lab node: a User-Mode Linux kernel whose root is the host's / over hostfs, mounted READ-ONLY.
# The host's files are only read; what the node writes goes to its own tmpfs:
#   /run, /tmp, /dev/shm                 plain tmpfs
#   /etc, /var                           overlayfs: the host's dir below, a tmpfs above (so /etc/target,
#                                        /etc/iscsi, /etc/lvm/{archive,backup}, /var/lib/iscsi ... are per node
#                                        and lost at reboot, like a node's own state on a real tmpfs)
#   <lab workdir>                        the only host path mounted read-write (disk images, logs, records)
# Parameters arrive as kernel command-line items csilab_<key>=<value>, which the kernel hands to init as
# environment. The lab (csi/lab/node.py) writes them; nothing here is typed by a user.
# Success ends with guestd printing "CSILAB-READY <node>" on the console; failure prints "CSILAB-FAILED".
set -u
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH LC_ALL=C

fail() {
    echo "CSILAB-FAILED $csilab_name: $*"
    sleep 1
    poweroff -f
    exit 1
}
# Runs its arguments as one command (no string evaluation); stops the boot on failure.
must() { "$@" || fail "$*"; }
mark() { echo "csilab: $* (uptime $(cut -d' ' -f1 /proc/uptime))"; }

must mount -t proc proc /proc
must mount -t sysfs sysfs /sys
mark "init $csilab_name role=$csilab_role ip=$csilab_ip"
must mount -t tmpfs -o mode=0755 tmpfs /run
must mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /dev/shm /dev/pts
must mount -t tmpfs -o mode=1777 tmpfs /dev/shm
must mount -t devpts devpts /dev/pts

# Writable /etc and /var for this node only.
for d in etc var; do
    must mkdir -p "/run/csilab/overlay/$d/upper" "/run/csilab/overlay/$d/work"
    must mount -t overlay overlay \
        -o "lowerdir=/$d,upperdir=/run/csilab/overlay/$d/upper,workdir=/run/csilab/overlay/$d/work" "/$d"
done
# The lab's workdir, read-write, at the same path as on the host (under /tmp the mount point is on our tmpfs).
must mkdir -p "$csilab_labdir"
must mount -t hostfs -o "$csilab_labdir" none "$csilab_labdir"
# The project and its venv, read-only, where our tmpfs hides them (a checkout under /tmp, say).
IFS=: 
for d in $csilab_hostdirs; do
    if [ ! -e "$d" ]; then
        must mkdir -p "$d"
        must mount -r -t hostfs -o "$d" none "$d"
    fi
done
unset IFS

# A machine-id of its own: with the host's, udev gives every node the same MAC address and ARP fails.
echo "$csilab_machine_id" > /run/csilab/machine-id
must mount --bind /run/csilab/machine-id /etc/machine-id
must hostname "$csilab_name"
echo "$csilab_name" > /etc/hostname
printf '127.0.0.1\tlocalhost\n%s\t%s\n' "$csilab_ip" "$csilab_name" > /etc/hosts

must ip link set lo up
# UML's vector driver names the interface vec0; everything else here and in the tests says eth0.
must ip link set vec0 name eth0
must ip addr add "$csilab_ip/24" dev eth0
must ip link set eth0 up
# No segmentation offload on the way out: UML hands a frame to the host at once, so TCP never sees one
# still queued and never coalesces small writes (autocorking). With TSO a bulk writer would send 64 KB
# frames while LIO, which writes each 4 KiB page of a PDU on its own, sends 5-9 KB ones (measured): a gap
# a real NIC, which completes transmits later, should not have. Receive coalescing (GRO) stays on.
# After the link is up: the vector driver sets its features again when it opens.
must ethtool -K eth0 tso off gso off
mark network up

# Before the modules: target_core_mod looks for /etc/target when it loads.
must mkdir -p /run/lock/iscsi /run/lock/lvm /run/lvm /etc/target /etc/iscsi /var/lib/iscsi \
    /etc/lvm/archive /etc/lvm/backup

# udevd first, so that the devices the modules make come to it as ordinary events; then a coldplug of the
# block subsystem only: a full `udevadm trigger` walks UML's hundreds of legacy tty devices (~17 s).
must /lib/systemd/systemd-udevd --daemon
must modprobe configfs
must mount -t configfs configfs /sys/kernel/config
must modprobe -a loop dm_mod dm_snapshot dm_thin_pool target_core_mod target_core_iblock \
    iscsi_target_mod iscsi_tcp sd_mod
mark modules loaded
udevadm trigger --action=add --subsystem-match=block --subsystem-match=misc
udevadm settle --timeout=30 || echo "csilab: udevadm settle timed out"
mark udev settled

# LVM of this node sees loop devices only (never an iSCSI disk it logged in to, nor anything of the host's),
# activates nothing by itself (activation is the agent's job) and needs neither dmeventd nor lvmpolld.
# lvmlocal.conf is read after lvm.conf, so the driver's plain `lvcreate ...` argv picks this up.
cat > /etc/lvm/lvmlocal.conf <<'EOF'
devices {
    global_filter = [ "a|^/dev/loop[0-9]+$|", "r|.*|" ]
    use_devicesfile = 0
}
global {
    use_lvmpolld = 0
    event_activation = 0
}
activation {
    monitoring = 0
}
EOF

echo "InitiatorName=$csilab_iqn" > /etc/iscsi/initiatorname.iscsi
# The host's iscsid.conf, with the two settings a lab node depends on forced.
must sed -i -e 's|^[# ]*node\.startup *=.*|node.startup = manual|' \
    -e 's|^[# ]*iscsid\.startup *=.*|iscsid.startup = /usr/sbin/iscsid|' /etc/iscsi/iscsid.conf
# The iSCSI node database on the node's own disk (its dir in the lab workdir), as on a real machine: node records
# outlive a reboot, so a rebooted worker finds what a real one would (the driver must clean them up itself).
must mkdir -p "$csilab_nodedir/iscsi-nodes" /etc/iscsi/nodes
must mount --bind "$csilab_nodedir/iscsi-nodes" /etc/iscsi/nodes
must iscsid
mark iscsid started
# What open-iscsi.service does at boot: log in to every record marked node.startup=automatic. The driver marks
# its records manual, so this must log in to nothing; a record that said otherwise would log in here.
iscsiadm -m node --loginall=automatic >/dev/null 2>&1
mark "automatic logins done (rc $?)"

if [ "$csilab_role" = storage ]; then
    disk="$csilab_nodedir/disk.img"
    [ -f "$disk" ] || fail "no disk image $disk"
    loop=$(losetup -f --show "$disk") || fail "losetup $disk"
    udevadm settle --timeout=30
    echo "csilab: $disk on $loop"
    vg=$csilab_vg
    if ! vgs "$vg" >/dev/null 2>&1; then
        pvs "$loop" >/dev/null 2>&1 || must pvcreate -q "$loop"
        must vgcreate -q "$vg" "$loop"
    fi
    if ! lvs "$vg/thinpool" >/dev/null 2>&1; then
        must lvcreate -q --type thin-pool -l "$csilab_thinpool_percent%VG" -n thinpool "$vg"
    fi
    must vgs "$vg"
    mark "storage ready: vg $vg"
fi

exec "$csilab_python" -I "$csilab_guestd" --name "$csilab_name" --ip "$csilab_ip" \
    --port "$csilab_port" --logdir "$csilab_nodedir"
