//! Partition-key routing: Jenkins lookup3 `hashlittle2` folded to 16 bits, as the service does.

#[inline]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline]
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// Reads up to four bytes little-endian (missing bytes count as zero).
fn word(bytes: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w[..bytes.len()].copy_from_slice(bytes);
    u32::from_le_bytes(w)
}

/// Jenkins lookup3 `hashlittle2` over `key` with the given seeds; returns `(primary, secondary)`.
pub fn hashlittle2(key: &[u8], seed_primary: u32, seed_secondary: u32) -> (u32, u32) {
    let init = 0xdead_beefu32
        .wrapping_add(key.len() as u32)
        .wrapping_add(seed_primary);
    let (mut a, mut b, mut c) = (init, init, init.wrapping_add(seed_secondary));
    let mut rest = key;
    while rest.len() > 12 {
        a = a.wrapping_add(word(&rest[0..4]));
        b = b.wrapping_add(word(&rest[4..8]));
        c = c.wrapping_add(word(&rest[8..12]));
        mix(&mut a, &mut b, &mut c);
        rest = &rest[12..];
    }
    if rest.is_empty() {
        return (c, b);
    }
    a = a.wrapping_add(word(&rest[..rest.len().min(4)]));
    if rest.len() > 4 {
        b = b.wrapping_add(word(&rest[4..rest.len().min(8)]));
    }
    if rest.len() > 8 {
        c = c.wrapping_add(word(&rest[8..]));
    }
    final_mix(&mut a, &mut b, &mut c);
    (c, b)
}

/// The service's 16-bit folded hash of a partition key: `(h1 ^ h2) as i16`.
pub fn folded_hash(key: &str) -> i16 {
    let (h1, h2) = hashlittle2(key.as_bytes(), 0, 0);
    (h1 ^ h2) as i16
}

/// The partition the service assigns to `key` among `partition_count` partitions.
pub fn partition_for_key(key: &str, partition_count: u32) -> u32 {
    if partition_count == 0 {
        return 0;
    }
    let v = i64::from(folded_hash(key));
    (v % i64::from(partition_count)).unsigned_abs() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_folded_hashes() {
        assert_eq!(folded_hash("7"), -15263);
        assert_eq!(folded_hash("FWfAT"), -22341);
    }

    #[test]
    fn partition_is_abs_of_remainder() {
        assert_eq!(partition_for_key("7", 4), (15263 % 4) as u32);
        assert_eq!(partition_for_key("FWfAT", 32), (22341 % 32) as u32);
        assert_eq!(partition_for_key("anything", 1), 0);
    }

    #[test]
    fn long_keys_hash_without_panicking() {
        let key = "k".repeat(100);
        let _ = folded_hash(&key);
        let _ = folded_hash("");
        let _ = folded_hash("twelve bytes");
        let _ = folded_hash("thirteen byte");
    }
}
