//! [qos] Quality of service: rate limits per export and per throttle group (issue 18).
//!
//! So far only the rate algorithm (`gcra.rs`), with its tests; the limits are not yet
//! configurable nor on the data path.

pub mod gcra;
