#!/usr/bin/env python3
"""Backup switchover under load (the switchover issue's benchmark).

fio 4 KiB randwrite QD32 over NBD against a file volume while a backup is created
and released every second. Prints:
  - command -> switch and command -> ready times (us) per backup (server-measured),
  - I/O latency p99 / p99.9 / max of I/Os completing within +-50 ms of each switch,
    next to the steady state (same run, I/Os farther than 200 ms from any switch),
  - IOPS with one delta present vs none (separate fio runs, same server; in full
    mode three pairs in ABBA order, each ratio and their median).
Figures are measured, never asserted. Usage: switch_bench.py [--quick|--smoke]
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODE = "full"
if "--quick" in sys.argv:
    MODE = "quick"
if "--smoke" in sys.argv:
    MODE = "smoke"
RUNTIME = {"full": 20, "quick": 8, "smoke": 2}[MODE]
SIZE = {"full": "1G", "quick": "512M", "smoke": "64M"}[MODE]
# Pairs of no-delta / delta phases for the IOPS ratio (ABBA order; the median is the figure).
PAIRS = {"full": 3, "quick": 1, "smoke": 1}[MODE]


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def start_server(datadir, profile):
    exe = os.path.join(ROOT, "target", profile, "ringblk")
    img = os.path.join(datadir, "bench.img")
    p = subprocess.Popen([exe, "serve", "--listen", "127.0.0.1:0", "--data-dir", datadir,
                          "--rpc", os.path.join(datadir, "ringblk.sock"),
                          "--volume", f"b={img},size={SIZE}"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = None
    for line in p.stdout:
        if "listening on 127.0.0.1:" in line:
            port = int(line.split("127.0.0.1:")[1].split()[0])
        if line.strip().startswith("qemu-img info"):
            break
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
    return p, port


def ctl(profile, rpc, *args):
    exe = os.path.join(ROOT, "target", profile, "ringblk-ctl")
    out = subprocess.run([exe, "--rpc", rpc, "--json", *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def fio(uri, runtime, lat_prefix=None):
    cmd = ["fio", "--name=sw", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
           "--iodepth=32", f"--size={SIZE}", "--time_based", f"--runtime={runtime}",
           "--randrepeat=0", "--output-format=json"]
    if lat_prefix:
        cmd += [f"--write_lat_log={lat_prefix}", "--log_avg_msec=0", "--log_unix_epoch=1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{"):])
    return j["jobs"][0]["write"]


def pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, int(p / 100.0 * len(sorted_vals)))
    return sorted_vals[i]


def main():
    # RINGBLK_PROFILE=debug: CI's smoke run checks that the script works, not speed.
    profile = os.environ.get("RINGBLK_PROFILE", "release")
    if not shutil.which("fio"):
        sys.exit("fio is not installed (ci/test.sh installs it)")
    build = ["cargo", "build", "-q", "-p", "ringblk-server", "-p", "ringblk-ctl"]
    sh(build + (["--release"] if profile == "release" else []), cwd=ROOT)
    base = os.path.join(ROOT, "target", "bench-data")
    os.makedirs(base, exist_ok=True)
    datadir = tempfile.mkdtemp(dir=base)
    srv, port = start_server(datadir, profile)
    rpc = os.path.join(datadir, "ringblk.sock")
    uri = f"nbd://127.0.0.1:{port}/b"
    try:
        # Fill once so the base is not sparse (writes then measure the disk, not holes).
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
                        "--bs=1M", "--iodepth=4", f"--size={SIZE}"], check=True,
                       capture_output=True)
        # IOPS with a delta against none: PAIRS pairs of phases in ABBA order (so a
        # disk that speeds up or slows down over the run favours neither side), each
        # delta phase on a fresh backup that is released (merged) before the next.
        pairs = []
        for i in range(PAIRS):
            got = {}
            for side in (("none", "delta") if i % 2 == 0 else ("delta", "none")):
                if side == "delta":
                    ctl(profile, rpc, "backup", "create", f"b@steady{i}")
                got[side] = fio(uri, RUNTIME)["iops"]
                if side == "delta":
                    ctl(profile, rpc, "backup", "release", f"b@steady{i}")
                    while ctl(profile, rpc, "backup", "list", "b"):
                        time.sleep(0.05)
            pairs.append(got)
        # Switches under load.
        prefix = os.path.join(datadir, "lat")
        switches = []
        stop = threading.Event()

        def switcher():
            n = 0
            time.sleep(1.0)
            while not stop.is_set():
                t = time.time() * 1000.0
                info = ctl(profile, rpc, "backup", "create", f"b@s{n}")
                switches.append((t, info["switch_us"], info["ready_us"]))
                if n > 0:
                    ctl(profile, rpc, "backup", "release", f"b@s{n - 1}")
                n += 1
                time.sleep(1.0)

        th = threading.Thread(target=switcher)
        th.start()
        loaded = fio(uri, RUNTIME + 1, prefix)
        stop.set()
        th.join()
        lats = []
        for name in os.listdir(datadir):
            if name.startswith("lat_clat") and name.endswith(".log"):
                with open(os.path.join(datadir, name)) as f:
                    for line in f:
                        parts = line.split(",")
                        lats.append((int(parts[0]), int(parts[1]) / 1000.0))
        near, steady, steady_t = [], [], []
        for t_ms, lat_us in lats:
            d = min((abs(t_ms - s[0]) for s in switches), default=1e9)
            if d <= 50:
                near.append(lat_us)
            elif d >= 200:
                steady.append(lat_us)
                steady_t.append((t_ms, lat_us))
        near.sort()
        steady.sort()
        sw = sorted(s[1] for s in switches)
        rd = sorted(s[2] for s in switches)
        print(f"switchover benchmark ({MODE}): fio randwrite 4k QD32 over NBD, volume {SIZE}, {len(switches)} backups")
        print(f"  command -> switch  us: median {pct(sw, 50)}  max {sw[-1] if sw else 'n/a'}")
        print(f"  command -> ready   us: median {pct(rd, 50)}  max {rd[-1] if rd else 'n/a'}")
        print(f"  latency us          {'p99':>10} {'p99.9':>10} {'max':>10} {'n':>8}")
        for label, v in (("steady", steady), ("+-50ms of switch", near)):
            print(f"  {label:<18} {pct(v, 99):>10.1f} {pct(v, 99.9):>10.1f} {(v[-1] if v else float('nan')):>10.1f} {len(v):>8}")
        ratio = (pct(near, 99.9) / pct(steady, 99.9)) if steady and near else float("nan")
        print(f"  window p99.9 / steady p99.9 = {ratio:.2f}")
        if steady and near:
            print(f"  window max / steady p99.9 = {near[-1] / pct(steady, 99.9):.2f}")
            # Context for the max: the max of as many I/Os as the window holds, taken
            # from the steady state (consecutive runs of I/Os in completion order).
            # A max grows with the number of samples, so this is what "max" means
            # for a set of that size with no switch in it.
            steady_t = [lat for _, lat in sorted(steady_t)]
            n = len(near)
            maxima = sorted(max(steady_t[i:i + n]) for i in range(0, len(steady_t) - n + 1, n))
            if maxima:
                print(f"  steady max over runs of {n} I/Os: median {pct(maxima, 50):.1f} us "
                      f"(min {maxima[0]:.1f}, max {maxima[-1]:.1f}, {len(maxima)} runs)")
        ratios = []
        for i, got in enumerate(pairs):
            r = got["delta"] / got["none"] if got["none"] else float("nan")
            ratios.append(r)
            print(f"  pair {i + 1}: IOPS no delta {got['none']:.0f}, with a delta {got['delta']:.0f}, ratio {r:.3f}")
        ratios.sort()
        print(f"  IOPS with a delta / none: median ratio {ratios[len(ratios) // 2]:.3f} over {len(ratios)} pair(s) "
              f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f})")
        print(f"  IOPS during switches {loaded['iops']:.0f}")
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(30)
        shutil.rmtree(datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
