#!/usr/bin/env bash
# Instructions per request of one ringblk binary, counted by callgrind (issue #12's
# fast-path budget: Ir/request on the null backend may grow by 3 % at most).
#
#   bench/callgrind.sh BIN [--rw randread|randwrite] [--requests N]
#   bench/callgrind.sh target/release/ringblk --rw randwrite
#   bench/callgrind.sh target/baseline/ringblk --keep /tmp/cg    keep callgrind's files
#   bench/callgrind.sh --vhost target/release/ringblk        the vhost-user-blk path
#   bench/callgrind.sh --vhost /usr/bin/qemu-storage-daemon  the peer, same workload
#
# Options:
#   --rw W           randread (default) or randwrite, 4 KiB requests at iodepth 32
#   --requests N     requests counted (default 200000)
#   --warmup S       seconds of the same workload before counting (default 2)
#   --calibrate S    seconds of idle reactor loop counted for the spin correction (2)
#   --poll P         the server's idle policy: busy (default) or interrupt (see below)
#   --bench PATH     the ringblk-bench client (default TARGET/release/ringblk-bench,
#                    built with cargo when missing)
#   --keep DIR       copy callgrind's files to DIR/callgrind.out.{idle,W}
#                    (for callgrind_annotate --inclusive=yes)
#   --vhost          drive a vhost-user-blk export of the null volume instead of NBD
#                    (issue #13): `ringblk serve ... --vhost v=SOCK`, one virtqueue,
#                    client `ringblk-bench run --vhost SOCK` (libblkio). BIN may then
#                    be qemu-storage-daemon: `--blockdev driver=null-co` exported with
#                    `type=vhost-user-blk,num-queues=1`; it sleeps when idle (no
#                    calibration, no correction: its Ir/request is the raw figure).
#
# What it does: starts, under `valgrind --tool=callgrind --instr-atstart=no`,
#   BIN serve --listen 127.0.0.1:0 --data-dir TMP --volume v=,backend=null,size=1G
#             --cores 0 --poll busy
# (one reactor; port 0: the server picks a free port and prints it), warms up with
# ringblk-bench for --warmup seconds, then counts two windows, each between
# `callgrind_control -i on` and `-i off` and dumped on its own:
#   1. idle: no client for --calibrate seconds: the cost of one idle iteration of
#      the reactor loop (Ir / calls of Reactor::poll_once);
#   2. counted: exactly N requests (`ringblk-bench run --size N*4KiB --iodepth 32` on
#      a new connection; the client checks it completed N without errors).
# It prints Ir/request = (Ir of window 2 - its idle iterations x idle cost) / N, where
# idle iterations = poll_once calls of window 2 - the reactor's busy_ticks over it
# (from the `reactor_list` RPC), and the raw totals. Every thread of the server
# counts; the counted connection's handshake and disconnect are in (a fixed cost of a
# fraction of an instruction per request at N = 200000). The client runs natively
# with --poll interrupt so that it does not compete with the server for a core.
#
# --vhost: the idle calibration runs with a client connected that sends one request
# a second (`--rate-iops 1`), so that an idle iteration includes the virtqueue
# poller's empty poll (an avail-index read), as it does in the counted window. The
# counted window opens once the counted client's queue serves and closes before it
# disconnects (the handshake, with a reactor spinning with no queue, is not in it), and
# N is then the number of completions in the counted dump (calls of the queue's
# `IoSink::complete`, which goes through a vtable and is never inlined): the
# `served` counter read around the toggles lags them (by 18 % in one run).
#
# Why busy polling and a correction, not --poll interrupt: valgrind 3.19 (Debian 12)
# does not treat io_uring_enter as a blocking system call, so a reactor sleeping in
# it holds valgrind's thread lock and the other threads never run (the server does
# not even print its banner). A busy reactor never sleeps; its idle spinning depends
# on timing (two identical runs: 8,078 and 10,422 raw Ir/request), and removing the
# idle iterations leaves the work (the same runs: 7,757.0 and 7,761.7). With a
# valgrind that handles a sleeping io_uring_enter, `--poll interrupt` counts work
# only (the correction is then near zero).
# Why --instr-atstart=no and not --collect-atstart=no: `callgrind_control -i on`
# switches instrumentation; with collection off at start it counts nothing
# (valgrind 3.19: totals 0).
#
# The work per request still depends a little on batching (requests per recv), so
# compare runs of the same machine and repeat when a difference is near the budget.
# Takes a minute or two for N = 200000 (callgrind slows the server ~50x). Needs
# valgrind (installed with apt-get when missing and root) and python3. The server and
# the temp dir are removed on every exit path (trap).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "callgrind.sh: $*" >&2; exit 1; }

BIN="" RW=randread N=200000 WARMUP=2 BENCH="" KEEP="" POLL=busy CALIBRATE=2 VHOST=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rw) RW=${2:-}; shift ;;
        --requests) N=${2:-}; shift ;;
        --warmup) WARMUP=${2:-}; shift ;;
        --bench) BENCH=${2:-}; shift ;;
        --keep) KEEP=${2:-}; shift ;;
        --poll) POLL=${2:-}; shift ;;
        --calibrate) CALIBRATE=${2:-}; shift ;;
        --vhost) VHOST=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "callgrind.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$BIN" ] || { echo "callgrind.sh: one BIN only (see --help)" >&2; exit 2; }
           BIN=$1 ;;
    esac
    shift
done
[ -n "$BIN" ] || { echo "callgrind.sh: which ringblk binary? (see --help)" >&2; exit 2; }
[ -x "$BIN" ] || die "$BIN is not an executable (build it: cargo build --release -p ringblk-server --bin ringblk)"
QSD=0
case "$(basename "$BIN")" in qemu-storage-daemon*) QSD=1 ;; esac
[ "$QSD" -eq 0 ] || [ "$VHOST" -eq 1 ] || die "qemu-storage-daemon is counted with --vhost only"
case "$RW" in randread|randwrite) ;; *) die "--rw must be randread or randwrite, not '$RW'" ;; esac
case "$N" in ''|*[!0-9]*|0) die "--requests must be a positive number, not '$N'" ;; esac
case "$POLL" in busy|interrupt) ;; *) die "--poll must be busy or interrupt, not '$POLL'" ;; esac
case "$CALIBRATE" in ''|*[!0-9]*|0) die "--calibrate must be whole seconds > 0, not '$CALIBRATE'" ;; esac
case "$WARMUP" in ''|*[!0-9]*) die "--warmup must be whole seconds, not '$WARMUP'" ;; esac
command -v python3 >/dev/null || die "python3 is required"

if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
    [ "$(id -u)" -eq 0 ] || die "valgrind is missing; install it (apt-get install valgrind)"
    echo "== installing valgrind" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends valgrind >&2
fi

TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "$BENCH" ]; then
    BENCH=$TARGET/release/ringblk-bench
    if [ ! -x "$BENCH" ]; then
        echo "== building $BENCH" >&2
        cargo build --release --quiet -p ringblk-bench --bin ringblk-bench
    fi
fi
[ -x "$BENCH" ] || die "$BENCH is not an executable"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ringblk-callgrind.XXXXXX")
SERVER_PID="" IDLE_PID=""
cleanup() {
    if [ -n "$IDLE_PID" ]; then
        kill -TERM "$IDLE_PID" 2>/dev/null || true
        wait "$IDLE_PID" 2>/dev/null || true
    fi
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 300); do  # valgrind may take a while to write its last dump
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

OUTFILE=$TMP/callgrind.out
SOCK=$TMP/vhost.sock
if [ "$QSD" -eq 1 ]; then
    SERVE=("$BIN" --blockdev "driver=null-co,node-name=f,size=1073741824"
           --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1")
else
    SERVE=("$BIN" serve --listen 127.0.0.1:0 --data-dir "$TMP/data" --rpc "$TMP/ringblk.sock"
           --volume "v=,backend=null,size=1G" --cores 0 --poll "$POLL")
    [ "$VHOST" -eq 0 ] || SERVE+=(--vhost "v=$SOCK")
fi
echo "== valgrind --tool=callgrind --instr-atstart=no ${SERVE[*]}" >&2
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUTFILE" \
    "${SERVE[@]}" > "$TMP/banner" 2> "$TMP/server.log" &
SERVER_PID=$!
# Whether something accepts connections on the Unix socket $1.
listening() {
    [ -S "$1" ] && python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' "$1" 2>/dev/null
}
ready=""
for _ in $(seq 1200); do  # 120 s: valgrind starts slowly
    if [ "$VHOST" -eq 1 ]; then
        listening "$SOCK" && ready=1
    else
        ready=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$TMP/banner" 2>/dev/null | cut -d: -f2 || true)
    fi
    [ -n "$ready" ] && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        cat "$TMP/server.log" >&2
        SERVER_PID=""
        die "the server exited before it listened (its log is above)"
    fi
    sleep 0.1
done
[ -n "$ready" ] || { cat "$TMP/server.log" >&2; die "the server did not listen in 120 s"; }
if [ "$VHOST" -eq 1 ]; then
    CLIENT=("$BENCH" run --vhost "$SOCK")
else
    CLIENT=("$BENCH" run "nbd://127.0.0.1:$ready/v")
fi
CLIENT+=(--rw "$RW" --bs 4k --iodepth 32 --poll interrupt --quiet --timeout 120)

if [ "$WARMUP" -gt 0 ]; then
    echo "== warm-up: $RW ${WARMUP} s" >&2
    "${CLIENT[@]}" --runtime "$WARMUP" > "$TMP/warmup.txt" 2>&1 \
        || { cat "$TMP/warmup.txt" >&2; die "the warm-up run failed"; }
fi

control() {
    callgrind_control "$@" "$SERVER_PID" > "$TMP/control.txt" 2>&1 \
        || { cat "$TMP/control.txt" >&2; die "callgrind_control $* failed"; }
}
# One RPC on the server's socket: METHOD's result, every integer field named KEY
# in it (at any depth) summed.
rpc_sum() {
    python3 - "$TMP/ringblk.sock" "$1" "$2" <<'PY'
import json, socket, sys
sock, method, key = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX)
s.settimeout(60)
s.connect(sock)
s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode() + b"\n")
buf = b""
while not buf.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
def total(v):
    if isinstance(v, dict):
        return sum(x if k == key and isinstance(x, int) else total(x) for k, x in v.items())
    if isinstance(v, list):
        return sum(total(x) for x in v)
    return 0
print(total(json.loads(buf)["result"]))
PY
}
# The reactor's busy_ticks (loop iterations that did work).
busy_ticks() { rpc_sum reactor_list busy_ticks; }
# Dumps what was counted since the last dump into $OUTFILE.K and waits for the file.
dump() {
    control --dump="$2"
    for _ in $(seq 600); do
        grep -q '^totals:' "$OUTFILE.$1" 2>/dev/null && return 0
        sleep 0.1
    done
    die "no callgrind dump in $OUTFILE.$1 after 60 s"
}

# Requests the vhost exports served so far (vhost_list), summed over queues.
served() { rpc_sum vhost_list served; }

if [ "$QSD" -eq 1 ]; then
    b0=0 b1=0
else
    if [ "$VHOST" -eq 1 ]; then
        # A connected queue that is nearly idle (module docs): one request a second.
        s0=$(served)
        "$BENCH" run --vhost "$SOCK" --rw "$RW" --bs 4k --iodepth 1 --poll interrupt --quiet \
            --timeout 120 --rate-iops 1 --runtime $((CALIBRATE + 600)) > "$TMP/idle.txt" 2>&1 &
        IDLE_PID=$!
        for _ in $(seq 1200); do
            [ "$(served)" -gt "$s0" ] && break
            kill -0 "$IDLE_PID" 2>/dev/null || { cat "$TMP/idle.txt" >&2; die "the idle client failed"; }
            sleep 0.1
        done
        [ "$(served)" -gt "$s0" ] || die "the idle client's queue served nothing in 120 s"
    fi
    echo "== calibrating: an idle reactor loop for ${CALIBRATE} s" >&2
    b0=$(busy_ticks)
    control -i on
    sleep "$CALIBRATE"
    control -i off
    b1=$(busy_ticks)
    dump 1 "idle"
    if [ -n "$IDLE_PID" ]; then
        kill -TERM "$IDLE_PID" 2>/dev/null || true
        wait "$IDLE_PID" 2>/dev/null || true
        IDLE_PID=""
        # Its queue stops on the disconnect before the counted client connects.
        sleep 2
    fi
fi

echo "== counting: $RW, $N requests of 4 KiB at iodepth 32" >&2
b2=0 b3=0 COUNTED=$N
if [ "$VHOST" -eq 1 ] && [ "$QSD" -eq 0 ]; then
    # The window opens once the client's queue serves and closes before it
    # disconnects (module docs); the requests counted are the queue's `served`.
    s0=$(served)
    "${CLIENT[@]}" --size "$((N * 4096 * 4))" --runtime 3600 --json > "$TMP/run.json" 2> "$TMP/run.err" &
    IDLE_PID=$!
    for _ in $(seq 1200); do
        [ "$(served)" -gt "$s0" ] && break
        kill -0 "$IDLE_PID" 2>/dev/null || { cat "$TMP/run.err" >&2; die "the counted client failed"; }
        sleep 0.1
    done
    b2=$(busy_ticks)
    control -i on
    s1=$(served)
    while [ "$(served)" -lt "$((s1 + N))" ]; do
        kill -0 "$IDLE_PID" 2>/dev/null || { cat "$TMP/run.err" >&2; die "the counted client ended early"; }
        sleep 0.2
    done
    s2=$(served)
    control -i off
    b3=$(busy_ticks)
    COUNTED=$((s2 - s1))
    kill -TERM "$IDLE_PID" 2>/dev/null || true
    wait "$IDLE_PID" 2>/dev/null || true
    IDLE_PID=""
    echo '{"phases": []}' > "$TMP/run.json"
else
    [ "$QSD" -eq 1 ] || b2=$(busy_ticks)
    control -i on
    "${CLIENT[@]}" --size "$((N * 4096))" --json > "$TMP/run.json" 2> "$TMP/run.err" \
        || { cat "$TMP/run.err" >&2; die "the counted run failed"; }
    control -i off
    [ "$QSD" -eq 1 ] || b3=$(busy_ticks)
fi
CNT=2 CAL=$OUTFILE.1
[ "$QSD" -eq 0 ] || CNT=1 CAL=-
dump "$CNT" "counted $RW"
if [ -n "$KEEP" ]; then
    mkdir -p "$KEEP"
    [ "$QSD" -eq 1 ] || cp "$OUTFILE.1" "$KEEP/callgrind.out.idle"
    cp "$OUTFILE.$CNT" "$KEEP/callgrind.out.$RW"
    echo "== kept $KEEP/callgrind.out.{idle,$RW}" >&2
fi

python3 - "$CAL" "$OUTFILE.$CNT" "$TMP/run.json" "$COUNTED" "$RW" "$BIN" "$POLL" \
    "$((b1 - b0))" "$((b3 - b2))" "$VHOST" <<'PY'
import json, re, sys
cal, dump, run, n, rw, binary, poll, cal_busy, busy, vhost = sys.argv[1:]
n, cal_busy, busy = int(n), int(cal_busy), int(busy)
LOOP = "ringblk_reactor::reactor::Reactor::poll_once"
# Called once per iteration too (the block layer's ready-queue poller, a boxed closure
# LTO cannot inline): counts the iterations when LTO inlines poll_once.
LOOP_ALT = "ringblk_target::bdev::channel::BdevLocal::get::{{closure}}"
# Called once per vhost request, through `dyn IoSink` (never inlined): the requests
# the counted window really holds (the `served` reads around the toggles lag them).
DONE = "<ringblk_vhost::queue::QueueCell as ringblk_target::bdev::request::IoSink>::complete"
COMPLETIONS = 0

MEMSET = 0  # Ir of memset (leaf functions: self cost), per dump parsed last


def parse(path):
    """Totals by event, and the calls of the reactor's poll_once (loop iterations)."""
    global MEMSET, COMPLETIONS
    events, totals, names, calls, callee = [], [], {}, 0, None
    fn, after_call, MEMSET, alt, COMPLETIONS = "", False, 0, 0, 0
    for line in open(path, errors="replace"):
        if line[:1].isdigit() or line[:1] in "+-*":
            # A cost line: the caller's own cost, or (after calls=) a call's.
            if not after_call and "memset" in fn:
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    MEMSET += int(parts[1])
            after_call = False
            continue
        after_call = False
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("totals:"):
            totals = [int(x) for x in line.split()[1:]]
        elif line.startswith("cfn="):
            m = re.match(r"cfn=(?:\((\d+)\))?\s*(.*)", line.rstrip("\n"))
            if m.group(1) and m.group(2):
                names[m.group(1)] = m.group(2)
            callee = m.group(2) or names.get(m.group(1), "")
        elif line.startswith("fn="):
            m = re.match(r"fn=(?:\((\d+)\))?\s*(.*)", line.rstrip("\n"))
            if m.group(1) and m.group(2):
                names[m.group(1)] = m.group(2)
            fn = m.group(2) or names.get(m.group(1), "")
            callee = None
        elif line.startswith("calls="):
            after_call = True
            if callee is not None and callee.startswith(LOOP):
                calls += int(line.split()[0].split("=")[1])
            if callee is not None and callee.startswith(LOOP_ALT):
                alt += int(line.split()[0].split("=")[1])
            if callee is not None and callee.startswith(DONE):
                COMPLETIONS += int(line.split()[0].split("=")[1])
            callee = None
    return dict(zip(events, totals)), calls or alt

report = json.load(open(run))
ops = [o for ph in report["phases"] for o in ph["ops"] if o["op"] in ("read", "write")]
done = sum(o["ops"] for o in ops)
errors = sum(ph["io_errors"] + len(ph["connection_errors"]) for ph in report["phases"])
if not report["phases"]:
    done = n  # vhost: counted by the server's `served` between the toggles
if done != n:
    sys.exit(f"callgrind.sh: the client completed {done} requests, not {n}")
if errors:
    sys.exit(f"callgrind.sh: the counted run had {errors} I/O or connection errors")
front = "vhost-user-blk, 1 virtqueue" if vhost == "1" else "NBD"
tot, iters = parse(dump)
memset = MEMSET
if vhost == "1" and cal != "-":
    if not COMPLETIONS:
        sys.exit(f"callgrind.sh: no calls of {DONE} in the counted dump")
    # `served` between the toggles undercounts (the client runs on while the RPCs
    # answer): the completions in the dump are the window's requests (+- a queue).
    print(f"requests:          {COMPLETIONS:,} completed in the window ({n:,} by `served`)")
    n = COMPLETIONS
ir = tot.get("Ir")
if not ir:
    sys.exit(f"callgrind.sh: no Ir in the counted dump's totals ({tot})")
if cal == "-":
    # qemu-storage-daemon sleeps when idle: nothing to remove.
    print(f"binary:            {binary}")
    print(f"workload:          {rw} 4 KiB, iodepth 32, {n} requests (null-co, {front})")
    print(f"Ir/request:        {ir / n:,.1f}   (raw: everything counted)")
    print(f"  of which memset: {MEMSET / n:,.1f}   (valgrind counts rep stosb once per byte)")
    print(f"raw totals:        " + ", ".join(f"{k} {v:,}" for k, v in tot.items()))
    sys.exit(0)
cal_tot, cal_iter = parse(cal)
cal_ir = cal_tot.get("Ir")
if not cal_ir:
    sys.exit(f"callgrind.sh: no Ir in the calibration dump's totals ({cal_tot})")
if not cal_iter or not iters:
    sys.exit(f"callgrind.sh: no calls of {LOOP} in the dumps (renamed? inlined?)")
per_idle = cal_ir / cal_iter
idle = max(iters - busy, 0)
work = ir - idle * per_idle
print(f"binary:            {binary}")
print(f"workload:          {rw} 4 KiB, iodepth 32, {n} requests (null backend, {front}, --poll {poll})")
print(f"Ir/request:        {work / n:,.1f}   (idle loop iterations removed)")
print(f"  of which memset: {memset / n:,.1f}   (the null read's zero fill: valgrind counts rep stosb"
      f" once per byte)")
print(f"Ir/request raw:    {ir / n:,.1f}   (everything counted, spinning included)")
print(f"raw totals:        " + ", ".join(f"{k} {v:,}" for k, v in tot.items())
      + f"; loop iterations {iters:,} of which busy {busy:,}, idle {idle:,}")
print(f"idle calibration:  {per_idle:,.1f} Ir per idle iteration ({cal_ir:,} Ir / {cal_iter:,}"
      f" iterations; busy iterations in it: {cal_busy})")
PY
