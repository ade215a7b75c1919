//! The amqp module from outside: property tests of header tables as they arrive off the
//! wire, and the confirming publisher against a real RabbitMQ.

mod headers_prop;
mod publish;
