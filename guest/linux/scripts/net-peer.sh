# Two VMs on one virtual network (through the card's overlay): configures eth0 and then
#   role server: serves a random blob over HTTP (busybox httpd, port 8080) until powered off and
#                prints  OUTBOARD_NET_SERVER md5=<blob md5> bytes=<n>
#   role client: waits until the peer answers ping, pings it 20 times, fetches the blob and prints
#                OUTBOARD_NET_CLIENT ok=1 loss_pct=<n> rtt_avg_ms=<ms> md5=<md5> bytes=<n> seconds=<s>
#                (ok=0 reason=... when the peer never answers or the fetch fails)
# Parameters: outboard.net.ip (CIDR), .peer, .role, .mib (blob size), .wait (seconds for the
# peer's first answer, default 90).
. /outboard/lib.sh
ip_cidr=$(param outboard.net.ip 10.9.0.1/24)
peer=$(param outboard.net.peer 10.9.0.2)
role=$(param outboard.net.role client)
mib=$(param outboard.net.mib 4)
# Seconds to wait for the peer's first ping answer.
wait_s=$(param outboard.net.wait 90)

ip link set eth0 up || { echo "OUTBOARD_NET_CLIENT ok=0 reason=no-eth0"; exit 2; }
ip addr add "$ip_cidr" dev eth0 || exit 2

now() { cut -d' ' -f1 /proc/uptime; }

case "$role" in
server)
    mkdir -p /tmp/www
    dd if=/dev/urandom of=/tmp/www/blob bs=1M count="$mib" 2>/dev/null
    echo "OUTBOARD_NET_SERVER md5=$(md5sum </tmp/www/blob | cut -d' ' -f1) bytes=$(wc -c </tmp/www/blob)"
    exec httpd -f -p 8080 -h /tmp/www
    ;;
client)
    tries=0
    until ping -c 1 -W 1 "$peer" >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -ge "$wait_s" ]; then
            echo "OUTBOARD_NET_CLIENT ok=0 reason=unreachable"
            exit 1
        fi
    done
    ping -c 20 -i 0.2 "$peer" >/tmp/ping.txt 2>&1
    loss=$(sed -n 's/.* \([0-9]*\)% packet loss.*/\1/p' /tmp/ping.txt)
    rtt=$(sed -n 's|.*min/avg/max = [0-9.]*/\([0-9.]*\)/.*|\1|p' /tmp/ping.txt)
    tries=0
    start=$(now)
    until wget -q -O /tmp/blob "http://$peer:8080/blob"; do
        tries=$((tries + 1))
        if [ "$tries" -ge 30 ]; then
            echo "OUTBOARD_NET_CLIENT ok=0 reason=fetch loss_pct=$loss"
            exit 1
        fi
        sleep 1
        start=$(now)
    done
    end=$(now)
    seconds=$(awk "BEGIN { print $end - $start }")
    echo "OUTBOARD_NET_CLIENT ok=1 loss_pct=$loss rtt_avg_ms=$rtt md5=$(md5sum </tmp/blob | cut -d' ' -f1) bytes=$(wc -c </tmp/blob) seconds=$seconds"
    ;;
*)
    echo "net-peer: unknown role $role"
    exit 2
    ;;
esac
