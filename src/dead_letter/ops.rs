//! Operations on the archive: list, groups, show, replay, purge. `bosun dlq` and
//! `/admin/dead-letters` both call these, so the two never disagree.
//!
//! A replay locks a batch of rows (`FOR UPDATE SKIP LOCKED`), publishes their copies with
//! confirms, marks the confirmed ones `replayed` and commits. A crash between the confirm and
//! the commit leaves the rows `archived`: the next replay sends them again (a duplicate,
//! never a loss).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

use super::archive::{self, ListFilter, Row, Selector, Summary, status};
use super::copy::{letter_from_row, replay_copy};
use super::publishers::PublisherSource;
use super::{DeadLetterError, metric};
use crate::config::Config;
use crate::publish::{OutgoingMessage, PublishError};

/// Rows locked and published per transaction.
const REPLAY_BATCH: i64 = 100;
/// The advisory-lock namespace of scheduled replays (one replica at a time per processor).
pub(crate) const REPLAY_LOCK: &str = "bosun.dead_letter.scheduled_replay";
/// Most ids one replay or purge may name: the work and the report stay bounded.
pub const MAX_IDS: usize = 10_000;
/// The statuses a replay takes rows from (those `archive::claim_for_replay` locks).
const REPLAYABLE: &[&str] = &[status::ARCHIVED, status::SCHEDULED, status::FAILED];
/// Upper bound on one batch's publish while its rows are locked.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// One archive table and the processors whose rows an operation covers.
#[derive(Clone)]
pub struct Target {
    pub pool: PgPool,
    pub table: String,
    pub processors: Vec<String>,
}

impl Target {
    /// The rows in `statuses` that `selector` picks: what a dry run of a replay or purge
    /// reports, read without locking.
    async fn preview(
        &self,
        selector: &Selector,
        statuses: &[&str],
    ) -> Result<Vec<Summary>, DeadLetterError> {
        archive::preview(
            &self.pool,
            &self.table,
            &self.processors,
            selector,
            statuses,
        )
        .await
    }
}

/// The shared implementation behind the CLI and the admin API.
#[derive(Clone)]
pub struct Ops {
    config: Arc<Config>,
    pools: BTreeMap<String, PgPool>,
    publishers: Arc<dyn PublisherSource>,
    /// A replay forgets its key in the inbox of the consumer it goes to.
    inboxes: crate::consumers::ReplayInboxes,
}

/// What a replay did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ReplayReport {
    pub dry_run: bool,
    /// Rows whose copies were confirmed and that are now `replayed`.
    pub replayed: Vec<i64>,
    /// Rows left as they were, with the reason.
    pub failed: Vec<Failed>,
    /// With `dry_run`: the rows that would be replayed.
    pub would_replay: Vec<Summary>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Failed {
    pub id: i64,
    pub error: String,
    /// The same replay fails the same way every time (no destination, not allowed, a row
    /// that cannot be read, a copy the broker refuses).
    #[serde(skip)]
    pub permanent: bool,
}

/// What a purge did (or would do).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PurgeReport {
    pub dry_run: bool,
    pub purged: Vec<i64>,
    pub would_purge: Vec<Summary>,
}

/// A row's replay copy: (row id, processor, the copy).
type ReplayCopy = (i64, String, OutgoingMessage);

impl Ops {
    pub fn new(
        config: Arc<Config>,
        pools: BTreeMap<String, PgPool>,
        publishers: Arc<dyn PublisherSource>,
    ) -> Self {
        Self {
            inboxes: crate::consumers::ReplayInboxes::new(&config, &pools),
            config,
            pools,
            publishers,
        }
    }

    /// The inboxes a replay forgets its key in.
    pub fn inboxes(&self) -> crate::consumers::ReplayInboxes {
        self.inboxes.clone()
    }

    /// The target of a replay or purge, once its selector is within bounds.
    fn selected_target(
        &self,
        processor: Option<&str>,
        selector: &Selector,
    ) -> Result<Target, DeadLetterError> {
        check_selector(processor, selector)?;
        self.target(processor)
    }

    /// The archive `processor` writes to, or, without one, the single archive table every
    /// archiving processor shares. Several tables need an explicit processor.
    pub fn target(&self, processor: Option<&str>) -> Result<Target, DeadLetterError> {
        let archiving = |name: &str| -> Result<(String, String), DeadLetterError> {
            let dl = self.config.dead_letters.get(name).ok_or_else(|| {
                DeadLetterError::Invalid(format!(
                    "no dead-letter processor `{name}` in the configuration"
                ))
            })?;
            let db = dl.archive.clone().ok_or_else(|| {
                DeadLetterError::Invalid(format!("dead-letter processor `{name}` has no archive"))
            })?;
            Ok((db, dl.table.clone()))
        };
        let mut tables: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        match processor {
            Some(name) => {
                tables
                    .entry(archiving(name)?)
                    .or_default()
                    .push(name.to_owned());
            }
            None => {
                for (name, dl) in &self.config.dead_letters {
                    if dl.archive.is_some() {
                        tables
                            .entry(archiving(name)?)
                            .or_default()
                            .push(name.clone());
                    }
                }
            }
        }
        let mut tables = tables.into_iter();
        let Some(((db, table), processors)) = tables.next() else {
            return Err(DeadLetterError::Invalid(
                "no dead-letter processor with an archive is configured".into(),
            ));
        };
        if tables.next().is_some() {
            return Err(DeadLetterError::Invalid(
                "dead-letter processors archive into different tables; choose one processor".into(),
            ));
        }
        let pool =
            self.pools.get(&db).cloned().ok_or_else(|| {
                DeadLetterError::Invalid(format!("database `{db}` is not defined"))
            })?;
        Ok(Target {
            pool,
            table,
            processors,
        })
    }

    pub async fn list(
        &self,
        processor: Option<&str>,
        filter: &ListFilter,
    ) -> Result<Vec<Summary>, DeadLetterError> {
        let t = self.target(processor)?;
        archive::list(&t.pool, &t.table, &t.processors, filter).await
    }

    pub async fn groups(
        &self,
        processor: Option<&str>,
    ) -> Result<Vec<archive::Group>, DeadLetterError> {
        let t = self.target(processor)?;
        archive::groups(&t.pool, &t.table, &t.processors).await
    }

    pub async fn show(&self, processor: Option<&str>, id: i64) -> Result<Row, DeadLetterError> {
        let t = self.target(processor)?;
        archive::show(&t.pool, &t.table, &t.processors, id)
            .await?
            .ok_or(DeadLetterError::NotFound(id))
    }

    pub async fn replay(
        &self,
        processor: Option<&str>,
        selector: &Selector,
        dry_run: bool,
    ) -> Result<ReplayReport, DeadLetterError> {
        if matches!(selector, Selector::Before(_)) {
            return Err(DeadLetterError::Invalid(
                "replay selects by ids, group or all".into(),
            ));
        }
        let t = self.selected_target(processor, selector)?;
        if dry_run {
            let rows = t.preview(selector, REPLAYABLE).await?;
            return Ok(ReplayReport {
                dry_run: true,
                would_replay: rows,
                ..ReplayReport::default()
            });
        }
        let mut report = ReplayReport::default();
        let mut skip: Vec<i64> = Vec::new();
        loop {
            let mut tx = t.pool.begin().await?;
            let rows = archive::claim_for_replay(
                &mut tx,
                &t.table,
                &t.processors,
                selector,
                &skip,
                REPLAY_BATCH,
            )
            .await?;
            let full = rows.len() as i64 == REPLAY_BATCH;
            if rows.is_empty() {
                break;
            }
            let outcome = self.publish_rows(&mut tx, &t.table, rows).await?;
            tx.commit().await?;
            count_replays(&outcome.replayed);
            report
                .replayed
                .extend(outcome.replayed.iter().map(|(id, _)| *id));
            skip.extend(outcome.failed.iter().map(|f| f.id));
            report.failed.extend(outcome.failed);
            if !full {
                break;
            }
        }
        if let Selector::Ids(ids) = selector {
            // Sets, not list scans: a long id list stays linear.
            let mut accounted: std::collections::HashSet<i64> = report
                .replayed
                .iter()
                .copied()
                .chain(report.failed.iter().map(|f| f.id))
                .collect();
            for id in ids {
                if accounted.insert(*id) {
                    report.failed.push(Failed {
                        id: *id,
                        error: "not found, or not archived (already replayed or purged)".into(),
                        permanent: true,
                    });
                }
            }
        }
        Ok(report)
    }

    /// Replays the scheduled rows of `processor` whose delay has passed. Returns how many
    /// were replayed. A row that fails is due again after a backoff, or ends `failed` with
    /// the reason, so it never holds up the rows behind it.
    pub async fn replay_due(&self, processor: &str) -> Result<usize, DeadLetterError> {
        let t = self.target(Some(processor))?;
        let mut total = 0;
        loop {
            let mut tx = t.pool.begin().await?;
            // One replica replays a processor's due rows at a time; the others skip the round.
            let key = format!("{}/{processor}", t.table);
            if !crate::database::try_singleton(&mut tx, REPLAY_LOCK, &key).await? {
                return Ok(total);
            }
            let rows = archive::claim_due(&mut tx, &t.table, processor, REPLAY_BATCH).await?;
            if rows.is_empty() {
                return Ok(total);
            }
            let full = rows.len() as i64 == REPLAY_BATCH;
            let outcome = self.publish_rows(&mut tx, &t.table, rows).await?;
            for f in &outcome.failed {
                archive::mark_replay_failed(&mut tx, &t.table, f.id, &f.error, f.permanent).await?;
            }
            tx.commit().await?;
            count_replays(&outcome.replayed);
            total += outcome.replayed.len();
            if !full {
                return Ok(total);
            }
        }
    }

    /// Publishes the replay copies of locked `rows`, then marks the confirmed ones replayed
    /// inside `tx` (the caller commits).
    async fn publish_rows(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        table: &str,
        rows: Vec<Row>,
    ) -> Result<PublishOutcome, DeadLetterError> {
        let mut outcome = PublishOutcome::default();
        // Rows grouped by broker and processor: each processor replays in its own format.
        let mut by_broker: BTreeMap<(String, String), Vec<ReplayCopy>> = BTreeMap::new();
        for row in rows {
            let broker = self
                .config
                .dead_letters
                .get(&row.details.processor)
                .map(|dl| dl.source.clone())
                .unwrap_or_else(|| row.details.broker.clone());
            let (kind, _) = match self
                .publishers
                .replay_publisher(&broker, &row.details.processor)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    outcome.failed.push(Failed {
                        id: row.id,
                        permanent: !e.is_transient(),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            // Only to what the row's processor serves, whatever the row's headers say.
            let allowed = self
                .config
                .dead_letters
                .get(&row.details.processor)
                .map(|dl| dl.replay_to.as_slice())
                .unwrap_or_default();
            let copy = letter_from_row(&row).and_then(|letter| replay_copy(kind, &letter, allowed));
            let copy = match copy {
                Ok(copy) => self
                    .inboxes
                    .forget(&copy)
                    .await
                    .map(|()| copy)
                    .map_err(Into::into),
                Err(e) => Err(e),
            };
            match copy {
                Ok(copy) => by_broker
                    .entry((broker, row.details.processor.clone()))
                    .or_default()
                    .push((row.id, row.details.processor.clone(), copy)),
                Err(e) => outcome.failed.push(Failed {
                    id: row.id,
                    permanent: !e.is_transient(),
                    error: e.to_string(),
                }),
            }
        }
        for ((broker, processor), items) in by_broker {
            // Copies to other brokers may be published already: an error from here on fails
            // these rows alone, never the transaction.
            let publisher = match self.publishers.replay_publisher(&broker, &processor).await {
                Ok((_, publisher)) => publisher,
                Err(e) => {
                    for (id, _, _) in items {
                        outcome.failed.push(Failed {
                            id,
                            permanent: !e.is_transient(),
                            error: e.to_string(),
                        });
                    }
                    continue;
                }
            };
            let messages: Vec<OutgoingMessage> = items.iter().map(|(_, _, m)| m.clone()).collect();
            let results =
                match tokio::time::timeout(PUBLISH_TIMEOUT, publisher.publish_batch(&messages))
                    .await
                {
                    Ok(results) => results,
                    Err(_) => vec![
                        Err(PublishError::Connection("publish timed out".into()));
                        messages.len()
                    ],
                };
            for (i, (id, processor, _)) in items.into_iter().enumerate() {
                match results.get(i) {
                    Some(Ok(())) => outcome.replayed.push((id, processor)),
                    Some(Err(e)) => outcome.failed.push(Failed {
                        id,
                        permanent: !e.is_transient(),
                        error: e.to_string(),
                    }),
                    None => outcome.failed.push(Failed {
                        id,
                        permanent: false,
                        error: "publisher returned no result".into(),
                    }),
                }
            }
        }
        let ids: Vec<i64> = outcome.replayed.iter().map(|(id, _)| *id).collect();
        if !ids.is_empty() {
            archive::mark_replayed(tx, table, &ids).await?;
        }
        for f in &outcome.failed {
            tracing::warn!(id = f.id, error = %f.error, "dead letter not replayed");
        }
        Ok(outcome)
    }

    pub async fn purge(
        &self,
        processor: Option<&str>,
        selector: &Selector,
        dry_run: bool,
    ) -> Result<PurgeReport, DeadLetterError> {
        let t = self.selected_target(processor, selector)?;
        if dry_run {
            let rows = t.preview(selector, status::PURGEABLE).await?;
            return Ok(PurgeReport {
                dry_run: true,
                would_purge: rows,
                ..PurgeReport::default()
            });
        }
        let purged = archive::purge(&t.pool, &t.table, &t.processors, selector).await?;
        tracing::info!(count = purged.len(), table = %t.table, "purged dead letters");
        Ok(PurgeReport {
            purged,
            ..PurgeReport::default()
        })
    }
}

/// Bounds every selector: an id list of at most [`MAX_IDS`], and `all` only for one named
/// processor (one processor's rows, never every processor sharing the table).
fn check_selector(processor: Option<&str>, selector: &Selector) -> Result<(), DeadLetterError> {
    match selector {
        Selector::Ids(ids) if ids.len() > MAX_IDS => Err(DeadLetterError::Invalid(format!(
            "{} ids given; at most {MAX_IDS} per request",
            ids.len()
        ))),
        Selector::All if processor.is_none() => Err(DeadLetterError::Invalid(
            "`all` needs a processor: name the one whose dead letters to select".into(),
        )),
        _ => Ok(()),
    }
}

/// `all` changes every row of a processor: it needs the processor named, and named again
/// as the confirmation (`how` says how to give it), unless nothing is changed (`dry_run`).
pub fn confirm_all(
    processor: Option<&str>,
    confirm: Option<&str>,
    dry_run: bool,
    how: &str,
) -> Result<(), DeadLetterError> {
    let Some(processor) = processor else {
        return Err(DeadLetterError::Invalid(
            "`all` needs a processor: name the one whose dead letters to select".into(),
        ));
    };
    if dry_run || confirm == Some(processor) {
        return Ok(());
    }
    Err(DeadLetterError::Invalid(format!(
        "`all` changes every dead letter of processor `{processor}`: confirm with {how} naming it again"
    )))
}

#[derive(Default)]
struct PublishOutcome {
    /// (row id, processor) of confirmed copies.
    replayed: Vec<(i64, String)>,
    failed: Vec<Failed>,
}

fn count_replays(replayed: &[(i64, String)]) {
    for (_, processor) in replayed {
        metrics::counter!(metric::REPLAYS, "processor" => processor.clone()).increment(1);
    }
}

/// A row as JSON for `show`: every column, the headers as archived, and the body as text
/// when it is UTF-8 (`body`), else as hex (`body_hex`).
pub fn row_json(row: &Row) -> serde_json::Value {
    let mut value = serde_json::to_value(row).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        match row.body.as_deref().map(std::str::from_utf8) {
            Some(Ok(text)) => {
                map.insert("body".into(), serde_json::Value::String(text.to_owned()));
            }
            Some(Err(_)) => {
                let hex = hex::encode(row.body.as_deref().unwrap_or_default());
                map.insert("body_hex".into(), serde_json::Value::String(hex));
            }
            None => {
                map.insert("body".into(), serde_json::Value::Null);
            }
        }
    }
    value
}

/// A point in time given as RFC 3339 (`2026-01-02T03:04:05Z`) or as an age (`90m`, `2d`).
pub fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, DeadLetterError> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text.trim()) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    crate::config::parse_duration(text)
        .ok()
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .map(|d| chrono::Utc::now() - d)
        .ok_or_else(|| {
            DeadLetterError::Invalid(format!(
                "`{text}` is neither an RFC 3339 time nor an age like \"2h\""
            ))
        })
}
