//! `cargo +nightly fuzz run manifest` (see scripts/fuzz.sh): the body is lewel::fuzzing::manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lewel::fuzzing::manifest(data);
});
