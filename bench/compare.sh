#!/usr/bin/env bash
# Peer comparison of issue 7: the same fio workloads against ringblk, qemu-nbd and
# nbdkit serving one backing file, and against the file itself (the local limit),
# back to back, repeated; prints a median table with ratios, and the servers' CPU.
#
#   bench/compare.sh                 3 rounds x 4 s (+1 s ramp), 1 GiB file   (~7-8 min)
#   bench/compare.sh --quick         1 round  x 3 s (+1 s ramp), 256 MiB      (< 3 min)
#   bench/compare.sh --smoke         1 round  x 1 s, one workload, 64 MiB    (seconds, CI)
#   bench/compare.sh --repeat 5 --runtime 10 --size 4G --out /some/dir
#   bench/compare.sh --no-build      use the release binaries already built
#   RINGBLK_ARGS="--submit batch" bench/compare.sh   extra `ringblk serve` flags
#   bench/compare.sh --bench-client  also drive every NBD server with ringblk-bench
#                                    (exact HdrHistogram latency; adds ~1/3 to the time)
#   bench/compare.sh --ringblk-old OLD --ringblk-new NEW
#                                    also run two given ringblk binaries (file and null
#                                    backends) and print new/old per workload; e.g. a
#                                    baseline build against the tree's (issue #12 gate)
#   bench/compare.sh --pin           servers (all their threads) on CPU 0, fio on CPU 1
#                                    (ringblk with --cores 0): on a 2-core machine the
#                                    scheduler then cannot move the client onto the
#                                    reactor's core between rounds, the main source of
#                                    run-to-run spread for the file workloads
#   bench/compare.sh --vhost         the vhost-user-blk section instead (issue #13): the
#                                    systems and workloads below, same method; with
#                                    --smoke: one workload, 1 s per system (CI)
#   bench/compare.sh --tls           the NBD-over-TLS section instead (issue #16):
#                                    ringblk-tls vs qemu-nbd-tls (same certificates from
#                                    `ringblk tls-init`, same run), 4 KiB randread QD32
#                                    and 128 KiB sequential read QD8; with --smoke, 1 s
#                                    each (CI)
#   bench/compare.sh --only SYS,SYS,... run only the named systems (names as listed below,
#                                    comma-separated; the others are skipped, and the
#                                    backing file is not written when no file-backed
#                                    system is left). The #12 performance gate, old vs
#                                    new only, 5 interleaved rounds (~10 min):
#     bench/compare.sh --repeat 5 --ringblk-old OLD --ringblk-new NEW \
#         --only ringblk-old,ringblk-new,ringblk-old-null,ringblk-new-null
#
# Systems (each started and stopped by this script, on a loopback port, by PID):
#   ringblk        ringblk serve --volume v=FILE            (file backend, O_DIRECT, io_uring)
#   qemu-nbd       qemu-nbd --aio=io_uring --cache=none     (O_DIRECT, io_uring)
#   nbdkit         nbdkit file FILE                         (page cache: its default)
#   local          fio --ioengine=io_uring --direct=1 on FILE: no network, no server
# and the overhead pair, where no storage is touched at all:
#   ringblk-null   ringblk serve --volume v=,backend=null
#   nbdkit-null    nbdkit null
# and with --ringblk-old/--ringblk-new, the same two ringblk set-ups per binary:
#   ringblk-old, ringblk-new              (file backend, as `ringblk`)
#   ringblk-old-null, ringblk-new-null    (null backend, as `ringblk-null`)
# They take their turns in the same interleaved rounds (RINGBLK_ARGS applies to them
# too), and the summary gets a table "ringblk new vs old" with the new/old ratios.
#
# With --tls, both servers serve the backing file over TLS (STARTTLS, TLS required)
# with the server certificate of one `ringblk tls-init` directory, and fio connects
# with nbds:// URIs:
#   ringblk-tls    ringblk serve --tls require --tls-creds DIR --volume v=FILE
#   qemu-nbd-tls   qemu-nbd ... --object tls-creds-x509,dir=DIR,endpoint=server,
#                  verify-peer=off --tls-creds tls0
# Neither asks for a client certificate: fio 3.33's nbd engine cannot pass libnbd a
# certificate directory (it refuses tls-certificates= in a URI).
#
# With --vhost, the systems are vhost-user-blk back ends on the same file, driven by
# `ringblk-bench run --vhost SOCKET` (libblkio's virtio-blk-vhost-user driver;
# VHOST_CLIENT_POLL=busy|adaptive|interrupt, default adaptive, is its --poll), and
# local fio as the limit:
#   ringblk-vhost      ringblk serve --volume v=FILE, then RPC vhost_create {v, SOCK,
#                      num_queues: 2} (ringblk-ctl call): two queues as the peer has
#   qsd-vhost          qemu-storage-daemon --blockdev driver=file,cache.direct=on,aio=io_uring
#                      --export type=vhost-user-blk,num-queues=2      (the peer)
#   local              as above
#   ringblk-vhost-null ringblk serve --volume v=,backend=null, the same export
#   qsd-vhost-null     qemu-storage-daemon --blockdev driver=null-co ... (same export)
# and the workloads rr4k-qd1, rr4k-qd32, rw4k-qd32, sr128k-qd8 and rr4k-qd32-q2
# (4 KiB random read, iodepth 32 on each of two virtqueues; numjobs 2 for local fio),
# on the file and on the null backends. The tables add "ringblk ÷ this" for IOPS per
# server CPU-second.
#
# Workloads (fio --ioengine=nbd for servers):
#   rr4k-qd1      4 KiB random read, iodepth 1
#   rr4k-qd32     4 KiB random read, iodepth 32
#   rw4k-qd32     4 KiB random write, iodepth 32
#   sr128k-qd8    128 KiB sequential read, iodepth 8
#   rr4k-qd32-j2  4 KiB random read, iodepth 32, numjobs 2 (two connections)
#
# Method:
# - Rounds interleave: for each round, each workload, each system in turn, so a drift
#   of the machine spreads over every system instead of favouring one.
# - Every run gets a freshly started server (no warm state carried over) and fio's
#   ramp is excluded from fio's figures. Medians over the rounds are reported.
# - Server CPU: utime+stime from /proc/PID/stat before and after the fio run; IOPS per
#   CPU-second = operations of the whole run (at the measured rate, ramp included) per
#   server CPU-second. ringblk's reactors spin while busy (adaptive idle policy), so
#   this is where polling shows its cost.
# - Latency: fio's total latency percentiles (lat_ns, i.e. submission to completion),
#   written as .hgrm per system and workload (median round) and overlaid in one SVG per
#   workload with `ringblk-bench plot`.
#
# Needs fio (required), qemu-nbd and nbdkit (skipped with a note when missing) and
# python3; ci/test.sh installs them. Output: OUT/summary.md, OUT/hgrm/*.hgrm,
# OUT/*.svg and every fio JSON in OUT/runs/. Default OUT: TARGET/compare/DATE.
set -euo pipefail
CALLER_PWD=$PWD
cd "$(dirname "$0")/.."

REPEAT=3 RUNTIME=4 RAMP=1 SIZE=1G MODE=default OUT="" BENCH_CLIENT=0 BUILD=1
RINGBLK_OLD="" RINGBLK_NEW="" ONLY="" PIN=0 VHOST=0 TLS=0
WORKLOADS="rr4k-qd1 rr4k-qd32 rw4k-qd32 sr128k-qd8 rr4k-qd32-j2"
NULL_WORKLOADS="rr4k-qd1 rr4k-qd32"
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --repeat) REPEAT=$2; shift ;;
        --runtime) RUNTIME=$2; shift ;;
        --ramp) RAMP=$2; shift ;;
        --size) SIZE=$2; shift ;;
        --out) OUT=$2; shift ;;
        --bench-client) BENCH_CLIENT=1 ;;
        --no-build) BUILD=0 ;;
        --ringblk-old) RINGBLK_OLD=${2:-}; shift ;;
        --ringblk-new) RINGBLK_NEW=${2:-}; shift ;;
        --only) ONLY=${2:-}; shift ;;
        --pin) PIN=1 ;;
        --vhost) VHOST=1 ;;
        --tls) TLS=1 ;;
        --quick) MODE=quick; REPEAT=1 RUNTIME=3 RAMP=1 SIZE=256M ;;
        --smoke) MODE=smoke; REPEAT=1 RUNTIME=1 RAMP=0 SIZE=64M
                 WORKLOADS="rr4k-qd32" NULL_WORKLOADS="rr4k-qd32" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# --pin: the prefixes that put a server and a client each on its own CPU.
SERVER_PIN=() CLIENT_PIN=() RINGBLK_PIN=()
if [ "$PIN" = 1 ]; then
    MODE="$MODE, pinned"
    command -v taskset >/dev/null || { echo "compare.sh: --pin needs taskset (util-linux)" >&2; exit 1; }
    [ "$(nproc)" -ge 2 ] || { echo "compare.sh: --pin needs 2 CPUs" >&2; exit 2; }
    SERVER_PIN=(taskset -c 0) CLIENT_PIN=(taskset -c 1) RINGBLK_PIN=(--cores 0)
fi

# An absolute path for a binary named relative to where the script was started.
abs_bin() {
    local b=$1
    case "$b" in /*) ;; *) b=$CALLER_PWD/$b ;; esac
    [ -x "$b" ] || { echo "compare.sh: $1 is not an executable" >&2; exit 2; }
    echo "$b"
}
if [ -n "$RINGBLK_OLD$RINGBLK_NEW" ]; then
    if [ -z "$RINGBLK_OLD" ] || [ -z "$RINGBLK_NEW" ]; then
        echo "compare.sh: --ringblk-old and --ringblk-new go together" >&2
        exit 2
    fi
    RINGBLK_OLD=$(abs_bin "$RINGBLK_OLD")
    RINGBLK_NEW=$(abs_bin "$RINGBLK_NEW")
fi

command -v fio >/dev/null || { echo "compare.sh: fio is required" >&2; exit 1; }
command -v python3 >/dev/null || { echo "compare.sh: python3 is required" >&2; exit 1; }
if [ "$VHOST" = 1 ]; then
    if [ -n "$RINGBLK_OLD" ] || [ "$BENCH_CLIENT" = 1 ]; then
        echo "compare.sh: --vhost goes without --ringblk-old/--ringblk-new and --bench-client" >&2
        exit 2
    fi
    MODE="vhost-user-blk, $MODE"
    WORKLOADS="rr4k-qd1 rr4k-qd32 rw4k-qd32 sr128k-qd8 rr4k-qd32-q2"
    NULL_WORKLOADS=$WORKLOADS
    case "$MODE" in *smoke*) WORKLOADS="rr4k-qd32-q2" NULL_WORKLOADS="rr4k-qd32-q2" ;; esac
    SYSTEMS="ringblk-vhost"
    NULL_SYSTEMS="ringblk-vhost-null"
    # qemu-storage-daemon is the peer: the comparison means nothing without it.
    command -v qemu-storage-daemon >/dev/null || {
        echo "compare.sh: --vhost needs qemu-storage-daemon (package qemu-utils)" >&2; exit 1; }
    SYSTEMS="$SYSTEMS qsd-vhost local"
    NULL_SYSTEMS="$NULL_SYSTEMS qsd-vhost-null"
elif [ "$TLS" = 1 ]; then
    if [ -n "$RINGBLK_OLD" ] || [ "$BENCH_CLIENT" = 1 ]; then
        echo "compare.sh: --tls goes without --ringblk-old/--ringblk-new and --bench-client" >&2
        exit 2
    fi
    MODE="NBD over TLS, $MODE"
    # The two workloads of #16, in --smoke too (1 s each).
    WORKLOADS="rr4k-qd32 sr128k-qd8"
    NULL_WORKLOADS=""
    command -v qemu-nbd >/dev/null || {
        echo "compare.sh: --tls needs qemu-nbd (package qemu-utils)" >&2; exit 1; }
    SYSTEMS="ringblk-tls qemu-nbd-tls"
    NULL_SYSTEMS=""
else
SYSTEMS="ringblk"
NULL_SYSTEMS="ringblk-null"
if command -v qemu-nbd >/dev/null; then SYSTEMS="$SYSTEMS qemu-nbd"
else echo "compare.sh: note: qemu-nbd not installed, skipped" >&2; fi
if command -v nbdkit >/dev/null; then SYSTEMS="$SYSTEMS nbdkit"; NULL_SYSTEMS="$NULL_SYSTEMS nbdkit-null"
else echo "compare.sh: note: nbdkit not installed, skipped" >&2; fi
SYSTEMS="$SYSTEMS local"
fi
# name+rbb: the same server driven by ringblk-bench instead of fio.
RBB_SYSTEMS=""
if [ "$BENCH_CLIENT" = 1 ]; then
    for s in $SYSTEMS; do [ "$s" = local ] || RBB_SYSTEMS="$RBB_SYSTEMS $s+rbb"; done
fi
# After RBB_SYSTEMS: old and new are compared with fio only.
if [ -n "$RINGBLK_OLD" ]; then
    SYSTEMS="$SYSTEMS ringblk-old ringblk-new"
    NULL_SYSTEMS="$NULL_SYSTEMS ringblk-old-null ringblk-new-null"
fi
# --only: keep the named systems (in the order above); a name that is not a system of
# this run is an error, not silently nothing.
if [ -n "$ONLY" ]; then
    known=" $SYSTEMS $NULL_SYSTEMS $RBB_SYSTEMS "
    for s in ${ONLY//,/ }; do
        case "$known" in
            *" $s "*) ;;
            *) echo "compare.sh: --only: $s is not a system of this run (they are:$known;" \
                    "ringblk-old* and ringblk-new* need --ringblk-old/--ringblk-new)" >&2
               exit 2 ;;
        esac
    done
    keep() {
        local out="" s
        for s in $1; do
            case ",$ONLY," in *",$s,"*) out="$out $s" ;; esac
        done
        echo "${out# }"
    }
    SYSTEMS=$(keep "$SYSTEMS")
    NULL_SYSTEMS=$(keep "$NULL_SYSTEMS")
    RBB_SYSTEMS=$(keep "$RBB_SYSTEMS")
    [ -n "$SYSTEMS$NULL_SYSTEMS$RBB_SYSTEMS" ] || { echo "compare.sh: --only: no system left" >&2; exit 2; }
    echo "== systems: $SYSTEMS $NULL_SYSTEMS $RBB_SYSTEMS" >&2
fi

TARGET=${CARGO_TARGET_DIR:-target}
# RINGBLK_PROFILE=debug runs the debug binaries (CI's smoke run: it checks that the
# script works, not how fast anything is).
PROFILE=${RINGBLK_PROFILE:-release}
if [ "$BUILD" = 1 ]; then
    echo "== building $PROFILE binaries" >&2
    if [ "$PROFILE" = release ]; then
        cargo build --release --quiet -p ringblk-server --bin ringblk -p ringblk-bench --bin ringblk-bench \
            -p ringblk-ctl --bin ringblk-ctl
    else
        cargo build --quiet -p ringblk-server --bin ringblk -p ringblk-bench --bin ringblk-bench \
            -p ringblk-ctl --bin ringblk-ctl
    fi
fi
RINGBLK=$TARGET/$PROFILE/ringblk
BENCH=$TARGET/$PROFILE/ringblk-bench
CTL=$TARGET/$PROFILE/ringblk-ctl
for b in "$RINGBLK" "$BENCH" "$CTL"; do
    [ -x "$b" ] || { echo "compare.sh: $b missing (build it, or drop --no-build)" >&2; exit 1; }
done
OUT=${OUT:-$TARGET/compare/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/runs" "$OUT/hgrm"
OUT=$(cd "$OUT" && pwd)
BACKING=$OUT/backing.img
: > "$OUT/results.tsv"
TLS_DIR=$OUT/tls
if [ "$TLS" = 1 ] && [ ! -e "$TLS_DIR/server-cert.pem" ]; then
    "$RINGBLK" tls-init "$TLS_DIR" > /dev/null
fi

SERVER_PID=""
URI=""
SOCK=$OUT/vhost.sock
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; fi
    # The backing file is as large as --size (1 GiB by default) and is no result:
    # runs kept in OUT would otherwise fill the disk, one backing file each.
    rm -f "$BACKING"
}
trap cleanup EXIT INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until FILE exists and is non-empty (a pid file or a banner), at most 10 s.
wait_file() {
    local f=$1 pid=$2
    for _ in $(seq 100); do
        if [ -s "$f" ]; then return 0; fi
        kill -0 "$pid" 2>/dev/null || { echo "compare.sh: server $pid died; see $OUT/server.log" >&2; return 1; }
        sleep 0.1
    done
    echo "compare.sh: server $pid did not come up in 10 s" >&2
    return 1
}

start_server() {
    local sys=${1%+rbb} port n
    n=$(date +%s%N)
    case "$sys" in
        ringblk|ringblk-null|ringblk-old|ringblk-old-null|ringblk-new|ringblk-new-null|ringblk-tls)
            local vol="v=$BACKING" bin=$RINGBLK scheme=nbd tls=()
            case "$sys" in *-null) vol="v=,backend=null,size=$SIZE" ;; esac
            case "$sys" in
                ringblk-old*) bin=$RINGBLK_OLD ;;
                ringblk-new*) bin=$RINGBLK_NEW ;;
                ringblk-tls) tls=(--tls require --tls-creds "$TLS_DIR") scheme=nbds ;;
            esac
            # The redirect below truncates the banner in the forked child, which may
            # run after the wait loop's first look: remove the last run's banner here,
            # or its port may be read (connection refused).
            rm -f "$OUT/banner"
            # shellcheck disable=SC2086 # RINGBLK_ARGS is a list of flags on purpose
            "${SERVER_PIN[@]}" "$bin" serve --listen 127.0.0.1:0 --data-dir "$OUT/ringblk-data.$n" --rpc "$OUT/ringblk.$n.sock" \
                --volume "$vol" "${tls[@]}" "${RINGBLK_PIN[@]}" ${RINGBLK_ARGS:-} > "$OUT/banner" 2> "$OUT/server.log" &
            SERVER_PID=$!
            for _ in $(seq 100); do
                grep -q "listening on" "$OUT/banner" 2>/dev/null && break
                kill -0 "$SERVER_PID" 2>/dev/null || { cat "$OUT/server.log" >&2; return 1; }
                sleep 0.1
            done
            port=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$OUT/banner" | cut -d: -f2)
            [ -n "$port" ] || { echo "compare.sh: no ringblk banner" >&2; return 1; }
            URI="$scheme://127.0.0.1:$port/v"
            ;;
        qemu-nbd-tls)
            port=$(free_port)
            rm -f "$OUT/qemu.pid"
            "${SERVER_PIN[@]}" qemu-nbd -f raw --aio=io_uring --cache=none -x v -b 127.0.0.1 -p "$port" -t -e 16 \
                --object "tls-creds-x509,id=tls0,dir=$TLS_DIR,endpoint=server,verify-peer=off" --tls-creds tls0 \
                --pid-file="$OUT/qemu.pid" "$BACKING" 2> "$OUT/server.log" &
            SERVER_PID=$!
            wait_file "$OUT/qemu.pid" "$SERVER_PID"
            URI="nbds://127.0.0.1:$port/v"
            ;;
        qemu-nbd)
            port=$(free_port)
            rm -f "$OUT/qemu.pid"
            "${SERVER_PIN[@]}" qemu-nbd -f raw --aio=io_uring --cache=none -x v -b 127.0.0.1 -p "$port" -t -e 16 \
                --pid-file="$OUT/qemu.pid" "$BACKING" 2> "$OUT/server.log" &
            SERVER_PID=$!
            wait_file "$OUT/qemu.pid" "$SERVER_PID"
            URI="nbd://127.0.0.1:$port/v"
            ;;
        nbdkit|nbdkit-null)
            port=$(free_port)
            rm -f "$OUT/nbdkit.pid"
            local plugin=(file "$BACKING")
            [ "$sys" = nbdkit-null ] && plugin=(null "$SIZE")
            "${SERVER_PIN[@]}" nbdkit -f -i 127.0.0.1 -p "$port" -P "$OUT/nbdkit.pid" "${plugin[@]}" 2> "$OUT/server.log" &
            SERVER_PID=$!
            wait_file "$OUT/nbdkit.pid" "$SERVER_PID"
            URI="nbd://127.0.0.1:$port/"
            ;;
        ringblk-vhost|ringblk-vhost-null)
            local vol="v=$BACKING"
            [ "$sys" = ringblk-vhost-null ] && vol="v=,backend=null,size=$SIZE"
            rm -f "$OUT/banner" "$SOCK"
            # shellcheck disable=SC2086 # RINGBLK_ARGS is a list of flags on purpose
            "${SERVER_PIN[@]}" "$RINGBLK" serve --listen 127.0.0.1:0 --data-dir "$OUT/ringblk-data.$n" \
                --rpc "$OUT/ringblk.$n.sock" --volume "$vol" "${RINGBLK_PIN[@]}" \
                ${RINGBLK_ARGS:-} > "$OUT/banner" 2> "$OUT/server.log" &
            SERVER_PID=$!
            wait_socket "$OUT/ringblk.$n.sock" "$SERVER_PID"
            # Two virtqueues as qemu-storage-daemon's num-queues=2, whatever the
            # reactor count (--pin gives ringblk one reactor; its default is one
            # queue per reactor).
            "$CTL" --rpc "$OUT/ringblk.$n.sock" call vhost_create \
                "{\"volume\": \"v\", \"socket\": \"$SOCK\", \"num_queues\": 2}" > /dev/null
            wait_socket "$SOCK" "$SERVER_PID"
            URI=$SOCK
            ;;
        qsd-vhost|qsd-vhost-null)
            local dev="driver=file,node-name=f,filename=$BACKING,cache.direct=on,aio=io_uring"
            # null-co takes its size in bytes.
            [ "$sys" = qsd-vhost-null ] && dev="driver=null-co,node-name=f,size=$(numfmt --from=iec "$SIZE")"
            rm -f "$SOCK" "$OUT/qsd.pid"
            "${SERVER_PIN[@]}" qemu-storage-daemon --blockdev "$dev" \
                --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=2" \
                --pidfile "$OUT/qsd.pid" 2> "$OUT/server.log" &
            SERVER_PID=$!
            wait_socket "$SOCK" "$SERVER_PID"
            URI=$SOCK
            ;;
        local) SERVER_PID=""; URI="" ;;
    esac
}

# Waits until something listens on the Unix socket SOCK, at most 10 s.
wait_socket() {
    local sock=$1 pid=$2
    for _ in $(seq 100); do
        if [ -S "$sock" ] && python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' "$sock" 2>/dev/null; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { echo "compare.sh: server $pid died; see $OUT/server.log" >&2; cat "$OUT/server.log" >&2; return 1; }
        sleep 0.1
    done
    echo "compare.sh: nothing listens on $sock after 10 s" >&2
    return 1
}

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    rm -rf "$OUT"/ringblk-data.*
}

# utime + stime of a process, in clock ticks.
cpu_ticks() {
    [ -n "$1" ] || { echo 0; return; }
    # Fields after the ")" that ends the command name: state is 1st, utime 12th, stime 13th.
    sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}

workload_args() {
    case "$1" in
        rr4k-qd1) echo "--rw=randread --bs=4k --iodepth=1" ;;
        rr4k-qd32) echo "--rw=randread --bs=4k --iodepth=32" ;;
        rw4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
        sr128k-qd8) echo "--rw=read --bs=128k --iodepth=8" ;;
        rr4k-qd32-j2|rr4k-qd32-q2) echo "--rw=randread --bs=4k --iodepth=32 --numjobs=2" ;;
    esac
}

# The same workloads for ringblk-bench (numjobs = connections).
bench_args() {
    case "$1" in
        rr4k-qd1) echo "--rw randread --bs 4k --iodepth 1" ;;
        rr4k-qd32) echo "--rw randread --bs 4k --iodepth 32" ;;
        rw4k-qd32) echo "--rw randwrite --bs 4k --iodepth 32" ;;
        sr128k-qd8) echo "--rw read --bs 128k --iodepth 8" ;;
        rr4k-qd32-j2) echo "--rw randread --bs 4k --iodepth 32 --connections 2" ;;
        rr4k-qd32-q2) echo "--rw randread --bs 4k --iodepth 32 --queues 2" ;;
    esac
}

# fio keeps at most 20 percentiles.
PCTS="10:20:30:40:50:60:70:80:90:95:97.5:99:99.5:99.9:99.95:99.99:99.995:99.999:100"

# The client command of one run, as an array in CLIENT (fio, or ringblk-bench for +rbb).
client_cmd() {
    local sys=$1 w=$2 base=$3
    case "$sys" in
        *-vhost|*-vhost-null)
            # shellcheck disable=SC2046,SC2207 # bench_args is a list of words on purpose
            CLIENT=("${CLIENT_PIN[@]}" "$BENCH" run --vhost "$URI" $(bench_args "$w") --runtime "$RUNTIME"
                    --ramp "$RAMP" --poll "${VHOST_CLIENT_POLL:-adaptive}" --quiet --json --hgrm "$base.hgrm")
            return ;;
    esac
    if [ "${sys%+rbb}" != "$sys" ]; then
        # shellcheck disable=SC2046,SC2207 # bench_args is a list of words on purpose
        CLIENT=("${CLIENT_PIN[@]}" "$BENCH" run "$URI" $(bench_args "$w") --runtime "$RUNTIME" --ramp "$RAMP"
                --quiet --json --hgrm "$base.hgrm")
        return
    fi
    local engine=(--ioengine=nbd "--uri=$URI")
    [ "$sys" = local ] && engine=(--ioengine=io_uring --direct=1 "--filename=$BACKING")
    # shellcheck disable=SC2046,SC2207 # workload_args is a list of words on purpose
    CLIENT=("${CLIENT_PIN[@]}" fio --name="$w" "${engine[@]}" $(workload_args "$w") --size="$SIZE"
            --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --group_reporting
            --lat_percentiles=1 --percentile_list="$PCTS" --output-format=json)
}

run_one() {
    local sys=$1 w=$2 rep=$3 base t0 t1
    base="$OUT/runs/$sys.$w.$rep"
    start_server "$sys"
    client_cmd "$sys" "$w" "$base"
    t0=$(cpu_ticks "$SERVER_PID")
    if ! "${CLIENT[@]}" > "$base.json" 2> "$base.err"; then
        echo "compare.sh: ${CLIENT[0]} failed for $sys $w; see $base.err" >&2
        stop_server
        return 1
    fi
    t1=$(cpu_ticks "$SERVER_PID")
    stop_server
    printf '%s\t%s\t%s\t%s\t%s\n' "$sys" "$w" "$rep" "$base.json" "$((t1 - t0))" >> "$OUT/results.tsv"
    printf '  %-13s %-13s round %s done\n' "$sys" "$w" "$rep" >&2
}

# Null systems need no backing file: skip the fill when only they run (--only).
if [ -n "$SYSTEMS$RBB_SYSTEMS" ]; then
    echo "== backing file $BACKING ($SIZE, incompressible)" >&2
    fio --name=fill --filename="$BACKING" --size="$SIZE" --rw=write --bs=1M --direct=1 \
        --ioengine=io_uring --iodepth=4 --refill_buffers > /dev/null
fi

START=$(date +%s)
for rep in $(seq "$REPEAT"); do
    echo "== round $rep of $REPEAT" >&2
    for w in $WORKLOADS; do
        for sys in $SYSTEMS $RBB_SYSTEMS; do run_one "$sys" "$w" "$rep"; done
    done
    for w in $NULL_WORKLOADS; do
        for sys in $NULL_SYSTEMS; do run_one "$sys" "$w" "$rep"; done
    done
done
echo "== ran for $(( $(date +%s) - START )) s" >&2

python3 - "$OUT" "$RUNTIME" "$RAMP" "$(getconf CLK_TCK)" "$MODE" "$SIZE" <<'PY' | tee "$OUT/summary.md"
import json, os, shutil, statistics, sys
out, runtime, ramp, tck, mode, size = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6]

def load(path):
    text = open(path).read()
    return json.loads(text[text.index("{"):])  # fio may print warnings first

runs = {}
for line in open(os.path.join(out, "results.tsv")):
    sysname, w, rep, path, ticks = line.rstrip("\n").split("\t")
    if sysname.endswith("+rbb") or "-vhost" in sysname:  # ringblk-bench's JSON
        ph = load(path)["phases"][0]
        o = next(o for o in ph["ops"] if o["op"] in ("read", "write"))
        l = o["latency_us"]
        runs.setdefault((sysname, w), []).append({
            "iops": o["iops"], "mbs": o["mb_s"], "n": o["ops"], "mean": l["mean"], "max": l["max"],
            "pct": {50.0: l["p50"], 99.0: l["p99"], 99.9: l["p99.9"]}, "cpu": int(ticks) / tck,
            "local": False, "hgrm": path[:-len(".json")] + ".hgrm", "rep": int(rep),
        })
        continue
    job = load(path)["jobs"][0]
    op = "read" if job["read"]["io_bytes"] > 0 else "write"
    s = job[op]
    lat = s.get("lat_ns") or s["clat_ns"]
    pct = {float(k): v / 1000.0 for k, v in lat.get("percentile", {}).items()}
    runs.setdefault((sysname, w), []).append({
        "iops": s["iops"], "mbs": s["bw_bytes"] / 1e6, "pct": pct,
        "n": lat.get("N", s.get("total_ios", 0)), "mean": lat["mean"] / 1000.0,
        "max": lat["max"] / 1000.0, "cpu": int(ticks) / tck, "local": sysname == "local",
        "rep": int(rep),
    })

def median_run(rs):
    m = statistics.median(r["iops"] for r in rs)
    return min(rs, key=lambda r: abs(r["iops"] - m))

def write_hgrm(path, r):
    if "hgrm" in r:  # ringblk-bench wrote the exact histogram itself
        shutil.copyfile(r["hgrm"], path)
        return
    n = max(int(r["n"]), 1)
    with open(path, "w") as f:
        f.write("%12s %14s %10s %14s\n\n" % ("Value", "Percentile", "TotalCount", "1/(1-Percentile)"))
        for p in sorted(r["pct"]):
            q = p / 100.0
            if q < 1.0:
                f.write("%12.3f %2.12f %10d %14.2f\n" % (r["pct"][p], q, round(q * n), 1 / (1 - q)))
            else:
                f.write("%12.3f %2.12f %10d\n" % (r["pct"][p], q, n))
        f.write("#[Mean    = %12.3f, StdDeviation   = %12.3f]\n" % (r["mean"], 0.0))
        f.write("#[Max     = %12.3f, Total count    = %12d]\n" % (r["max"], n))

def med(rs, key):
    return statistics.median(r[key] for r in rs)

def medpct(rs, p):
    return statistics.median(r["pct"].get(p, float("nan")) for r in rs)

def fmt(v, d=0):
    return "-" if v is None else f"{v:,.{d}f}"

workloads = []
for (_, w) in runs:
    if w not in workloads:
        workloads.append(w)
rounds = max(len(v) for v in runs.values())
print(f"# ringblk peer comparison ({mode}: {rounds} round(s) x {runtime:g} s + {ramp:g} s ramp, {size} file)\n")
print("Medians over the rounds. Latency: fio total latency (µs; ringblk-bench's own for +rbb rows). CPU: server utime+stime "
      "over the run; IOPS/CPU-s: operations per server CPU-second.\n")
for group, members in (("storage", ["ringblk", "qemu-nbd", "nbdkit", "local"]),
                       ("NBD over TLS on the file (same certificates)", ["ringblk-tls", "qemu-nbd-tls"]),
                       ("null backend (protocol and server overhead only)", ["ringblk-null", "nbdkit-null"]),
                       ("ringblk-bench as the client (HdrHistogram latency)", ["ringblk+rbb", "qemu-nbd+rbb", "nbdkit+rbb"]),
                       ("vhost-user-blk on the file (ringblk-bench --vhost; local: fio)", ["ringblk-vhost", "qsd-vhost", "local"]),
                       ("vhost-user-blk on a null backend (protocol and server overhead only)", ["ringblk-vhost-null", "qsd-vhost-null"])):
    present = [s for s in members if any((s, w) in runs for w in workloads)]
    if not present or present == ["local"]:  # local alone compares nothing
        continue
    vhost = "vhost" in group
    print(f"## {group}\n")
    head = "| workload | system | IOPS | MB/s | p50 | p99 | p99.9 | max | server CPU s | IOPS/CPU-s | ringblk ÷ this |"
    if vhost:
        head += " ringblk ÷ this (IOPS/CPU-s) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    base = present[0]
    for w in workloads:
        if (base, w) not in runs:
            continue
        ref = med(runs[(base, w)], "iops")
        bcpu = med(runs[(base, w)], "cpu")
        ref_per_cpu = ref * (runtime + ramp) / bcpu if bcpu else None
        for s in present:
            rs = runs.get((s, w))
            if not rs:
                continue
            r = median_run(rs)
            write_hgrm(os.path.join(out, "hgrm", f"{w}.{s}.hgrm"), r)
            iops = med(rs, "iops")
            cpu = None if r["local"] else med(rs, "cpu")
            per_cpu = None if not cpu else iops * (runtime + ramp) / cpu
            ratio = "" if s == base else f"{ref / iops:.2f}" if iops else "-"
            extra = ""
            if vhost:
                extra = " |" if s == base else (f" {ref_per_cpu / per_cpu:.2f} |" if ref_per_cpu and per_cpu else " - |")
            print(f"| {w} | {s} | {fmt(iops)} | {fmt(med(rs, 'mbs'), 1)} | {fmt(medpct(rs, 50.0), 1)} "
                  f"| {fmt(medpct(rs, 99.0), 1)} | {fmt(medpct(rs, 99.9), 1)} | {fmt(med(rs, 'max'), 0)} "
                  f"| {fmt(cpu, 2)} | {fmt(per_cpu)} | {ratio} |{extra}")
    print()
print("Ratios are the median IOPS of the first system of the table divided by this row's; "
      "for `local` it is the fraction of the device's own limit that ringblk delivers over NBD"
      + (" (over vhost-user-blk in the vhost tables; there the last column divides IOPS per "
         "server CPU-second the same way)." if "vhost" in mode else "."))

# --vhost: issue #13's targets, each figure against its goal (printed, never asserted).
def per_cpu(sysname, w):
    rs = runs.get((sysname, w))
    c = rs and med(rs, "cpu")
    return med(rs, "iops") * (runtime + ramp) / c if c else None

def ratio_line(what, num, den, goal):
    if num is None or den is None or not den:
        return f"| {what} | - | {goal} | not measured |"
    v = num / den
    return f"| {what} | {v:.2f} | {goal} | {'met' if v >= float(goal.split()[-1].rstrip('×')) else 'NOT met'} |"

if "vhost" in mode and any(s.startswith("ringblk-vhost") for s, _ in runs):
    iops = lambda s, w: med(runs[(s, w)], "iops") if (s, w) in runs else None
    print("\n## issue #13 targets (vhost-user-blk)\n")
    print("| target | figure | goal | |")
    print("|---|---|---|---|")
    print(ratio_line("file, rr4k-qd32: ringblk ÷ local IOPS", iops("ringblk-vhost", "rr4k-qd32"),
                     iops("local", "rr4k-qd32"), "≥ 0.95"))
    print(ratio_line("file, rr4k-qd32: ringblk ÷ qemu-storage-daemon IOPS", iops("ringblk-vhost", "rr4k-qd32"),
                     iops("qsd-vhost", "rr4k-qd32"), "≥ 1.5"))
    if ("ringblk-vhost", "rr4k-qd1") in runs and ("local", "rr4k-qd1") in runs:
        d = medpct(runs[("ringblk-vhost", "rr4k-qd1")], 50.0) - medpct(runs[("local", "rr4k-qd1")], 50.0)
        print(f"| file, rr4k-qd1: ringblk p50 − local p50 (µs) | {d:.1f} | ≤ 10 | {'met' if d <= 10 else 'NOT met'} |")
    else:
        print("| file, rr4k-qd1: ringblk p50 − local p50 (µs) | - | ≤ 10 | not measured |")
    for w in workloads:
        if ("ringblk-vhost-null", w) in runs:
            print(ratio_line(f"null, {w}: ringblk ÷ qemu-storage-daemon IOPS per server CPU-s",
                             per_cpu("ringblk-vhost-null", w), per_cpu("qsd-vhost-null", w), "≥ 2"))
    print("\nThe vhost systems are driven by ringblk-bench (libblkio), local by fio: the "
          "client differs, so the local ratios include the difference of the two clients.")

# --ringblk-old/--ringblk-new: the two binaries side by side, new / old.
pairs = [(w, backend, f"ringblk-old{sfx}", f"ringblk-new{sfx}")
         for w in workloads for backend, sfx in (("file", ""), ("null", "-null"))
         if (f"ringblk-old{sfx}", w) in runs and (f"ringblk-new{sfx}", w) in runs]
if pairs:
    print("\n## ringblk new vs old (--ringblk-old / --ringblk-new)\n")
    print("| workload | backend | old IOPS | new IOPS | new ÷ old IOPS | paired ÷ (IQR) | old p99 | new p99 "
          "| old IOPS/CPU-s | new IOPS/CPU-s | new ÷ old IOPS/CPU-s |")
    print("|" + "---|" * 11)
    for w, backend, old, new in pairs:
        o, n = runs[(old, w)], runs[(new, w)]
        for sysname, rs in ((old, o), (new, n)):  # for the plots
            write_hgrm(os.path.join(out, "hgrm", f"{w}.{sysname}.hgrm"), median_run(rs))
        oi, ni = med(o, "iops"), med(n, "iops")
        oc, nc = med(o, "cpu"), med(n, "cpu")
        opc = oi * (runtime + ramp) / oc if oc else None
        npc = ni * (runtime + ramp) / nc if nc else None
        ratio = f"{ni / oi:.3f}" if oi else "-"
        cratio = f"{npc / opc:.3f}" if opc and npc else "-"
        # Paired: new ÷ old within each round (the two ran back to back), then the
        # median and quartiles of those ratios. A drift of the machine between rounds
        # moves both members of a pair, so this spreads less than the ratio of medians.
        by_rep = {r["rep"]: r["iops"] for r in o}
        pr = sorted(r["iops"] / by_rep[r["rep"]] for r in n if by_rep.get(r["rep"]))
        paired = (f"{statistics.median(pr):.3f} ({pr[len(pr) // 4]:.2f}-{pr[(3 * len(pr)) // 4]:.2f})"
                  if pr else "-")
        print(f"| {w} | {backend} | {fmt(oi)} | {fmt(ni)} | {ratio} | {paired} | {fmt(medpct(o, 99.0), 1)} "
              f"| {fmt(medpct(n, 99.0), 1)} | {fmt(opc)} | {fmt(npc)} | {cratio} |")
    print()
    print("new ÷ old above 1 is better for IOPS; #12's gate is new ÷ old IOPS >= 0.97 "
          "(medians of the rounds; the gate runs 5 rounds: --repeat 5, see --only). "
          "`paired ÷` is the median of the per-round ratios with their interquartile range: "
          "when that range is wider than the 3 % margin, the machine cannot decide the gate.")
PY

echo "== plots" >&2
for hg in "$OUT"/hgrm/*.hgrm; do
    w=$(basename "$hg" | cut -d. -f1)
    echo "$w"
done | sort -u | while read -r w; do
    args=()
    for sys in $SYSTEMS $NULL_SYSTEMS $RBB_SYSTEMS; do
        hg="$OUT/hgrm/$w.$sys.hgrm"
        [ -f "$hg" ] && args+=("$sys=$hg")
    done
    "$BENCH" plot --svg "$OUT/$w.svg" --title "$w: latency by percentile (fio lat)" "${args[@]}" > /dev/null
    echo "  $OUT/$w.svg" >&2
done
echo "== results in $OUT (summary.md, hgrm/, *.svg, runs/)" >&2
