use aes::cipher::KeyInit;
use aes::Aes256;
use xts_mode::{get_tweak_default, Xts128};

use super::*;
use crate::testutil::Rng;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// IEEE 1619-2007 Annex B, vector 10: XTS-AES-256, 512-byte data unit, sequence number 0xff.
#[test]
fn ieee1619_vector_10() {
    let key = hex(
        "2718281828459045235360287471352662497757247093699959574966967627
         3141592653589793238462643383279502884197169399375105820974944592",
    );
    let plain: Vec<u8> = (0..512).map(|i| i as u8).collect();
    let cipher = hex(
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b
         5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd
         5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0
         c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca
         2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0
         b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f
         93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec
         583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a
         84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1
         505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae
         9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29
         a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac
         6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f
         645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385
         1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa
         773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
    );
    let mut xts = Xts::new(&XtsKey::from_bytes(&key).unwrap()).unwrap();
    let mut buf = plain.clone();
    xts.encrypt_unit(0xff, &mut buf).unwrap();
    assert_eq!(buf, cipher);
    xts.decrypt_unit(0xff, &mut buf).unwrap();
    assert_eq!(buf, plain);
}

fn oracle(key: &[u8]) -> Xts128<Aes256> {
    let k1 = Aes256::new_from_slice(&key[..32]).unwrap();
    let k2 = Aes256::new_from_slice(&key[32..]).unwrap();
    Xts128::new(k1, k2)
}

/// Random keys, sectors and data: OpenSSL agrees with the independent RustCrypto oracle,
/// sector by sector with the plain64 tweak.
#[test]
fn matches_the_xts_mode_oracle() {
    let mut rng = Rng(0xdead_beef_1234_5678);
    for round in 0..32 {
        let mut key = [0u8; KEY_LEN];
        rng.fill(&mut key);
        let oracle = oracle(&key);
        let mut xts = Xts::new(&XtsKey::from_bytes(&key).unwrap()).unwrap();
        let sectors = 1 + rng.below(8) as usize;
        let first = if round == 0 {
            u64::MAX - 3
        } else {
            rng.next_u64() >> rng.below(64)
        };
        let mut plain = vec![0u8; sectors * SECTOR];
        rng.fill(&mut plain);

        let mut ours = plain.clone();
        xts.encrypt(first, &mut ours).unwrap();
        let mut theirs = plain.clone();
        for (i, unit) in theirs.chunks_exact_mut(SECTOR).enumerate() {
            oracle.encrypt_sector(
                unit,
                get_tweak_default(first.wrapping_add(i as u64) as u128),
            );
        }
        assert_eq!(ours, theirs, "round {round}");

        let mut bounce = vec![0u8; plain.len()];
        xts.encrypt_to(first, &plain, &mut bounce).unwrap();
        assert_eq!(bounce, theirs, "encrypt_to, round {round}");

        xts.decrypt(first, &mut ours).unwrap();
        assert_eq!(ours, plain);
    }
}

/// Out of place against guest memory: encrypt from a volatile slice and decrypt into one agree
/// with the oracle, leave the source untouched and write nothing past the unit.
#[test]
fn volatile_out_of_place_matches_the_oracle() {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut rng = Rng(0x005e_ed0f_0ac1);
    for round in 0..16u64 {
        let mut key = [0u8; KEY_LEN];
        rng.fill(&mut key);
        let oracle = oracle(&key);
        let mut xts = Xts::new(&XtsKey::from_bytes(&key).unwrap()).unwrap();
        let unit = rng.next_u64() >> rng.below(64);
        // Whole sectors, and (as the cipher allows) other unit lengths with stealing.
        let len = if round % 4 == 3 {
            16 + rng.below(4000) as usize
        } else {
            SECTOR
        };
        let addr = GuestAddress(rng.below(512) * 1024 + rng.below(16));
        let mut plain = vec![0u8; len];
        rng.fill(&mut plain);
        mem.write_slice(&plain, addr).unwrap();
        let src = mem.get_slice(addr, len).unwrap();

        let mut ours = vec![0u8; len];
        xts.encrypt_from_volatile(unit, &src, &mut ours).unwrap();
        let mut theirs = plain.clone();
        oracle.encrypt_sector(&mut theirs, get_tweak_default(unit as u128));
        assert_eq!(ours, theirs, "round {round}");
        let mut left = vec![0u8; len];
        mem.read_slice(&mut left, addr).unwrap();
        assert_eq!(left, plain, "source untouched");

        let dst_addr = GuestAddress(addr.0 + (2 << 10) + len as u64);
        mem.write_slice(&[0x77], GuestAddress(dst_addr.0 + len as u64))
            .unwrap();
        let dst = mem.get_slice(dst_addr, len).unwrap();
        xts.decrypt_into_volatile(unit, &ours, &dst).unwrap();
        let mut back = vec![0u8; len + 1];
        mem.read_slice(&mut back, dst_addr).unwrap();
        assert_eq!(back[..len], plain[..], "round {round}");
        assert_eq!(back[len], 0x77, "nothing written past the unit");

        if len == SECTOR {
            let mut again = vec![0u8; SECTOR];
            xts.decrypt_to(unit, &ours, &mut again).unwrap();
            assert_eq!(again, plain, "decrypt_to, round {round}");
        }
    }
    // Lengths are checked before any memory is touched.
    let mut key = [0u8; KEY_LEN];
    rng.fill(&mut key);
    let mut xts = Xts::new(&XtsKey::from_bytes(&key).unwrap()).unwrap();
    let s = mem.get_slice(GuestAddress(0), SECTOR).unwrap();
    assert!(matches!(
        xts.encrypt_from_volatile(0, &s, &mut [0u8; 100]),
        Err(Error::Length(100))
    ));
    let tiny = mem.get_slice(GuestAddress(0), 8).unwrap();
    assert!(matches!(
        xts.decrypt_into_volatile(0, &[0u8; 8], &tiny),
        Err(Error::Length(8))
    ));
    assert!(matches!(
        xts.decrypt_to(0, &[0u8; SECTOR], &mut [0u8; 16]),
        Err(Error::Length(16))
    ));
}

#[test]
fn same_data_different_sectors_differ() {
    let mut rng = Rng(7);
    let mut key = [0u8; KEY_LEN];
    rng.fill(&mut key);
    let mut xts = Xts::new(&XtsKey::from_bytes(&key).unwrap()).unwrap();
    let mut a = vec![0u8; SECTOR];
    let mut b = vec![0u8; SECTOR];
    xts.encrypt(1, &mut a).unwrap();
    xts.encrypt(2, &mut b).unwrap();
    assert_ne!(a, b);
    assert!(a.iter().any(|&x| x != 0));
}

#[test]
fn bad_keys_and_lengths_are_errors() {
    assert!(matches!(
        XtsKey::from_bytes(&[1u8; 32]),
        Err(Error::KeyLength(32))
    ));
    assert!(matches!(
        XtsKey::from_bytes(&[1u8; KEY_LEN]),
        Err(Error::WeakKey)
    ));
    let mut key = [0u8; KEY_LEN];
    key[63] = 1;
    let k = XtsKey::from_bytes(&key).unwrap();
    let mut xts = Xts::new(&k).unwrap();
    assert!(matches!(
        xts.encrypt(0, &mut [0u8; 100]),
        Err(Error::Length(100))
    ));
    assert!(matches!(
        xts.encrypt_unit(0, &mut [0u8; 8]),
        Err(Error::Length(8))
    ));
    assert!(matches!(
        xts.encrypt_to(0, &[0u8; SECTOR], &mut [0u8; 16]),
        Err(Error::Length(16))
    ));
}

#[test]
fn debug_never_shows_key_bytes() {
    let mut key = [0u8; KEY_LEN];
    key.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = 0xa0 + (i as u8 % 17));
    let k = XtsKey::from_bytes(&key).unwrap();
    let shown = format!("{k:?} {:?}", Xts::new(&k).unwrap());
    assert!(shown.contains("redacted"));
    assert!(!shown.contains("a0") && !shown.contains("160"), "{shown}");
}

#[test]
fn bench_reports_positive_throughput() {
    let r = bench(1 << 20).unwrap();
    assert!(r.encrypt_gbps > 0.0 && r.decrypt_gbps > 0.0);
    assert_eq!(r.bytes, 1 << 20);
}
