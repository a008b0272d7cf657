# A heartbeat for live-update tests: every outboard.heartbeat.ms (100) milliseconds prints
#   OUTBOARD_HEARTBEAT seq=<n> uptime=<s> [disk=ok|fail]
# for outboard.heartbeat.count beats (0: until powered off). With outboard.heartbeat.dev=<block
# device> each beat also writes its number to sector n % 2048 of that device, drops the
# device's buffer cache and reads the sector back from the device (disk=ok when it matches).
. /outboard/lib.sh
ms=$(param outboard.heartbeat.ms 100)
count=$(param outboard.heartbeat.count 0)
dev=$(param outboard.heartbeat.dev "")
interval="$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"

if [ -n "$dev" ] && [ ! -b "$dev" ]; then
    echo "OUTBOARD_GUEST_ERROR heartbeat: $dev is not a block device"
    exit 2
fi
n=0
while [ "$count" = 0 ] || [ "$n" -lt "$count" ]; do
    n=$((n + 1))
    disk=""
    if [ -n "$dev" ]; then
        sector=$((n % 2048))
        want=$(printf 'OUTBOARD_BEAT %016d' "$n")
        echo "$want" | dd of="$dev" bs=512 seek="$sector" count=1 conv=sync,fsync 2>/dev/null
        blockdev --flushbufs "$dev"
        got=$(dd if="$dev" bs=512 skip="$sector" count=1 2>/dev/null | head -c ${#want})
        if [ "$got" = "$want" ]; then disk=" disk=ok"; else disk=" disk=fail"; fi
    fi
    echo "OUTBOARD_HEARTBEAT seq=$n uptime=$(cut -d' ' -f1 /proc/uptime)$disk"
    sleep "$interval"
done
