#!/usr/bin/env python3
"""Upward-import check of ringblk-target (issue #12, PLAN12 section g).

Every top-level module of crates/target/src has a rank (RANKS below). A module may
refer to `crate::X` only if X has a strictly lower rank; paths inside its own subtree
(`super::`, `crate::self_mod::...`) are fine. A module without a rank is an error too,
so a new module must be placed in the layering when it is added.

Usage:
  ci/layers.py [--report] [SRC_DIR]      SRC_DIR defaults to crates/target/src
  ci/layers.py --help

  (no flag)   enforce: exit 1 on an upward import or an unranked module
  --report    print the same findings and exit 0 (ci/test.sh runs this mode from
              step 0 until step 5.3 of PLAN12, which switches CI to enforcing)

What it reads: `crate::NAME` anywhere in code, and the first name of each item of a
`use crate::{a, b::{c, d}}` group (braces are matched, so only `a` and `b` count).
Comments and doc comments are ignored, and so is everything from the first inline
`#[cfg(test)] mod NAME {` of a file to its end (unit tests may reach up). Test files
of their own (nbd/codec/tests.rs, durable/sim_tests.rs) are checked like code.
Not seen: `super::super::X` paths that climb out of a top-level module, and
`crate::` inside string literals or macros' `$crate`.
"""
import argparse
import os
import re
import sys

# Lower = more basic. The final ranks are PLAN12's table (keep in sync with the layer
# table in lib.rs's top doc). Today's modules that will be renamed,
# split or moved out of the crate have the rank of where they are going, so that the
# report lists exactly the imports #12 has to cut. Names that do not exist yet are
# harmless here.
RANKS = {
    # -- rank 0: vocabulary and leaf helpers, no crate imports at all --------------
    "error": 0,  # new in step 1: BlockError
    "ops": 0,  # new in step 1: IoKind, stat names
    "extent": 0,  # new in step 1: protocol-free block status
    "spec": 0,  # new in step 1: VolumeSpec, BackendKind (from volume, backend, config)
    "park": 0,  # reactor continuations
    "filelock": 0,  # one writer per file (OFD write lock); backend, image, copyjob use it
    # -- rank 1: storage primitives -----------------------------------------------
    "buf": 1,  # new in 3B.2
    "admission": 1,  # today: buffer budget + handshake slots. The budget becomes
    #                  buf.rs (3B.2, rank 1); the slots go to crates/server's listen.rs
    "durable": 1,
    "backend": 1,
    # -- rank 2: accounting ---------------------------------------------------------
    "stats": 2,  # new in step 1
    "latency": 2,  # becomes stats/latency.rs in step 1
    "fault": 2,
    # -- ranks 3-12: the block device layer -----------------------------------------
    "image": 3,
    "persist": 4,
    "datapath": 5,  # new in 3B.3
    "volume": 6,
    "events": 7,  # 2A.5: BdevEvent, per-reactor subscribers, notify rounds
    "bdev": 8,  # new in 3B.4: the block I/O API
    "drain": 8,  # 2A.4: drain rounds + SwitchError, shared by merge and switchover
    "merge": 9,  # split out of switchover in 2A.4
    "switchover": 10,
    "copyjob": 10,
    "catalog": 11,
    "target": 12,  # 2A.6: Target (volume::Registry and server.rs's volume half)
    # The sans-IO codec (nbd, 4C.1), the front end's sessions and what they share
    # (session, shared -> crates/nbd's frontend, 5.2) and the server's modules (rpc,
    # listen, config, startup, server, methods, datadir and the bin's main ->
    # crates/server, 5.1) left the crate: both crates sit above it.
    "sim_tests": 99,  # #[cfg(test)] deterministic multi-reactor tests
}
# lib.rs declares the modules; it is the crate root, not a layer.
ROOTS = ("lib",)

COMMENT = re.compile(r"//.*$", re.M)
TEST_TAIL = re.compile(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", re.S)
CRATE_PATH = re.compile(r"(?<![\w$])crate::(\w+)")
USE_GROUP = re.compile(r"\buse\s+crate::\{")


def group_heads(text, start):
    """First names of the top-level items of a `{...}` group whose body begins at
    `start`, each with its offset. Nested groups are skipped."""
    heads, depth, i, item_start = [], 1, start, start
    while i < len(text) and depth:
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if depth == 0 or (depth == 1 and ch == ","):
            m = re.match(r"\s*(\w+)", text[item_start:i])
            if m:
                heads.append((m.group(1), item_start + m.start(1)))
            item_start = i + 1
        i += 1
    return heads


def imports(text):
    """{module: offset of its first mention} of `crate::` references in `text`."""
    found = {}
    for m in CRATE_PATH.finditer(text):
        found.setdefault(m.group(1), m.start())
    for m in USE_GROUP.finditer(text):
        for name, at in group_heads(text, m.end()):
            found[name] = min(found.get(name, at), at)
    return found


def check(src):
    bad, unknown, seen = [], {}, set()
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            top = os.path.relpath(path, src).split(os.sep)[0].removesuffix(".rs")
            if top in ROOTS:
                continue
            seen.add(top)
            if top not in RANKS:
                unknown.setdefault(top, path)
                continue
            with open(path, encoding="utf-8") as fh:
                text = COMMENT.sub("", fh.read())  # keeps line numbers
            tail = TEST_TAIL.search(text)
            if tail:
                text = text[: tail.start()]
            for dep, at in sorted(imports(text).items()):
                if dep == top:
                    continue
                line = text.count("\n", 0, at) + 1
                if dep not in RANKS:
                    unknown.setdefault(dep, f"{path}:{line}")
                elif RANKS[dep] >= RANKS[top]:
                    bad.append((path, line, top, dep))
    bad.sort(key=lambda b: (b[0], b[1]))
    return bad, unknown, seen


def main():
    ap = argparse.ArgumentParser(
        usage="%(prog)s [--report] [SRC_DIR]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--report", action="store_true", help="print findings, exit 0")
    ap.add_argument("src", nargs="?", default="crates/target/src", help="crate src dir")
    a = ap.parse_args()
    if not os.path.isdir(a.src):
        print(f"layers.py: {a.src} is not a directory (run from the repo root)", file=sys.stderr)
        return 2
    bad, unknown, seen = check(a.src)
    for path, line, top, dep in bad:
        print(
            f"upward import: {path}:{line}: {top} (rank {RANKS[top]}) "
            f"uses crate::{dep} (rank {RANKS[dep]})"
        )
    for name, where in sorted(unknown.items()):
        print(f"module {name!r} ({where}) has no rank in ci/layers.py: add it to RANKS")
    if not bad and not unknown:
        verdict = "ok"
    else:
        verdict = "to fix (report mode: not enforced)" if a.report else "refused"
    mode = ""
    print(
        f"layers: {len(seen)} modules, {len(bad)} upward imports, "
        f"{len(unknown)} unranked: {verdict}{mode}"
    )
    if a.report:
        return 0
    return 1 if bad or unknown else 0


if __name__ == "__main__":
    sys.exit(main())
