//! `cargo +nightly fuzz run config` (see scripts/fuzz.sh): the body is lewel::fuzzing::config.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lewel::fuzzing::config(data);
});
