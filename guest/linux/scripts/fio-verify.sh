# fio with verify on a guest disk (default: the first virtio-blk disk, /dev/vda): writes a
# pattern with checksums, reads it back and checks it, then prints one line
#   OUTBOARD_FIO_RESULT status=ok|fail|nodev rc=<fio exit> errors=<fio error> write_kib=<n> read_kib=<n> dev=... size=... rw=... bs=... iodepth=... loops=...
# Parameters (kernel command line): outboard.fio.dev, .size, .rw, .bs, .iodepth, .ioengine, .loops.
. /outboard/lib.sh
dev=$(param outboard.fio.dev /dev/vda)
size=$(param outboard.fio.size 16M)
rw=$(param outboard.fio.rw randwrite)
bs=$(param outboard.fio.bs 4k)
iodepth=$(param outboard.fio.iodepth 8)
ioengine=$(param outboard.fio.ioengine libaio)
loops=$(param outboard.fio.loops 1)
settings="dev=$dev size=$size rw=$rw bs=$bs iodepth=$iodepth loops=$loops"

if [ ! -b "$dev" ]; then
    echo "fio-verify: $dev is not a block device; disks: $(ls /sys/block | tr '\n' ' ')"
    echo "OUTBOARD_FIO_RESULT status=nodev rc=1 $settings"
    exit 2
fi

terse=$(fio --name=verify --filename="$dev" --rw="$rw" --bs="$bs" --size="$size" \
    --ioengine="$ioengine" --iodepth="$iodepth" --direct=1 --loops="$loops" \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
    --output-format=terse --terse-version=3 2>&1)
rc=$?
# Terse v3 fields: 5 error, 6 read KiB, 47 write KiB.
line=$(echo "$terse" | grep '^3;' | tail -n 1)
errors=$(echo "$line" | cut -d';' -f5)
read_kib=$(echo "$line" | cut -d';' -f6)
write_kib=$(echo "$line" | cut -d';' -f47)
status=fail
[ "$rc" = 0 ] && [ "$errors" = 0 ] && [ -n "$write_kib" ] && status=ok
[ "$status" = ok ] || echo "$terse"
echo "OUTBOARD_FIO_RESULT status=$status rc=$rc errors=${errors:-none} write_kib=${write_kib:-0} read_kib=${read_kib:-0} $settings"
[ "$status" = ok ]
