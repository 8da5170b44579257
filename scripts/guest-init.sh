#!/bin/busybox sh
# /init of the guest test's initramfs. It checks the disk blkplane serves as /dev/vda and
# reports on the console: BLKPLANE-CHECK lines as it goes, BLKPLANE-MD5 for the host to
# compare with the image, then BLKPLANE-PASS or BLKPLANE-FAIL. Parameters come from the
# kernel command line: blkplane.mode=rw|ro|resize|restart|migrate|limit|many|hotplug, blkplane.runid, blkplane.sectors,
# blkplane.serial, blkplane.queues, blkplane.wce (1 = write back).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp

fail() {
    echo "BLKPLANE-FAIL: $*"
    poweroff -f
    exit 1
}
check() { echo "BLKPLANE-CHECK: $*"; }
# Whether the host has typed $1 on the console, waiting $2 seconds at most (busybox takes
# fractions). A read that times out part-way through a line keeps what it got, so what was
# heard is gathered across calls and searched.
heard=""
host_says() {
    word=""
    read -t "$2" word < /dev/console
    heard="$heard$word"
    case "$heard" in
        *"$1"*) heard=""; return 0 ;;
    esac
    return 1
}
# The restart and migration tests' fio job, run again and again; its last run's data is
# verified once more at the end (--verify_only).
fio_job() {
    fio --name=job --filename=/dev/vda --eta=never --direct=1 --ioengine=libaio --iodepth=16 \
        --rw=randwrite --bs=4k --offset=8M --size=16M --verify=crc32c --verify_fatal=1 \
        --output=/tmp/fio "$@" || { cat /tmp/fio; fail "fio $*"; }
}

param() {
    for word in $(cat /proc/cmdline); do
        case "$word" in "blkplane.$1="*) echo "${word#*=}"; return ;; esac
    done
}
MODE=$(param mode)
RUNID=$(param runid)
SECTORS=$(param sectors)
SERIAL=$(param serial)
QUEUES=$(param queues)
WCE=$(param wce)

for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && fail "no /dev/vda"
    sleep 0.1
done

# What the guest sees must match the export.
[ "$(cat /sys/block/vda/size)" = "$SECTORS" ] || fail "size $(cat /sys/block/vda/size) != $SECTORS"
check "size $SECTORS sectors"
[ "$(cat /sys/block/vda/serial)" = "$SERIAL" ] || fail "serial '$(cat /sys/block/vda/serial)' != '$SERIAL'"
check "serial $SERIAL"
nq=$(ls /sys/block/vda/mq | wc -l)
[ "$nq" = "$QUEUES" ] || fail "queues $nq != $QUEUES"
check "queues $nq"
wc=$(cat /sys/block/vda/queue/write_cache)
if [ "$WCE" = 1 ]; then want="write back"; else want="write through"; fi
[ "$wc" = "$want" ] || fail "write cache '$wc' != '$want'"
check "write cache $wc"

if [ "$MODE" = resize ]; then
    # The host resizes the export through the control socket once it sees this line; the
    # VMM gets a config-change message and the guest must see the new size without a reboot.
    NEWSECTORS=$(param newsectors)
    echo "BLKPLANE-WAIT-RESIZE"
    i=0
    while [ "$(cat /sys/block/vda/size)" != "$NEWSECTORS" ]; do
        i=$((i + 1))
        [ $i -gt 600 ] && fail "size still $(cat /sys/block/vda/size), expected $NEWSECTORS after the resize"
        sleep 0.1
    done
    check "resized to $NEWSECTORS sectors"
    last=$((NEWSECTORS - 8))
    dd if=/dev/urandom of=/tmp/tail bs=4096 count=1 2>/dev/null
    dd if=/tmp/tail of=/dev/vda bs=512 seek=$last count=8 oflag=direct 2>/dev/null || fail "write at the new end"
    echo "BLKPLANE-MD5 $((last * 512)) 4096 $(md5sum < /tmp/tail | cut -d' ' -f1)"
    check "wrote the last 4 KiB of the grown disk"
    echo "BLKPLANE-PASS"
    poweroff -f
fi

if [ "$MODE" = limit ]; then
    # The host serves the disk under a rate limit and checks the figure fio prints here:
    # random reads at depth 16 for 6 s (terse output: field 8 is the read IOPS).
    fio --name=limit --filename=/dev/vda --eta=never --direct=1 --ioengine=libaio --iodepth=16 \
        --rw=randread --bs=4k --time_based=1 --runtime=6 --output-format=terse \
        --terse-version=3 --output=/tmp/fio || { cat /tmp/fio; fail "fio under the limit"; }
    echo "BLKPLANE-IOPS $(cut -d';' -f8 /tmp/fio)"
    echo "BLKPLANE-PASS"
    poweroff -f
fi

if [ "$MODE" = restart ]; then
    # The host kills (SIGKILL, SIGTERM) and restarts the daemon under us while fio writes and
    # verifies; QEMU reconnects and the requests in flight must complete without an error.
    # The host types "flush" on the console when it is done killing, then "stop".
    printf 'BLKPLANE-RUN-%s' "$RUNID" > /tmp/id
    dd if=/tmp/id of=/dev/vda bs=512 count=1 conv=sync oflag=direct 2>/dev/null || fail "write run id"
    echo "BLKPLANE-IO-START"
    round=0
    while :; do
        round=$((round + 1))
        fio_job --verify_backlog=256 --do_verify=1
        echo "BLKPLANE-ROUND $round"
        host_says flush 0.1 && break
        [ $round -gt 100 ] && fail "the host never said flush"
    done
    # Each round: 1 MiB written to the second disk (cache=writeback on the host, so the
    # host's page cache holds it), then a FLUSH (fsync of the device), which the host's
    # fdatasync makes slow; the host kills the daemon while the FLUSH is in flight.
    [ -b /dev/vdb ] || fail "no /dev/vdb"
    echo "BLKPLANE-FLUSH-PHASE"
    n=0
    while :; do
        n=$((n + 1))
        dd if=/dev/urandom of=/tmp/f bs=1M count=1 2>/dev/null
        dd if=/tmp/f of=/dev/vdb bs=1M seek=40 oflag=direct 2>/dev/null || fail "write before flush $n"
        echo "BLKPLANE-FLUSHING $n"
        dd if=/dev/null of=/dev/vdb count=0 conv=notrunc,fsync 2>/dev/null || fail "flush $n"
        echo "BLKPLANE-FLUSHED $n"
        host_says stop 5 && break
        [ $n -gt 10 ] && fail "the host never said stop"
    done
    echo "BLKPLANE-MD5-VDB 41943040 1048576 $(md5sum < /tmp/f | cut -d' ' -f1)"
    fio_job --verify_only
    check "fio data of the last round verified"
    if dmesg | grep -iE 'I/O error|blk_update_request|Buffer I/O|critical medium'; then
        fail "the guest kernel logged I/O errors"
    fi
    check "no I/O error in the kernel log after $round fio rounds and $n flushes"
    echo "BLKPLANE-PASS"
    poweroff -f
fi

if [ "$MODE" = migrate ]; then
    # The host live-migrates this VM to a second QEMU while the guest does I/O, and types
    # "stop" on the console (the destination's by then) once the migration has completed.
    # blkplane.workload=write: fio's random writes, each verified soon after. read: buffered
    # reads of 32 MiB into the page cache, round after round, the cache dropped before each; the round under way at the switch-over is not dropped, and its checksum,
    # read back from the cache on the destination, shows whether every page the daemon read
    # into guest memory on the source reached the destination.
    WORKLOAD=$(param workload)
    printf 'BLKPLANE-RUN-%s' "$RUNID" > /tmp/id
    dd if=/tmp/id of=/dev/vda bs=512 count=1 conv=sync oflag=direct 2>/dev/null || fail "write run id"
    # Linux drops a block device's page cache when its last opener closes it: hold it open.
    exec 3< /dev/vda
    echo "BLKPLANE-IO-START"
    round=0
    while :; do
        round=$((round + 1))
        if [ "$WORKLOAD" = read ]; then
            # A window that moves 4 MiB a round: the pages the cache reuses get other data
            # than they held, so a page that missed the destination cannot match by chance.
            skip=$(( (round % 8) * 4 ))
            echo 3 > /proc/sys/vm/drop_caches
            dd if=/dev/vda of=/dev/null bs=1M skip=$skip count=32 2>/dev/null || fail "read round $round"
        else
            fio_job --verify_backlog=256 --do_verify=1
        fi
        echo "BLKPLANE-ROUND $round"
        host_says stop 0.1 && break
        [ $round -gt 200 ] && fail "the host never said stop"
    done
    if [ "$WORKLOAD" = read ]; then
        echo "BLKPLANE-MD5 $((skip << 20)) 33554432 $(dd if=/dev/vda bs=1M skip=$skip count=32 2>/dev/null | md5sum | cut -d' ' -f1)"
    else
        fio_job --verify_only
        check "fio data of the last round verified after $round rounds"
    fi
    if dmesg | grep -iE 'I/O error|blk_update_request|Buffer I/O|critical medium'; then
        fail "the guest kernel logged I/O errors"
    fi
    echo "BLKPLANE-PASS"
    poweroff -f
fi

if [ "$MODE" = hotplug ]; then
    # The host plugs a DIMM into this VM, waits for us to take it out of use, unplugs it and
    # types "stop"; fio writes and verifies all along (in the background). The kernel onlines
    # the DIMM as movable memory (memhp_default_state=online_movable), which user pages, fio's
    # buffers among them, take before any other zone; the old memory is filled with a tmpfs
    # file as well, so the buffers of every fio round after the plug come from the DIMM.
    printf 'BLKPLANE-RUN-%s' "$RUNID" > /tmp/id
    dd if=/tmp/id of=/dev/vda bs=512 count=1 conv=sync oflag=direct 2>/dev/null || fail "write run id"
    mem=/sys/devices/system/memory
    blocks() { ls -d $mem/memory* | sed 's,.*/memory,,' | sort -n; }
    blocks > /tmp/old-blocks
    mkdir -p /fill
    mount -t tmpfs -o size=100% fill /fill
    free_mib=$(( $(awk '/^MemFree:/ {print $2}' /proc/meminfo) / 1024 ))
    # 48 MiB stay free: fio, the shell, and the DIMM's pages when it goes out of use.
    dd if=/dev/zero of=/fill/old bs=1M count=$((free_mib - 48)) 2>/dev/null || fail "fill the old memory"
    check "old memory filled: $((free_mib - 48)) of $free_mib MiB free taken, $(wc -l < /tmp/old-blocks) memory blocks"
    (
        round=0
        while [ ! -e /tmp/stop ]; do
            round=$((round + 1))
            fio_job --verify_backlog=256 --do_verify=1
            echo "BLKPLANE-ROUND $round"
        done
        touch /tmp/stopped
    ) &
    echo "BLKPLANE-IO-START"
    # Runs "$@" every 0.1 s until it succeeds; fails the test with $2 after $1 tries.
    poll() {
        tries=$1; what=$2; shift 2
        i=0
        until "$@"; do
            i=$((i + 1))
            [ $i -gt "$tries" ] && fail "$what"
            sleep 0.1
        done
    }
    old=$(wc -l < /tmp/old-blocks)
    more_blocks() { [ "$(blocks | wc -l)" -gt "$old" ]; }
    old_blocks_only() { [ "$(blocks | wc -l)" = "$old" ]; }
    online() { [ "$(cat $mem/memory$1/state)" = online ]; }
    take_offline() { echo offline > $mem/memory$1/state 2>/dev/null; }
    poll 1200 "no new memory block" more_blocks
    sleep 1
    blocks | grep -vxF -f /tmp/old-blocks > /tmp/new-blocks
    for b in $(cat /tmp/new-blocks); do
        poll 100 "memory block $b does not come online" online $b
        zone=$(cat $mem/memory$b/valid_zones)
        [ "$zone" = Movable ] || fail "memory block $b onlined in zone $zone"
    done
    check "DIMM online: blocks $(echo $(cat /tmp/new-blocks)) in zone Movable, MemTotal $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) kB"
    # The host lets fio run whole rounds on the new memory, then says "offline".
    echo "BLKPLANE-ONLINE"
    poll 120 "the host never said offline" host_says offline 1
    used=$(awk '/^Node .* zone +Movable/ {m=1; next} /^Node/ {m=0} m && /present/ {p=$2} m && /nr_free_pages/ {f=$2} END {print p - f}' /proc/zoneinfo)
    check "pages in use in the DIMM's zone before it goes out of use: $used"
    rm -f /fill/old
    for b in $(cat /tmp/new-blocks); do
        poll 100 "memory block $b does not go offline" take_offline $b
    done
    check "DIMM offline: blocks $(echo $(cat /tmp/new-blocks))"
    echo "BLKPLANE-OFFLINE"
    poll 1200 "the DIMM's memory blocks are still there" old_blocks_only
    check "DIMM removed: MemTotal $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) kB"
    poll 120 "the host never said stop" host_says stop 1
    touch /tmp/stop
    poll 600 "fio did not stop" [ -e /tmp/stopped ]
    fio_job --verify_only
    check "fio data of the last round verified"
    if dmesg | grep -iE 'I/O error|blk_update_request|Buffer I/O|critical medium'; then
        fail "the guest kernel logged I/O errors"
    fi
    echo "BLKPLANE-PASS"
    poweroff -f
fi

if [ "$MODE" = many ]; then
    # Two disks QEMU gave as many queues as it liked: vda with QEMU's default (one per vCPU,
    # checked above against blkplane.queues), vdb with num-queues=blkplane.queues2, of which
    # virtio-blk uses one per CPU. On each CPU in turn, 1 MiB is written to each disk with
    # O_DIRECT and read back, so every queue the guest uses carries verified I/O.
    i=0
    while [ ! -b /dev/vdb ]; do
        i=$((i + 1))
        [ $i -gt 100 ] && fail "no /dev/vdb"
        sleep 0.1
    done
    cpus=$(nproc)
    nq=$(ls /sys/block/vdb/mq | wc -l)
    [ "$nq" = "$cpus" ] || fail "vdb (num-queues=$(param queues2)) has $nq queues, $cpus CPUs"
    check "vdb: num-queues=$(param queues2), $nq queues in use"
    printf 'BLKPLANE-RUN-%s' "$RUNID" > /tmp/id
    for d in vda vdb; do
        dd if=/tmp/id of=/dev/$d bs=512 count=1 conv=sync oflag=direct 2>/dev/null || fail "write run id to $d"
    done
    cpu=0
    while [ $cpu -lt "$cpus" ]; do
        for d in vda vdb; do
            off=$((8 + cpu))
            dd if=/dev/urandom of=/tmp/pat bs=1M count=1 2>/dev/null
            taskset -c $cpu dd if=/tmp/pat of=/dev/$d bs=1M seek=$off oflag=direct 2>/dev/null || fail "write $d on CPU $cpu"
            taskset -c $cpu dd if=/dev/$d of=/tmp/back bs=1M skip=$off count=1 iflag=direct 2>/dev/null || fail "read $d on CPU $cpu"
            cmp /tmp/pat /tmp/back || fail "$d read back on CPU $cpu differs"
            echo "BLKPLANE-MD5-$d $((off << 20)) 1048576 $(md5sum < /tmp/pat | cut -d' ' -f1)"
        done
        cpu=$((cpu + 1))
    done
    check "1 MiB written and read back on each disk from each of $cpus CPUs"
    echo "BLKPLANE-PASS"
    poweroff -f
fi

if [ "$MODE" = ro ]; then
    [ "$(cat /sys/block/vda/ro)" = 1 ] || fail "not read-only"
    check "read-only flag set"
    if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then
        fail "a write to the read-only disk succeeded"
    fi
    check "write refused"
    dd if=/dev/vda of=/tmp/head bs=4096 count=16 iflag=direct 2>/dev/null || fail "read from the read-only disk"
    echo "BLKPLANE-MD5 0 65536 $(md5sum < /tmp/head | cut -d' ' -f1)"
    echo "BLKPLANE-PASS"
    poweroff -f
fi

[ "$(cat /sys/block/vda/ro)" = 0 ] || fail "read-only, expected read-write"

# The run id at offset 0, then 4 MiB of random data at 1 MiB, written and read with O_DIRECT.
printf 'BLKPLANE-RUN-%s' "$RUNID" > /tmp/id
dd if=/tmp/id of=/dev/vda bs=512 count=1 conv=sync oflag=direct 2>/dev/null || fail "write run id"
dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=1M seek=1 oflag=direct 2>/dev/null || fail "O_DIRECT write"
dd if=/dev/vda of=/tmp/back bs=1M skip=1 count=4 iflag=direct 2>/dev/null || fail "O_DIRECT read"
cmp /tmp/pat /tmp/back || fail "O_DIRECT read-back differs"
check "4 MiB O_DIRECT write and read-back"
echo "BLKPLANE-MD5 1048576 4194304 $(md5sum < /tmp/pat | cut -d' ' -f1)"
rm -f /tmp/back

# fio with verification: random writes then verifying reads, at depth 1 and 16.
fio --name=qd1 --filename=/dev/vda --eta=never --direct=1 --ioengine=psync --rw=randwrite --bs=4k \
    --offset=8M --size=8M --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --output=/tmp/fio1 || { cat /tmp/fio1; fail "fio QD1"; }
check "fio randwrite+verify QD1"
fio --name=qd16 --filename=/dev/vda --eta=never --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite \
    --bs=4k --offset=16M --size=8M --numjobs="$QUEUES" --offset_increment=8M \
    --verify=crc32c --verify_fatal=1 --do_verify=1 --output=/tmp/fio16 || { cat /tmp/fio16; fail "fio QD16"; }
check "fio randwrite+verify QD16 x $QUEUES jobs"
fio --name=reread --filename=/dev/vda --eta=never --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite \
    --bs=4k --offset=8M --size=8M --verify=crc32c --verify_only --verify_fatal=1 \
    --output=/tmp/fio3 || { cat /tmp/fio3; fail "fio verify-only randread QD16"; }
check "fio random re-read and verify QD16"

# Flush.
sync || fail "sync"
blockdev --flushbufs /dev/vda || fail "flushbufs"
check "flush"

# Discard: data first, then the range must read back as zeroes.
[ "$(cat /sys/block/vda/queue/discard_max_bytes)" != 0 ] || fail "discard not offered"
dd if=/dev/urandom of=/dev/vda bs=1M seek=48 count=1 oflag=direct 2>/dev/null || fail "write before discard"
blkdiscard -o $((48 << 20)) -l $((1 << 20)) /dev/vda || fail "blkdiscard"
zero=$(dd if=/dev/zero bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)
got=$(dd if=/dev/vda bs=1M skip=48 count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$zero" ] || fail "discarded range does not read back as zeroes"
check "discard reads back zeroes"

sync
echo "BLKPLANE-PASS"
poweroff -f
