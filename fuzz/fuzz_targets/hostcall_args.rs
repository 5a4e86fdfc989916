//! The argument encodings of Weft's host calls (`weft.*` foreign functions), as a guest
//! passes them: decoding any bytes never panics, and a decoded value encodes back to the
//! same bytes (where the encoding has one form).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_abi::ext;

fuzz_target!(|data: &[u8]| {
    if let Ok(ms) = ext::decode_millis(data) {
        assert_eq!(ext::encode_millis(ms).as_slice(), data);
    }
    if let Ok(n) = ext::decode_attempts(data) {
        assert_eq!(ext::encode_attempts(n).as_slice(), data);
    }
    if let Ok(info) = ext::AttemptInfo::decode(data) {
        assert_eq!(ext::AttemptInfo::decode(&info.encode()), Ok(info));
    }
    if let Ok(args) = ext::RetryArgs::decode(data) {
        assert_eq!(ext::RetryArgs::decode(&args.encode()), Ok(args));
    }
});
