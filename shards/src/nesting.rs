//! How deep JSON text nests, found fast enough to run before every parse.
//!
//! sonic-rs validates values it skips by recursion with no depth limit, so a body of a few
//! hundred kilobytes of `[` would overflow a shard's stack and abort the process. The
//! check runs over every request body, so it is built for speed: a body with fewer opening
//! brackets in all than the limit (nearly all of them) is cleared by a vectorised count;
//! the others get a scan 64 bytes at a time with bit masks (strings found by a prefix XOR
//! of the unescaped quotes), the technique of simdjson's first stage.
//!
//! Depth counts `[` and `{` outside strings, minus `]` and `}`. A backslash escapes the
//! next byte wherever it is (outside a string it makes the text invalid, and the parser
//! stops there anyway). For valid JSON this is the nesting depth; for invalid JSON it is
//! exact up to the first error, which is as far as any parser recurses.

/// Whether `json` nests deeper than `limit`.
pub fn exceeds(json: &[u8], limit: usize) -> bool {
    if count_opening_brackets(json) <= limit {
        return false;
    }
    let mut scan = Scan {
        depth: 0,
        limit: limit as i64,
        escape_carry: false,
        in_string: 0,
    };
    let mut blocks = json.chunks_exact(64);
    for block in &mut blocks {
        if scan.block(block.try_into().unwrap()) {
            return true;
        }
    }
    // The rest, padded with zero bytes, which mean nothing here.
    let rest = blocks.remainder();
    let mut last = [0u8; 64];
    last[..rest.len()].copy_from_slice(rest);
    scan.block(&last)
}

struct Scan {
    depth: i64,
    limit: i64,
    /// The previous block ended with a backslash that escapes this block's first byte.
    escape_carry: bool,
    /// All ones when the previous block ended inside a string.
    in_string: u64,
}

impl Scan {
    /// Takes one block into the depth; true as soon as the depth passes the limit.
    #[inline(always)]
    fn block(&mut self, block: &[u8; 64]) -> bool {
        let m = Masks::of(block);
        let escaped = if m.backslash == 0 && !self.escape_carry {
            0
        } else {
            escaped(m.backslash, &mut self.escape_carry)
        };
        let quotes = m.quote & !escaped;
        // 1 from an opening quote up to (not including) its closing quote.
        let inside = prefix_xor(quotes) ^ self.in_string;
        self.in_string = ((inside as i64) >> 63) as u64;
        let opens = m.open & !inside & !escaped;
        let closes = m.close & !inside & !escaped;
        let n_open = opens.count_ones() as i64;
        if self.depth + n_open <= self.limit {
            self.depth += n_open - closes.count_ones() as i64;
            return false;
        }
        // Close to the limit: take the brackets in order.
        let mut all = opens | closes;
        while all != 0 {
            let bit = all & all.wrapping_neg();
            if opens & bit != 0 {
                self.depth += 1;
                if self.depth > self.limit {
                    return true;
                }
            } else {
                self.depth -= 1;
            }
            all ^= bit;
        }
        false
    }
}

/// Bytes escaped by a backslash: each backslash not itself escaped escapes the next byte
/// (in the next block when it is the last byte). Backslashes are rare; one step each.
#[inline(always)]
fn escaped(mut backslash: u64, carry: &mut bool) -> u64 {
    let mut escaped = 0u64;
    if *carry {
        escaped = 1;
        backslash &= !1;
    }
    *carry = false;
    while backslash != 0 {
        let i = backslash.trailing_zeros();
        if i == 63 {
            *carry = true;
            break;
        }
        escaped |= 1 << (i + 1);
        // This backslash and the byte it escapes (a backslash there escapes nothing).
        backslash &= !(3u64 << i);
    }
    escaped
}

/// Bit i is the XOR of bits 0..=i.
#[inline(always)]
fn prefix_xor(mut x: u64) -> u64 {
    x ^= x << 1;
    x ^= x << 2;
    x ^= x << 4;
    x ^= x << 8;
    x ^= x << 16;
    x ^= x << 32;
    x
}

/// Bit i set where byte i of a block is the character.
struct Masks {
    quote: u64,
    backslash: u64,
    /// `[` or `{` (they differ only in bit 0x20).
    open: u64,
    /// `]` or `}`.
    close: u64,
}

impl Masks {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    #[inline(always)]
    fn of(block: &[u8; 64]) -> Masks {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 is enabled at compile time (cfg above); both loads read 32 bytes
        // inside the 64-byte block, unaligned loads.
        unsafe {
            let lo = _mm256_loadu_si256(block.as_ptr() as *const __m256i);
            let hi = _mm256_loadu_si256(block.as_ptr().add(32) as *const __m256i);
            let bit = _mm256_set1_epi8(0x20);
            let (lo_folded, hi_folded) = (_mm256_or_si256(lo, bit), _mm256_or_si256(hi, bit));
            let mask = |lo: __m256i, hi: __m256i, c: u8| {
                let c = _mm256_set1_epi8(c as i8);
                let l = _mm256_movemask_epi8(_mm256_cmpeq_epi8(lo, c)) as u32 as u64;
                let h = _mm256_movemask_epi8(_mm256_cmpeq_epi8(hi, c)) as u32 as u64;
                l | h << 32
            };
            Masks {
                quote: mask(lo, hi, b'"'),
                backslash: mask(lo, hi, b'\\'),
                open: mask(lo_folded, hi_folded, b'{'),
                close: mask(lo_folded, hi_folded, b'}'),
            }
        }
    }

    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    #[inline(always)]
    fn of(block: &[u8; 64]) -> Masks {
        Masks::portable(block)
    }

    #[cfg(any(test, not(all(target_arch = "x86_64", target_feature = "avx2"))))]
    #[inline(always)]
    fn portable(block: &[u8; 64]) -> Masks {
        let mut m = Masks {
            quote: 0,
            backslash: 0,
            open: 0,
            close: 0,
        };
        for (i, &c) in block.iter().enumerate() {
            let bit = 1u64 << i;
            match c | 0x20 {
                b'{' => m.open |= bit,
                b'}' => m.close |= bit,
                _ => {}
            }
            match c {
                b'"' => m.quote |= bit,
                b'\\' => m.backslash |= bit,
                _ => {}
            }
        }
        m
    }
}

/// `[` and `{` bytes anywhere, strings included.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
fn count_opening_brackets(b: &[u8]) -> usize {
    use std::arch::x86_64::*;
    let whole = b.len() - b.len() % 32;
    let mut total = 0usize;
    let mut i = 0;
    // SAFETY: AVX2 is enabled at compile time; every load reads b[i..i + 32] with
    // i + 32 <= whole <= b.len().
    unsafe {
        let bit = _mm256_set1_epi8(0x20);
        let brace = _mm256_set1_epi8(b'{' as i8);
        while i < whole {
            // Byte counters, summed before they can wrap (255 rounds).
            let mut counts = _mm256_setzero_si256();
            let end = (i + 255 * 32).min(whole);
            while i < end {
                let v = _mm256_loadu_si256(b.as_ptr().add(i) as *const __m256i);
                let hit = _mm256_cmpeq_epi8(_mm256_or_si256(v, bit), brace);
                counts = _mm256_sub_epi8(counts, hit);
                i += 32;
            }
            let sums = _mm256_sad_epu8(counts, _mm256_setzero_si256());
            let mut lanes = [0u64; 4];
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, sums);
            total += lanes.iter().sum::<u64>() as usize;
        }
    }
    total + b[whole..].iter().filter(|&&c| (c | 0x20) == b'{').count()
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
fn count_opening_brackets(b: &[u8]) -> usize {
    count_opening_brackets_portable(b)
}

#[cfg(any(test, not(all(target_arch = "x86_64", target_feature = "avx2"))))]
fn count_opening_brackets_portable(b: &[u8]) -> usize {
    b.iter().filter(|&&c| (c | 0x20) == b'{').count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one byte at a time.
    fn reference(json: &[u8], limit: usize) -> bool {
        let (mut depth, mut in_string, mut escape) = (0i64, false, false);
        for &c in json {
            if escape {
                escape = false;
            } else if c == b'\\' {
                escape = true;
            } else if in_string {
                in_string = c != b'"';
            } else {
                match c {
                    b'"' => in_string = true,
                    b'[' | b'{' => {
                        depth += 1;
                        if depth > limit as i64 {
                            return true;
                        }
                    }
                    b']' | b'}' => depth -= 1,
                    _ => {}
                }
            }
        }
        false
    }

    #[test]
    fn depth_of_json() {
        assert!(!exceeds(br#"{"a":[1,{"b":[]}]}"#, 4));
        assert!(exceeds(br#"{"a":[1,{"b":[]}]}"#, 3));
        assert!(!exceeds(b"", 0));
        assert!(!exceeds(b"[]", 1));
        assert!(exceeds(b"[]", 0));
        // Siblings do not add up.
        let wide = format!("[{}1]", "{},[],".repeat(1000));
        assert!(!exceeds(wide.as_bytes(), 2));
        assert!(exceeds(wide.as_bytes(), 1));
        assert_eq!(count_opening_brackets(wide.as_bytes()), 2001);
    }

    #[test]
    fn brackets_in_strings_do_not_count() {
        let text = format!(r#"["{}\"{}\\", "]]]]"]"#, "[{".repeat(300), "[".repeat(300));
        assert!(!exceeds(text.as_bytes(), 1));
        // A string running across many blocks, its quote escaped at a block's last byte.
        for pad in 0..70 {
            let s = format!(r#"["{}\"{}", [[1]]]"#, "x".repeat(pad), "[".repeat(200));
            assert!(!exceeds(s.as_bytes(), 3), "pad {pad}");
            assert!(exceeds(s.as_bytes(), 2), "pad {pad}");
        }
    }

    #[test]
    fn deep_is_deep() {
        for depth in [1, 63, 64, 65, 129, 100_000] {
            let s = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            assert!(!exceeds(s.as_bytes(), depth));
            assert!(exceeds(s.as_bytes(), depth - 1));
        }
    }

    #[test]
    fn vector_and_portable_masks_agree() {
        // Every byte value in every lane, and the counts over odd lengths.
        let bytes: Vec<u8> = (0..=255u8).cycle().take(255 * 32 * 2 + 77).collect();
        for (i, block) in bytes.windows(64).enumerate().step_by(7) {
            let block: &[u8; 64] = block.try_into().unwrap();
            let (v, p) = (Masks::of(block), Masks::portable(block));
            assert_eq!(
                (v.quote, v.backslash, v.open, v.close),
                (p.quote, p.backslash, p.open, p.close),
                "block at {i}"
            );
        }
        for len in [
            0,
            1,
            31,
            32,
            33,
            255 * 32 - 1,
            255 * 32,
            255 * 32 + 1,
            bytes.len(),
        ] {
            let b = &bytes[..len];
            assert_eq!(
                count_opening_brackets(b),
                count_opening_brackets_portable(b),
                "len {len}"
            );
        }
        let braces = vec![b'{'; 255 * 32 * 2 + 5];
        assert_eq!(count_opening_brackets(&braces), braces.len());
    }

    #[test]
    fn agrees_with_the_definition_on_random_text() {
        const ALPHABET: &[u8] = b"[[]]{{}}\"\"\\\\ax ";
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..400);
            let text: Vec<u8> = (0..len)
                .map(|_| ALPHABET[rng.usize(..ALPHABET.len())])
                .collect();
            let limit = rng.usize(0..8);
            assert_eq!(
                exceeds(&text, limit),
                reference(&text, limit),
                "limit {limit}: {}",
                String::from_utf8_lossy(&text)
            );
        }
    }
}
