//! The shipped artifacts (Dockerfile, docker-compose.yml, deploy/) checked against the
//! repository: the Dockerfile's build steps replayed in a scratch directory, every path they
//! name present, every bosun command line they run accepted by the binary, the systemd units
//! verified by systemd-analyze and the Kubernetes manifests validated against the Kubernetes
//! JSON schemas.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn bosun_bin() -> &'static str {
    env!("CARGO_BIN_EXE_bosun")
}

/// True when a missing tool must fail the test rather than skip it: CI installs every tool
/// these tests use (.ci/run).
fn tools_required() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// Skips (printing why) where a tool is missing, except under CI, where it fails.
fn missing_tool(what: &str) {
    assert!(!tools_required(), "{what} is missing; .ci/run installs it");
    println!("skipped: {what} is not installed (.ci/run installs it)");
}

/// Every YAML document of `path`, as JSON values (PyYAML does the parsing: the repository's
/// manifests use anchors and merge keys).
fn yaml_documents(path: &Path) -> Option<Vec<Value>> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1], encoding='utf-8')) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("ModuleNotFoundError") && !stderr.contains("No module named"),
            "python3 cannot import yaml: {stderr}"
        );
        panic!("{} is not valid YAML: {stderr}", path.display());
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn python_yaml_available() -> bool {
    Command::new("python3")
        .args(["-c", "import yaml"])
        .output()
        .is_ok_and(|o| o.status.success())
}

// ---------------------------------------------------------------------------------------
// Dockerfile

/// One Dockerfile instruction, continuation lines joined, comments dropped.
#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

fn dockerfile() -> Vec<Instruction> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("read Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let full = std::mem::take(&mut current);
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_owned(),
        });
    }
    assert!(
        current.is_empty(),
        "Dockerfile ends inside a continued line"
    );
    out
}

/// The instructions of the stage `FROM ... AS name`.
fn stage(instructions: &[Instruction], name: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut inside = false;
    for i in instructions {
        if i.keyword == "FROM" {
            let words: Vec<&str> = i.args.split_whitespace().collect();
            inside = words.len() >= 3
                && words[words.len() - 2].eq_ignore_ascii_case("as")
                && words[words.len() - 1] == name;
            continue;
        }
        if inside {
            out.push(i.clone());
        }
    }
    assert!(!out.is_empty(), "the Dockerfile has no stage named {name}");
    out
}

/// `COPY [--flag=...] SRC... DEST` as (flags, sources, destination).
fn copy_parts(args: &str) -> (Vec<String>, Vec<String>, String) {
    let words: Vec<String> = if args.starts_with('[') {
        serde_json::from_str(args).expect("COPY in JSON form")
    } else {
        args.split_whitespace().map(str::to_owned).collect()
    };
    let (flags, rest): (Vec<String>, Vec<String>) =
        words.into_iter().partition(|w| w.starts_with("--"));
    let (dest, sources) = rest.split_last().expect("COPY needs a destination");
    (flags, sources.to_vec(), dest.clone())
}

/// .dockerignore's patterns, as a test of a path relative to the build context. Only the
/// forms the file uses are understood: a name or directory (`target/`), and `**/*.ext`.
fn docker_ignored() -> impl Fn(&Path) -> bool {
    let text = std::fs::read_to_string(repo().join(".dockerignore")).unwrap_or_default();
    let patterns: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    for p in &patterns {
        assert!(
            !p.starts_with('!') && (!p.contains('*') || p.starts_with("**/*.")),
            ".dockerignore pattern {p:?} is not understood by this test; extend docker_ignored()"
        );
    }
    move |rel: &Path| {
        let rel_str = rel.to_string_lossy();
        patterns.iter().any(|p| match p.strip_prefix("**/*") {
            Some(ext) => rel_str.ends_with(ext),
            None => rel_str == p.as_str() || rel_str.starts_with(&format!("{p}/")),
        })
    }
}

fn copy_tree(from: &Path, to: &Path, rel: &Path, ignored: &dyn Fn(&Path) -> bool) {
    if ignored(rel) {
        return;
    }
    let meta = std::fs::metadata(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    if meta.is_dir() {
        std::fs::create_dir_all(to).expect("create dir");
        for entry in std::fs::read_dir(from).expect("read dir") {
            let entry = entry.expect("dir entry");
            let name = entry.file_name();
            copy_tree(&entry.path(), &to.join(&name), &rel.join(&name), ignored);
        }
    } else {
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
}

/// Docker's COPY: a directory's contents go into the destination; files go into it when it
/// ends in `/` (or is `.`), else become it.
fn replay_copy(
    sources: &[String],
    dest: &Path,
    dest_is_dir: bool,
    ignored: &dyn Fn(&Path) -> bool,
) {
    for source in sources {
        let rel = Path::new(source.trim_start_matches("./"));
        let from = repo().join(rel);
        assert!(
            from.exists(),
            "COPY source {source} does not exist in the repository"
        );
        if from.is_dir() {
            copy_tree(
                &from,
                dest,
                if source == "." { Path::new("") } else { rel },
                ignored,
            );
        } else {
            let target = if dest_is_dir {
                std::fs::create_dir_all(dest).expect("create COPY destination");
                dest.join(from.file_name().expect("file name"))
            } else {
                dest.to_path_buf()
            };
            std::fs::copy(&from, &target).expect("COPY a file");
        }
    }
}

/// The target directory the replayed builds share with this test run, so dependencies
/// already built are not built again.
fn shared_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// Runs one `cargo build ...` of a RUN line as the equivalent `cargo check`: the same
/// manifest, lock file and sources, without spending minutes on a release build.
fn replay_cargo(words: &[&str], dir: &Path, env: &BTreeMap<String, String>, step: &str) {
    assert_eq!(words.first(), Some(&"cargo"));
    assert!(
        matches!(words.get(1), Some(&"build")),
        "unexpected cargo command in the Dockerfile: {step}"
    );
    let mut args: Vec<&str> = vec!["check", "--offline", "--message-format", "short"];
    for w in &words[2..] {
        if *w != "--release" {
            args.push(w);
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(&args)
        .current_dir(dir)
        .envs(env)
        .env("CARGO_TARGET_DIR", shared_target_dir())
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "the Dockerfile step `{step}` fails (replayed as `cargo {}`):\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dockerfile_build_stage_builds_with_the_real_manifest() {
    let instructions = dockerfile();
    let build = stage(&instructions, "build");
    let scratch = tempfile::tempdir().expect("tempdir");
    let ignored = docker_ignored();
    let mut workdir = scratch.path().to_path_buf();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut cargo_runs = 0;
    let mut installed_binary = None;

    for i in &build {
        match i.keyword.as_str() {
            "WORKDIR" => {
                workdir = scratch.path().join(i.args.trim_start_matches('/'));
                std::fs::create_dir_all(&workdir).expect("WORKDIR");
            }
            "ENV" => {
                for pair in i.args.split_whitespace() {
                    if let Some((k, v)) = pair.split_once('=') {
                        env.insert(k.to_owned(), v.trim_matches('"').to_owned());
                    }
                }
            }
            "COPY" => {
                let (flags, sources, dest) = copy_parts(&i.args);
                assert!(
                    flags.iter().all(|f| !f.starts_with("--from")),
                    "the build stage copies from another stage: {}",
                    i.args
                );
                let dest_is_dir = dest.ends_with('/') || dest == "." || sources.len() > 1;
                let dest_path = if dest.starts_with('/') {
                    scratch.path().join(dest.trim_start_matches('/'))
                } else {
                    workdir.join(&dest)
                };
                replay_copy(&sources, &dest_path, dest_is_dir, &ignored);
            }
            "RUN" => {
                for step in i.args.split("&&").map(str::trim) {
                    let words: Vec<&str> = step.split_whitespace().collect();
                    match words.first().copied() {
                        // Packages of the build image, not of the repository.
                        Some("apt-get") => {}
                        Some("cargo") => {
                            replay_cargo(&words, &workdir, &env, step);
                            cargo_runs += 1;
                        }
                        // `install -m 0755 target/release/bosun /usr/local/bin/bosun`
                        Some("install") => {
                            installed_binary = words
                                .iter()
                                .find(|w| w.starts_with("target/"))
                                .map(|w| w.to_string());
                        }
                        // The freshly installed binary's self-check.
                        Some(cmd) if cmd.ends_with("/bosun") => {
                            let args: Vec<String> =
                                words[1..].iter().map(|w| w.to_string()).collect();
                            assert_bosun_command("Dockerfile build stage", &args);
                        }
                        Some("rm") if step.contains("/var/lib/apt") => {}
                        _ => {
                            let status = Command::new("sh")
                                .args(["-ec", step])
                                .current_dir(&workdir)
                                .status()
                                .expect("run sh");
                            assert!(status.success(), "the Dockerfile step `{step}` fails");
                        }
                    }
                }
            }
            _ => {}
        }
    }
    assert_eq!(
        cargo_runs, 2,
        "expected the dependency layer's build and the real build"
    );
    assert_eq!(
        installed_binary.as_deref(),
        Some("target/release/bosun"),
        "the build stage installs the binary cargo builds"
    );
}

#[test]
fn dockerfile_copies_only_what_exists() {
    let ignored = docker_ignored();
    for i in dockerfile().iter().filter(|i| i.keyword == "COPY") {
        let (flags, sources, _) = copy_parts(&i.args);
        if flags.iter().any(|f| f.starts_with("--from")) {
            continue;
        }
        for source in sources {
            let rel = Path::new(source.trim_start_matches("./"));
            assert!(
                repo().join(rel).exists(),
                "Dockerfile: COPY {source}: no such path in the repository"
            );
            assert!(
                source == "." || !ignored(rel),
                "Dockerfile: COPY {source}: excluded from the build context by .dockerignore"
            );
        }
    }
}

/// Exit status of `bosun ARGS --help`: clap parses every argument before it, so an unknown
/// command or flag fails while a valid command line prints its help and exits 0.
fn accepted_by_bosun(args: &[String]) -> Result<(), String> {
    let out = Command::new(bosun_bin())
        .args(args)
        .arg("--help")
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn assert_bosun_command(origin: &str, args: &[String]) {
    // Shell variables stand for values, which clap takes as they are.
    if let Err(e) = accepted_by_bosun(args) {
        panic!(
            "{origin}: `bosun {}` is not a bosun command line:\n{e}",
            args.join(" ")
        );
    }
}

/// The bosun command lines inside a shell command (`bosun a && bosun b`).
fn bosun_in_shell(script: &str) -> Vec<Vec<String>> {
    script
        .split(['\n', ';'])
        .flat_map(|l| l.split("&&"))
        .flat_map(|l| l.split("||"))
        .filter_map(|part| {
            let mut words = part.split_whitespace();
            let first = words.next()?;
            (first == "bosun" || first.ends_with("/bosun"))
                .then(|| words.map(str::to_owned).collect())
        })
        .collect()
}

fn string_list(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// The bosun command line an exec-form command runs, given the entrypoint in front of it.
fn exec_form_bosun(entrypoint: &[String], command: &[String]) -> Option<Vec<String>> {
    let full: Vec<String> = entrypoint.iter().chain(command).cloned().collect();
    let at = full
        .iter()
        .position(|w| w == "bosun" || w.ends_with("/bosun"))?;
    Some(full[at + 1..].to_vec())
}

#[test]
fn dockerfile_commands_are_bosun_commands() {
    let instructions = dockerfile();
    let runtime = stage(&instructions, "runtime");
    let exec_form = |args: &str| -> Vec<String> {
        serde_json::from_str(args).unwrap_or_else(|_| panic!("not exec form: {args}"))
    };
    let entrypoint = runtime
        .iter()
        .find(|i| i.keyword == "ENTRYPOINT")
        .map(|i| exec_form(&i.args))
        .expect("ENTRYPOINT");
    let cmd = runtime
        .iter()
        .find(|i| i.keyword == "CMD")
        .map(|i| exec_form(&i.args))
        .expect("CMD");
    let run = exec_form_bosun(&entrypoint, &cmd).expect("the entrypoint runs bosun");
    assert_bosun_command("Dockerfile ENTRYPOINT + CMD", &run);

    let healthcheck = runtime
        .iter()
        .find(|i| i.keyword == "HEALTHCHECK")
        .expect("HEALTHCHECK");
    let (_, command) = healthcheck
        .args
        .split_once("CMD ")
        .expect("HEALTHCHECK CMD");
    let probe =
        exec_form_bosun(&[], &exec_form(command.trim())).expect("the health check runs bosun");
    assert_bosun_command("Dockerfile HEALTHCHECK", &probe);

    // Every COPY --from names a stage of this file; every other source is in the repository.
    for i in runtime.iter().filter(|i| i.keyword == "COPY") {
        let (flags, _, _) = copy_parts(&i.args);
        for f in flags {
            if let Some(from) = f.strip_prefix("--from=") {
                let _ = stage(&instructions, from);
            }
        }
    }
}

#[test]
fn compose_paths_and_commands_exist() {
    if !python_yaml_available() {
        missing_tool("python3 with PyYAML");
        return;
    }
    let docs = yaml_documents(&repo().join("docker-compose.yml")).expect("parse compose file");
    let compose = &docs[0];
    let services = compose["services"].as_object().expect("services");
    let mut bosun_commands = 0;
    for (name, service) in services {
        // Build contexts hold a Dockerfile.
        if let Some(build) = service.get("build") {
            let context = build
                .as_str()
                .or_else(|| build["context"].as_str())
                .unwrap_or(".");
            let dockerfile = build["dockerfile"].as_str().unwrap_or("Dockerfile");
            assert!(
                repo().join(context).join(dockerfile).is_file(),
                "compose service {name}: build context {context} has no {dockerfile}"
            );
        }
        // Bind mounts name files of the repository.
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let Some(spec) = volume.as_str() else {
                continue;
            };
            let host = spec.split(':').next().unwrap_or_default();
            if host.starts_with("./") || host.starts_with('/') || host.starts_with("..") {
                assert!(
                    repo().join(host).exists(),
                    "compose service {name}: volume source {host} does not exist"
                );
            }
        }
        // Commands of services built from this repository's image run bosun.
        let runs_bosun = service.get("build").is_some()
            || service["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("bosun"));
        if !runs_bosun {
            continue;
        }
        let entrypoint = string_list(&service["entrypoint"]);
        let command = string_list(&service["command"]);
        let mut lines = Vec::new();
        if entrypoint.first().is_some_and(|e| e.ends_with("sh"))
            && entrypoint.get(1).is_some_and(|f| f == "-c")
        {
            for script in &command {
                lines.extend(bosun_in_shell(script));
            }
        } else if entrypoint.is_empty() {
            // The image's own entrypoint: tini -- bosun.
            lines.push(if command.is_empty() {
                vec!["run".to_owned()]
            } else {
                command.clone()
            });
        }
        let test = string_list(&service["healthcheck"]["test"]);
        if test.first().is_some_and(|t| t == "CMD")
            && let Some(probe) = exec_form_bosun(&[], &test[1..])
        {
            lines.push(probe);
        }
        if test.first().is_some_and(|t| t == "CMD-SHELL") {
            for script in &test[1..] {
                lines.extend(bosun_in_shell(script));
            }
        }
        for line in lines {
            assert_bosun_command(&format!("docker-compose.yml service {name}"), &line);
            bosun_commands += 1;
        }
    }
    assert!(
        bosun_commands >= 3,
        "expected the migrate command, the daemon and its health check in the compose file"
    );
}

#[test]
fn accepted_by_bosun_refuses_unknown_commands_and_flags() {
    assert!(accepted_by_bosun(&["outbox".into(), "migrate".into()]).is_ok());
    assert!(accepted_by_bosun(&["probe".into(), "--timeout".into(), "4s".into()]).is_ok());
    assert!(accepted_by_bosun(&["outbox".into(), "migrat".into()]).is_err());
    assert!(accepted_by_bosun(&["probe".into(), "--no-such-flag".into()]).is_err());
}

// ---------------------------------------------------------------------------------------
// systemd

fn systemd_version() -> Option<u32> {
    let out = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// `systemd-analyze verify` of the unit (with `drop_in`, if given) installed in a scratch
/// unit directory, the binary path pointed at the one cargo built. Returns what it reported
/// about the unit's own files (its complaints about the host's units are not ours).
fn verify_unit(unit: &str, drop_in: Option<&str>) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit_path = dir.path().join("bosun.service");
    std::fs::write(
        &unit_path,
        unit.replace("/usr/local/bin/bosun", bosun_bin()),
    )
    .expect("write unit");
    if let Some(drop_in) = drop_in {
        let d = dir.path().join("bosun.service.d");
        std::fs::create_dir_all(&d).expect("drop-in dir");
        std::fs::write(d.join("notify-reload.conf"), drop_in).expect("write drop-in");
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        // A trailing ':' keeps the built-in search path after ours.
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .output()
        .expect("run systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = dir.path().to_string_lossy().into_owned();
    let mut problems: Vec<String> = text
        .lines()
        .filter(|l| l.contains(&ours) || l.contains("bosun"))
        .map(str::to_owned)
        .collect();
    if !out.status.success() {
        problems.push(format!(
            "systemd-analyze verify exited with {}: {text}",
            out.status
        ));
    }
    problems
}

fn systemd_file(rel: &str) -> String {
    std::fs::read_to_string(repo().join("deploy/systemd").join(rel))
        .unwrap_or_else(|e| panic!("deploy/systemd/{rel}: {e}"))
}

#[test]
fn systemd_unit_verifies_on_systemd_247_and_later() {
    let unit = systemd_file("bosun.service");
    assert!(
        !unit.lines().any(|l| l.trim() == "Type=notify-reload"),
        "bosun.service must not need systemd 253: Type=notify-reload belongs in the drop-in"
    );
    assert!(unit.lines().any(|l| l.trim() == "Type=notify"));
    assert!(
        unit.lines()
            .any(|l| l.trim() == "ExecReload=/bin/kill -HUP $MAINPID"),
        "Type=notify needs ExecReload to send SIGHUP"
    );
    // The bosun command lines the unit runs exist.
    for line in unit.lines() {
        let line = line.trim();
        if line.starts_with("ExecStart") {
            let (_, command) = line.split_once('=').expect("key=value");
            let args: Vec<String> = command
                .split_whitespace()
                .skip(1)
                .map(|w| w.replace("${BOSUN_CONFIG}", "/etc/bosun/bosun.toml"))
                .collect();
            assert_bosun_command(&format!("bosun.service {line}"), &args);
        }
    }
    if systemd_version().is_none() {
        missing_tool("systemd-analyze");
        return;
    }
    let problems = verify_unit(&unit, None);
    assert!(
        problems.is_empty(),
        "systemd-analyze verify bosun.service:\n{}",
        problems.join("\n")
    );
}

#[test]
fn systemd_notify_reload_drop_in_verifies_where_supported() {
    let unit = systemd_file("bosun.service");
    let drop_in = systemd_file("bosun.service.d/notify-reload.conf");
    assert!(drop_in.lines().any(|l| l.trim() == "Type=notify-reload"));
    assert!(
        drop_in.lines().any(|l| l.trim() == "ExecReload="),
        "the drop-in resets ExecReload so a reload sends one SIGHUP, not two"
    );
    let Some(version) = systemd_version() else {
        missing_tool("systemd-analyze");
        return;
    };
    let problems = verify_unit(&unit, Some(&drop_in));
    if version >= 253 {
        assert!(
            problems.is_empty(),
            "systemd-analyze verify with the drop-in:\n{}",
            problems.join("\n")
        );
    } else {
        // This systemd predates notify-reload: the type is its only complaint.
        let other: Vec<&String> = problems
            .iter()
            .filter(|p| !p.contains("Failed to parse service type, ignoring: notify-reload"))
            .collect();
        assert!(
            other.is_empty(),
            "systemd {version} finds more than the unsupported type in the drop-in:\n{other:?}"
        );
        assert!(
            !problems.is_empty(),
            "systemd {version} was expected to reject notify-reload"
        );
    }
}

#[test]
fn systemd_verify_reports_a_broken_unit() {
    if systemd_version().is_none() {
        missing_tool("systemd-analyze");
        return;
    }
    let broken = systemd_file("bosun.service").replace("[Service]", "[Service]\nRestartt=always");
    let problems = verify_unit(&broken, None);
    assert!(
        problems.iter().any(|p| p.contains("Restartt")),
        "a misspelt key must be reported: {problems:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Kubernetes

fn kubernetes_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// The API groups whose kinds come from add-ons (Prometheus Operator, KEDA, kustomize), for
/// which the Kubernetes schemas have nothing. Their manifests are checked by other means
/// (the PrometheusRule by the metrics test and promtool).
const ADD_ON_GROUPS: &[&str] = &[
    "monitoring.coreos.com/",
    "keda.sh/",
    "kustomize.config.k8s.io/",
];

fn kubernetes_validate_available() -> bool {
    Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `kubernetes-validate --strict` (unknown fields are errors) of `files`: Ok, or what it
/// reported. A kind it has no schema for is an error unless its API group is an add-on's.
fn validate_manifests(files: &[PathBuf]) -> Result<(), String> {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .args(files)
        .output()
        .map_err(|e| e.to_string())?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !(l.contains("Couldn't find schema")
                && ADD_ON_GROUPS
                    .iter()
                    .any(|g| l.contains(&format!("api version {g}"))))
        })
        .collect();
    if out.status.success() && problems.is_empty() {
        Ok(())
    } else {
        Err(format!("exit {}: {}", out.status, problems.join("\n")))
    }
}

fn kustomization_resources() -> Vec<PathBuf> {
    let docs = yaml_documents(&kubernetes_dir().join("kustomization.yaml")).expect("kustomization");
    docs[0]["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| kubernetes_dir().join(r.as_str().expect("resource path")))
        .collect()
}

#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    if !python_yaml_available() {
        missing_tool("python3 with PyYAML");
        return;
    }
    let resources = kustomization_resources();
    for r in &resources {
        assert!(
            r.is_file(),
            "kustomization.yaml lists {} which does not exist",
            r.display()
        );
    }
    // Every manifest in the directory is applied by the kustomization.
    for entry in std::fs::read_dir(kubernetes_dir()).expect("read deploy/kubernetes") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                resources.contains(&path),
                "kustomization.yaml does not list {name}"
            );
        }
    }
    if !kubernetes_validate_available() {
        missing_tool("kubernetes-validate (pip install kubernetes-validate)");
        return;
    }
    let mut files = resources.clone();
    files.push(kubernetes_dir().join("kustomization.yaml"));
    if let Err(e) = validate_manifests(&files) {
        panic!("deploy/kubernetes does not validate:\n{e}");
    }

    // The validation can fail: a misspelt field and a wrong type are both refused.
    let deployment =
        std::fs::read_to_string(kubernetes_dir().join("deployment.yaml")).expect("deployment");
    let scratch = tempfile::tempdir().expect("tempdir");
    for (name, broken) in [
        (
            "misspelt.yaml",
            deployment.replacen("replicas:", "replica:", 1),
        ),
        (
            "wrong-type.yaml",
            deployment.replacen("replicas: 2", "replicas: two", 1),
        ),
        (
            "unknown-kind.yaml",
            deployment.replacen("kind: Deployment", "kind: Deploymnet", 1),
        ),
    ] {
        assert_ne!(
            broken, deployment,
            "{name}: the manifest changed shape; update this check"
        );
        let path = scratch.path().join(name);
        std::fs::write(&path, broken).expect("write broken manifest");
        assert!(
            validate_manifests(&[path]).is_err(),
            "kubernetes-validate accepted the broken manifest {name}"
        );
    }
}

/// The ConfigMap's bosun.toml.
fn configmap_config() -> String {
    let docs = yaml_documents(&kubernetes_dir().join("configmap.yaml")).expect("configmap");
    docs[0]["data"]["bosun.toml"]
        .as_str()
        .expect("data.bosun.toml")
        .to_owned()
}

#[test]
fn kubernetes_pods_migrate_the_tables_their_components_need() {
    if !python_yaml_available() {
        missing_tool("python3 with PyYAML");
        return;
    }
    let config: toml::Table = configmap_config()
        .parse()
        .expect("the ConfigMap's bosun.toml is TOML");
    let docs = yaml_documents(&kubernetes_dir().join("deployment.yaml")).expect("deployment");
    let pod = &docs[0]["spec"]["template"]["spec"];
    let init: Vec<Vec<String>> = pod["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| string_list(&c["args"]))
        .collect();
    let has_init = |cmd: &[&str]| {
        init.iter().any(|args| {
            args.iter()
                .map(String::as_str)
                .take(cmd.len())
                .eq(cmd.iter().copied())
        })
    };
    let table = |key: &str| {
        config
            .get(key)
            .and_then(|v| v.as_table())
            .cloned()
            .unwrap_or_default()
    };
    let migrates = |t: &toml::Value| t.get("migrate").and_then(|m| m.as_bool()) == Some(true);

    for (name, outbox) in &table("outboxes") {
        assert!(
            migrates(outbox) || has_init(&["outbox", "migrate"]),
            "outbox {name} has no migrate = true and no init container runs `bosun outbox migrate`: its relay never becomes ready"
        );
    }
    for (name, dl) in &table("dead_letters") {
        if dl.get("archive").is_some() {
            assert!(
                migrates(dl) || has_init(&["dlq", "migrate"]),
                "dead-letter processor {name} archives but nothing runs `bosun dlq migrate`: it never becomes ready"
            );
        }
    }

    // Every container's command line is a bosun command line (the image's entrypoint is
    // `tini -- bosun`).
    let containers = pod["containers"].as_array().into_iter().flatten();
    let inits = pod["initContainers"].as_array().into_iter().flatten();
    for c in containers.chain(inits) {
        assert!(
            c.get("command").is_none(),
            "{}: overrides the image's entrypoint",
            c["name"]
        );
        assert_bosun_command(
            &format!("deployment.yaml container {}", c["name"]),
            &string_list(&c["args"]),
        );
    }

    // And the file itself is a valid configuration (secrets only as placeholders).
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bosun.toml");
    std::fs::write(&path, configmap_config()).expect("write config");
    let out = Command::new(bosun_bin())
        .arg("check")
        .arg("--config")
        .arg(&path)
        .envs([
            ("RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            ("REDIS_URL", "redis://127.0.0.1:6379/"),
            ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
            ("WEBHOOK_URL", "http://127.0.0.1:9/messages"),
        ])
        .output()
        .expect("bosun check");
    assert!(
        out.status.success(),
        "bosun check refuses the ConfigMap's bosun.toml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replicas stop cleanly and keep their names: the grace period is above the ConfigMap's
/// `shutdown_timeout`, the Redis consumer name is the pod's name, and a PodDisruptionBudget
/// covers the Deployment's pods.
#[test]
fn kubernetes_replicas_drain_keep_their_names_and_are_evicted_one_at_a_time() {
    if !python_yaml_available() {
        missing_tool("python3 with PyYAML");
        return;
    }
    let config: toml::Table = configmap_config()
        .parse()
        .expect("the ConfigMap's bosun.toml is TOML");
    let shutdown = config
        .get("service")
        .and_then(|s| s.get("shutdown_timeout"))
        .and_then(|t| t.as_str())
        .map(|t| match t.strip_suffix('m') {
            Some(m) => Duration::from_secs(m.parse::<u64>().expect("minutes") * 60),
            None => Duration::from_secs(
                t.trim_end_matches('s')
                    .parse()
                    .expect("shutdown_timeout in s or m"),
            ),
        })
        .unwrap_or(Duration::from_secs(30));
    let docs = yaml_documents(&kubernetes_dir().join("deployment.yaml")).expect("deployment");
    let deployment = &docs[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace) > shutdown,
        "terminationGracePeriodSeconds {grace} is not above shutdown_timeout {shutdown:?}"
    );
    let bosun = pod["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "bosun"))
        .expect("the bosun container");
    let name_from_pod = bosun["env"].as_array().into_iter().flatten().any(|e| {
        e["name"] == "BOSUN_CONSUMER_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    });
    assert!(
        name_from_pod,
        "BOSUN_CONSUMER_NAME does not come from the pod's name"
    );
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let pdb = yaml_documents(&kubernetes_dir().join("poddisruptionbudget.yaml")).expect("pdb");
    let selector = pdb[0]["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(
            &labels[k], v,
            "the PodDisruptionBudget's {k} selects other pods"
        );
    }
    assert!(
        pdb[0]["spec"]["maxUnavailable"] == 1 || pdb[0]["spec"]["minAvailable"].is_number(),
        "the PodDisruptionBudget allows no or every eviction"
    );
}
