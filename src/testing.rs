//! What the unit tests that drive a module against the real services share with the
//! integration tests: their helpers, compiled into the library's test build. A leaf of its
//! own, so a module's tests lean on it and not on the crate root.

#[path = "../tests/integration/support/mod.rs"]
pub(crate) mod support;
