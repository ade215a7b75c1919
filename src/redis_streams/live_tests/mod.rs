//! The producer and stream trimming against a real Redis.

mod producer;
mod trim;
