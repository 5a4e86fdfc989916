//! The control service's manifest parser (`weftctl apply -f`): any text is resources or an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = weft_control::manifest::parse(text);
    }
});
