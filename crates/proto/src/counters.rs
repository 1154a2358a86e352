//! Counters of one metric labelled by message `type`, made once and then only incremented.
//!
//! `metrics::counter!(name, "type" => t)` looks the counter up in the recorder's registry on
//! every call (a key built, hashed and copied, a sharded map read): per message under
//! `tether stress message_flood` that was about 4 % of the coordinator's samples. A
//! [`ByType`] makes the counter of every type once, from the recorder installed at that
//! moment, and an increment is then a short scan of the type list and an atomic add.

use std::sync::OnceLock;

/// The counters of `metric` for each of `types`.
pub struct ByType {
    metric: &'static str,
    types: &'static [&'static str],
    made: OnceLock<Vec<metrics::Counter>>,
}

impl ByType {
    pub const fn new(metric: &'static str, types: &'static [&'static str]) -> Self {
        Self {
            metric,
            types,
            made: OnceLock::new(),
        }
    }

    /// Makes the counters from the recorder installed now. Until this is called, increments
    /// go through the registry (so that they reach a recorder installed later).
    pub fn register(&self) {
        self.made.get_or_init(|| {
            self.types
                .iter()
                .map(|t| metrics::counter!(self.metric, "type" => *t))
                .collect()
        });
    }

    /// Adds one to the counter of `ty`.
    pub fn increment(&self, ty: &'static str) {
        let made = self
            .made
            .get()
            .and_then(|c| c.get(self.types.iter().position(|t| *t == ty)?));
        match made {
            Some(counter) => counter.increment(1),
            None => metrics::counter!(self.metric, "type" => ty).increment(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use metrics::{
        Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };

    use super::*;
    use crate::msg::WORKER_MSG_TYPES;

    /// Counts by the `type` label; says how many counters it made.
    #[derive(Default)]
    struct ByLabel {
        counts: Mutex<HashMap<String, Arc<AtomicU64>>>,
        made: AtomicU64,
    }

    impl ByLabel {
        fn get(&self, ty: &str) -> u64 {
            let counts = self.counts.lock().expect("lock");
            counts.get(ty).map_or(0, |c| c.load(Ordering::SeqCst))
        }
    }

    impl Recorder for ByLabel {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            self.made.fetch_add(1, Ordering::SeqCst);
            let ty = key
                .labels()
                .find(|l| l.key() == "type")
                .map(|l| l.value().to_owned())
                .unwrap_or_default();
            let mut counts = self.counts.lock().expect("lock");
            Counter::from_arc(counts.entry(ty).or_default().clone())
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn increments_reach_the_counter_of_their_type_and_registered_ones_are_made_once() {
        let recorder = ByLabel::default();
        let by = ByType::new("m", WORKER_MSG_TYPES);
        metrics::with_local_recorder(&recorder, || {
            by.increment("task_state");
            by.register();
            let made = recorder.made.load(Ordering::SeqCst);
            for _ in 0..10 {
                by.increment("task_state");
            }
            by.increment("heartbeat");
            assert_eq!(
                recorder.made.load(Ordering::SeqCst),
                made,
                "no lookup after register"
            );
            // A type outside the list still counts, through the registry.
            by.increment("bogus");
        });
        assert_eq!(recorder.get("task_state"), 11);
        assert_eq!(recorder.get("heartbeat"), 1);
        assert_eq!(recorder.get("bogus"), 1);
    }
}
