//! The core's operation sequences against the model of the property test
//! (`pagedkv_tests::model`): every live block holds its sequence's tokens,
//! a refused call changes nothing, no block crosses salts, and prompts may
//! repeat keys. Any broken check panics, which libFuzzer reports.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagedkv_tests::model::{Model, Op};

fuzz_target!(|ops: Vec<Op>| {
    let mut m = Model::new();
    for op in ops.iter().take(2_000) {
        m.step(op);
    }
    m.drain();
});
