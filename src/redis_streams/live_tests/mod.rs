//! The producer and stream trimming against a real Redis.

mod budget;
mod producer;
mod trim;
