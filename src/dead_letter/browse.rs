//! Reading the archive the way the console does: filters (time range, source, kind, text,
//! header), keyset pages, counts, and groups by a chosen key.
//!
//! Every value goes in as a bind parameter; only the table name (validated configuration)
//! and fixed SQL fragments are spliced.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::DeadLetterError;
use super::archive::Summary;

/// Which archived rows: every field narrows; none given selects everything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Only these rows (a page's selection, one message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<i64>>,
    /// Failure group key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The dead-letter processor that archived the row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processor: Option<String>,
    /// Original queue or stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Error kind (`transient`, `permanent`, `exhausted`, `invalid`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Original routing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
    /// Text in the error or reason (case-insensitive), or the exact message or correlation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// A header that must have this value: `(name, value)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<(String, String)>,
    /// Archived at or after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Archived before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// Only this status; `None`: every status but `purged`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

impl Filter {
    /// The filter in one line, for tables and logs.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut add = |name: &str, value: &Option<String>| {
            if let Some(v) = value {
                parts.push(format!("{name}={v}"));
            }
        };
        add("group", &self.group);
        add("processor", &self.processor);
        add("source", &self.source);
        add("kind", &self.kind);
        add("routing_key", &self.routing_key);
        add("text", &self.text);
        add("status", &self.status);
        if let Some((k, v)) = &self.header {
            parts.push(format!("header {k}={v}"));
        }
        if let Some(t) = self.since {
            parts.push(format!("since={}", t.to_rfc3339()));
        }
        if let Some(t) = self.until {
            parts.push(format!("until={}", t.to_rfc3339()));
        }
        if let Some(ids) = &self.ids {
            let shown: Vec<String> = ids.iter().take(10).map(i64::to_string).collect();
            let more = if ids.len() > 10 { " …" } else { "" };
            parts.push(format!("ids={}{more}", shown.join(",")));
        }
        if parts.is_empty() {
            "everything".into()
        } else {
            parts.join(" ")
        }
    }
}

/// `text` for a `LIKE` pattern: its wildcards taken literally.
fn like_literal(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Appends `WHERE ...` for `processors`, `filter` and, when given, `statuses` (which then
/// replace the filter's status).
fn push_where<'a>(
    qb: &mut QueryBuilder<'a, Postgres>,
    processors: &'a [String],
    filter: &'a Filter,
    statuses: Option<&[&str]>,
) {
    qb.push(" WHERE processor = ANY(")
        .push_bind(processors)
        .push(")");
    match (statuses, &filter.status) {
        (Some(statuses), _) => {
            let owned: Vec<String> = statuses.iter().map(|s| (*s).to_owned()).collect();
            qb.push(" AND status = ANY(").push_bind(owned).push(")");
        }
        (None, Some(status)) => {
            qb.push(" AND status = ").push_bind(status);
        }
        (None, None) => {
            qb.push(" AND status <> 'purged'");
        }
    }
    if let Some(ids) = &filter.ids {
        qb.push(" AND id = ANY(").push_bind(ids).push(")");
    }
    if let Some(g) = &filter.group {
        qb.push(" AND group_key = ").push_bind(g);
    }
    if let Some(p) = &filter.processor {
        qb.push(" AND processor = ").push_bind(p);
    }
    if let Some(s) = &filter.source {
        qb.push(" AND original = ").push_bind(s);
    }
    if let Some(k) = &filter.kind {
        qb.push(" AND error_kind = ").push_bind(k);
    }
    if let Some(r) = &filter.routing_key {
        qb.push(" AND routing_key = ").push_bind(r);
    }
    if let Some(t) = &filter.text {
        let pattern = format!("%{}%", like_literal(t));
        qb.push(" AND (error ILIKE ")
            .push_bind(pattern.clone())
            .push(" OR reason ILIKE ")
            .push_bind(pattern)
            .push(" OR message_id = ")
            .push_bind(t)
            .push(" OR correlation_id = ")
            .push_bind(t)
            .push(")");
    }
    if let Some((k, v)) = &filter.header {
        qb.push(" AND headers ->> ")
            .push_bind(k)
            .push(" = ")
            .push_bind(v);
    }
    if let Some(t) = filter.since {
        qb.push(" AND archived_at >= ").push_bind(t);
    }
    if let Some(t) = filter.until {
        qb.push(" AND archived_at < ").push_bind(t);
    }
}

const SUMMARY_COLUMNS: &str = "id, processor, message_id, original, error_kind, error, reason,
    attempts, replay_count, group_key, archived_at, status";

/// One page of rows matching `filter`, newest first, with ids below `before` (keyset
/// pagination: a page is as fast at the end of the archive as at its start).
pub async fn page(
    pool: &PgPool,
    table: &str,
    processors: &[String],
    filter: &Filter,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Summary>, DeadLetterError> {
    let mut qb = QueryBuilder::new(format!("SELECT {SUMMARY_COLUMNS} FROM {table}"));
    push_where(&mut qb, processors, filter, None);
    if let Some(before) = before {
        qb.push(" AND id < ").push_bind(before);
    }
    qb.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
    Ok(qb.build_query_as::<Summary>().fetch_all(pool).await?)
}

/// Rows matching `filter` in `statuses` with an id up to `max_id`.
pub async fn count(
    pool: &PgPool,
    table: &str,
    processors: &[String],
    filter: &Filter,
    statuses: &[&str],
    max_id: i64,
) -> Result<i64, DeadLetterError> {
    let mut qb = QueryBuilder::new(format!("SELECT count(*) FROM {table}"));
    push_where(&mut qb, processors, filter, Some(statuses));
    qb.push(" AND id <= ").push_bind(max_id);
    Ok(qb.build_query_scalar::<i64>().fetch_one(pool).await?)
}

/// The next ids (ascending) after `after`, up to `max_id`, matching `filter` in `statuses`:
/// how a recorded operation walks its rows.
#[allow(clippy::too_many_arguments)]
pub async fn next_ids(
    pool: &PgPool,
    table: &str,
    processors: &[String],
    filter: &Filter,
    statuses: &[&str],
    after: i64,
    max_id: i64,
    limit: i64,
) -> Result<Vec<i64>, DeadLetterError> {
    let mut qb = QueryBuilder::new(format!("SELECT id FROM {table}"));
    push_where(&mut qb, processors, filter, Some(statuses));
    qb.push(" AND id > ")
        .push_bind(after)
        .push(" AND id <= ")
        .push_bind(max_id)
        .push(" ORDER BY id LIMIT ")
        .push_bind(limit);
    Ok(qb.build_query_scalar::<i64>().fetch_all(pool).await?)
}

/// The largest id in the table (0 when empty): an operation covers rows up to here, so
/// failures that arrive while it runs are left for the operator to see.
pub async fn max_id(pool: &PgPool, table: &str) -> Result<i64, DeadLetterError> {
    let sql = format!("SELECT COALESCE(max(id), 0) FROM {table}");
    Ok(sqlx::query_scalar(&sql).fetch_one(pool).await?)
}

/// What archived dead letters are grouped by on the groups page.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupBy {
    /// The failure group: error kind and normalised error text.
    Reason,
    /// The original queue or stream.
    Original,
    /// The consumer that gave up (`bosun-consumer`).
    Consumer,
    RoutingKey,
    /// A header's value.
    Header(String),
}

impl GroupBy {
    /// From the page's `by` and `header` parameters; unknown values group by reason.
    pub fn parse(by: &str, header: Option<&str>) -> GroupBy {
        match by {
            "original" => GroupBy::Original,
            "consumer" => GroupBy::Consumer,
            "routing_key" => GroupBy::RoutingKey,
            "header" => match header.map(str::trim).filter(|h| !h.is_empty()) {
                Some(h) => GroupBy::Header(h.to_owned()),
                None => GroupBy::Reason,
            },
            _ => GroupBy::Reason,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            GroupBy::Reason => "reason",
            GroupBy::Original => "original",
            GroupBy::Consumer => "consumer",
            GroupBy::RoutingKey => "routing_key",
            GroupBy::Header(_) => "header",
        }
    }

    /// The filter selecting the rows of the group whose key is `key`.
    pub fn filter_for(&self, key: &str) -> Filter {
        let mut f = Filter::default();
        match self {
            GroupBy::Reason => f.group = Some(key.to_owned()),
            GroupBy::Original => f.source = Some(key.to_owned()),
            GroupBy::Consumer => f.header = Some(("bosun-consumer".into(), key.to_owned())),
            GroupBy::RoutingKey => f.routing_key = Some(key.to_owned()),
            GroupBy::Header(h) => f.header = Some((h.clone(), key.to_owned())),
        }
        f
    }
}

/// One line of the groups page.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct KeyedGroup {
    pub key: String,
    pub error_kind: String,
    pub count: i64,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// The newest row of the group: its error text and original stand for the group.
    pub newest_id: i64,
    pub sample_error: Option<String>,
    pub original: Option<String>,
    pub processors: Vec<String>,
}

/// Groups of archived (not replayed, not purged) rows by `by`, largest first (at most
/// `limit`). The sample error is read from each group's newest row by primary key.
pub async fn groups(
    pool: &PgPool,
    table: &str,
    processors: &[String],
    by: &GroupBy,
    limit: i64,
) -> Result<Vec<KeyedGroup>, DeadLetterError> {
    let mut qb: QueryBuilder<'_, Postgres> = QueryBuilder::new("WITH g AS (SELECT ");
    match by {
        GroupBy::Reason => qb.push("group_key"),
        GroupBy::Original => qb.push("COALESCE(original, '')"),
        GroupBy::Consumer => qb.push("COALESCE(headers ->> 'bosun-consumer', '')"),
        GroupBy::RoutingKey => qb.push("COALESCE(routing_key, '')"),
        GroupBy::Header(h) => qb
            .push("COALESCE(headers ->> ")
            .push_bind(h.clone())
            .push(", '')"),
    };
    qb.push(format!(
        " AS key, min(error_kind) AS error_kind, count(*) AS count,
           min(archived_at) AS first_seen, max(archived_at) AS last_seen, max(id) AS newest_id,
           array_agg(DISTINCT processor) AS processors
         FROM {table} WHERE processor = ANY("
    ));
    qb.push_bind(processors.to_vec())
        .push(") AND status = 'archived' GROUP BY 1 ORDER BY count(*) DESC, max(id) DESC LIMIT ")
        .push_bind(limit);
    qb.push(format!(
        ") SELECT g.key, g.error_kind, g.count, g.first_seen, g.last_seen, g.newest_id,
             t.error AS sample_error, t.original, g.processors
           FROM g JOIN {table} t ON t.id = g.newest_id
           ORDER BY g.count DESC, g.newest_id DESC"
    ));
    Ok(qb.build_query_as::<KeyedGroup>().fetch_all(pool).await?)
}

/// Rows of group `filter` archived after `after_id` that are still archived: failures that
/// arrived after a replay of the group started.
pub async fn arrived_after(
    pool: &PgPool,
    table: &str,
    processors: &[String],
    filter: &Filter,
    after_id: i64,
) -> Result<i64, DeadLetterError> {
    let mut qb = QueryBuilder::new(format!("SELECT count(*) FROM {table}"));
    push_where(&mut qb, processors, filter, Some(&["archived"]));
    qb.push(" AND id > ").push_bind(after_id);
    Ok(qb.build_query_scalar::<i64>().fetch_one(pool).await?)
}

/// Dead letters archived per hour over the last 24 hours, oldest first (24 buckets).
pub async fn last_day(
    pool: &PgPool,
    table: &str,
    processors: &[String],
) -> Result<Vec<i64>, DeadLetterError> {
    let sql = format!(
        "SELECT floor(extract(epoch FROM now() - archived_at) / 3600)::int AS age, count(*)
         FROM {table}
         WHERE processor = ANY($1) AND archived_at > now() - interval '24 hours'
         GROUP BY 1"
    );
    let rows: Vec<(i32, i64)> = sqlx::query_as(&sql)
        .bind(processors)
        .fetch_all(pool)
        .await?;
    let mut buckets = vec![0i64; 24];
    for (age, n) in rows {
        if let Ok(age) = usize::try_from(age)
            && age < 24
        {
            buckets[23 - age] += n;
        }
    }
    Ok(buckets)
}

/// Earlier archive rows of the same message id (its failure history), newest first.
pub async fn same_message(
    pool: &PgPool,
    table: &str,
    processors: &[String],
    message_id: &str,
    limit: i64,
) -> Result<Vec<Summary>, DeadLetterError> {
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS} FROM {table}
         WHERE processor = ANY($1) AND message_id = $2 ORDER BY id DESC LIMIT $3"
    );
    Ok(sqlx::query_as::<_, Summary>(&sql)
        .bind(processors)
        .bind(message_id)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_wildcards_are_literal() {
        assert_eq!(like_literal("50%_off\\"), "50\\%\\_off\\\\");
    }

    #[test]
    fn a_group_key_becomes_the_filter_of_its_messages() {
        let by = GroupBy::parse("header", Some("tenant"));
        assert_eq!(
            by.filter_for("acme").header,
            Some(("tenant".into(), "acme".into()))
        );
        assert_eq!(GroupBy::parse("header", None), GroupBy::Reason);
        assert_eq!(
            GroupBy::parse("original", None).filter_for("q").source,
            Some("q".into())
        );
    }
}
