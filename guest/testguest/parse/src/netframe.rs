//! The Ethernet frames `net-exchange` sends and expects back: ethertype 0x88B5 (local
//! experimental), a magic and a sequence number in the payload, and the bookkeeping of which
//! sequence numbers came back (lost, duplicated, out of order).

pub const ETHERTYPE: u16 = 0x88B5;
pub const MAGIC: [u8; 4] = *b"OBNT";
/// Frames are padded to the Ethernet minimum (without FCS).
pub const FRAME_LEN: usize = 60;
pub const BROADCAST: [u8; 6] = [0xFF; 6];
/// Most sequence numbers tracked.
pub const MAX_FRAMES: usize = 4096;

/// Writes frame `seq` into `buf` (at least [`FRAME_LEN`] bytes); returns its length.
pub fn build(buf: &mut [u8], dst: [u8; 6], src: [u8; 6], seq: u32) -> Option<usize> {
    let frame = buf.get_mut(..FRAME_LEN)?;
    frame.fill(0);
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    frame[14..18].copy_from_slice(&MAGIC);
    frame[18..22].copy_from_slice(&seq.to_be_bytes());
    Some(FRAME_LEN)
}

/// The sequence number of one of our frames; `None` for any other frame.
pub fn parse(frame: &[u8]) -> Option<u32> {
    if frame.get(12..14)? != ETHERTYPE.to_be_bytes() || frame.get(14..18)? != MAGIC {
        return None;
    }
    Some(u32::from_be_bytes(frame.get(18..22)?.try_into().ok()?))
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// What came back of the frames sent.
#[derive(Debug, Clone)]
pub struct Tracker {
    seen: [u64; MAX_FRAMES / 64],
    sent: u32,
    highest: Option<u32>,
    pub received: u32,
    pub duplicated: u32,
    pub out_of_order: u32,
    /// Frames of ours with a sequence number never sent.
    pub unknown: u32,
}

impl Tracker {
    /// Tracks up to [`MAX_FRAMES`] sent frames.
    pub fn new(sent: u32) -> Tracker {
        Tracker {
            seen: [0; MAX_FRAMES / 64],
            sent: sent.min(MAX_FRAMES as u32),
            highest: None,
            received: 0,
            duplicated: 0,
            out_of_order: 0,
            unknown: 0,
        }
    }

    pub fn record(&mut self, seq: u32) {
        if seq >= self.sent {
            self.unknown += 1;
            return;
        }
        let (word, bit) = (seq as usize / 64, seq % 64);
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicated += 1;
            return;
        }
        self.seen[word] |= 1 << bit;
        self.received += 1;
        match self.highest {
            Some(h) if seq < h => self.out_of_order += 1,
            _ => self.highest = Some(seq),
        }
    }

    pub fn lost(&self) -> u32 {
        self.sent - self.received
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = [0u8; 64];
        let n = build(&mut buf, BROADCAST, [2, 0, 0, 0, 0, 1], 77).unwrap();
        assert_eq!(parse(&buf[..n]), Some(77));
        assert_eq!(parse(&buf[..20]), None);
        assert_eq!(parse(&[]), None);
        buf[13] = 0;
        assert_eq!(parse(&buf), None);
        assert_eq!(build(&mut [0u8; 10], BROADCAST, BROADCAST, 1), None);
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("5:54:00:12:34:56"), None);
        assert_eq!(parse_mac("zz:54:00:12:34:56"), None);
        assert_eq!(parse_mac(""), None);
    }

    #[test]
    fn tracking() {
        let mut t = Tracker::new(5);
        for seq in [0, 2, 1, 2, 9, 4] {
            t.record(seq);
        }
        assert_eq!(
            (
                t.received,
                t.duplicated,
                t.out_of_order,
                t.unknown,
                t.lost()
            ),
            (4, 1, 1, 1, 1)
        );
        let mut big = Tracker::new(u32::MAX);
        big.record(u32::MAX - 1);
        assert_eq!(big.unknown, 1);
        assert_eq!(big.lost(), MAX_FRAMES as u32);
    }
}
