//! Path normalization on arbitrary text: never panics; decoding unreserved escapes is
//! stable (decoding the result again changes nothing), and a lenient reading has no
//! encoded or repeated slash, no `;parameter` and no backslash left.
#![no_main]

use keygate::http::path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Some(decoded)) = path::decode_unreserved(data) {
        assert_eq!(path::decode_unreserved(&decoded), Ok(None), "{text:?}");
        assert!(decoded.len() < text.len());
    }
    if let Ok(Some(read)) = path::lenient_reading(text) {
        assert!(
            !read.contains("//") && !read.contains(';') && !read.contains('\\'),
            "{read:?}"
        );
        let lowered = read.to_ascii_lowercase();
        assert!(
            !lowered.contains("%2f") && !lowered.contains("%5c"),
            "{text:?} -> {read:?}"
        );
        assert_eq!(path::lenient_reading(&read), Ok(None), "{text:?} -> {read:?}");
    }
    let _ = path::has_dot_segment(text);
});
