//! The request head parser on arbitrary bytes: never panics; a head reused across requests
//! (as a connection reuses it) parses exactly like a fresh one; every span lies inside the
//! head; a complete head split anywhere is only ever "partial" before its last byte (a
//! request cut across TCP reads is never refused).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shards::http::{ParseOutcome, RequestHead};

const WARM: &[u8] = b"POST /v1/completions HTTP/1.1\r\nContent-Length: 5\r\nX-Request-Id: r1\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n";

fn same(a: &RequestHead, b: &RequestHead) {
    assert_eq!(a.method, b.method);
    assert_eq!(a.method_span, b.method_span);
    assert_eq!(a.path, b.path);
    assert_eq!(a.minor_version, b.minor_version);
    assert_eq!(a.len, b.len);
    assert_eq!(a.framing, b.framing);
    assert_eq!(a.keep_alive, b.keep_alive);
    assert_eq!(a.expect_continue, b.expect_continue);
    assert_eq!(a.request_id, b.request_id);
    let spans = |h: &RequestHead| {
        h.headers
            .iter()
            .map(|s| (s.name, s.value))
            .collect::<Vec<_>>()
    };
    assert_eq!(spans(a), spans(b));
}

fn check_spans(h: &RequestHead, data: &[u8], max_head: usize) {
    assert!(h.len <= data.len() && h.len <= max_head);
    assert!(h.method_span.end <= h.len && h.path.end <= h.len);
    assert_eq!(data[h.path.clone()].first(), Some(&b'/'));
    for s in &h.headers {
        assert!(s.name.0 <= s.name.1 && s.name.1 as usize <= h.len);
        assert!(s.value.0 <= s.value.1 && s.value.1 as usize <= h.len);
    }
    if let Some(id) = &h.request_id {
        assert!(!id.is_empty() && id.end <= h.len);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut reused = RequestHead::default();
    let _ = reused.parse(WARM, 8192);
    for max_head in [8192, 96] {
        let mut fresh = RequestHead::default();
        let a = fresh.parse(data, max_head);
        let b = reused.parse(data, max_head);
        match (&a, &b) {
            (Ok(ParseOutcome::Complete), Ok(ParseOutcome::Complete)) => {
                same(&fresh, &reused);
                check_spans(&fresh, data, max_head);
                let head = &data[..fresh.len];
                let mut alone = RequestHead::default();
                assert!(matches!(
                    alone.parse(head, max_head),
                    Ok(ParseOutcome::Complete)
                ));
                same(&fresh, &alone);
                for cut in [1, head.len() / 3, head.len() / 2, head.len() - 1] {
                    if cut == 0 || cut >= head.len() {
                        continue;
                    }
                    let mut part = RequestHead::default();
                    let r = part.parse(&head[..cut], max_head);
                    assert!(
                        matches!(r, Ok(ParseOutcome::Partial)),
                        "a complete head cut at {cut} gave {r:?}"
                    );
                }
            }
            (Ok(ParseOutcome::Partial), Ok(ParseOutcome::Partial)) => {
                assert!(data.len() < max_head)
            }
            (Err(x), Err(y)) => {
                assert_eq!(x, y);
                assert!(matches!(x.status, 400 | 417 | 431 | 501), "{x:?}");
            }
            _ => panic!("a reused head parsed differently: {a:?} vs {b:?}"),
        }
    }
});
