//! The full reliability run: `cargo bench --bench reliability [-- --scale N]` drives every
//! fault scenario (broker restarts included) through the release `bosun` binary and writes
//! the table to RELIABILITY.md. It stops RabbitMQ and Redis on this machine for a moment:
//! run it on a machine of your own.
//!
//! `-- --only TEXT` (repeatable) runs just the scenarios whose name contains TEXT and
//! replaces only their rows in RELIABILITY.md's table (new scenarios are appended), so one
//! scenario can be measured again without stopping the brokers for the others.

#[path = "../tests/integration/checker/mod.rs"]
mod checker;
#[path = "../tests/integration/support/mod.rs"]
mod support;

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
    let only: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--only")
        .map(|w| w[1].as_str())
        .collect();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_bosun"));
    let mut rows = Vec::new();
    let plans: Vec<_> = checker::plans(scale, true)
        .into_iter()
        .filter(|p| only.is_empty() || only.iter().any(|o| p.name.contains(o)))
        .collect();
    if plans.is_empty() {
        eprintln!("no scenario matches {only:?}");
        std::process::exit(2);
    }
    for plan in plans {
        println!("running: {}", plan.name);
        let row = rt.block_on(checker::scenarios::run(bin, &plan));
        println!("  {row:?}");
        rows.push(row);
    }
    let table = checker::table(&rows);
    println!("{table}");
    let holds = rows.iter().all(checker::Row::holds);
    if !only.is_empty() {
        if let Err(e) = update_rows(&table) {
            eprintln!("cannot update RELIABILITY.md: {e}");
            std::process::exit(1);
        }
        if !holds {
            std::process::exit(1);
        }
        return;
    }
    let doc = format!(
        "# Reliability\n\nbosun promises at-least-once delivery with nothing dropped silently. This table is the proof: every\nscenario drives the real `bosun` binary under load, injects one fault, and classifies every message\n(see `tests/integration/checker/mod.rs` for the checker).\n\n- **lost**: confirmed by the broker (or committed to the outbox), never handled and not dead-lettered. Must be 0.\n- **misplaced**: bad input that did not end in its documented place (bad-input rows only, described below). Must be 0.\n- **unexpected**: handled or dead-lettered but never sent. Must be 0.\n- **duplicated**: extra deliveries of one id, which at-least-once allows after a crash or a lost ack.\n\nRegenerate with `cargo bench --bench reliability -- --scale {scale}` (scale {scale}: message counts are {scale}x the CI set).\nCI runs the same scenarios at scale 1 without the broker restarts (`cargo test --test integration reliability::`).\n\n{table}\nContract held in every scenario: {}.\n",
        if holds { "yes" } else { "NO" }
    );
    let doc = format!("{doc}{BAD_INPUT}{HOSTILE}");
    if let Err(e) = std::fs::write("RELIABILITY.md", doc) {
        eprintln!("cannot write RELIABILITY.md: {e}");
        std::process::exit(1);
    }
    if !holds {
        std::process::exit(1);
    }
}

/// Replaces the rows of RELIABILITY.md's table that `table` has (same scenario name) and
/// appends the others at the table's end; everything else in the file stays as it is.
fn update_rows(table: &str) -> std::io::Result<()> {
    let doc = std::fs::read_to_string("RELIABILITY.md")?;
    let scenario = |line: &str| line.split('|').nth(1).map(|c| c.trim().to_string());
    let mut fresh: Vec<&str> = table.lines().skip(2).collect();
    let mut out: Vec<String> = Vec::new();
    let mut in_table = false;
    for line in doc.lines() {
        if line.starts_with("| scenario |") {
            in_table = true;
        } else if in_table && !line.starts_with('|') {
            out.extend(fresh.drain(..).map(str::to_string));
            in_table = false;
        }
        if in_table && let Some(pos) = fresh.iter().position(|f| scenario(f) == scenario(line)) {
            out.push(fresh.remove(pos).to_string());
            continue;
        }
        out.push(line.to_string());
    }
    out.extend(fresh.drain(..).map(str::to_string));
    std::fs::write("RELIABILITY.md", out.join("\n") + "\n")
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
| handler URL that hangs; refused connection; unresolvable host | retry after `timeout` | `tests/integration/handlers/http.rs` `hanging_endpoint_times_out_as_retry`, `refused_connection_and_unresolvable_host_retry` |
| command that writes megabytes; command that hangs | only the stderr tail kept; process group killed | `tests/integration/handlers/exec.rs` `megabytes_of_output_keep_only_the_stderr_tail`, `timeout_kills_the_whole_group_and_reaps_it` |
| unroutable outbox destination | row failed with a clear `last_error` | `src/outbox/live_tests.rs` `unroutable_rows_fail_with_a_clear_last_error` |
| outbox payload over the broker's `max_message_size` | row failed at the first attempt; the rest of its batch published once | `src/outbox/live_tests.rs` `an_oversized_payload_fails_at_once_and_spares_its_batch` |
| a missing exchange or an oversized body inside a publish batch | only that message fails; the others are confirmed once (exchange) or sent again (size) | `src/amqp/live_tests/publish.rs` `a_missing_exchange_fails_only_its_own_message_and_duplicates_nothing`, `the_brokers_size_limit_is_charged_to_the_oversized_message` |
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

/// The hostile input coverage, kept with the table when it is regenerated.
const HOSTILE: &str = r#"
## Hostile input

Input that anyone who can publish to one queue, stream or outbox table bosun reads (or who can
reach its listeners) could send to stop it, leak a secret or misroute a message. Each ends in
its place while the process keeps running, and every other message is handled. Each row is
proved by a test that runs in CI, most through the real binary.

| input | where it ends | proved by |
|---|---|---|
| amqp header table nested 40, 1,500 and 15,000 levels deep | `Q.dlq`, kind `invalid`, the 32 outer levels kept, `bosun-truncated = headers`; the vendored frame parser stops decoding at 64 levels, so no stack overflow | `tests/hostile_amqp.rs` `headers_nested_thousands_of_levels_deep_are_dead_lettered_as_invalid_without_a_crash` |
| amqp `message_id`, `content_type` or a header name that is not UTF-8 | `Q.dlq`, kind `invalid`, decoded with U+FFFD; no reconnect | `tests/hostile_amqp.rs` `non_utf8_message_id_content_type_and_header_name_are_dead_lettered_as_invalid_without_a_reconnect` |
| amqp body over the consumer's `max_message_size` | `Q.dlq`, kind `invalid`, body kept (left out, with `bosun-truncated = body`, only when over the broker's limit) | `tests/hostile_amqp.rs` `body_over_max_message_size_is_dead_lettered_as_invalid_with_its_body` |
| random amqp header tables: deep, wide, non-UTF-8 names, every field type; random bytes | parsed and converted within the depth limits, no panic | `src/amqp/live_tests/headers_prop.rs` (proptest) |
| amqp message whose retry copy would pass `frame_max` (a 130,500-byte header plus bosun's failure headers) | copy trimmed of `bosun-error`; otherwise `Q.dlq` as `invalid` with the headers that fit and `bosun-headers-truncated`; no FRAME_ERROR, no reconnect | `tests/amqp.rs` `retry_copy_over_frame_max_is_trimmed_or_dead_lettered_as_invalid_without_reconnecting` |
| amqp message with a per-message TTL (`expiration`) dead-lettered | stays in `Q.dlq`; the TTL kept as `bosun-orig-expiration` | `tests/amqp.rs` `dead_letter_copy_does_not_inherit_expiration`; checker row "dead letters of TTL messages" |
| 300 amqp messages of 1 MiB at prefetch 1000 | prefetch cut to `max_in_flight_bytes / max_message_size`; peak RSS 96 MiB (was 329 MB) | `cargo bench --bench harness -- amqp-memory` (BENCHMARKS.md) |
| redis entry with 4,000 fields, or over `max_entry_size` | `<stream>:dlq`, kind `invalid`, its fields packed into `bosun-orig-fields`; never a failing script | `tests/redis_streams.rs` `four_thousand_field_entry_that_fails_is_dead_lettered_whole_as_invalid`; checker row "4,000-field entries" |
| undecodable or oversized member at the head of `<stream>:retry` | `<stream>:dlq`, kind `invalid`; the members behind it move on | `tests/redis_streams.rs` `poisoned_retry_members_are_dead_lettered_and_the_rest_move_on` |
| `Retry-After: 99999999999` (or a value that would wrap) | capped at the consumer's longest configured delay | `tests/redis_streams.rs` `a_retry_after_beyond_the_longest_delay_is_capped_to_it` |
| outbox `headers` nested 200 deep, holding `1e400`, or not an object | that row `failed` at its first attempt with the reason; the rest of the batch published | `src/outbox/live_tests.rs` `rows_with_unusable_headers_fail_alone_at_their_first_attempt`; checker row "outbox bad input" |
| outbox row with a 200 KB header value | that row `failed` at its first attempt ("does not fit one frame"), never counted as an outage | `src/outbox/live_tests.rs` `a_row_whose_headers_exceed_the_frame_fails_at_its_first_attempt` |
| random outbox header text: deep, wide, huge numbers, NUL, lone surrogates, cut text | parsed within bounds or refused with a reason, no panic | `src/outbox/headers.rs` `any_headers_text_is_handled_within_bounds` (proptest) |
| dead letters with NUL bytes in the error, header names and values, and body | archived (NUL escaped and marked) and replayed byte for byte | `tests/dead_letters.rs` `dead_letters_with_nul_bytes_are_archived_and_replayed_exactly`; checker row "NUL bytes into the archive" |
| archived dead letter with headers nested 150 deep | stored with the levels past the bound as a marker; `dlq show` and `replay --all` work for every row | `tests/dead_letters.rs` `a_deeply_nested_archived_letter_holds_up_no_other_row_in_show_and_replay_all` |
| dead letter whose `bosun-original-queue` (amqp) or `bosun-orig-stream` (redis) names a queue or stream outside `replay_to` | archived with the reason, never replayed there | `tests/dead_letters.rs` `amqp_dead_letter_naming_another_queue_is_archived_not_replayed`, `redis_dead_letter_naming_another_stream_is_archived_not_replayed` |
| an entry a redis dead-letter processor cannot read | archived as `invalid` (body kept as bytes), never moved to a second-level stream | `tests/dead_letters.rs` `undecodable_processor_input_is_archived_as_invalid_not_moved_on` |
| exec handler child | sees only the environment allow-list and its own `env`, never a variable the config read | `tests/hostile_secrets.rs` `exec_children_inherit_only_the_allowlist_and_never_what_the_config_reads` |
| admin API: 230,000 ids, `all` without a processor, a short token, repeated bad tokens | 413; 400 until `processor` and `confirm` are given; refused at load; 429 with one aggregated WARN per 10 s. The API listens on loopback, apart from `/metrics` | `tests/hostile_secrets.rs` `admin_api_limits_ids_requires_confirmed_all_and_rate_limits_failures`, `short_admin_tokens_are_refused_at_load` |
| secrets (database password, admin token, webhook token and URL path) | never in `bosun check`, config errors, logs, `/readyz`, `/metrics`, dead-letter headers, the archive or the admin API | `tests/hostile_secrets.rs` `no_secret_reaches_any_output`, `configuration_errors_show_interpolated_values_as_their_variable` |
| redirect to another host | `Authorization`, cookies and secret headers dropped | `tests/hostile_secrets.rs` `secret_headers_are_dropped_on_a_redirect_to_another_origin` |
| pid file that is a symlink, or held by a live daemon; a config others may write | refused without touching the file; exit 78 unless `--allow-insecure-config` | `tests/hostile_secrets.rs` `the_pid_file_is_never_written_through_a_symlink`, `a_second_daemon_on_the_same_pid_file_refuses_and_leaves_it_alone`, `a_config_file_others_may_write_is_refused` |
"#;
