# Data survives a guest reboot. Boot 1 (no marker on the disk) writes a verifiable pattern with
# fio, then a marker block (flushed), prints
#   OUTBOARD_PERSIST_WRITTEN status=ok|fail rc=<fio exit> errors=<fio error> write_kib=<n>
# and reboots; with a failure it stops instead. Boot 2 (marker found) reads everything back,
# checks it against the pattern and prints
#   OUTBOARD_PERSIST_RESULT status=ok|fail rc=<fio exit> errors=<fio error> read_kib=<n>
# Parameters (kernel command line): outboard.persist.dev (/dev/vda), .size (16M), .bs (4k).
. /outboard/lib.sh
dev=$(param outboard.persist.dev /dev/vda)
size=$(param outboard.persist.size 16M)
bs=$(param outboard.persist.bs 4k)
marker=OUTBOARD-PERSIST-MARKER

if [ ! -b "$dev" ]; then
    echo "OUTBOARD_PERSIST_RESULT status=nodev dev=$dev"
    exit 2
fi
# The marker lives in the disk's last 4 KiB, away from fio's area at the start.
sectors=$(cat "/sys/block/${dev#/dev/}/size")
last=$((sectors / 8 - 1))

# Both boots run the same fio job (same offsets, same seeds): the second only verifies.
job() {
    fio --name=persist --filename="$dev" --rw=write --bs="$bs" --size="$size" \
        --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --verify_fatal=1 \
        --verify_state_save=0 --output-format=terse --terse-version=3 "$@" 2>&1
}

if dd if="$dev" bs=4096 skip="$last" count=1 2>/dev/null | grep -q "$marker"; then
    terse=$(job --verify_only)
    rc=$?
    line=$(echo "$terse" | grep '^3;' | tail -n 1)
    errors=$(echo "$line" | cut -d';' -f5)
    read_kib=$(echo "$line" | cut -d';' -f6)
    status=fail
    [ "$rc" = 0 ] && [ "$errors" = 0 ] && [ "${read_kib:-0}" -gt 0 ] && status=ok
    [ "$status" = ok ] || echo "$terse"
    echo "OUTBOARD_PERSIST_RESULT status=$status rc=$rc errors=${errors:-none} read_kib=${read_kib:-0}"
    [ "$status" = ok ]
    exit
fi

terse=$(job --do_verify=0)
rc=$?
line=$(echo "$terse" | grep '^3;' | tail -n 1)
errors=$(echo "$line" | cut -d';' -f5)
write_kib=$(echo "$line" | cut -d';' -f47)
status=fail
[ "$rc" = 0 ] && [ "$errors" = 0 ] && [ "${write_kib:-0}" -gt 0 ] && status=ok
if [ "$status" = ok ]; then
    # conv=fsync: the marker and, before it, fio's O_DIRECT writes are flushed to the card.
    printf '%s\n' "$marker" | dd of="$dev" bs=4096 seek="$last" count=1 conv=sync,fsync 2>/dev/null ||
        status=fail
fi
[ "$status" = ok ] || echo "$terse"
echo "OUTBOARD_PERSIST_WRITTEN status=$status rc=$rc errors=${errors:-none} write_kib=${write_kib:-0}"
[ "$status" = ok ] || exit 1
reboot -f
# reboot -f does not return; if it does, stop here rather than power off with a pass.
sleep 3600
