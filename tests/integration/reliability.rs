//! The contract under faults, reduced for CI: every scenario of `checker::plans` at its
//! smallest size, through the real `bosun` binary. Lost and unexpected must be 0.
//! The full set (larger, with broker restarts) is `cargo bench --bench reliability`, which
//! writes RELIABILITY.md. `RELIABILITY_ONLY=<text>` runs only the scenarios whose name
//! contains the text.

use crate::checker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_handled_or_dead_lettered_under_faults() {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_bosun"));
    let mut rows = Vec::new();
    let only = std::env::var("RELIABILITY_ONLY").unwrap_or_default();
    for plan in checker::plans(1, false)
        .into_iter()
        .filter(|p| p.name.contains(&only))
    {
        let row = checker::scenarios::run(bin, &plan).await;
        eprintln!("{}: {:?}", plan.name, row);
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
        assert_eq!(
            row.misplaced, 0,
            "{}: bad input outside its documented place\n{table}",
            row.scenario
        );
    }
}
