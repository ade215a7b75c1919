//! What validation and linting report: a problem at a key path, and the kinds of warning.

/// One problem found while validating, at a key path such as `consumers.orders.retry.initial`.
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub path: Vec<String>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarningKind {
    /// An unset `${VAR}` without default, an unset token variable, an unreadable token file.
    MissingSecret,
    /// A handler no consumer and no route uses.
    UnusedHandler,
    /// An amqp exchange an outbox or a dead-letter forward publishes to that no consumer
    /// declares: it has to exist on the broker already.
    UndeclaredExchange { broker: String, exchange: String },
}
