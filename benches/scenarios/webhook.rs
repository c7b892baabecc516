//! Scenarios of the webhook feature.

use crate::harness::Scenario;

pub fn all() -> Vec<Scenario> {
    Vec::new()
}
