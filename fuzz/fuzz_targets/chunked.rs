//! The chunked decoder fed the same bytes whole and cut at arbitrary points: the same
//! payload, the same number of bytes consumed, the same end, the same error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shards::http::{ChunkedDecoder, ChunkedError};

#[derive(Debug, PartialEq)]
struct Outcome {
    result: Result<usize, ChunkedError>,
    done: bool,
    payload: Vec<u8>,
}

fn whole(wire: &[u8], keep: bool) -> Outcome {
    let mut d = ChunkedDecoder::new();
    let mut payload = Vec::new();
    let result = d.feed(wire, keep.then_some(&mut payload));
    Outcome {
        result,
        done: d.is_done(),
        payload,
    }
}

fn in_pieces(wire: &[u8], cuts: &[usize]) -> Outcome {
    let mut d = ChunkedDecoder::new();
    let mut payload = Vec::new();
    let mut consumed = 0;
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&wire.len())) {
        if to < from {
            continue;
        }
        let piece = &wire[from..to];
        match d.feed(piece, Some(&mut payload)) {
            Err(e) => {
                return Outcome {
                    result: Err(e),
                    done: d.is_done(),
                    payload,
                }
            }
            Ok(n) => {
                assert!(n <= piece.len());
                consumed += n;
                if n < piece.len() {
                    assert!(d.is_done(), "stopped early without the end of the body");
                    break;
                }
            }
        }
        from = to;
    }
    Outcome {
        result: Ok(consumed),
        done: d.is_done(),
        payload,
    }
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many cut points follow (up to 8), each a byte scaled to the wire.
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = (k as usize % 9).min(rest.len());
    let (cut_bytes, wire) = rest.split_at(k);
    let mut cuts: Vec<usize> = cut_bytes
        .iter()
        .map(|&c| c as usize * (wire.len() + 1) / 256)
        .collect();
    cuts.sort_unstable();

    let all = whole(wire, true);
    if let Ok(n) = all.result {
        assert!(n <= wire.len());
        assert!(all.done || n == wire.len());
        assert!(all.payload.len() <= n);
    }
    let cut = in_pieces(wire, &cuts);
    match (&all.result, &cut.result) {
        (Ok(_), Ok(_)) => assert_eq!(all, cut),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("whole {all:?} vs cut at {cuts:?}: {cut:?}"),
    }
    // One byte at a time, the worst split a socket can produce.
    let bytewise: Vec<usize> = (1..wire.len()).collect();
    let one = in_pieces(wire, &bytewise);
    match (&all.result, &one.result) {
        (Ok(_), Ok(_)) => assert_eq!(all, one),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("whole {all:?} vs byte by byte: {one:?}"),
    }
    // Scanning without keeping the payload (the response relay) ends at the same place.
    let scan = whole(wire, false);
    assert_eq!(scan.result, all.result);
    assert_eq!(scan.done, all.done);
});
