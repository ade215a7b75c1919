//! The full reliability run: `cargo bench --bench reliability [-- --scale N]` drives every
//! fault scenario (broker restarts included) through the release `bosun` binary and writes
//! the table to RELIABILITY.md. It stops RabbitMQ and Redis on this machine for a moment:
//! run it on a machine of your own.

#[path = "../tests/checker/mod.rs"]
mod checker;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scale = args
        .iter()
        .position(|a| a == "--scale")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5usize);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start tokio: {e}");
            std::process::exit(1);
        }
    };
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_bosun"));
    let mut rows = Vec::new();
    for plan in checker::plans(scale, true) {
        println!("running: {}", plan.name);
        let row = rt.block_on(checker::scenarios::run(bin, &plan));
        println!("  {row:?}");
        rows.push(row);
    }
    let table = checker::table(&rows);
    println!("{table}");
    let holds = rows.iter().all(checker::Row::holds);
    let doc = format!(
        "# Reliability\n\nbosun promises at-least-once delivery with nothing dropped silently. This table is the proof: every\nscenario drives the real `bosun` binary under load, injects one fault, and classifies every message\n(see `tests/checker/mod.rs` for the checker).\n\n- **lost**: confirmed by the broker (or committed to the outbox), never handled and not dead-lettered. Must be 0.\n- **misplaced**: bad input that did not end in its documented place (bad-input rows only, described below). Must be 0.\n- **unexpected**: handled or dead-lettered but never sent. Must be 0.\n- **duplicated**: extra deliveries of one id, which at-least-once allows after a crash or a lost ack.\n\nRegenerate with `cargo bench --bench reliability -- --scale {scale}` (scale {scale}: message counts are {scale}x the CI set).\nCI runs the same scenarios at scale 1 without the broker restarts (`cargo test --test reliability`).\n\n{table}\nContract held in every scenario: {}.\n",
        if holds { "yes" } else { "NO" }
    );
    let doc = format!("{doc}{BAD_INPUT}{HOSTILE_AMQP}");
    if let Err(e) = std::fs::write("RELIABILITY.md", doc) {
        eprintln!("cannot write RELIABILITY.md: {e}");
        std::process::exit(1);
    }
    if !holds {
        std::process::exit(1);
    }
}

/// The bad-input coverage, kept with the table when it is regenerated.
const BAD_INPUT: &str = r#"
## Bad input

Each case below must end in its documented place while the daemon keeps running. These are
covered by the integration suites (run in CI):

| input | where it ends | proved by |
|---|---|---|
| non-UTF-8, non-JSON body (amqp) | reaches the handler byte for byte | `tests/amqp.rs` `non_utf8_body_reaches_the_handler_byte_for_byte` |
| binary stream field values (redis) | passed through untouched, also into the dead-letter copy | `tests/redis_streams.rs` `binary_field_values_pass_through_untouched` |
| stream entry without `payload` or with a bad `bosun-attempt` | dead-lettered as `invalid`, never retried | `tests/redis_streams.rs` `entries_the_handler_cannot_use_are_dead_lettered_as_invalid` |
| dead letter with no bosun headers and no `x-death` | archived with kind `unknown` | `tests/dead_letters.rs` |
| handler URL that hangs; refused connection; unresolvable host | retry after `timeout` | `tests/handlers/http.rs` `hanging_endpoint_times_out_as_retry`, `refused_connection_and_unresolvable_host_retry` |
| command that writes megabytes; command that hangs | only the stderr tail kept; process group killed | `tests/handlers/exec.rs` `megabytes_of_output_keep_only_the_stderr_tail`, `timeout_kills_the_whole_group_and_reaps_it` |
| unroutable outbox destination | row failed with a clear `last_error` | `tests/outbox.rs` `unroutable_rows_fail_with_a_clear_last_error` |
| outbox payload over the broker's `max_message_size` | row failed at the first attempt; the rest of its batch published once | `tests/outbox.rs` `an_oversized_payload_fails_at_once_and_spares_its_batch` |
| a missing exchange or an oversized body inside a publish batch | only that message fails; the others are confirmed once (exchange) or sent again (size) | `tests/amqp_publish.rs` `a_missing_exchange_fails_only_its_own_message_and_duplicates_nothing`, `the_brokers_size_limit_is_charged_to_the_oversized_message` |
| config file truncated, binary, or over 4 MiB | exit 78 with a located message | `tests/config.rs` `binary_truncated_and_huge_files_are_refused_clearly` |
| random and mutated config text | never panics; every error has a location | `tests/config_fuzz.rs` (proptest) |

The table above also has two bad-input rows, whose **misplaced** column counts bad input that
did not end in its documented place (it must be 0):

- **amqp**: bodies of random bytes with 1,000-entry non-UTF-8 header tables, all handled (ids
  taken from `bosun-message-id`); a body exactly at the broker's `max_message_size` (read from
  the running broker), handled after one retry, so its retry copy crossed the broker too; and a
  body one byte over it, refused by the broker at publish, so it never reaches bosun.
- **outbox**: rows with NULL destinations (the relay's default applies) are published; rows
  naming a missing exchange, and rows whose payload is one byte over the broker's
  `max_message_size`, end `failed` with a `last_error` that says why, and no other row does.
  The relay here has no `max_message_size` configured, so the broker's own refusal is the one
  charged to the oversized row.
"#;

/// The hostile amqp input coverage, kept with the table when it is regenerated.
const HOSTILE_AMQP: &str = r#"
## Hostile input (amqp)

Messages anyone who can publish to a consumer's queue could send to stop it. Each must end in
its place while the process keeps running on the same connection and every other message is
handled (`tests/hostile_amqp.rs`, through the real binary, frames written by hand):

| input | where it ends | proved by |
|---|---|---|
| header table nested 40, 1,500 and 15,000 levels deep | `Q.dlq`, kind `invalid`, the 32 outer levels kept, `bosun-truncated = headers`; the parser stops decoding at 64 levels | `headers_nested_thousands_of_levels_deep_are_dead_lettered_as_invalid_without_a_crash` |
| `message_id`, `content_type` or a header name that is not UTF-8 | `Q.dlq`, kind `invalid`, decoded with U+FFFD | `non_utf8_message_id_content_type_and_header_name_are_dead_lettered_as_invalid_without_a_reconnect` |
| body over the consumer's `max_message_size` | `Q.dlq`, kind `invalid`, body kept (left out, with `bosun-truncated = body`, only when over the broker's limit) | `body_over_max_message_size_is_dead_lettered_as_invalid_with_its_body` |
| random header tables: deep, wide, non-UTF-8 names, every field type; random bytes | parsed and converted within the depth limits, no panic | `tests/amqp_headers_prop.rs` (proptest) |
"#;
