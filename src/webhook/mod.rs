//! Signed HTTP delivery of events (work in progress).
