//! The proxy's config parser and validation: any text is a config or an error, never a panic
//! (or an allocation the size of a number in it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = weft_config::Config::parse(std::path::Path::new("fuzz.yaml"), text);
    }
});
