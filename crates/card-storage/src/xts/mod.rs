//! AES-256-XTS encryption of volume data at rest.
//!
//! Each volume has a 512-bit key (two AES-256 keys). The data unit is one 4 KiB sector and the
//! tweak is the volume-relative sector number as a 128-bit little-endian integer: the same as
//! dm-crypt/LUKS `aes-xts-plain64` with 4096-byte sectors, so a volume can be checked with
//! standard tools. The cipher is OpenSSL's EVP AES-256-XTS (AES-NI); its key schedule is
//! computed once per [`Xts`] and only the tweak is re-initialised per sector.
//!
//! Key material lives in [`XtsKey`] (zeroized on drop, redacted in `Debug`) and in OpenSSL's
//! context, which OpenSSL cleanses when the context is freed.
//!
//! Besides in place, a unit can go out of place between guest memory (a vm-memory
//! [`VolatileSlice`]) and one of our buffers: [`Xts::encrypt_from_volatile`] and
//! [`Xts::decrypt_into_volatile`]. The guest may change its memory while the cipher runs, so Rust
//! never references it: the cipher gets raw pointers, and whatever bytes it reads only change
//! what it writes (its memory accesses do not depend on the data).

use std::fmt;
use std::os::raw::c_int;
use std::time::Instant;

use foreign_types::ForeignTypeRef;
use openssl::cipher::Cipher;
use openssl::cipher_ctx::{CipherCtx, CipherCtxRef};
use openssl::error::ErrorStack;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use zeroize::{Zeroize, Zeroizing};

/// Bytes in a volume key: two AES-256 keys.
pub const KEY_LEN: usize = 64;
/// The XTS data unit: one logical block.
pub const SECTOR: usize = 4096;

/// Errors from key handling and encryption.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("An XTS key is {KEY_LEN} bytes, got {0}")]
    KeyLength(usize),
    #[error("The two halves of an XTS key must differ")]
    WeakKey,
    #[error("Data length {0} is not a whole number of data units")]
    Length(usize),
    #[error("OpenSSL cipher operation failed")]
    OpenSsl(#[source] ErrorStack),
}

/// A volume's 512-bit XTS key. Never printed, zeroized when dropped.
#[derive(Clone)]
pub struct XtsKey(Zeroizing<[u8; KEY_LEN]>);

impl XtsKey {
    /// Takes a key from raw bytes: key1 (data) followed by key2 (tweak).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() != KEY_LEN {
            return Err(Error::KeyLength(bytes.len()));
        }
        // IEEE 1619 wants independent halves; OpenSSL refuses equal ones when encrypting.
        if bytes[..32] == bytes[32..] {
            return Err(Error::WeakKey);
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(bytes);
        Ok(Self(key))
    }

    fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for XtsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("XtsKey(<redacted>)")
    }
}

/// One thread's AES-256-XTS engine for one volume (contexts are stateful, so each worker
/// thread builds its own from the shared [`XtsKey`]).
pub struct Xts {
    enc: CipherCtx,
    dec: CipherCtx,
}

impl fmt::Debug for Xts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Xts(<key redacted>)")
    }
}

fn tweak(sector: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&sector.to_le_bytes());
    t
}

impl Xts {
    /// Expands `key` into encryption and decryption contexts.
    pub fn new(key: &XtsKey) -> Result<Self, Error> {
        let cipher = Cipher::aes_256_xts();
        let mut enc = CipherCtx::new().map_err(Error::OpenSsl)?;
        enc.encrypt_init(Some(cipher), Some(key.bytes()), Some(&[0u8; 16]))
            .map_err(Error::OpenSsl)?;
        let mut dec = CipherCtx::new().map_err(Error::OpenSsl)?;
        dec.decrypt_init(Some(cipher), Some(key.bytes()), Some(&[0u8; 16]))
            .map_err(Error::OpenSsl)?;
        Ok(Self { enc, dec })
    }

    /// Encrypts one data unit of any length ≥ 16 in place with tweak `unit`.
    pub fn encrypt_unit(&mut self, unit: u64, data: &mut [u8]) -> Result<(), Error> {
        run_inplace(&mut self.enc, true, unit, data)
    }

    /// Decrypts one data unit in place.
    pub fn decrypt_unit(&mut self, unit: u64, data: &mut [u8]) -> Result<(), Error> {
        run_inplace(&mut self.dec, false, unit, data)
    }

    /// Encrypts whole sectors in place; `first` is the volume sector number of `data[0]`.
    pub fn encrypt(&mut self, first: u64, data: &mut [u8]) -> Result<(), Error> {
        check_len(data.len())?;
        for (i, unit) in data.chunks_exact_mut(SECTOR).enumerate() {
            run_inplace(&mut self.enc, true, first.wrapping_add(i as u64), unit)?;
        }
        Ok(())
    }

    /// Encrypts whole sectors from `src` into `dst` (same length), leaving `src` untouched:
    /// how guest data goes into a bounce buffer.
    pub fn encrypt_to(&mut self, first: u64, src: &[u8], dst: &mut [u8]) -> Result<(), Error> {
        run_to(&mut self.enc, true, first, src, dst)
    }

    /// Decrypts whole sectors from `src` into `dst` (same length), leaving `src` untouched.
    pub fn decrypt_to(&mut self, first: u64, src: &[u8], dst: &mut [u8]) -> Result<(), Error> {
        run_to(&mut self.dec, false, first, src, dst)
    }

    /// Encrypts one data unit (any length ≥ 16) with tweak `unit` from guest memory `src` into
    /// `dst` (same length): how guest data goes into a bounce buffer without a copy. Bytes the
    /// guest changes meanwhile change only the ciphertext.
    pub fn encrypt_from_volatile<B: BitmapSlice>(
        &mut self,
        unit: u64,
        src: &VolatileSlice<'_, B>,
        dst: &mut [u8],
    ) -> Result<(), Error> {
        start_out_of_place(&mut self.enc, true, unit, src.len(), dst.len())?;
        let guard = src.ptr_guard();
        // SAFETY: the guard's pointer is valid for reads of `src.len()` bytes while the guard and
        // the slice live (vm-memory's VolatileSlice contract: the mapping outlives the slice);
        // `dst` is our own exclusive slice of that length, outside guest memory, so the two do
        // not overlap.
        unsafe { update_raw(&mut self.enc, guard.as_ptr(), dst.as_mut_ptr(), dst.len()) }
    }

    /// Decrypts one data unit with tweak `unit` from `src` straight into guest memory `dst`
    /// (same length), marking it dirty.
    pub fn decrypt_into_volatile<B: BitmapSlice>(
        &mut self,
        unit: u64,
        src: &[u8],
        dst: &VolatileSlice<'_, B>,
    ) -> Result<(), Error> {
        start_out_of_place(&mut self.dec, false, unit, src.len(), dst.len())?;
        let guard = dst.ptr_guard_mut();
        // SAFETY: the guard's pointer is valid for writes of `dst.len()` bytes while the guard
        // and the slice live (VolatileSlice contract); `src` is our own slice of that length,
        // outside guest memory. Rust holds no reference to the guest bytes being written.
        unsafe { update_raw(&mut self.dec, src.as_ptr(), guard.as_ptr(), src.len()) }?;
        dst.bitmap().mark_dirty(0, dst.len());
        Ok(())
    }

    /// Decrypts whole sectors in place.
    pub fn decrypt(&mut self, first: u64, data: &mut [u8]) -> Result<(), Error> {
        check_len(data.len())?;
        for (i, unit) in data.chunks_exact_mut(SECTOR).enumerate() {
            run_inplace(&mut self.dec, false, first.wrapping_add(i as u64), unit)?;
        }
        Ok(())
    }
}

fn check_len(len: usize) -> Result<(), Error> {
    if !len.is_multiple_of(SECTOR) {
        return Err(Error::Length(len));
    }
    Ok(())
}

/// A data unit the cipher accepts: at least one AES block, and a length OpenSSL can take.
fn check_unit(len: usize) -> Result<(), Error> {
    if len < 16 || c_int::try_from(len).is_err() {
        return Err(Error::Length(len));
    }
    Ok(())
}

/// Runs `len` bytes (one data unit, the tweak already set) through `ctx` from `src` to `dst`.
///
/// Raw pointers rather than slices, because either side may be guest memory that Rust must not
/// reference while the guest can change it.
///
/// # Safety
///
/// `src` must be valid for reads and `dst` for writes of `len` bytes for the duration of the
/// call, and the two ranges must not overlap (memory the guest changes concurrently is fine).
unsafe fn update_raw(
    ctx: &mut CipherCtxRef,
    src: *const u8,
    dst: *mut u8,
    len: usize,
) -> Result<(), Error> {
    let inl = c_int::try_from(len).map_err(|_| Error::Length(len))?;
    let mut outl: c_int = 0;
    // SAFETY: `ctx` is a live context initialised for XTS, borrowed exclusively; the caller
    // guarantees both ranges. XTS writes exactly `inl` bytes for a whole unit (no buffered
    // tail), and its memory accesses never depend on the data, so any bytes a guest puts in
    // `src` meanwhile only change the output.
    let ok = unsafe { openssl_sys::EVP_CipherUpdate(ctx.as_ptr(), dst, &mut outl, src, inl) };
    if ok != 1 {
        return Err(Error::OpenSsl(ErrorStack::get()));
    }
    if outl != inl {
        return Err(Error::Length(usize::try_from(outl).unwrap_or(0)));
    }
    Ok(())
}

/// Starts data unit `unit` on `ctx`. Re-initialising with only the IV keeps the expanded key
/// and resets the XTS state, as each data unit must start afresh.
fn start_unit(ctx: &mut CipherCtx, encrypting: bool, unit: u64) -> Result<(), Error> {
    let iv = tweak(unit);
    if encrypting {
        ctx.encrypt_init(None, None, Some(&iv))
    } else {
        ctx.decrypt_init(None, None, Some(&iv))
    }
    .map_err(Error::OpenSsl)
}

/// Checks one data unit going out of place (`src_len` bytes into `dst_len`) and starts it.
fn start_out_of_place(
    ctx: &mut CipherCtx,
    encrypting: bool,
    unit: u64,
    src_len: usize,
    dst_len: usize,
) -> Result<(), Error> {
    check_unit(src_len)?;
    if dst_len != src_len {
        return Err(Error::Length(dst_len));
    }
    start_unit(ctx, encrypting, unit)
}

/// Runs whole sectors of `src` through `ctx` into `dst` (same length); `first` is the volume
/// sector number of `src[0]`.
fn run_to(
    ctx: &mut CipherCtx,
    encrypting: bool,
    first: u64,
    src: &[u8],
    dst: &mut [u8],
) -> Result<(), Error> {
    check_len(src.len())?;
    if dst.len() != src.len() {
        return Err(Error::Length(dst.len()));
    }
    for (i, (s, d)) in src
        .chunks_exact(SECTOR)
        .zip(dst.chunks_exact_mut(SECTOR))
        .enumerate()
    {
        start_unit(ctx, encrypting, first.wrapping_add(i as u64))?;
        // SAFETY: `s` and `d` are distinct Rust slices of the same length, valid for the call.
        unsafe { update_raw(ctx, s.as_ptr(), d.as_mut_ptr(), s.len()) }?;
    }
    Ok(())
}

fn run_inplace(
    ctx: &mut CipherCtx,
    encrypting: bool,
    unit: u64,
    data: &mut [u8],
) -> Result<(), Error> {
    if data.len() < 16 || data.len() > i32::MAX as usize {
        return Err(Error::Length(data.len()));
    }
    start_unit(ctx, encrypting, unit)?;
    let len = data.len();
    ctx.cipher_update_inplace(data, len)
        .map_err(Error::OpenSsl)?;
    Ok(())
}

/// Result of [`bench()`]: single-thread throughput at 4 KiB data units.
#[derive(Debug, Clone, Copy)]
pub struct BenchResult {
    pub encrypt_gbps: f64,
    pub decrypt_gbps: f64,
    pub bytes: u64,
}

/// Measures AES-256-XTS throughput on this thread (one core): `total` bytes each way, in
/// 128 KiB requests of 4 KiB sectors, as the data path does.
pub fn bench(total: u64) -> Result<BenchResult, Error> {
    let mut raw = [0u8; KEY_LEN];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    let key = XtsKey::from_bytes(&raw)?;
    raw.zeroize();
    let mut xts = Xts::new(&key)?;
    let mut buf = vec![0x5au8; 128 * 1024];
    let rounds = total.div_ceil(buf.len() as u64).max(1);
    let bytes = rounds * buf.len() as u64;
    let per_req = (buf.len() / SECTOR) as u64;
    let t = Instant::now();
    for r in 0..rounds {
        xts.encrypt(r * per_req, &mut buf)?;
    }
    let enc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for r in 0..rounds {
        xts.decrypt(r * per_req, &mut buf)?;
    }
    let dec = t.elapsed().as_secs_f64();
    std::hint::black_box(&buf);
    Ok(BenchResult {
        encrypt_gbps: bytes as f64 / enc / 1e9,
        decrypt_gbps: bytes as f64 / dec / 1e9,
        bytes,
    })
}

#[cfg(test)]
mod tests;
