//! What a newcomer runs first works as written: the example configuration, started the way
//! the README says, against the local RabbitMQ, Redis and PostgreSQL.

use crate::support;

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use support::{ConfigFile, Daemon, PG_URL, RABBIT_URL, REDIS_URL, free_port, unique, wait_for};

const EXAMPLE: &str = include_str!("../../config/bosun.toml");

/// The example with every queue, exchange, stream and table renamed after `prefix`, so the
/// run shares nothing with other tests or with an earlier run of the example itself.
fn example_with_own_names(prefix: &str) -> String {
    let mut text = EXAMPLE.to_owned();
    for (from, to) in [
        (
            "exchange = \"shop\"",
            format!("exchange = \"{prefix}_shop\""),
        ),
        (
            "destination = \"shop\"",
            format!("destination = \"{prefix}_shop\""),
        ),
        ("queue = \"orders\"", format!("queue = \"{prefix}_orders\"")),
        (
            "queue = \"orders.dlq\"",
            format!("queue = \"{prefix}_orders.dlq\""),
        ),
        (
            "stream = \"events\"",
            format!("stream = \"{prefix}_events\""),
        ),
        (
            "stream = \"events:dlq\"",
            format!("stream = \"{prefix}_events:dlq\""),
        ),
        (
            "table = \"bosun_outbox\"",
            format!("table = \"{prefix}_outbox\""),
        ),
        (
            "table = \"dead_letters\"",
            format!("table = \"{prefix}_dead_letters\""),
        ),
    ] {
        assert!(
            text.contains(from),
            "the example no longer has {from}: update this test"
        );
        text = text.replace(from, &to);
    }
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn example_config_runs_clean_and_its_outbox_row_is_published_and_consumed() {
    let prefix = unique("example");
    let text = example_with_own_names(&prefix);
    let config = ConfigFile::new(&text);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let dead_letters_table = format!("{prefix}_dead_letters");
    let env = [
        ("BOSUN_LISTEN", listen.as_str()),
        ("RABBIT_URL", RABBIT_URL),
        ("REDIS_URL", REDIS_URL),
        ("DATABASE_URL", PG_URL),
        // The redis processor archives into the default table name; keep it apart too.
        (
            "BOSUN__DEAD_LETTERS__EVENTS__TABLE",
            dead_letters_table.as_str(),
        ),
    ];
    let loaded = bosun::config::load_str(
        &text,
        "example",
        &bosun::handler::HandlerKinds::builtin(),
        &bosun::config::Env::from_pairs(env.iter().copied()),
    )
    .expect("the example config is valid");
    // A postgres inbox runs its sweeper as a component of its own.
    let sweepers = loaded
        .inboxes
        .values()
        .filter(|i| matches!(i.store, bosun::config::InboxStore::Postgres { .. }))
        .count();
    let components =
        loaded.consumers.len() + loaded.outboxes.len() + loaded.dead_letters.len() + sweepers;

    let mut daemon = Daemon::start_with_env(&config.path, port, &env);
    // Every component registered and ready.
    let ready = wait_for(Duration::from_secs(120), || {
        let (status, body) = daemon.get("/readyz")?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status == 200 && json["status"] == "ready" && json["components"] == components)
            .then_some(())
    });
    assert!(
        ready.is_some(),
        "the example never became ready with its {components} components: {:?}\n{}",
        daemon.get("/readyz"),
        daemon.logs()
    );

    // The row an application writes, as in the README: NULL destination, so the relay uses
    // the configured exchange, which the `orders` consumer binds.
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(PG_URL)
        .await
        .expect("connect to PostgreSQL");
    let outbox = format!("{prefix}_outbox");
    let (message_id,): (String,) = sqlx::query_as(&format!(
        "INSERT INTO {outbox} (routing_key, partition_key, content_type, payload) \
         VALUES ('order.paid', 'order-42', 'application/json', convert_to('{{\"order\": 42}}', 'UTF8')) \
         RETURNING message_id::text"
    ))
    .fetch_one(&pool)
    .await
    .expect("insert the outbox row");

    let published = support::wait_for_async(Duration::from_secs(60), || {
        let pool = pool.clone();
        let outbox = outbox.clone();
        async move {
            let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(&format!(
                "SELECT published_at::text, last_error FROM {outbox} WHERE partition_key = 'order-42'"
            ))
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten();
            match row {
                Some((Some(_), last_error)) => Some(last_error),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(
        published,
        Some(None),
        "the row was not published, or not without an error\n{}",
        daemon.logs()
    );
    let consumed = wait_for(Duration::from_secs(60), || {
        daemon
            .logs()
            .lines()
            .any(|l| {
                l.contains("message received")
                    && l.contains(&message_id)
                    && l.contains(&format!("{prefix}_orders"))
            })
            .then_some(())
    });
    assert!(
        consumed.is_some(),
        "the `orders` consumer never logged message {message_id}\n{}",
        daemon.logs()
    );

    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(60)), Some(0));
    let logs = daemon.logs();
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "ERROR lines:\n{}", errors.join("\n"));
    // `log_format = "pretty"` into a file: plain text, no colour codes.
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in a log file:\n{logs}"
    );

    cleanup(&prefix, &pool).await;
}

/// Drops what the run created: queues, exchange, streams, tables.
async fn cleanup(prefix: &str, pool: &sqlx::PgPool) {
    for table in [format!("{prefix}_outbox"), format!("{prefix}_dead_letters")] {
        let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {table} CASCADE"))
            .execute(pool)
            .await;
    }
    if let Ok(conn) =
        lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default()).await
        && let Ok(channel) = conn.create_channel().await
    {
        let queue = format!("{prefix}_orders");
        let mut queues = vec![queue.clone(), format!("{queue}.dlq")];
        queues.extend(["1s", "10s", "1m"].map(|tier| format!("{queue}.retry.{tier}")));
        for q in queues {
            let _ = channel
                .queue_delete(q.as_str().into(), Default::default())
                .await;
        }
        let _ = channel
            .exchange_delete(format!("{prefix}_shop").as_str().into(), Default::default())
            .await;
        let _ = conn.close(200, "done".into()).await;
    }
    if let Ok(client) = redis::Client::open(REDIS_URL)
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let stream = format!("{prefix}_events");
        let _: Result<(), _> = redis::cmd("DEL")
            .arg(&stream)
            .arg(format!("{stream}:dlq"))
            .arg(format!("{stream}:retry"))
            .query_async(&mut conn)
            .await;
    }
}

/// Values in logs are plain text: a message id is the id, a list of components is a list of
/// names, an exit status is a word; no `Some(...)`, `ShortString(...)` or `["..."]`.
#[test]
fn log_fields_hold_plain_values_not_rust_debug_text() {
    let queue = unique("plain_logs");
    let port = free_port();
    let with_consumer = |consumer: bool| {
        let mut text = format!(
            "[service]\nlog_format = \"json\"\nshutdown_timeout = \"10s\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n[brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n\n[handlers.reject]\nkind = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", \"exit 65\"]\n\n[handlers.keep]\nkind = \"noop\"\n\n[consumers.keep]\nsource = \"rabbit\"\nhandler = \"keep\"\nqueue = \"{queue}_keep\"\n"
        );
        if consumer {
            text.push_str(&format!(
                "\n[consumers.jobs]\nsource = \"rabbit\"\nhandler = \"reject\"\nqueue = \"{queue}\"\n"
            ));
        }
        text
    };
    let config = ConfigFile::new(&with_consumer(true));
    let mut daemon = Daemon::start(&config.path, port);
    assert!(
        daemon.wait_ready(Duration::from_secs(60)),
        "{}",
        daemon.logs()
    );
    wait_for(Duration::from_secs(60), || {
        daemon
            .get("/readyz")
            .filter(|(s, b)| *s == 200 && b.contains("\"components\":2"))
    })
    .expect("both consumers ready");

    let message_id = unique("msg");
    let path = config.path.to_string_lossy().into_owned();
    let (code, _, stderr) = support::bosun_output(
        &[
            "publish",
            "--config",
            &path,
            "--broker",
            "rabbit",
            "--exchange",
            "",
            "--routing-key",
            &queue,
            "--message-id",
            &message_id,
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let line = wait_for(Duration::from_secs(60), || {
        daemon
            .logs()
            .lines()
            .find(|l| l.contains("dead-lettering message"))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("no dead-letter log line\n{}", daemon.logs()));
    let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(json["message_id"], message_id.as_str(), "{line}");

    // A reload that removes a component names it plainly.
    config.rewrite(&with_consumer(false));
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let line = wait_for(Duration::from_secs(60), || {
        daemon
            .logs()
            .lines()
            .find(|l| l.contains("applying changes"))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("no reload log line\n{}", daemon.logs()));
    let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(json["stop"], "consumer:jobs", "{line}");
    assert_eq!(json["start"], "", "{line}");

    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(60)), Some(0));
    let logs = daemon.logs();
    let stopped = logs
        .lines()
        .find(|l| l.contains("bosun stopped"))
        .expect("a stop line");
    let json: serde_json::Value = serde_json::from_str(stopped).expect("a JSON log line");
    assert_eq!(json["status"], "clean", "{stopped}");
    for debug_text in ["Some(", "ShortString(", "[\\\"", "PerKey"] {
        assert!(
            !logs.contains(debug_text),
            "{debug_text} in the logs:\n{logs}"
        );
    }
    delete_queues(&[
        queue.clone(),
        format!("{queue}.dlq"),
        format!("{queue}_keep"),
        format!("{queue}_keep.dlq"),
    ]);
}

/// `bosun check` speaks in the file's own words.
#[test]
fn check_output_reads_as_plain_text() {
    let port = free_port();
    let token = unique("TOKEN").to_uppercase();
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\n\n[http.admin]\ntoken_env = \"{token}\"\n\n[brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n\n[databases.main]\nurl = \"{PG_URL}\"\n\n[outboxes.orders]\ndatabase = \"main\"\ntarget = \"rabbit\"\nordering = \"per_key\"\n"
    );
    let config = ConfigFile::new(&text);
    let path = config.path.to_string_lossy().into_owned();
    let (code, stdout, stderr) = support::bosun_output(
        &["check", "--config", &path],
        &[(token.as_str(), "a-long-enough-token-of-thirty-two-bytes")],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ordering per_key"), "{stdout}");
    assert!(
        stdout.contains(&format!("admin API on 127.0.0.1:{port}/admin")),
        "{stdout}"
    );
    assert!(stdout.contains("service bosun:"), "{stdout}");
    for debug_text in ["PerKey", "Some(", "\"bosun\""] {
        assert!(!stdout.contains(debug_text), "{debug_text} in:\n{stdout}");
    }
    assert!(
        !stdout.contains("a-long-enough-token-of-thirty-two-bytes"),
        "{stdout}"
    );
}

fn delete_queues(queues: &[String]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        if let Ok(conn) =
            lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default()).await
            && let Ok(channel) = conn.create_channel().await
        {
            for q in queues {
                let _ = channel
                    .queue_delete(q.as_str().into(), Default::default())
                    .await;
            }
            let _ = conn.close(200, "done".into()).await;
        }
    });
}

/// `bosun topology` lists what outboxes and dead-letter `forward` rules publish to, and
/// `--apply` fails when such an exchange exists nowhere.
#[test]
fn topology_lists_outbox_and_forward_targets_and_apply_checks_them() {
    let name = unique("topology");
    let missing = format!("{name}_missing");
    let text = format!(
        "[brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n\n[databases.main]\nurl = \"{PG_URL}\"\n\n[handlers.h]\nkind = \"noop\"\n\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"h\"\nqueue = \"{name}\"\nbindings = [{{ exchange = \"{name}_shop\", routing_key = \"order.*\" }}]\n\n[outboxes.orders]\ndatabase = \"main\"\ntarget = \"rabbit\"\ndestination = \"{name}_shop\"\n\n[dead_letters.orders]\nsource = \"rabbit\"\nqueue = \"{name}.dlq\"\ndefault_action = \"drop\"\n\n[[dead_letters.orders.rules]]\naction = \"forward\"\nexchange = \"{missing}\"\n"
    );
    let config = ConfigFile::new(&text);
    let path = config.path.to_string_lossy().into_owned();
    let (code, stdout, stderr) = support::bosun_output(&["topology", "--config", &path], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!(
            "# outbox orders publishes on broker rabbit to exchange {name}_shop: declared by consumer orders"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "# dead letters orders (rule 1, forward) publishes on broker rabbit to exchange {missing}: declared by no consumer"
        )),
        "{stdout}"
    );

    let (code, stdout, stderr) =
        support::bosun_output(&["topology", "--config", &path, "--apply"], &[]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stdout.contains("consumer orders: declared"), "{stdout}");
    assert!(
        stderr.contains(&format!("exchange `{missing}`, which does not exist")),
        "{stderr}"
    );

    delete_queues(&[
        name.clone(),
        format!("{name}.dlq"),
        format!("{name}.retry.1s"),
    ]);
}
