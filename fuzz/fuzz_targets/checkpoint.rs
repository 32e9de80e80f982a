//! `cargo +nightly fuzz run checkpoint` (see scripts/fuzz.sh): the body is lewel::fuzzing::checkpoint.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lewel::fuzzing::checkpoint(data);
});
