//! Property tests over dataset file headers and contents (IDX and CIFAR): any bytes give a
//! dataset or an error naming the file, never a panic, and a dataset that parses is consistent.

use proptest::prelude::*;
use umae_runtime::data::{parse_cifar, parse_idx, InMemory};

fn be(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

/// An IDX image/label file pair with the given header fields and `extra` bytes of data past
/// what the header promises (negative: truncated).
fn idx(n: u32, h: u32, w: u32, labels: u32, extra: i64, magic_ok: bool) -> (Vec<u8>, Vec<u8>) {
    let mut img = Vec::new();
    img.extend(be(if magic_ok { 0x0803 } else { 0x0804 }));
    img.extend(be(n));
    img.extend(be(h));
    img.extend(be(w));
    // Only materialise data for small headers; huge ones stay tiny files.
    let body = (n as u64) * (h as u64) * (w as u64);
    let len = if body <= 1 << 16 {
        body as i64 + extra
    } else {
        extra.abs()
    };
    img.extend(std::iter::repeat_n(7u8, len.max(0) as usize));
    let mut lab = Vec::new();
    lab.extend(be(0x0801));
    lab.extend(be(labels));
    lab.extend(std::iter::repeat_n(3u8, labels.min(1 << 16) as usize));
    (img, lab)
}

fn consistent(m: &InMemory) {
    assert_eq!(
        m.pixels.len(),
        m.labels.len() * m.channels * m.height * m.width
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn idx_headers_never_panic(
        n in prop_oneof![0u32..40, any::<u32>()],
        h in prop_oneof![0u32..40, any::<u32>()],
        w in prop_oneof![0u32..40, any::<u32>()],
        label_delta in -2i64..3,
        extra in -3i64..4,
        magic_ok in prop::bool::weighted(0.9),
    ) {
        let labels = (n as i64 + label_delta).clamp(0, u32::MAX as i64) as u32;
        let (img, lab) = idx(n, h, w, labels, extra, magic_ok);
        match parse_idx(&img, &lab, "fuzz-images") {
            Ok(m) => {
                consistent(&m);
                let body = n as u64 * h as u64 * w as u64;
                prop_assert!(magic_ok && labels == n && h > 0 && w > 0);
                prop_assert_eq!(img.len() as u64, 16 + body);
            }
            Err(e) => prop_assert!(e.starts_with("fuzz-images:"), "{}", e),
        }
    }

    #[test]
    fn arbitrary_idx_bytes_never_panic(
        img in proptest::collection::vec(any::<u8>(), 0..64),
        lab in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        if let Ok(m) = parse_idx(&img, &lab, "fuzz") {
            consistent(&m);
        }
    }

    #[test]
    fn cifar_records_never_panic(
        records in 0usize..4,
        extra in -5i64..5,
        label_bytes in 1usize..3,
    ) {
        let rec = label_bytes + 3072;
        let len = (records * rec) as i64 + extra;
        let bytes = vec![5u8; len.max(0) as usize];
        let mut into = InMemory { channels: 3, height: 32, width: 32, pixels: Vec::new(), labels: Vec::new() };
        match parse_cifar(&bytes, label_bytes, "fuzz.bin", &mut into) {
            Ok(()) => {
                consistent(&into);
                prop_assert_eq!(into.labels.len(), records);
                prop_assert!(records > 0 && extra == 0);
            }
            Err(e) => prop_assert!(e.starts_with("fuzz.bin:"), "{}", e),
        }
    }
}
