//! `cargo +nightly fuzz run packed` (see scripts/fuzz.sh): the body is lewel::fuzzing::packed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lewel::fuzzing::packed(data);
});
