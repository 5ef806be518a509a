//! Byte fixtures (laid out by hand from the protocol documentation) and
//! property tests: round trips through the encoder, and arbitrary bytes.

use super::*;
use proptest::prelude::*;

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

#[test]
fn begin_fixture() {
    let mut b = vec![b'B'];
    b.extend_from_slice(&0x0000_0001_0000_0A00u64.to_be_bytes());
    b.extend_from_slice(&786_000_000_000_000i64.to_be_bytes());
    b.extend_from_slice(&be32(742));
    let Message::Begin(begin) = decode(&b).unwrap() else {
        panic!("not a Begin")
    };
    assert_eq!(
        begin,
        Begin {
            final_lsn: 0x1_0000_0A00,
            commit_time: 786_000_000_000_000,
            xid: 742
        }
    );
}

#[test]
fn commit_fixture() {
    let mut b = vec![b'C', 0];
    b.extend_from_slice(&10u64.to_be_bytes());
    b.extend_from_slice(&20u64.to_be_bytes());
    b.extend_from_slice(&30i64.to_be_bytes());
    assert_eq!(
        decode(&b).unwrap(),
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: 10,
            end_lsn: 20,
            commit_time: 30
        })
    );
}

#[test]
fn relation_fixture() {
    let mut b = vec![b'R'];
    b.extend_from_slice(&be32(16384));
    b.extend_from_slice(b"public\0tasks\0f");
    b.extend_from_slice(&2i16.to_be_bytes());
    b.push(1);
    b.extend_from_slice(b"id\0");
    b.extend_from_slice(&be32(2950)); // uuid
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.push(0);
    b.extend_from_slice(b"title\0");
    b.extend_from_slice(&be32(25)); // text
    b.extend_from_slice(&(-1i32).to_be_bytes());
    let Message::Relation(rel) = decode(&b).unwrap() else {
        panic!("not a Relation")
    };
    assert_eq!(rel.oid, 16384);
    assert_eq!(
        (rel.namespace.as_str(), rel.name.as_str()),
        ("public", "tasks")
    );
    assert_eq!(rel.replica_identity, ReplicaIdentity::Full);
    assert_eq!(rel.columns.len(), 2);
    assert!(rel.columns[0].is_key && !rel.columns[1].is_key);
    assert_eq!(rel.columns[1].name, "title");
    assert_eq!(rel.column_index("title"), Some(1));
}

#[test]
fn insert_with_null_toast_and_text() {
    let mut b = vec![b'I'];
    b.extend_from_slice(&be32(16384));
    b.push(b'N');
    b.extend_from_slice(&3i16.to_be_bytes());
    b.push(b'n');
    b.push(b'u');
    b.push(b't');
    b.extend_from_slice(&be32(5));
    b.extend_from_slice("héllo".as_bytes()[..5].as_ref());
    // "héllo" is 6 bytes; the fixture takes 5 to stay a valid length test.
    let Message::Insert(ins) = decode(&b).unwrap() else {
        panic!("not an Insert")
    };
    let values: Vec<_> = ins.new.iter().collect();
    assert_eq!(
        values,
        vec![
            Value::Null,
            Value::UnchangedToast,
            Value::Text(&"héllo".as_bytes()[..5])
        ]
    );
}

#[test]
fn update_with_old_image_and_key_only() {
    let new = [Value::Text(b"1"), Value::Text(b"new")];
    let old = [Value::Text(b"1"), Value::Text(b"old")];
    let bytes = encode::update(7, Some(&old), &new);
    let Message::Update(u) = decode(&bytes).unwrap() else {
        panic!()
    };
    assert_eq!(u.relation, 7);
    assert!(!u.key_only);
    assert_eq!(u.old.unwrap().get(1), Some(Value::Text(b"old")));
    assert_eq!(u.new.get(1), Some(Value::Text(b"new")));

    let bytes = encode::update(7, None, &new);
    let Message::Update(u) = decode(&bytes).unwrap() else {
        panic!()
    };
    assert!(u.old.is_none());

    let mut b = vec![b'U'];
    b.extend_from_slice(&be32(7));
    b.push(b'K');
    encode::tuple(&mut b, &[Value::Text(b"1"), Value::Null]);
    b.push(b'N');
    encode::tuple(&mut b, &new);
    let Message::Update(u) = decode(&b).unwrap() else {
        panic!()
    };
    assert!(u.key_only);
}

#[test]
fn delete_truncate_message_origin_type() {
    let bytes = encode::delete(9, &[Value::Text(b"x")]);
    let Message::Delete(d) = decode(&bytes).unwrap() else {
        panic!()
    };
    assert_eq!((d.relation, d.key_only, d.old.len()), (9, false, 1));

    let mut b = vec![b'T'];
    b.extend_from_slice(&2i32.to_be_bytes());
    b.push(Truncate::RESTART_IDENTITY);
    b.extend_from_slice(&be32(1));
    b.extend_from_slice(&be32(2));
    let Message::Truncate(t) = decode(&b).unwrap() else {
        panic!()
    };
    assert_eq!(t.relations().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(t.options, Truncate::RESTART_IDENTITY);

    let mut b = vec![b'M', 1];
    b.extend_from_slice(&99u64.to_be_bytes());
    b.extend_from_slice(b"walcast.actor\0");
    b.extend_from_slice(&2i32.to_be_bytes());
    b.extend_from_slice(b"{}");
    assert_eq!(
        decode(&b).unwrap(),
        Message::Message(LogicalMessage {
            transactional: true,
            lsn: 99,
            prefix: "walcast.actor",
            content: b"{}"
        })
    );

    let mut b = vec![b'O'];
    b.extend_from_slice(&5u64.to_be_bytes());
    b.extend_from_slice(b"origin1\0");
    assert_eq!(
        decode(&b).unwrap(),
        Message::Origin(Origin {
            commit_lsn: 5,
            name: "origin1"
        })
    );

    let mut b = vec![b'Y'];
    b.extend_from_slice(&be32(700));
    b.extend_from_slice(b"public\0mood\0");
    assert_eq!(
        decode(&b).unwrap(),
        Message::Type(TypeInfo {
            oid: 700,
            namespace: "public",
            name: "mood"
        })
    );
}

#[test]
fn malformed_input_is_a_typed_error() {
    assert_eq!(decode(&[]), Err(DecodeError::Empty));
    assert_eq!(decode(b"Z"), Err(DecodeError::UnknownTag(b'Z')));
    assert!(matches!(
        decode(b"B\0\0"),
        Err(DecodeError::Truncated { .. })
    ));
    // A text value claiming 2 GiB must fail without allocating it.
    let mut b = vec![b'I'];
    b.extend_from_slice(&be32(1));
    b.push(b'N');
    b.extend_from_slice(&1i16.to_be_bytes());
    b.push(b't');
    b.extend_from_slice(&i32::MAX.to_be_bytes());
    assert!(matches!(decode(&b), Err(DecodeError::Truncated { .. })));
    // Negative lengths and counts.
    let mut b = vec![b'I'];
    b.extend_from_slice(&be32(1));
    b.push(b'N');
    b.extend_from_slice(&(-1i16).to_be_bytes());
    assert!(matches!(decode(&b), Err(DecodeError::BadLength { .. })));
    // Trailing garbage after a complete message.
    let mut b = encode::delete(9, &[Value::Null]);
    b.push(0);
    assert!(matches!(decode(&b), Err(DecodeError::TrailingBytes { .. })));
    // Bad markers.
    let mut b = vec![b'D'];
    b.extend_from_slice(&be32(1));
    b.push(b'X');
    assert!(matches!(decode(&b), Err(DecodeError::BadMarker { .. })));
}

fn value_strategy() -> impl Strategy<Value = (u8, Vec<u8>)> {
    prop_oneof![
        Just((b'n', vec![])),
        Just((b'u', vec![])),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|v| (b't', v)),
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(|v| (b'b', v)),
    ]
}

fn as_values(raw: &[(u8, Vec<u8>)]) -> Vec<Value<'_>> {
    raw.iter()
        .map(|(kind, bytes)| match kind {
            b'n' => Value::Null,
            b'u' => Value::UnchangedToast,
            b't' => Value::Text(bytes),
            _ => Value::Binary(bytes),
        })
        .collect()
}

fn ident() -> impl Strategy<Value = String> {
    "[a-z_][a-z0-9_ é]{0,20}"
}

proptest! {
    // Replay a failure with PROPTEST_RNG_SEED / the persisted regressions file.
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn row_changes_round_trip(
        rel in any::<u32>(),
        old in proptest::collection::vec(value_strategy(), 0..12),
        new in proptest::collection::vec(value_strategy(), 0..12),
        with_old in any::<bool>(),
    ) {
        let (old, new) = (as_values(&old), as_values(&new));
        for bytes in [
            encode::insert(rel, &new),
            encode::update(rel, with_old.then_some(&old[..]), &new),
            encode::delete(rel, &old),
        ] {
            let msg = decode(&bytes).expect("valid encoding decodes");
            prop_assert_eq!(encode::message(&msg), bytes.clone());
        }
        let bytes = encode::update(rel, Some(&old), &new);
        let Message::Update(u) = decode(&bytes).unwrap() else { unreachable!() };
        prop_assert_eq!(u.old.unwrap().iter().collect::<Vec<_>>(), old);
        prop_assert_eq!(u.new.iter().collect::<Vec<_>>(), new);
    }

    #[test]
    fn relations_and_messages_round_trip(
        oid in any::<u32>(),
        namespace in ident(),
        name in ident(),
        columns in proptest::collection::vec((ident(), any::<u32>(), any::<i32>(), any::<bool>()), 0..20),
        prefix in ident(),
        content in proptest::collection::vec(any::<u8>(), 0..100),
        lsn in any::<u64>(),
    ) {
        let rel = Relation {
            oid,
            namespace,
            name,
            replica_identity: ReplicaIdentity::Full,
            columns: columns
                .into_iter()
                .map(|(name, type_oid, type_modifier, is_key)| Column { name, type_oid, type_modifier, is_key })
                .collect(),
        };
        let bytes = encode::message(&Message::Relation(rel.clone()));
        prop_assert_eq!(decode(&bytes).unwrap(), Message::Relation(rel));
        let msg = Message::Message(LogicalMessage { transactional: lsn % 2 == 0, lsn, prefix: &prefix, content: &content });
        let bytes = encode::message(&msg);
        prop_assert_eq!(decode(&bytes).unwrap(), msg);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn truncated_valid_messages_are_errors(
        new in proptest::collection::vec(value_strategy(), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = encode::insert(1, &as_values(&new));
        let cut = cut.index(bytes.len());
        prop_assert!(decode(&bytes[..cut]).is_err());
    }
}

/// Fuzz finding (fuzz/decode, 2026-11): an unknown tag in front of an
/// otherwise valid Type message is a typed error (the harness, not the
/// decoder, was wrong about the error text); kept as a fixture.
#[test]
fn fuzz_unknown_tag_before_a_type_message() {
    let bytes = b"\x92Y\x00ic\x00m\x00\x00\x00\x01t\x00";
    assert_eq!(decode(bytes), Err(DecodeError::UnknownTag(0x92)));
    assert!(decode(&bytes[1..]).is_err());
}
