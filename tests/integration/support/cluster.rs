//! A local Redis Cluster (3 primaries, 3 replicas) on six ports, started by `.ci/redis-cluster`
//! when it is not up, and a connection to it that follows the slots.

use std::collections::HashSet;
use std::sync::Mutex;

/// The first port of the cluster the tests share (7000-7005).
pub const SHARED: u16 = 7000;
/// The first port of the cluster the failover tests break and mend (7100-7105): the shared
/// one is never disturbed.
pub const DISPOSABLE: u16 = 7100;

/// Makes sure the cluster on `base`..`base + 5` is up (started and created when it is not),
/// and returns the seed URLs of its six nodes.
pub fn redis_cluster(base: u16) -> Vec<String> {
    static UP: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut up = UP.lock().unwrap_or_else(|e| e.into_inner());
    if !up.get_or_insert_with(HashSet::new).contains(&base) {
        ensure(base);
        up.get_or_insert_with(HashSet::new).insert(base);
    }
    nodes(base)
}

/// Runs `.ci/redis-cluster up base` (idempotent: restarts a stopped node, which rejoins).
pub fn ensure(base: u16) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/redis-cluster");
    let out = std::process::Command::new(script)
        .arg("up")
        .arg(base.to_string())
        .output()
        .expect("run .ci/redis-cluster");
    assert!(
        out.status.success(),
        "the redis cluster on {base} did not come up: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn nodes(base: u16) -> Vec<String> {
    (base..base + 6)
        .map(|p| format!("redis://127.0.0.1:{p}/"))
        .collect()
}

/// The `cluster = [...]` value of a broker on the cluster at `base`.
pub fn toml_nodes(base: u16) -> String {
    let quoted: Vec<String> = redis_cluster(base)
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// A connection to the cluster at `base` for the test's own commands.
pub async fn connect(base: u16) -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClientBuilder::new(redis_cluster(base))
        .retries(10)
        .build()
        .expect("cluster client")
        .get_async_connection()
        .await
        .expect("connect to the redis cluster")
}

/// The port of the primary that holds `key`'s slot, from `CLUSTER SLOTS`.
pub async fn primary_port_of(conn: &mut redis::cluster_async::ClusterConnection, key: &str) -> u16 {
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .expect("CLUSTER KEYSLOT");
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .expect("CLUSTER SLOTS");
    for range in slots {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        let (
            Some(redis::Value::Int(lo)),
            Some(redis::Value::Int(hi)),
            Some(redis::Value::Array(primary)),
        ) = (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        if (*lo..=*hi).contains(&slot)
            && let Some(redis::Value::Int(port)) = primary.get(1)
        {
            return u16::try_from(*port).expect("port");
        }
    }
    panic!("no primary holds slot {slot}");
}

/// The pid of the redis-server on `port` started by `.ci/redis-cluster` for `base`.
pub fn server_pid(base: u16, port: u16) -> i32 {
    let path = format!("/tmp/bosun-redis-cluster-{base}/{port}/redis.pid");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .trim()
        .parse()
        .expect("pid")
}
