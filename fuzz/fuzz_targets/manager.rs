//! The manager's request sequences against the model of its property test
//! (`pagedkv_tests::manager_model`): KV content of every block, prefix hits,
//! cancelled calls, unknown ids, nothing held at the end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagedkv_manager::PreemptionPolicy;
use pagedkv_tests::manager_model::{MOp, ManagerModel};

fuzz_target!(|input: (bool, Vec<MOp>)| {
    let (scheduler, ops) = input;
    let policy = if scheduler {
        PreemptionPolicy::Scheduler
    } else {
        PreemptionPolicy::Automatic
    };
    let mut m = ManagerModel::with_policy(policy);
    for op in ops.iter().take(500) {
        m.step(op);
    }
    m.drain();
});
