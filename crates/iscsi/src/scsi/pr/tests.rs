use super::*;
use proptest::prelude::*;

fn params(key: u64, sa_key: u64, aptpl: bool) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = u8::from(aptpl);
    p
}

const A: &str = "iqn.a,i,0x1";
const B: &str = "iqn.b,i,0x2";
const C: &str = "iqn.c,i,0x3";

fn out(
    r: &mut Reservations,
    n: &str,
    act: u8,
    t: u8,
    key: u64,
    sa: u64,
) -> Result<PrOutcome, PrError> {
    r.reserve_out(n, act, 0, t, &params(key, sa, false))
}

/// The usual failover sequence: two nodes register, one reserves (write exclusive,
/// registrants only), the other preempts it after a failure.
#[test]
fn register_reserve_preempt() {
    let mut r = Reservations::new();
    assert!(out(&mut r, A, action::REGISTER, 0, 0, 0xa).is_ok());
    assert!(out(&mut r, B, action::REGISTER, 0, 0, 0xb).is_ok());
    assert_eq!(r.generation(), 2);
    // Wrong key: conflict (negative control of the key check).
    assert_eq!(
        out(&mut r, A, action::RESERVE, 5, 0xb, 0),
        Err(PrError::Conflict)
    );
    assert!(out(&mut r, A, action::RESERVE, 5, 0xa, 0).is_ok());
    // The same reservation again is fine; another type or holder is a conflict.
    assert!(out(&mut r, A, action::RESERVE, 5, 0xa, 0).is_ok());
    assert_eq!(
        out(&mut r, B, action::RESERVE, 5, 0xb, 0),
        Err(PrError::Conflict)
    );
    // Registrants may write under WE_RO; an unregistered nexus may only read.
    assert_eq!(r.check_access(B, true), Ok(()));
    assert_eq!(r.check_access(C, true), Err(PrError::Conflict));
    assert_eq!(r.check_access(C, false), Ok(()));
    // READ KEYS and READ RESERVATION.
    let keys = r.reserve_in(action::READ_KEYS).unwrap_or_default();
    assert_eq!(&keys[4..8], &16u32.to_be_bytes());
    assert_eq!(&keys[8..16], &0xau64.to_be_bytes());
    let res = r.reserve_in(action::READ_RESERVATION).unwrap_or_default();
    assert_eq!(res.len(), 24);
    assert_eq!(&res[8..16], &0xau64.to_be_bytes());
    assert_eq!(res[21], 5);
    // B preempts A: A's registration goes, B holds the reservation with its type.
    let o = out(&mut r, B, action::PREEMPT_AND_ABORT, 1, 0xb, 0xa);
    assert_eq!(o.map(|o| o.abort_keys), Ok(vec![0xa]));
    assert_eq!(r.check_access(A, true), Err(PrError::Conflict));
    assert_eq!(r.check_access(A, false), Ok(()));
    assert_eq!(r.check_access(B, true), Ok(()));
    assert_eq!(
        out(&mut r, A, action::RESERVE, 1, 0xa, 0),
        Err(PrError::Conflict)
    );
    // Release with the wrong type is an error; with the right one it goes.
    assert_eq!(
        out(&mut r, B, action::RELEASE, 3, 0xb, 0),
        Err(PrError::Check(Sense::INVALID_RELEASE))
    );
    assert!(out(&mut r, B, action::RELEASE, 1, 0xb, 0).is_ok());
    assert_eq!(r.check_access(C, true), Ok(()));
    // CLEAR drops everything.
    assert!(out(&mut r, B, action::CLEAR, 0, 0xb, 0).is_ok());
    assert_eq!(r.reserve_in(action::READ_KEYS).map(|k| k.len()), Ok(8));
}

#[test]
fn unregistering_holder_releases() {
    let mut r = Reservations::new();
    assert!(out(&mut r, A, action::REGISTER, 0, 0, 1).is_ok());
    assert!(out(&mut r, A, action::RESERVE, 3, 1, 0).is_ok());
    assert_eq!(r.check_access(B, false), Err(PrError::Conflict));
    assert!(out(&mut r, A, action::REGISTER, 0, 1, 0).is_ok());
    assert_eq!(r.check_access(B, true), Ok(()));
    // Registering with a nonzero reservation key while unregistered is a conflict;
    // REGISTER AND IGNORE EXISTING KEY does not check it.
    assert_eq!(
        out(&mut r, B, action::REGISTER, 0, 9, 2),
        Err(PrError::Conflict)
    );
    assert!(out(&mut r, B, action::REGISTER_AND_IGNORE, 0, 9, 2).is_ok());
}

#[test]
fn legacy_reservations() {
    let mut r = Reservations::new();
    assert_eq!(r.reserve_legacy(A), Ok(()));
    assert_eq!(r.reserve_legacy(B), Err(PrError::Conflict));
    assert_eq!(r.check_access(B, false), Err(PrError::Conflict));
    assert_eq!(r.release_legacy(B), Ok(()));
    assert_eq!(r.check_access(B, false), Err(PrError::Conflict));
    assert_eq!(r.release_legacy(A), Ok(()));
    assert!(out(&mut r, A, action::REGISTER, 0, 0, 1).is_ok());
    // With registrations present, an SPC-2 RESERVE is a conflict.
    assert_eq!(r.reserve_legacy(A), Err(PrError::Conflict));
}

#[test]
fn bad_parameters() {
    let mut r = Reservations::new();
    assert_eq!(
        r.reserve_out(A, action::REGISTER, 0, 0, &[0; 23]),
        Err(PrError::Check(Sense::PARAMETER_LIST_LENGTH))
    );
    let mut p = params(0, 1, false);
    p[20] = 0x08; // SPEC_I_PT
    assert_eq!(
        r.reserve_out(A, action::REGISTER, 0, 0, &p),
        Err(PrError::Check(Sense::INVALID_FIELD_IN_PARAMETERS))
    );
    assert!(out(&mut r, A, action::REGISTER, 0, 0, 1).is_ok());
    assert_eq!(
        out(&mut r, A, action::RESERVE, 2, 1, 0),
        Err(PrError::Check(Sense::INVALID_FIELD_IN_CDB))
    );
    assert_eq!(
        r.reserve_in(3),
        Err(PrError::Check(Sense::INVALID_FIELD_IN_CDB))
    );
    let caps = r
        .reserve_in(action::REPORT_CAPABILITIES)
        .unwrap_or_default();
    assert_eq!(caps.len(), 8);
    // APTPL asked for: the outcome says persist.
    let o = r.reserve_out(A, action::REGISTER, 0, 0, &params(1, 2, true));
    assert_eq!(o.map(|o| o.persist), Ok(true));
    assert!(r.aptpl());
}

proptest! {
    /// Random PR OUT sequences from three nexuses keep the invariants: registrations
    /// bounded, one per nexus, keys nonzero; a non-all-registrants reservation is held
    /// by a registered nexus; the holder always has access.
    #[test]
    fn invariants_hold(ops in prop::collection::vec(
        (0usize..3, 0u8..8, 0u8..9, 0u64..4, 0u64..4, any::<bool>()), 0..60)) {
        let nexus = [A, B, C];
        let mut r = Reservations::new();
        for (n, act, t, key, sa, aptpl) in ops {
            let _ = r.reserve_out(nexus[n], act, 0, t, &params(key, sa, aptpl));
            let mut seen: Vec<&str> = Vec::new();
            for (nx, k) in &r.registrants {
                prop_assert!(*k != 0);
                prop_assert!(!seen.contains(&nx.as_str()));
                seen.push(nx);
            }
            prop_assert!(r.registrants.len() <= REGISTRANTS_MAX);
            if let Some(res) = &r.reservation {
                prop_assert!(valid_type(res.pr_type));
                prop_assert!(r.key_of(&res.holder).is_some() || all_registrants(res.pr_type));
                if !all_registrants(res.pr_type) {
                    prop_assert_eq!(r.check_access(&res.holder, true), Ok(()));
                }
            }
        }
    }
}
