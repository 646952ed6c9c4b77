//! COCO's run-length encoding: the compressed string form pycocotools
//! writes ([`rle_to_string`], [`rle_from_string`]) and the resize of a
//! column-major mask by the nearest pixel-centre rule without decoding it
//! ([`resize_rle`]).

use super::super::mask::nearest_indices;

/// COCO's compressed RLE string (pycocotools `rleToString`): each count,
/// from the fourth on as the difference to the count two before, written as
/// a signed little-endian base-32 number, 5 bits a character (bit 5 set
/// while more follow, bit 4 of the last the sign), offset by 48 (`'0'`).
pub fn rle_to_string(counts: &[u64]) -> String {
    let mut s = String::new();
    for (i, &count) in counts.iter().enumerate() {
        // Counts are pixel counts of one image: far below 2^63.
        let mut x = count as i64;
        if i > 2 {
            x -= counts[i - 2] as i64;
        }
        loop {
            let mut c = (x & 0x1f) as u8;
            x >>= 5;
            let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                c |= 0x20;
            }
            s.push(char::from(c + 48));
            if !more {
                break;
            }
        }
    }
    s
}

/// Decodes a compressed RLE string ([`rle_to_string`]'s inverse,
/// pycocotools `rleFrString`). Fails on a character outside `'0'..='o'`, a
/// number cut off at the end, one over 60 bits, or a negative count.
pub fn rle_from_string(s: &str) -> Result<Vec<u64>, String> {
    /// 12 characters carry 60 bits, far beyond any image's pixel count.
    const MAX_CHARS: u32 = 12;
    let bytes = s.as_bytes();
    let mut counts: Vec<u64> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let mut x: i64 = 0;
        let mut k: u32 = 0;
        loop {
            let Some(&b) = bytes.get(p) else {
                return Err("RLE counts string ends in the middle of a number".into());
            };
            if !(48..48 + 64).contains(&b) {
                return Err(format!(
                    "RLE counts string has {:?} at byte {p}, outside '0'..='o'",
                    char::from(b)
                ));
            }
            if k == MAX_CHARS {
                return Err(format!("RLE count {} is too long", counts.len()));
            }
            let c = i64::from(b - 48);
            x |= (c & 0x1f) << (5 * k);
            p += 1;
            k += 1;
            if c & 0x20 == 0 {
                if c & 0x10 != 0 {
                    x |= -1i64 << (5 * k);
                }
                break;
            }
        }
        let n = counts.len();
        if n > 2 {
            x = x
                .checked_add(counts[n - 2] as i64)
                .ok_or_else(|| format!("RLE count {n} overflows"))?;
        }
        let count = u64::try_from(x).map_err(|_| format!("RLE count {n} is negative ({x})"))?;
        counts.push(count);
    }
    Ok(counts)
}

/// Resizes a column-major RLE mask of `from = (width, height)` to `to` by the
/// nearest pixel-centre rule, without decoding the source: returns the new
/// counts (starting with 0s) and the number of 1 pixels.
pub(super) fn resize_rle(counts: &[u64], from: (u32, u32), to: (u32, u32)) -> (Vec<u64>, u64) {
    let xs = nearest_indices(from.0, to.0);
    let ys = nearest_indices(from.1, to.1);
    let mut ends = Vec::with_capacity(counts.len());
    let mut acc = 0u64;
    for &c in counts {
        acc += c;
        ends.push(acc);
    }
    let from_h = u64::from(from.1);
    let mut out = Vec::new();
    let mut value = 0u8;
    let mut run = 0u64;
    let mut area = 0u64;
    for &x in &xs {
        let column = x as u64 * from_h;
        // Run k covers [ends[k-1], ends[k]); runs alternate 0, 1, 0, …
        let mut k = ends.partition_point(|&e| e <= column);
        for &y in &ys {
            let p = column + y as u64;
            while k < ends.len() && ends[k] <= p {
                k += 1;
            }
            let v = (k % 2) as u8;
            if v == value {
                run += 1;
            } else {
                out.push(run);
                value = v;
                run = 1;
            }
            area += u64::from(v);
        }
    }
    out.push(run);
    (out, area)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Column-major RLE counts of a row-major 0/1 mask, as pycocotools encodes.
    pub(crate) fn encode(rows: &[&[u8]]) -> Vec<u64> {
        let (h, w) = (rows.len(), rows[0].len());
        let mut counts = Vec::new();
        let (mut value, mut run) = (0u8, 0u64);
        for x in 0..w {
            for row in rows.iter().take(h) {
                if row[x] == value {
                    run += 1;
                } else {
                    counts.push(run);
                    value = row[x];
                    run = 1;
                }
            }
        }
        counts.push(run);
        counts
    }

    /// Decodes column-major counts to row-major rows.
    pub(crate) fn decode(counts: &[u64], h: usize, w: usize) -> Vec<Vec<u8>> {
        let mut flat = Vec::new();
        for (k, &c) in counts.iter().enumerate() {
            flat.extend(std::iter::repeat_n((k % 2) as u8, c as usize));
        }
        assert_eq!(flat.len(), h * w);
        (0..h)
            .map(|y| (0..w).map(|x| flat[x * h + y]).collect())
            .collect()
    }

    pub(crate) const M1: [&[u8]; 4] = [
        &[0, 1, 1, 0, 0],
        &[0, 1, 1, 1, 0],
        &[1, 1, 0, 0, 0],
        &[0, 0, 0, 0, 1],
    ];

    pub(crate) fn m2() -> Vec<Vec<u8>> {
        // numpy: m[5:50, 3:40] = 1; m[10:12, 50:69] = 1; m[0:60, 45] = 1
        let mut m = vec![vec![0u8; 70]; 60];
        for (y, row) in m.iter_mut().enumerate() {
            for (x, v) in row.iter_mut().enumerate() {
                if ((5..50).contains(&y) && (3..40).contains(&x))
                    || ((10..12).contains(&y) && (50..69).contains(&x))
                    || x == 45
                {
                    *v = 1;
                }
            }
        }
        m
    }

    pub(crate) const M2_STRING: &str = "i5]1?00000000000000000000000000000000000000000000000000000000000000000000000W9?TNVNPJ00000000000000000000000000000000000b1";

    #[test]
    fn compressed_rle_matches_pycocotools() {
        // Strings from pycocotools 2.0 `mask.encode` / `frPyObjects`.
        assert_eq!(rle_to_string(&encode(&M1)), "21120O2O20");
        assert_eq!(rle_from_string("21120O2O20").unwrap(), encode(&M1));
        let list = [0, 5, 3, 100, 2, 2000, 7, 1, 40000];
        assert_eq!(rle_to_string(&list), "053o2O\\k15aQNiQW1");
        assert_eq!(rle_from_string("053o2O\\k15aQNiQW1").unwrap(), list);
        assert_eq!(rle_to_string(&[3, 1, 1, 2]), "3111");
        let rows = m2();
        let rows: Vec<&[u8]> = rows.iter().map(Vec::as_slice).collect();
        let counts = encode(&rows);
        assert_eq!(rle_to_string(&counts), M2_STRING);
        assert_eq!(rle_from_string(M2_STRING).unwrap(), counts);
        // A mask starting with a 1 begins with a zero count.
        assert_eq!(
            rle_to_string(&encode(&[&[1, 1, 1], &[1, 0, 1], &[1, 1, 1]])),
            "0410"
        );
        // Big and negative deltas survive a round trip.
        let wild = [1 << 40, 0, 7, 1 << 33, 1, 0, 123_456_789, 2, 1];
        assert_eq!(rle_from_string(&rle_to_string(&wild)).unwrap(), wild);
        assert_eq!(rle_from_string("").unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn malformed_rle_strings_are_errors() {
        assert!(rle_from_string("2 1").unwrap_err().contains("outside"));
        assert!(rle_from_string("2é").is_err());
        // '`' = 48 + 0x30: "more follows", then the string ends.
        assert!(rle_from_string("1`").unwrap_err().contains("middle"));
        assert!(rle_from_string("oooooooooooooooooooo1")
            .unwrap_err()
            .contains("too long"));
        // A negative first count ('O' = 48 + 0x1f: -1).
        assert!(rle_from_string("O").unwrap_err().contains("negative"));
    }
}
