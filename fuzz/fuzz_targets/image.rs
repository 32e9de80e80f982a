//! `cargo +nightly fuzz run image` (see scripts/fuzz.sh): the body is lewel::fuzzing::image.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lewel::fuzzing::image(data);
});
