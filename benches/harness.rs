//! The benchmark harness: `cargo bench --bench harness -- [CASE...]`.
//!
//! Each case measures bosun against a bare loop on the same services and prints a row:
//! throughput of both, their ratio and bosun's peak RSS. Cases and their figures are
//! described in BENCHMARKS.md. With no arguments every case runs.

mod cases;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let all = cases::all();
    let selected: Vec<&cases::Case> = if args.is_empty() {
        all.iter().collect()
    } else {
        let unknown: Vec<&String> = args
            .iter()
            .filter(|a| !all.iter().any(|c| c.name == a.as_str()))
            .collect();
        if !unknown.is_empty() {
            let names: Vec<&str> = all.iter().map(|c| c.name).collect();
            eprintln!("unknown case(s) {unknown:?}; cases: {}", names.join(", "));
            std::process::exit(64);
        }
        all.iter()
            .filter(|c| args.iter().any(|a| a == c.name))
            .collect()
    };
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
    let mut failed = false;
    for case in selected {
        println!("== {} ==", case.name);
        match rt.block_on((case.run)()) {
            Ok(report) => println!("{report}"),
            Err(e) => {
                failed = true;
                println!("case {} failed: {e:#}", case.name);
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
