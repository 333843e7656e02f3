//! Runs the fuzz corpus through both entry points, keeps the hand-made seeds in step with
//! the generator below, and checks the fuzz oracle itself (negative controls).
//!
//! Regenerate the seeds after changing them here:
//! `RINGBLK_BLESS_CORPUS=1 cargo test -p ringblk-nbd fuzz`.

use super::*;
use crate::codec::{Command, CommandFlags, Request};
use crate::proto::*;
use crate::testutil::{client, meta_request, name_and_infos, opt};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

fn request(command: Command, flags: CommandFlags, offset: u64, length: u32) -> Vec<u8> {
    let r = Request {
        cookie: offset ^ u64::from(command.wire()) << 48 ^ 0x5eed,
        command,
        flags,
        offset,
        length,
    };
    let mut bytes = r.encode().to_vec();
    bytes.resize(bytes.len() + r.payload_len() as usize, 0xab);
    bytes
}

fn cmd(command: Command, offset: u64, length: u32) -> Vec<u8> {
    request(command, CommandFlags::default(), offset, length)
}

/// What qemu-img/qemu-io do after the handshake with structured replies: reads, a write,
/// block status, zeroing, trim, flush, disconnect.
fn structured_requests() -> Vec<u8> {
    [
        cmd(Command::Read, 0, 4096),
        request(Command::Read, CommandFlags::DF, 65536, 65536),
        request(Command::Write, CommandFlags::FUA, 4096, 4096),
        cmd(Command::Write, 100, 512), // unaligned: refused, payload drained
        request(Command::BlockStatus, CommandFlags::REQ_ONE, 0, 1 << 20),
        cmd(Command::BlockStatus, 0, 1 << 20),
        request(Command::WriteZeroes, CommandFlags::NO_HOLE, 0, 65536),
        request(
            Command::WriteZeroes,
            CommandFlags::FAST_ZERO,
            1 << 20,
            1 << 20,
        ),
        cmd(Command::Trim, 8192, 8192),
        cmd(Command::Cache, 0, 1 << 20),
        cmd(Command::Flush, 0, 0),
        cmd(Command::Disc, 0, 0),
    ]
    .concat()
}

/// What the Linux kernel client sends: simple replies only.
fn simple_requests() -> Vec<u8> {
    [
        cmd(Command::Read, 0, 4096),
        cmd(Command::Write, 0, 8192),
        cmd(Command::Flush, 0, 0),
        cmd(Command::Trim, 0, 4096),
        cmd(Command::Read, 64 << 20, 4096), // past the end
        cmd(Command::Disc, 0, 0),
    ]
    .concat()
}

fn qemu_handshake() -> Vec<u8> {
    client(
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
        &[
            opt(OPT_EXTENDED_HEADERS, &[]),
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(
                OPT_SET_META_CONTEXT,
                &meta_request("disk", &["base:allocation"]),
            ),
            opt(OPT_GO, &name_and_infos("disk", &[INFO_BLOCK_SIZE])),
        ],
    )
}

fn with_seed(seed: u8, parts: &[Vec<u8>]) -> Vec<u8> {
    let mut v = vec![seed];
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

/// Transmission input: config byte, split seed, export size, stream.
fn transmission(config: u8, split: u8, size: u64, stream: &[u8]) -> Vec<u8> {
    let mut v = vec![config, split];
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(stream);
    v
}

const STRUCTURED_4K_ONE_CONTEXT: u8 = 0b0100_0101;
const SIMPLE_RO_512: u8 = 0b0010_0010;

/// The hand-made seeds: (target, file name, bytes).
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let nbdinfo = client(
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
        &[
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(OPT_LIST, &[]),
            opt(
                OPT_INFO,
                &name_and_infos("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
            ),
            opt(
                OPT_INFO,
                &name_and_infos("ro", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
            ),
            opt(OPT_LIST_META_CONTEXT, &meta_request("disk", &[])),
            opt(OPT_LIST_META_CONTEXT, &meta_request("disk", &["base:"])),
            opt(OPT_ABORT, &[]),
        ],
    );
    let linux = client(
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
        &[opt(OPT_EXPORT_NAME, b"disk")],
    );
    let old_zeroes = client(FLAG_C_FIXED_NEWSTYLE, &[opt(OPT_EXPORT_NAME, b"tiny")]);
    let ro = client(
        FLAG_C_FIXED_NEWSTYLE,
        &[opt(OPT_GO, &name_and_infos("ro", &[INFO_BLOCK_SIZE]))],
    );
    let ro_requests = [cmd(Command::Write, 0, 512), cmd(Command::Read, 0, 512)].concat();
    let too_big = client(
        FLAG_C_FIXED_NEWSTYLE,
        &[
            opt(OPT_GO, &vec![0u8; 9000]),
            opt(OPT_STARTTLS, &[]),
            opt(OPT_GO, &name_and_infos("nope", &[])),
            opt(OPT_GO, &name_and_infos("", &[])),
        ],
    );
    let mut bad_magic = structured_requests();
    bad_magic[28] ^= 0xff;
    let edge = [
        cmd(Command::Read, u64::MAX - 4095, 8192), // wraps past 2^64
        cmd(Command::Write, 0, 0),                 // zero length
        request(Command::Read, CommandFlags::from_bits(0x8000), 0, 4096),
        cmd(Command::Unknown(9), 0, 0),
    ]
    .concat();
    // Over 32 MiB: refused and drained. Only the header and a little payload are in the
    // seed; the stream ends inside the drain.
    let oversized = Request {
        cookie: 7,
        command: Command::Write,
        flags: CommandFlags::default(),
        offset: 0,
        length: 40 << 20,
    };
    let edge = [edge, oversized.encode().to_vec(), vec![0xab; 100]].concat();
    vec![
        (
            "handshake",
            "qemu_go_structured",
            with_seed(0, &[qemu_handshake(), structured_requests()]),
        ),
        (
            "handshake",
            "qemu_go_structured_bytewise",
            with_seed(1, &[qemu_handshake(), structured_requests()]),
        ),
        ("handshake", "nbdinfo_list", with_seed(7, &[nbdinfo])),
        (
            "handshake",
            "linux_export_name",
            with_seed(0, &[linux, simple_requests()]),
        ),
        (
            "handshake",
            "export_name_zeroes",
            with_seed(3, &[old_zeroes, cmd(Command::Read, 0, 3000)]),
        ),
        (
            "handshake",
            "read_only_go",
            with_seed(0, &[ro, ro_requests.clone()]),
        ),
        (
            "handshake",
            "options_too_big_and_unknown",
            with_seed(5, &[too_big]),
        ),
        (
            "handshake",
            "unknown_client_flags",
            with_seed(0, &[client(0xff, &[])]),
        ),
        (
            "transmission",
            "structured_4k",
            transmission(
                STRUCTURED_4K_ONE_CONTEXT,
                0,
                64 << 20,
                &structured_requests(),
            ),
        ),
        (
            "transmission",
            "structured_4k_bytewise",
            transmission(
                STRUCTURED_4K_ONE_CONTEXT,
                1,
                64 << 20,
                &structured_requests(),
            ),
        ),
        (
            "transmission",
            "simple_read_only",
            transmission(SIMPLE_RO_512, 9, 1 << 20, &ro_requests),
        ),
        (
            "transmission",
            "simple_linux",
            transmission(0, 13, 64 << 20, &simple_requests()),
        ),
        (
            "transmission",
            "edge_cases",
            transmission(STRUCTURED_4K_ONE_CONTEXT, 0, u64::MAX, &edge),
        ),
        (
            "transmission",
            "bad_magic",
            transmission(STRUCTURED_4K_ONE_CONTEXT, 0, 64 << 20, &bad_magic),
        ),
    ]
}

#[test]
fn seed_corpus_matches_the_generator() {
    let bless = std::env::var_os("RINGBLK_BLESS_CORPUS").is_some();
    for (target, name, bytes) in seeds() {
        let path = corpus_dir().join(target).join(name);
        if bless {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (bless with RINGBLK_BLESS_CORPUS=1)",
                path.display()
            )
        });
        assert_eq!(on_disk, bytes, "{} is stale", path.display());
    }
}

#[test]
fn every_corpus_file_passes_both_entry_points() {
    let mut files = 0;
    for target in std::fs::read_dir(corpus_dir()).expect("fuzz/corpus exists") {
        let target = target.unwrap().path();
        if !target.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&target).unwrap() {
            let path = file.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            // A panic names the file through the test's output.
            eprintln!("corpus: {}", path.display());
            fuzz_handshake(&bytes);
            fuzz_transmission(&bytes);
            files += 1;
        }
    }
    // Negative control: an empty or missing corpus must not pass silently.
    assert!(files >= seeds().len(), "only {files} corpus files found");
}

#[test]
fn seeds_reach_the_transmission_phase() {
    // The handshake seeds are only useful if they get through negotiation; check that
    // the qemu-like one does, with the expected requests accepted.
    let bytes = with_seed(0, &[qemu_handshake()]);
    let catalog = StaticCatalog::sample();
    let mut hs = Handshake::new(fuzz_limits());
    let progress = hs.feed(&bytes[1..], &catalog).unwrap();
    let Status::Done(n) = progress.status else {
        panic!(
            "qemu seed did not finish the handshake: {:?}",
            progress.status
        );
    };
    assert_eq!(n.meta_contexts.len(), 1);
    let policy = RequestPolicy::from_negotiated(&n, Unaligned::Reject);
    let read = Request {
        cookie: 1,
        command: Command::Read,
        flags: CommandFlags::DF,
        offset: 0,
        length: 4096,
    };
    assert_eq!(codec::validate(&read, &policy), Ok(Admission::Execute));
}

#[test]
#[should_panic]
fn oracle_catches_an_accepted_request_past_the_end() {
    // Negative control for the fuzz oracle: were the validator to accept this, the fuzz
    // targets would crash.
    let policy = fuzz_policy(0, 4096);
    let past_end = Request {
        cookie: 1,
        command: Command::Read,
        flags: CommandFlags::default(),
        offset: 4096,
        length: 1,
    };
    check_accepted(&policy, &past_end, false);
}

#[test]
#[should_panic]
fn oracle_catches_unframed_handshake_output() {
    let mut out = Handshake::new(fuzz_limits()).take_output();
    out.extend_from_slice(b"garbage that is not an option reply");
    check_handshake_output(&out, false);
}

#[test]
fn splitter_covers_whole_and_bytewise() {
    let mut whole = Splitter::new(0);
    assert_eq!(whole.next_len(100), 100);
    let mut bytewise = Splitter::new(1);
    assert!((0..50).all(|_| bytewise.next_len(100) == 1));
    let mut some = Splitter::new(9);
    assert!((0..50).all(|_| (1..=9).contains(&some.next_len(100))));
}

/// The TLS modes reach their states through the fuzz entry (#16): a client that
/// sends STARTTLS first, then qemu's options, completes under every mode that offers
/// TLS and with every split; without STARTTLS, FORCEDTLS never enters transmission
/// (the entry's own assertion) and the others do.
#[test]
fn fuzz_entry_covers_starttls_in_every_mode() {
    let flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let starttls = opt(OPT_STARTTLS, &[]);
    let rest = qemu_handshake()[4..].to_vec(); // without its client flags
    for seed in [0u8, 1, 7, 86, 87, 100, 172, 173, 255] {
        fuzz_handshake(&with_seed(
            seed,
            &[flags.clone(), starttls.clone(), rest.clone()],
        ));
        fuzz_handshake(&with_seed(seed, &[qemu_handshake()]));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn entry_points_never_panic_on_random_bytes(
        data in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        fuzz_handshake(&data);
        fuzz_transmission(&data);
    }

    /// Valid prefixes with random tails reach deeper states than pure noise.
    #[test]
    fn entry_points_never_panic_after_valid_prefixes(
        seed in any::<u8>(),
        config in any::<u8>(),
        tail in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        fuzz_handshake(&with_seed(seed, &[qemu_handshake(), tail.clone()]));
        let mut stream = REQUEST_MAGIC.to_be_bytes().to_vec();
        stream.extend_from_slice(&tail);
        fuzz_transmission(&transmission(config, seed, 1 << 30, &stream));
    }
}
