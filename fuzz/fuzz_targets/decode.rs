//! The pgoutput decoder on arbitrary bytes (seeded with real messages
//! captured from PostgreSQL). Properties:
//! - never panics (any panic, overflow included, is a crash);
//! - never allocates from a length field: the peak of live allocations while
//!   decoding is bounded by a constant plus a small multiple of the input;
//! - a decoded message is consistent: every tuple yields exactly its column
//!   count of values, borrowed from the input; errors render as text;
//! - decoding is faithful: re-encoding what was decoded and decoding that
//!   again gives the same message, with the same length on the wire.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walcast::decode::{Message, Tuple, Value, decode};

mod alloc_guard;
use walcast::decode::encode;

#[global_allocator]
static ALLOC: alloc_guard::Counting = alloc_guard::Counting;

/// A Relation may reserve its (capped) column vector up front: 1,664 columns.
const FIXED_ALLOWANCE: usize = 96 * 1024;

fuzz_target!(|data: &[u8]| {
    let guard = alloc_guard::Guard::start();
    let result = decode(data);
    let peak = guard.peak();
    assert!(
        peak <= FIXED_ALLOWANCE + 4 * data.len(),
        "decoding {} bytes allocated {peak} bytes at its peak: {result:?}",
        data.len()
    );
    match result {
        Err(e) => {
            // Every error names the protocol and says what was wrong.
            let text = e.to_string();
            assert!(text.contains("pgoutput") && text.len() > 20, "{text}");
        }
        Ok(msg) => {
            check(&msg, data);
            let again = encode::message(&msg);
            assert_eq!(again.len(), data.len(), "re-encoded length of {msg:?}");
            let redecoded = decode(&again).expect("a re-encoded message decodes");
            assert_eq!(redecoded, msg);
        }
    }
});

fn check(msg: &Message<'_>, data: &[u8]) {
    let range = data.as_ptr_range();
    let tuple = |t: &Tuple<'_>| {
        assert_eq!(t.iter().count(), t.len(), "tuple yields its column count");
        for v in t.iter() {
            if let Value::Text(b) | Value::Binary(b) = v {
                assert!(
                    b.is_empty() || range.contains(&b.as_ptr()),
                    "value borrowed from the input"
                );
                assert!(b.len() <= data.len());
            }
        }
    };
    match msg {
        Message::Insert(i) => tuple(&i.new),
        Message::Update(u) => {
            if let Some(old) = &u.old {
                tuple(old);
            }
            tuple(&u.new);
        }
        Message::Delete(d) => tuple(&d.old),
        Message::Truncate(t) => assert_eq!(6 + 4 * t.relations().count(), data.len()),
        Message::Relation(r) => assert!(r.columns.len() <= 1664),
        _ => {}
    }
}
