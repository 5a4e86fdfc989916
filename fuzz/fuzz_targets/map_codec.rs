//! The proxy-wasm map wire format, as a guest hands it to the host: parsing any bytes never
//! panics, and what parses serialises back to bytes that parse to the same pairs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_abi::map;

fuzz_target!(|data: &[u8]| {
    if let Some(pairs) = map::deserialize(data) {
        let again = map::serialize(pairs.iter().map(|(k, v)| (*k, *v)));
        assert_eq!(map::deserialize(&again), Some(pairs));
    }
});
