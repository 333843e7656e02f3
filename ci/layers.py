#!/usr/bin/env python3
"""Layer checks of ringblk (issue #12, PLAN12 section g).

1. Ranks. Every top-level module of crates/target/src has a rank (RANKS below). A
   module may refer to `crate::X` only if X has a strictly lower rank; paths inside its
   own subtree (`super::`, `crate::self_mod::...`) are fine. A module without a rank is
   an error too, so a new module must be placed in the layering when it is added. No
   upward import means no module circle either (a circle needs one upward edge).
2. Visibility. lib.rs must not declare `pub mod` for the private layers (PRIVATE
   below: backend, image, datapath, durable, buf, park, persist) nor `pub use`
   anything of them; no file of the crate may `pub use ringblk_blockmap` (the block
   map's types are never re-exported). With `#![warn(unreachable_pub)]` in lib.rs and
   clippy's -D warnings this keeps images, maps and backends out of every front end.
3. Crate dependencies, from `cargo metadata --no-deps --format-version 1` (every
   dependency kind counts): ringblk-target must not depend on ringblk-server, clap,
   toml or tracing-subscriber; ringblk-nbd must not depend on ringblk-server;
   ringblk-iscsi must not depend on ringblk-server, ringblk-blockmap or ringblk-nbd
   (its front end, feature `frontend`, may depend on ringblk-reactor).
4. The vhost front end (issue #13): every `ringblk_target::NAME` path in
   crates/vhost/src names a public API module of VHOST_TARGET_API (bdev, error,
   stats, target, ops, extent) -- never volume, images, maps or backends; and
   ringblk-vhost depends on neither ringblk-server nor ringblk-nbd (rule 3's
   table), nor does ringblk-target depend on it.
5. With --after-5-2 (the lead switches it on when step 5.2 has moved the NBD front end
   into ringblk-nbd): ringblk-target must not depend on ringblk-nbd; ringblk-bench must
   depend on ringblk-nbd with default-features off; and every line of
   crates/target/src/**.rs that matches /nbd/i must be a `//` comment (the --nbd prose
   rule: the block layer speaks no protocol).

Usage:
  ci/layers.py [--report] [--after-5-2] [SRC_DIR]
  ci/layers.py --self-test
  ci/layers.py --help

  (no flag)     enforce: exit 1 on any finding (ci/test.sh runs this mode)
  --report      print the same findings and exit 0
  --after-5-2   add the rules of 5 (they fail until step 5.2 has landed)
  --self-test   negative controls: plant one violation of each rule in a temp copy of
                the tree (or of the metadata) and check that it is found; exit 1 if
                one is missed or the real tree does not pass
  SRC_DIR       defaults to crates/target/src; the crate checks (3) run only for the
                default, from the repo root

What the rank check reads: `crate::NAME` anywhere in code, and the first name of each
item of a `use crate::{a, b::{c, d}}` group (braces are matched, so only `a` and `b`
count). Comments and doc comments are ignored, and so is everything from the first
inline `#[cfg(test)] mod NAME {` of a file to its end (unit tests may reach up). Test
files of their own (durable/sim_tests.rs) are checked like code. Not seen:
`super::super::X` paths that climb out of a top-level module, and `crate::` inside
string literals or macros' `$crate`.
"""
import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

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


# The layers no front end may see (PLAN12 (a), "Visibility").
PRIVATE = ("backend", "image", "datapath", "durable", "buf", "park", "persist")
PUB_MOD = re.compile(r"^\s*pub\s+mod\s+(\w+)\s*[;{]", re.M)  # not pub(crate) mod
PUB_USE = re.compile(r"\bpub\s+use\s+([^;]*);", re.S)  # not pub(crate) use


def use_roots(path):
    """Top modules a `pub use` path names: `crate::a::X`, `self::a::X`, `a::X`, or each
    head of `crate::{a::X, b}` / `{a, b}`."""
    path = re.sub(r"\s+", "", path)
    path = re.sub(r"^(::)?(crate|self)::", "", path)
    if path.startswith("{"):
        return [name for name, _ in group_heads(path, 1)]
    m = re.match(r"(\w+)", path)
    return [m.group(1)] if m else []


def check_visibility(src):
    """Findings of rule 2, as strings."""
    out = []
    lib = os.path.join(src, "lib.rs")
    with open(lib, encoding="utf-8") as fh:
        text = COMMENT.sub("", fh.read())
    for m in PUB_MOD.finditer(text):
        if m.group(1) in PRIVATE:
            line = text.count("\n", 0, m.start()) + 1
            out.append(f"{lib}:{line}: `pub mod {m.group(1)}`: {m.group(1)} must stay private")
    for m in PUB_USE.finditer(text):
        for root in use_roots(m.group(1)):
            if root in PRIVATE:
                line = text.count("\n", 0, m.start()) + 1
                out.append(f"{lib}:{line}: `pub use` of private layer {root}")
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            with open(path, encoding="utf-8") as fh:
                text = COMMENT.sub("", fh.read())
            for m in PUB_USE.finditer(text):
                if re.match(r"\s*(::)?ringblk_blockmap\b", m.group(1)):
                    line = text.count("\n", 0, m.start()) + 1
                    out.append(f"{path}:{line}: `pub use` of ringblk_blockmap (never re-exported)")
    return out


def check_nbd_prose(src):
    """Findings of the --nbd prose rule: a line naming NBD that is not a `//` comment."""
    out = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if re.search(r"nbd", line, re.I) and not line.lstrip().startswith("//"):
                        out.append(f"{path}:{n}: names NBD outside a comment: {line.strip()[:80]}")
    return out


# Rule 3 (always) and the dependency half of rule 5 (--after-5-2).
FORBIDDEN = {
    "ringblk-target": ("ringblk-server", "ringblk-vhost", "clap", "toml", "tracing-subscriber"),
    "ringblk-nbd": ("ringblk-server",),
    "ringblk-vhost": ("ringblk-server", "ringblk-nbd", "clap", "toml", "tracing-subscriber"),
    # The iSCSI crate (#14): the sans-IO part takes only BlockError from the target; its
    # front end (feature `frontend`) runs sessions on reactors, so ringblk-reactor is
    # allowed; never the server, the block map or another front end.
    "ringblk-iscsi": ("ringblk-server", "ringblk-blockmap", "ringblk-nbd"),
}

# Rule 4: what crates/vhost/src may name of the block layer.
VHOST_SRC = "crates/vhost/src"
VHOST_TARGET_API = ("bdev", "error", "stats", "target", "ops", "extent")
TARGET_PATH = re.compile(r"(?<![\w$])ringblk_target::(\w+)")
TARGET_GROUP = re.compile(r"\bringblk_target::\{")


def check_vhost_imports(src):
    """Findings of rule 4's path half, as strings (comments ignored)."""
    out = []
    if not os.path.isdir(src):
        return [f"{src} is missing (the vhost front end's sources)"]
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            with open(path, encoding="utf-8") as fh:
                text = COMMENT.sub("", fh.read())
            names = [(m.group(1), m.start()) for m in TARGET_PATH.finditer(text)]
            for m in TARGET_GROUP.finditer(text):
                names += group_heads(text, m.end())
            for name, at in names:
                if name not in VHOST_TARGET_API:
                    line = text.count("\n", 0, at) + 1
                    out.append(
                        f"{path}:{line}: ringblk_target::{name} is not the block layer's "
                        f"public API for front ends ({', '.join(VHOST_TARGET_API)})"
                    )
    return out
FORBIDDEN_AFTER_5_2 = {"ringblk-target": ("ringblk-nbd",)}


def cargo_metadata():
    out = subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def check_deps(meta, after_5_2):
    """Findings of rule 3 (and 4's crate rules with after_5_2) on cargo metadata."""
    out = []
    pkgs = {p["name"]: p for p in meta["packages"]}
    rules = {k: list(v) for k, v in FORBIDDEN.items()}
    if after_5_2:
        for k, v in FORBIDDEN_AFTER_5_2.items():
            rules.setdefault(k, []).extend(v)
    for pkg, banned in sorted(rules.items()):
        if pkg not in pkgs:
            out.append(f"crate {pkg} is not in the workspace (cargo metadata)")
            continue
        for d in pkgs[pkg]["dependencies"]:
            if d["name"] in banned:
                kind = d["kind"] or "normal"
                out.append(f"crate {pkg} depends on {d['name']} ({kind}): not allowed")
    if after_5_2:
        bench = pkgs.get("ringblk-bench")
        deps = [d for d in (bench or {}).get("dependencies", []) if d["name"] == "ringblk-nbd"]
        if not deps:
            out.append("crate ringblk-bench does not depend on ringblk-nbd (its codec)")
        for d in deps:
            if d["uses_default_features"]:
                out.append(
                    "crate ringblk-bench depends on ringblk-nbd with default features "
                    "(must be default-features = false: the codec, not the front end)"
                )
    return out


def run_checks(src, after_5_2, meta, vhost_src=None):
    """Every finding, as printable lines, and the rank check's counts."""
    bad, unknown, seen = check(src)
    lines = [
        f"upward import: {path}:{line}: {top} (rank {RANKS[top]}) "
        f"uses crate::{dep} (rank {RANKS[dep]})"
        for path, line, top, dep in bad
    ]
    lines += [
        f"module {name!r} ({where}) has no rank in ci/layers.py: add it to RANKS"
        for name, where in sorted(unknown.items())
    ]
    lines += [f"visibility: {v}" for v in check_visibility(src)]
    if meta is not None:
        lines += [f"crate deps: {d}" for d in check_deps(meta, after_5_2)]
    if after_5_2:
        lines += [f"nbd prose: {n}" for n in check_nbd_prose(src)]
    if vhost_src is not None:
        lines += [f"vhost imports: {v}" for v in check_vhost_imports(vhost_src)]
    return lines, len(seen)


def self_test(src):
    """Negative controls: each rule must catch a violation planted in a temp copy."""
    failures = []
    meta = cargo_metadata()
    base, _ = run_checks(src, False, meta, VHOST_SRC)
    if base:
        failures.append("the real tree does not pass: " + "; ".join(base))

    def planted(name, edit, want, after_5_2=False, meta_edit=None):
        with tempfile.TemporaryDirectory() as tmp:
            dst = os.path.join(tmp, "src")
            shutil.copytree(src, dst)
            if edit:
                edit(dst)
            m = copy.deepcopy(meta)
            if meta_edit:
                meta_edit(m)
            found, _ = run_checks(dst, after_5_2, m)
        hit = [f for f in found if want in f]
        print(f"self-test {name}: {'caught' if hit else 'MISSED'}" + (f": {hit[0]}" if hit else ""))
        if not hit:
            failures.append(f"{name}: planted violation not found ({found})")

    def append(rel, text):
        def edit(dst):
            with open(os.path.join(dst, rel), "a", encoding="utf-8") as fh:
                fh.write(text)

        return edit

    def replace(rel, old, new):
        def edit(dst):
            path = os.path.join(dst, rel)
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            if old not in text:
                raise SystemExit(f"self-test: {old!r} not in {rel}")
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text.replace(old, new, 1))

        return edit

    def add_dep(pkg, dep, kind=None):
        def edit(m):
            p = next(p for p in m["packages"] if p["name"] == pkg)
            p["dependencies"].append(
                {"name": dep, "kind": kind, "uses_default_features": True, "features": []}
            )

        return edit

    def bench_nbd(default_features):
        def edit(m):
            p = next(p for p in m["packages"] if p["name"] == "ringblk-bench")
            p["dependencies"] = [d for d in p["dependencies"] if d["name"] != "ringblk-nbd"]
            if default_features is not None:
                p["dependencies"].append(
                    {"name": "ringblk-nbd", "kind": None,
                     "uses_default_features": default_features, "features": []}
                )

        return edit

    def clear_nbd(m):
        for p in m["packages"]:
            if p["name"] == "ringblk-target":
                p["dependencies"] = [d for d in p["dependencies"] if d["name"] != "ringblk-nbd"]

    def no_nbd_words(dst):
        # A tree where the prose rule holds, so that the planted line is the finding.
        for root, _, files in os.walk(dst):
            for f in files:
                if f.endswith(".rs"):
                    path = os.path.join(root, f)
                    with open(path, encoding="utf-8") as fh:
                        lines = fh.readlines()
                    keep = [
                        ln for ln in lines
                        if not re.search(r"nbd", ln, re.I) or ln.lstrip().startswith("//")
                    ]
                    with open(path, "w", encoding="utf-8") as fh:
                        fh.writelines(keep)

    def then(*edits):
        def edit(dst):
            for e in edits:
                e(dst)

        return edit

    # At the top: what follows a file's inline test module is not checked.
    planted(
        "rank",
        replace("error.rs", "#[derive(", "use crate::target::Target;\n\n#[derive("),
        "error (rank 0) uses crate::target",
    )
    planted("unranked", append("zz_new.rs", "pub fn f() {}\n"), "has no rank")
    planted("pub mod", replace("lib.rs", "\nmod backend;", "\npub mod backend;"), "pub mod backend")
    planted(
        "pub use",
        append("lib.rs", "\npub use crate::image::{Images, Stack};\n"),
        "`pub use` of private layer image",
    )
    planted(
        "pub use group",
        append("lib.rs", "\npub use crate::{ops, durable::check};\n"),
        "`pub use` of private layer durable",
    )
    planted(
        "blockmap re-export",
        append("volume.rs", "\npub use ringblk_blockmap::BlockMap;\n"),
        "ringblk_blockmap",
    )
    planted(
        "target -> clap",
        None,
        "ringblk-target depends on clap",
        meta_edit=add_dep("ringblk-target", "clap"),
    )
    planted(
        "target -> server (dev)",
        None,
        "ringblk-target depends on ringblk-server (dev)",
        meta_edit=add_dep("ringblk-target", "ringblk-server", "dev"),
    )
    planted(
        "nbd -> server",
        None,
        "ringblk-nbd depends on ringblk-server",
        meta_edit=add_dep("ringblk-nbd", "ringblk-server"),
    )
    planted(
        "iscsi -> blockmap",
        None,
        "ringblk-iscsi depends on ringblk-blockmap",
        meta_edit=add_dep("ringblk-iscsi", "ringblk-blockmap"),
    )
    planted(
        "target -> nbd (after 5.2)",
        no_nbd_words,
        "ringblk-target depends on ringblk-nbd",
        after_5_2=True,
        meta_edit=add_dep("ringblk-target", "ringblk-nbd"),
    )
    planted(
        "bench nbd defaults (after 5.2)",
        no_nbd_words,
        "with default features",
        after_5_2=True,
        meta_edit=lambda m: (clear_nbd(m), bench_nbd(True)(m)),
    )
    planted(
        "bench without nbd (after 5.2)",
        no_nbd_words,
        "does not depend on ringblk-nbd",
        after_5_2=True,
        meta_edit=lambda m: (clear_nbd(m), bench_nbd(None)(m)),
    )
    planted(
        "nbd prose (after 5.2)",
        then(
            no_nbd_words,
            append("ops.rs", "\n// NBD in a comment is fine\nconst NBD_X: u8 = 0;\n"),
        ),
        "nbd prose: ",
        after_5_2=True,
        meta_edit=lambda m: (clear_nbd(m), bench_nbd(False)(m)),
    )
    planted(
        "vhost -> nbd",
        None,
        "ringblk-vhost depends on ringblk-nbd",
        meta_edit=add_dep("ringblk-vhost", "ringblk-nbd"),
    )
    planted(
        "target -> vhost",
        None,
        "ringblk-target depends on ringblk-vhost",
        meta_edit=add_dep("ringblk-target", "ringblk-vhost"),
    )
    for name, text in (
        ("vhost imports volume", "\nuse ringblk_target::volume::Volume;\n"),
        ("vhost imports group", "\nuse ringblk_target::{bdev::Bdev, spec::VolumeSpec};\n"),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            dst = os.path.join(tmp, "src")
            shutil.copytree(VHOST_SRC, dst)
            with open(os.path.join(dst, "lib.rs"), "a", encoding="utf-8") as fh:
                fh.write(text)
            found = check_vhost_imports(dst)
        bad_name = "volume" if "volume" in text else "spec"
        hit = [f for f in found if f"ringblk_target::{bad_name} " in f]
        print(f"self-test {name}: {'caught' if hit else 'MISSED'}" + (f": {hit[0]}" if hit else ""))
        if not hit:
            failures.append(f"{name}: planted violation not found ({found})")
    # And the after-5.2 tree with none of them planted passes: the controls above
    # fail because of what they plant, not because of the setup.
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "src")
        shutil.copytree(src, dst)
        no_nbd_words(dst)
        with open(os.path.join(dst, "ops.rs"), "a", encoding="utf-8") as fh:
            fh.write("\n// NBD in a comment is fine\n")
        m = copy.deepcopy(meta)
        clear_nbd(m)
        bench_nbd(False)(m)
        clean, _ = run_checks(dst, True, m)
    print(f"self-test clean after-5.2 tree: {'passes' if not clean else 'FAILS'}")
    if clean:
        failures.append("clean after-5.2 tree reports: " + "; ".join(clean))
    for f in failures:
        print(f"self-test failed: {f}")
    print(f"layers self-test: {'ok' if not failures else 'FAILED'}")
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(
        usage="%(prog)s [--report] [--after-5-2] [SRC_DIR] | --self-test",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--report", action="store_true", help="print findings, exit 0")
    ap.add_argument("--after-5-2", action="store_true", help="add the rules of step 5.2")
    ap.add_argument("--self-test", action="store_true", help="run the negative controls")
    ap.add_argument("src", nargs="?", default=None, help="crate src dir")
    a = ap.parse_args()
    src = a.src or "crates/target/src"
    if not os.path.isdir(src):
        print(f"layers.py: {src} is not a directory (run from the repo root)", file=sys.stderr)
        return 2
    if a.self_test:
        return self_test(src)
    # The crate rules read the workspace this script belongs to: only for the default
    # SRC_DIR (a copy elsewhere has no Cargo.toml around it).
    meta = cargo_metadata() if a.src is None else None
    vhost_src = VHOST_SRC if a.src is None else None
    findings, modules = run_checks(src, a.after_5_2, meta, vhost_src)
    for f in findings:
        print(f)
    if not findings:
        verdict = "ok"
    else:
        verdict = "to fix (report mode: not enforced)" if a.report else "refused"
    rules = "ranks, visibility" + (", crate deps, vhost imports" if meta is not None else "")
    rules += ", after-5.2 rules" if a.after_5_2 else ""
    print(f"layers: {modules} modules; {rules}: {len(findings)} findings: {verdict}")
    if a.report:
        return 0
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
