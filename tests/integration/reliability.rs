//! The contract under faults, reduced for CI: every scenario of `checker::plans` at its
//! smallest size, through the real `bosun` binary. Lost and unexpected must be 0, and so
//! must duplicated effects in the scenarios with an inbox.
//! The full set (larger, with broker restarts) is `cargo bench --bench reliability`, which
//! writes RELIABILITY.md. `RELIABILITY_ONLY=<text>` runs only the scenarios whose name
//! contains the text.

use crate::checker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_handled_or_dead_lettered_under_faults() {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_bosun"));
    let mut rows = Vec::new();
    let mut with_inbox = Vec::new();
    let only = std::env::var("RELIABILITY_ONLY").unwrap_or_default();
    for plan in checker::plans(1, false)
        .into_iter()
        .filter(|p| p.name.contains(&only))
    {
        let row = checker::scenarios::run(bin, &plan).await;
        eprintln!("{}: {:?}", plan.name, row);
        if plan.inbox {
            with_inbox.push(row.scenario.clone());
        }
        rows.push(row);
    }
    let table = checker::table(&rows);
    eprintln!("{table}");
    for row in &rows {
        assert!(
            row.ran,
            "scenario {} did not run: {}",
            row.scenario, row.note
        );
        assert!(row.messages > 0, "scenario {} sent nothing", row.scenario);
        assert_eq!(row.lost, 0, "{} lost messages\n{table}", row.scenario);
        assert_eq!(
            row.unexpected, 0,
            "{} had unexpected messages\n{table}",
            row.scenario
        );
        // An inbox whose handler completes its record in the effect's own transaction:
        // exactly one effect per message, whatever the fault.
        if with_inbox.contains(&row.scenario) {
            assert_eq!(
                row.duplicated, 0,
                "{}: duplicated effects with an inbox\n{table}",
                row.scenario
            );
        }
        assert_eq!(
            row.misplaced, 0,
            "{}: bad input outside its documented place\n{table}",
            row.scenario
        );
    }
}
