//! The one piece of AML the guest needs: the `\_S5_` package, whose first elements are the
//! SLP_TYPa and SLP_TYPb values that put the machine in soft-off.
//!
//! No AML interpreter: the DSDT bytes are scanned for `_S5_` followed by a PackageOp whose
//! elements are integer constants, which is how every firmware and VMM writes `Name (_S5, …)`.

const PACKAGE_OP: u8 = 0x12;
const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const BYTE_PREFIX: u8 = 0x0A;
const WORD_PREFIX: u8 = 0x0B;
const DWORD_PREFIX: u8 = 0x0C;
const QWORD_PREFIX: u8 = 0x0E;
/// SLP_TYPx is a 3-bit field.
const SLP_TYP_MAX: u64 = 7;

/// Errors finding `_S5_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("No usable _S5_ package in the DSDT")]
    NoS5,
    #[error("_S5_ sleep type {value} does not fit SLP_TYP")]
    BadSleepType { value: u64 },
}

/// The sleep type values for PM1a and PM1b control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SleepType {
    pub a: u8,
    pub b: u8,
}

/// Finds the `_S5_` package in `aml` (a DSDT or SSDT body).
pub fn find_s5(aml: &[u8]) -> Result<SleepType, Error> {
    let mut last_error = Error::NoS5;
    let mut from = 0;
    while let Some(pos) = find(&aml[from..], b"_S5_") {
        let at = from + pos + 4;
        match parse_package(&aml[at..]) {
            Some(Ok(st)) => return Ok(st),
            Some(Err(e)) => last_error = e,
            None => {}
        }
        from = at;
    }
    Err(last_error)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses `PackageOp PkgLength NumElements Integer [Integer]`; `None` when this is no package of
/// integers (the name was used elsewhere, e.g. as a reference).
fn parse_package(b: &[u8]) -> Option<Result<SleepType, Error>> {
    if *b.first()? != PACKAGE_OP {
        return None;
    }
    let (pkg_len, len_bytes) = pkg_length(b.get(1..)?)?;
    // PkgLength counts itself and what follows; it must stay inside the table.
    let body = b.get(1..1usize.checked_add(pkg_len)?)?.get(len_bytes..)?;
    let (&count, elements) = body.split_first()?;
    let (first, used) = integer(elements)?;
    let (a, b_val) = if count >= 2 {
        let (second, _) = integer(elements.get(used..)?)?;
        (first, second)
    } else if count == 1 {
        // One element: the legacy packing, SLP_TYPa in bits 0-7 and SLP_TYPb in bits 8-15.
        (first & 0xff, (first >> 8) & 0xff)
    } else {
        return None;
    };
    for value in [a, b_val] {
        if value > SLP_TYP_MAX {
            return Some(Err(Error::BadSleepType { value }));
        }
    }
    Some(Ok(SleepType {
        a: a as u8,
        b: b_val as u8,
    }))
}

/// Decodes a PkgLength: (length, bytes the encoding used).
fn pkg_length(b: &[u8]) -> Option<(usize, usize)> {
    let lead = *b.first()?;
    let follow = usize::from(lead >> 6);
    if follow == 0 {
        return Some((usize::from(lead & 0x3f), 1));
    }
    let mut len = usize::from(lead & 0x0f);
    for i in 0..follow {
        len |= usize::from(*b.get(1 + i)?) << (4 + 8 * i);
    }
    Some((len, 1 + follow))
}

/// Decodes an integer constant: (value, bytes used).
fn integer(b: &[u8]) -> Option<(u64, usize)> {
    let op = *b.first()?;
    let le = |n: usize| -> Option<(u64, usize)> {
        let bytes = b.get(1..1 + n)?;
        Some((
            bytes
                .iter()
                .rev()
                .fold(0u64, |v, byte| (v << 8) | u64::from(*byte)),
            1 + n,
        ))
    };
    match op {
        ZERO_OP => Some((0, 1)),
        ONE_OP => Some((1, 1)),
        BYTE_PREFIX => le(1),
        WORD_PREFIX => le(2),
        DWORD_PREFIX => le(4),
        QWORD_PREFIX => le(8),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_common_encodings() {
        // Name (_S5, Package () { 5, 5, 0, 0 })
        assert_eq!(
            find_s5(b"\x10\x20\x08_S5_\x12\x08\x04\x0a\x05\x0a\x05\x00\x00"),
            Ok(SleepType { a: 5, b: 5 })
        );
        // Name (\_S5, Package (4) { Zero, One, ... }) with a root prefix.
        assert_eq!(
            find_s5(b"\x08\\_S5_\x12\x06\x04\x00\x01\x00\x00"),
            Ok(SleepType { a: 0, b: 1 })
        );
        // Word and dword constants, two-byte PkgLength.
        let aml = b"\x08_S5_\x12\x4b\x00\x02\x0b\x07\x00\x0c\x03\x00\x00\x00";
        assert_eq!(find_s5(aml), Ok(SleepType { a: 7, b: 3 }));
        // One element: legacy packing.
        assert_eq!(
            find_s5(b"\x08_S5_\x12\x05\x01\x0b\x05\x07"),
            Ok(SleepType { a: 5, b: 7 })
        );
    }

    #[test]
    fn skips_references_and_takes_the_package() {
        let aml = b"\x70_S5_\x60\x08_S5_\x12\x05\x02\x0a\x06\x00";
        assert_eq!(find_s5(aml), Ok(SleepType { a: 6, b: 0 }));
    }

    #[test]
    fn rejects_hostile_packages() {
        assert_eq!(find_s5(b""), Err(Error::NoS5));
        assert_eq!(find_s5(b"_S5"), Err(Error::NoS5));
        assert_eq!(find_s5(b"_S5_"), Err(Error::NoS5));
        assert_eq!(find_s5(b"_S5_\x12"), Err(Error::NoS5));
        // PkgLength past the end of the table.
        assert_eq!(
            find_s5(b"_S5_\x12\x3f\x02\x0a\x05\x0a\x05"),
            Err(Error::NoS5)
        );
        assert_eq!(
            find_s5(b"_S5_\x12\xff\xff\xff\xff\x02\x0a\x05"),
            Err(Error::NoS5)
        );
        // Element truncated, or no elements.
        assert_eq!(find_s5(b"_S5_\x12\x04\x02\x0a\x05\x0a"), Err(Error::NoS5));
        assert_eq!(find_s5(b"_S5_\x12\x02\x00"), Err(Error::NoS5));
        // Not integer constants (a method call, a string).
        assert_eq!(find_s5(b"_S5_\x12\x05\x02\x0d\x41\x00"), Err(Error::NoS5));
        // Values wider than SLP_TYP.
        assert_eq!(
            find_s5(b"_S5_\x12\x05\x02\x0a\x08\x00"),
            Err(Error::BadSleepType { value: 8 })
        );
        let wide = b"_S5_\x12\x0c\x02\x0e\xff\xff\xff\xff\xff\xff\xff\xff\x00";
        assert_eq!(find_s5(wide), Err(Error::BadSleepType { value: u64::MAX }));
    }
}
