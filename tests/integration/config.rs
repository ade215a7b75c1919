//! Configuration errors name the file, line, column and key path; interpolation and
//! environment overrides apply; `bosun check` exits 0 or 78.

use crate::support;

use bosun::config::{ConfigError, Env, Location, load_str};
use bosun::handler::HandlerKinds;
use support::{ConfigFile, bosun_output};

const BASE: &str = r#"
[brokers.rabbit]
kind = "amqp"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"

[brokers.cache]
kind = "redis"
url = "redis://127.0.0.1:6379/"

[handlers.orders]
kind = "noop"
"#;

fn load(text: &str) -> Result<bosun::config::Config, ConfigError> {
    load_with_env(text, &[])
}

fn load_with_env(text: &str, env: &[(&str, &str)]) -> Result<bosun::config::Config, ConfigError> {
    load_str(
        text,
        "test.toml",
        &HandlerKinds::builtin(),
        &Env::from_pairs(env.iter().copied()),
    )
}

/// Asserts that loading `text` fails with exactly one problem at `line`:`column` whose
/// message contains every `needle`.
fn check_error(text: &str, line: usize, column: usize, needles: &[&str]) {
    let err = load(text).expect_err("config should be rejected");
    let rendered = err.to_string();
    assert_eq!(err.problems.len(), 1, "{rendered}");
    match &err.problems[0].location {
        Location::File(pos) => assert_eq!((pos.line, pos.column), (line, column), "{rendered}"),
        other => panic!("expected a file position, got {other:?}: {rendered}"),
    }
    assert!(
        rendered.starts_with(&format!("test.toml:{line}:{column}: ")),
        "{rendered}"
    );
    for needle in needles {
        assert!(
            rendered.contains(needle),
            "missing {needle:?} in: {rendered}"
        );
    }
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .expect("needle in text")
}

#[test]
fn unknown_field_names_table_and_expected_fields() {
    let text = format!(
        "{BASE}\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"orders\"\nqueue = \"q\"\nprefech = 10\n"
    );
    check_error(
        &text,
        line_of(&text, "prefech"),
        1,
        &[
            "unknown field `prefech` in [consumers.orders]",
            "expected one of",
            "`prefetch`",
        ],
    );
}

#[test]
fn syntax_error_has_parser_position() {
    let text = "[service]\nname = \"x\"\nshutdown_timeout = \n";
    let err = load(text).expect_err("invalid TOML");
    let rendered = err.to_string();
    assert!(rendered.starts_with("test.toml:3:"), "{rendered}");
    assert!(rendered.contains("invalid TOML"), "{rendered}");
}

#[test]
fn wrong_type_is_located_at_its_key() {
    let text = format!(
        "{BASE}\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"orders\"\nqueue = \"q\"\nprefetch = \"many\"\n"
    );
    check_error(
        &text,
        line_of(&text, "prefetch ="),
        1,
        &["invalid type", "consumers.orders.prefetch"],
    );
}

#[test]
fn bad_duration_is_rejected_at_load_time() {
    let text = "[service]\nshutdown_timeout = \"10 parsecs\"\n";
    check_error(
        text,
        2,
        1,
        &["invalid duration", "service.shutdown_timeout"],
    );
}

#[test]
fn bad_listen_address_is_rejected() {
    let text = "[http]\nlisten = \"localhost:nine\"\n";
    check_error(text, 2, 1, &["invalid socket address", "http.listen"]);
}

#[test]
fn bad_url_scheme_is_rejected_without_showing_the_password() {
    let text = "[brokers.rabbit]\nkind = \"amqp\"\nurl = \"http://guest:hunter2@127.0.0.1/\"\n";
    check_error(
        text,
        3,
        1,
        &["scheme `http`", "expected one of: amqp, amqps"],
    );
    let rendered = load(text).expect_err("rejected").to_string();
    assert!(!rendered.contains("hunter2"), "{rendered}");
}

#[test]
fn tls_needs_the_tls_scheme_and_a_certificate_needs_its_key() {
    let text = "[brokers.cache]\nkind = \"redis\"\nurl = \"redis://127.0.0.1/\"\ntls = { ca_file = \"/ca.pem\" }\n";
    check_error(
        text,
        4,
        1,
        &["need a `rediss://` URL", "`redis://`", "brokers.cache.tls"],
    );
    let text = "[brokers.rabbit]\nkind = \"amqp\"\nurl = \"amqps://127.0.0.1/\"\ntls = { cert_file = \"/c.pem\" }\n";
    check_error(text, 4, 1, &["`cert_file` and `key_file` go together"]);
    let ok = "[brokers.cache]\nkind = \"redis\"\nurl = \"rediss://127.0.0.1/\"\ntls = { ca_file = \"/ca.pem\", cert_file = \"/c.pem\", key_file = \"/c.key\" }\n";
    assert!(load(ok).is_ok());
}

#[test]
fn max_message_size_takes_bytes_or_binary_units() {
    let text = "[brokers.rabbit]\nkind = \"amqp\"\nurl = \"amqp://127.0.0.1/\"\nmax_message_size = \"16 MB\"\n";
    check_error(
        text,
        4,
        1,
        &[
            "invalid size",
            "unknown unit",
            "brokers.rabbit.max_message_size",
        ],
    );
    for (value, bytes) in [("4096", 4096u64), ("\"16MiB\"", 16 << 20)] {
        let text = format!(
            "[brokers.rabbit]\nkind = \"amqp\"\nurl = \"amqp://127.0.0.1/\"\nmax_message_size = {value}\n"
        );
        let config = load(&text).expect("valid");
        match config.brokers.get("rabbit") {
            Some(bosun::config::BrokerConfig::Amqp(b)) => {
                assert_eq!(b.max_message_size, Some(bytes), "{value}")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn unknown_broker_kind_lists_the_kinds() {
    let text = "[brokers.x]\nkind = \"kafka\"\nurl = \"x\"\n";
    let rendered = load(text).expect_err("rejected").to_string();
    assert!(rendered.contains("unknown variant `kafka`"), "{rendered}");
    assert!(
        rendered.contains("`amqp`") && rendered.contains("`redis`"),
        "{rendered}"
    );
    assert!(
        rendered.starts_with("test.toml:1:") || rendered.starts_with("test.toml:2:"),
        "{rendered}"
    );
}

#[test]
fn missing_broker_reference_names_consumer_and_broker() {
    let text = format!(
        "{BASE}\n[consumers.orders]\nsource = \"rabit\"\nhandler = \"orders\"\nqueue = \"q\"\n"
    );
    check_error(
        &text,
        line_of(&text, "rabit\""),
        1,
        &[
            "consumer `orders` names broker `rabit`",
            "not defined",
            "`rabbit`",
        ],
    );
}

#[test]
fn missing_handler_reference_names_consumer_and_handler() {
    let text = format!(
        "{BASE}\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"ordrs\"\nqueue = \"q\"\n"
    );
    check_error(
        &text,
        line_of(&text, "ordrs"),
        1,
        &["consumer `orders` names handler `ordrs`", "not defined"],
    );
}

#[test]
fn field_of_the_other_broker_kind_is_an_error() {
    let text = format!(
        "{BASE}\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"orders\"\nqueue = \"q\"\nstream = \"s\"\n"
    );
    check_error(
        &text,
        line_of(&text, "stream ="),
        1,
        &["`stream` is for redis consumers", "amqp"],
    );
    let text = format!(
        "{BASE}\n[consumers.events]\nsource = \"cache\"\nhandler = \"orders\"\nstream = \"s\"\nprefetch = 5\n"
    );
    check_error(
        &text,
        line_of(&text, "prefetch"),
        1,
        &["`prefetch` is for amqp consumers"],
    );
}

#[test]
fn nested_retry_errors_point_into_the_inline_table() {
    let text = format!(
        "{BASE}\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"orders\"\nqueue = \"q\"\nretry = {{ max_attempts = 3, initial = \"soon\" }}\n"
    );
    let line = line_of(&text, "retry =");
    let column = text
        .lines()
        .nth(line - 1)
        .and_then(|l| l.find("initial"))
        .map(|c| c + 1)
        .expect("column");
    check_error(
        &text,
        line,
        column,
        &[
            "invalid duration \"soon\"",
            "consumers.orders.retry.initial",
        ],
    );
}

#[test]
fn unknown_handler_kind_lists_known_kinds() {
    let text = "[handlers.x]\nkind = \"carrier-pigeon\"\n";
    check_error(
        text,
        2,
        1,
        &["unknown handler kind `carrier-pigeon`", "`log`", "`noop`"],
    );
}

#[test]
fn unknown_handler_option_is_located() {
    let text = "[handlers.x]\nkind = \"noop\"\nspeed = 3\n";
    check_error(text, 3, 1, &["unknown field `speed`"]);
}

#[test]
fn every_problem_is_reported_at_once() {
    let text =
        "[service]\nshutdown_timeout = \"x\"\nlog_format = \"xml\"\n[http]\nlisten = \"nope\"\n";
    let err = load(text).expect_err("rejected");
    assert_eq!(err.problems.len(), 3, "{err}");
    let lines: Vec<usize> = err
        .problems
        .iter()
        .map(|p| match p.location {
            Location::File(pos) => pos.line,
            _ => 0,
        })
        .collect();
    assert_eq!(lines, vec![2, 3, 5], "{err}");
}

#[test]
fn interpolation_uses_values_and_defaults() {
    let text = "[http]\nlisten = \"${BIND:-127.0.0.1}:${PORT}\"\n[service]\nname = \"${NAME:-fallback}\"\n";
    let config = load_with_env(text, &[("PORT", "9999")]).expect("valid");
    assert_eq!(config.http.listen.to_string(), "127.0.0.1:9999");
    assert_eq!(config.service.name, "fallback");
    let config =
        load_with_env(text, &[("PORT", "1"), ("BIND", "0.0.0.0"), ("NAME", "n")]).expect("valid");
    assert_eq!(config.http.listen.to_string(), "0.0.0.0:1");
    assert_eq!(config.service.name, "n");
}

#[test]
fn unset_variable_without_default_is_located() {
    let text = "[service]\nname = \"x\"\n\n[http]\nlisten = \"${NOT_SET_ANYWHERE}\"\n";
    check_error(
        text,
        5,
        1,
        &["`NOT_SET_ANYWHERE` is not set", "http.listen"],
    );
}

#[test]
fn env_overrides_replace_file_values_and_keep_string_types() {
    let text = format!(
        "{BASE}\n[service]\nname = \"file\"\n\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"orders\"\nqueue = \"orders\"\nprefetch = 10\n"
    );
    let config = load_with_env(
        &text,
        &[
            ("BOSUN__CONSUMERS__ORDERS__PREFETCH", "500"),
            ("BOSUN__SERVICE__NAME", "12345"),
            ("BOSUN__HTTP__LISTEN", "127.0.0.1:7000"),
        ],
    )
    .expect("valid");
    let consumer = &config.consumers["orders"];
    match &consumer.kind {
        bosun::config::ConsumerKind::Amqp(a) => assert_eq!(a.prefetch, 500),
        other => panic!("expected amqp, got {other:?}"),
    }
    // The file holds `name` as a string, so a numeric-looking override stays a string.
    assert_eq!(config.service.name, "12345");
    assert_eq!(config.http.listen.port(), 7000);
}

#[test]
fn bad_env_override_names_the_variable() {
    let text = format!(
        "{BASE}\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"orders\"\nqueue = \"orders\"\n"
    );
    let err = load_with_env(&text, &[("BOSUN__CONSUMERS__ORDERS__PREFETCH", "lots")])
        .expect_err("rejected");
    assert_eq!(
        err.problems[0].location,
        Location::Env("BOSUN__CONSUMERS__ORDERS__PREFETCH".into()),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("environment variable BOSUN__CONSUMERS__ORDERS__PREFETCH"),
        "{err}"
    );
}

#[test]
fn defaults_fill_a_minimal_consumer() {
    let text = format!(
        "{BASE}\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"orders\"\nqueue = \"orders\"\n\n[consumers.events]\nsource = \"cache\"\nhandler = \"orders\"\nstream = \"events\"\n"
    );
    let config = load(&text).expect("valid");
    let orders = &config.consumers["orders"];
    assert_eq!(orders.concurrency, 100);
    assert_eq!(orders.retry.max_attempts, 5);
    match &orders.kind {
        bosun::config::ConsumerKind::Amqp(a) => {
            assert_eq!(a.prefetch, 100);
            assert_eq!(
                a.dead_letter,
                bosun::config::AmqpDeadLetter::Queue("orders.dlq".into())
            );
            assert!(a.declare);
        }
        other => panic!("expected amqp, got {other:?}"),
    }
    match &config.consumers["events"].kind {
        bosun::config::ConsumerKind::Redis(r) => {
            assert_eq!(r.dead_letter_stream, "events:dlq");
            assert_eq!(r.group, "events");
            assert_eq!(r.block, std::time::Duration::from_secs(5));
        }
        other => panic!("expected redis, got {other:?}"),
    }
}

#[test]
fn check_command_exit_codes_and_output() {
    let good = ConfigFile::new(&format!(
        "{BASE}\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"orders\"\nqueue = \"orders\"\n"
    ));
    let path = good.path.to_string_lossy().into_owned();
    let (code, stdout, stderr) = bosun_output(&["check", "--config", &path], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    assert!(
        stdout.contains("consumer orders: amqp queue orders"),
        "{stdout}"
    );
    assert!(
        stdout.contains("amqp://guest:***@127.0.0.1"),
        "password must be masked: {stdout}"
    );

    let bad = ConfigFile::new("[service]\nshutdown_timeout = 30\n");
    let bad_path = bad.path.to_string_lossy().into_owned();
    let (code, _, stderr) = bosun_output(&["check", "--config", &bad_path], &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains(&format!("{bad_path}:2:1:")), "{stderr}");

    let (code, _, stderr) = bosun_output(&["check", "--config", "/nonexistent/bosun.toml"], &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("cannot read the config file"), "{stderr}");

    let (code, _, _) = bosun_output(&["check", "--no-such-flag"], &[]);
    assert_eq!(code, 64);
    let (code, stdout, _) = bosun_output(&["version"], &[]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("bosun "), "{stdout}");
}

#[test]
fn check_command_applies_env_overrides() {
    let file = ConfigFile::new("[http]\nlisten = \"${LISTEN_AT:-127.0.0.1:9090}\"\n");
    let path = file.path.to_string_lossy().into_owned();
    let (code, stdout, stderr) = bosun_output(
        &["check", "--config", &path],
        &[("LISTEN_AT", "127.0.0.1:4444")],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("http on 127.0.0.1:4444"), "{stdout}");
    let (code, stdout, stderr) = bosun_output(
        &["check", "--config", &path],
        &[("BOSUN__HTTP__LISTEN", "127.0.0.1:5555")],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("http on 127.0.0.1:5555"), "{stdout}");
}

#[test]
fn binary_truncated_and_huge_files_are_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = dir.path().join("binary.toml");
    std::fs::write(&binary, [0x5b, 0x73, 0xff, 0xfe, 0x00, 0x01]).expect("write");
    let (code, _, stderr) = bosun_output(&["check", "--config", &binary.to_string_lossy()], &[]);
    assert_eq!(code, 78);
    assert!(stderr.contains("not valid UTF-8"), "{stderr}");

    let truncated = dir.path().join("truncated.toml");
    std::fs::write(
        &truncated,
        "[brokers.rabbit]\nkind = \"amqp\"\nurl = \"amqp://gue",
    )
    .expect("write");
    let (code, _, stderr) = bosun_output(&["check", "--config", &truncated.to_string_lossy()], &[]);
    assert_eq!(code, 78);
    assert!(
        stderr.contains(":3:") && stderr.contains("invalid TOML"),
        "{stderr}"
    );

    let huge = dir.path().join("huge.toml");
    let line = "# padding padding padding padding padding padding padding padding padding\n";
    std::fs::write(&huge, line.repeat(10 * 1024 * 1024 / line.len() + 1)).expect("write");
    let (code, _, stderr) = bosun_output(&["check", "--config", &huge.to_string_lossy()], &[]);
    assert_eq!(code, 78);
    assert!(stderr.contains("larger than 4 MiB"), "{stderr}");
}

#[test]
fn example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/bosun.toml");
    let (code, stdout, stderr) = bosun_output(&["check", "--config", path], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("configuration is valid"));
    // Every handler is used and the outbox publishes to an exchange a consumer declares.
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn every_unknown_key_is_reported_with_the_keys_of_its_kind_and_a_suggestion() {
    let text = format!(
        "{BASE}\n[service]\nshutdown_timout = \"5s\"\n\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"orders\"\nqueue = \"q\"\nprefech = 10\nretry = {{ max_attempts = 0 }}\n\n[consumers.events]\nsource = \"cache\"\nhandler = \"orders\"\nstream = \"s\"\nclaim_idel = \"1m\"\n"
    );
    let err = load(&text).expect_err("rejected");
    let rendered = err.to_string();
    assert_eq!(err.problems.len(), 4, "{rendered}");
    let problem = |needle: &str| {
        err.problems
            .iter()
            .find(|p| p.message.contains(needle))
            .unwrap_or_else(|| panic!("no problem mentions {needle:?}: {rendered}"))
    };
    let line = |p: &bosun::config::ConfigProblem| match &p.location {
        Location::File(pos) => pos.line,
        other => panic!("{other:?}"),
    };

    let typo = problem("`shutdown_timout`");
    assert_eq!(line(typo), line_of(&text, "shutdown_timout"), "{rendered}");
    assert!(
        typo.message.contains("did you mean `shutdown_timeout`?"),
        "{rendered}"
    );

    // An amqp consumer is offered amqp keys only, and the closest one.
    let amqp = problem("`prefech`");
    assert_eq!(line(amqp), line_of(&text, "prefech"), "{rendered}");
    assert!(
        amqp.message.contains("did you mean `prefetch`?"),
        "{rendered}"
    );
    assert!(amqp.message.contains("`queue_type`"), "{rendered}");
    assert!(!amqp.message.contains("`claim_idle`"), "{rendered}");
    assert!(!amqp.message.contains("`stream`"), "{rendered}");

    // A redis consumer is offered redis keys only.
    let redis = problem("`claim_idel`");
    assert_eq!(line(redis), line_of(&text, "claim_idel"), "{rendered}");
    assert!(
        redis.message.contains("did you mean `claim_idle`?"),
        "{rendered}"
    );
    assert!(!redis.message.contains("`prefetch`"), "{rendered}");

    // The unknown keys do not hide the validation errors behind them.
    problem("must be at least 1 (1 means no retries)");
}

#[test]
fn unknown_key_far_from_every_name_gets_no_suggestion() {
    let text = "[service]\nzzzz = 1\n";
    let err = load(text).expect_err("rejected");
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(!err.to_string().contains("did you mean"), "{err}");
    assert!(err.to_string().contains("`log_format`"), "{err}");
}

#[test]
fn check_reports_missing_secrets_as_warnings_and_strict_makes_them_errors() {
    let var = support::unique("BOSUN_TEST_UNSET").to_uppercase();
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\n[http.admin]\ntoken_env = \"{var}_ADMIN\"\n\n[databases.main]\nurl = \"${{{var}_DB}}\"\n\n[handlers.hook]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/hook\"\ntoken_env = \"{var}_HOOK\"\n\n[brokers.cache]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\n\n[consumers.events]\nsource = \"cache\"\nhandler = \"hook\"\nstream = \"s\"\n"
    );
    let file = ConfigFile::new(&text);
    let path = file.path.to_string_lossy().into_owned();

    let (code, stdout, stderr) = bosun_output(&["check", "--config", &path], &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    for (needle, line) in [
        (format!("`{var}_ADMIN`"), 5),
        (format!("`{var}_DB`"), 8),
        (format!("`{var}_HOOK`"), 13),
    ] {
        let warning = stderr
            .lines()
            .find(|l| l.contains(&needle))
            .unwrap_or_else(|| panic!("no warning names {needle}: {stderr}"));
        assert!(
            warning.starts_with(&format!("warning: {path}:{line}:")),
            "{warning}"
        );
    }
    // The unset URL is not also reported as an invalid URL.
    assert!(!stderr.contains("invalid URL"), "{stderr}");

    let (code, _, stderr) = bosun_output(&["check", "--strict", "--config", &path], &[]);
    assert_eq!(code, 78, "{stderr}");
    for name in ["_ADMIN", "_DB", "_HOOK"] {
        assert!(stderr.contains(&format!("`{var}{name}`")), "{stderr}");
    }

    // `bosun run` still refuses the file.
    let (code, _, stderr) = bosun_output(&["run", "--config", &path], &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains(&format!("`{var}_ADMIN`")), "{stderr}");
}

#[test]
fn check_warns_about_a_handler_nothing_uses() {
    let text = "[handlers.used]\nkind = \"noop\"\n\n[handlers.route]\nkind = \"route\"\nroutes = [{ routing_key = \"a.#\", handler = \"via_route\" }]\n\n[handlers.via_route]\nkind = \"log\"\n\n[handlers.forgotten]\nkind = \"log\"\n\n[brokers.cache]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\n\n[consumers.events]\nsource = \"cache\"\nhandler = \"used\"\nstream = \"s\"\n";
    let file = ConfigFile::new(text);
    let path = file.path.to_string_lossy().into_owned();
    let (code, stdout, stderr) = bosun_output(&["check", "--config", &path], &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    // `route` itself is unused; `via_route` is used by it; `forgotten` by nothing.
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("handler `forgotten` is not used")
                && w.starts_with(&format!("warning: {path}:11:"))),
        "{stderr}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("handler `route` is not used")),
        "{stderr}"
    );
}

#[test]
fn check_reports_an_outbox_exchange_no_consumer_declares_and_the_broker_lacks() {
    let exchange = support::unique("nowhere");
    let config = |destination: &str, url: &str, binding: &str| {
        format!(
            "[brokers.rabbit]\nkind = \"amqp\"\nurl = \"{url}\"\n\n[databases.main]\nurl = \"postgres://postgres@127.0.0.1:5432/test\"\n\n[handlers.h]\nkind = \"noop\"\n\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"h\"\nqueue = \"q\"\nbindings = [{{ exchange = \"{binding}\" }}]\n\n[outboxes.orders]\ndatabase = \"main\"\ntarget = \"rabbit\"\ndestination = \"{destination}\"\n\n[dead_letters.orders]\nsource = \"rabbit\"\nqueue = \"q.dlq\"\ndefault_action = \"drop\"\n\n[[dead_letters.orders.rules]]\naction = \"forward\"\nexchange = \"{destination}\"\n"
        )
    };
    let rabbit = support::RABBIT_URL;
    let line = |text: &str, needle: &str| line_of(text, needle);

    // Neither declared by a consumer nor present on the broker: an error at each key.
    let text = config(&exchange, rabbit, "shop");
    let file = ConfigFile::new(&text);
    let path = file.path.to_string_lossy().into_owned();
    let (code, stdout, stderr) = bosun_output(&["check", "--config", &path], &[]);
    assert_eq!(code, 78, "{stdout}\n{stderr}");
    let destination_line = line(&text, "destination =");
    let forward_line = line(&text, &format!("exchange = \"{exchange}\""));
    assert!(
        stderr.contains(&format!(
            "{path}:{destination_line}:1: outbox `orders` publishes to exchange `{exchange}`"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{path}:{forward_line}:")) && stderr.contains("`forward`"),
        "{stderr}"
    );
    assert!(stderr.contains("does not exist"), "{stderr}");

    // Declared by the consumer: nothing to say.
    let text = config(&exchange, rabbit, &exchange);
    file.rewrite(&text);
    let (code, stdout, stderr) = bosun_output(&["check", "--config", &path], &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    assert!(stdout.contains(&format!("exchange {exchange}")), "{stdout}");

    // Present on the broker though no consumer declares it: nothing to say.
    file.rewrite(&config("amq.topic", rabbit, "shop"));
    let (code, stdout, stderr) = bosun_output(&["check", "--config", &path], &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");

    // The broker cannot be asked: a warning that says so.
    file.rewrite(&config(
        &exchange,
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "shop",
    ));
    let (code, stdout, stderr) = bosun_output(&["check", "--config", &path], &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("could not be asked"),
        "{stderr}"
    );
}

#[test]
fn trim_takes_maxlen_or_max_age_on_redis_consumers_only() {
    let redis = |trim: &str| {
        format!(
            "{BASE}\n[consumers.events]\nsource = \"cache\"\nhandler = \"orders\"\nstream = \"s\"\n{trim}\n"
        )
    };
    let config = load(&redis(
        "trim = { maxlen = 1000 }\ndead_letter = { trim = { max_age = \"7d\", interval = \"10s\" } }",
    ))
    .expect("valid");
    match &config.consumers["events"].kind {
        bosun::config::ConsumerKind::Redis(r) => {
            let stream = r.trim.stream.as_ref().expect("stream trim");
            assert_eq!(stream.limit, bosun::config::TrimLimit::MaxLen(1000));
            assert_eq!(stream.interval, std::time::Duration::from_secs(60));
            let dl = r.trim.dead_letter.as_ref().expect("dead-letter trim");
            assert_eq!(
                dl.limit,
                bosun::config::TrimLimit::MaxAge(std::time::Duration::from_secs(7 * 86400))
            );
            assert_eq!(dl.interval, std::time::Duration::from_secs(10));
        }
        other => panic!("{other:?}"),
    }
    // Off by default.
    let config = load(&redis("")).expect("valid");
    match &config.consumers["events"].kind {
        bosun::config::ConsumerKind::Redis(r) => assert_eq!(r.trim, Default::default()),
        other => panic!("{other:?}"),
    }
    let text = redis("trim = { maxlen = 10, max_age = \"1d\" }");
    check_error(
        &text,
        line_of(&text, "trim ="),
        1,
        &["give `maxlen`", "consumers.events.trim"],
    );
    let text = redis("trim = { maxlen = 0 }");
    check_error(
        &text,
        line_of(&text, "trim ="),
        10,
        &["must be at least 1", "trim.maxlen"],
    );
    let text = format!(
        "{BASE}\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"orders\"\nqueue = \"q\"\ntrim = {{ maxlen = 10 }}\n"
    );
    check_error(
        &text,
        line_of(&text, "trim ="),
        1,
        &["`trim` is for redis consumers"],
    );
}

#[test]
fn consumer_delivery_limits_default_and_parse_and_are_amqp_only() {
    use bosun::config::{ConsumerKind, DeliveryLimits};
    let limits = |extra: &str| {
        let text = format!(
            "{BASE}\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"orders\"\nqueue = \"q\"\n{extra}"
        );
        match load(&text)
            .expect("valid")
            .consumers
            .get("orders")
            .map(|c| &c.kind)
        {
            Some(ConsumerKind::Amqp(a)) => a.limits,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(limits(""), DeliveryLimits::default());
    assert_eq!(limits("").max_message_size, 1 << 20);
    assert_eq!(limits("").max_in_flight_bytes, 64 << 20);
    let set = limits("max_message_size = \"16MiB\"\nmax_in_flight_bytes = 1073741824\n");
    assert_eq!(
        (set.max_message_size, set.max_in_flight_bytes),
        (16 << 20, 1 << 30)
    );

    let text = format!(
        "{BASE}\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"orders\"\nqueue = \"q\"\nmax_message_size = \"1 MB\"\n"
    );
    check_error(
        &text,
        line_of(&text, "1 MB"),
        1,
        &["invalid size", "consumers.orders.max_message_size"],
    );
    let text = format!(
        "{BASE}\n[consumers.events]\nsource = \"cache\"\nhandler = \"orders\"\nstream = \"s\"\nmax_in_flight_bytes = \"1MiB\"\n"
    );
    check_error(
        &text,
        line_of(&text, "max_in_flight_bytes"),
        1,
        &["is for amqp consumers"],
    );
}

#[test]
fn attempt_header_names_a_legacy_retry_count_header_and_is_checked() {
    let consumer = |value: &str| {
        format!(
            "{BASE}\n[consumers.orders]\nsource = \"rabbit\"\nhandler = \"orders\"\nqueue = \"q\"\nattempt_header = {value}\n"
        )
    };
    let config = load(&consumer("\"x-retry-count\"")).expect("a legacy header is accepted");
    match &config.consumers["orders"].kind {
        bosun::config::ConsumerKind::Amqp(amqp) => {
            assert_eq!(amqp.attempt_header.as_deref(), Some("x-retry-count"))
        }
        other => panic!("not an amqp consumer: {other:?}"),
    }
    let long = format!("\"{}\"", "x".repeat(256));
    for (value, needle) in [
        ("\"\"", "must name a header"),
        ("\"  \"", "must name a header"),
        (long.as_str(), "longer than 255 bytes"),
        ("\"x retry count\"", "whitespace or control characters"),
        ("\"bosun-attempt\"", "one of bosun's own headers"),
        ("\"Bosun-Error\"", "one of bosun's own headers"),
        ("\"x-death\"", "the broker's dead-letter history"),
        (
            "\"x-first-death-queue\"",
            "the broker's dead-letter history",
        ),
        ("3", "invalid type"),
    ] {
        let text = consumer(value);
        check_error(
            &text,
            line_of(&text, "attempt_header"),
            1,
            &[needle, "consumers.orders.attempt_header"],
        );
    }
    let text = format!(
        "{BASE}\n[consumers.events]\nsource = \"cache\"\nhandler = \"orders\"\nstream = \"s\"\nattempt_header = \"x-retry-count\"\n"
    );
    check_error(
        &text,
        line_of(&text, "attempt_header"),
        1,
        &["`attempt_header` is for amqp consumers"],
    );
}
