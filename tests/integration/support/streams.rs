//! Redis Streams helpers: a connection to the shared server, entries added and read back raw.

use super::REDIS_URL;

pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

pub async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

pub async fn xadd(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    fields: &[(&str, &[u8])],
) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query_async(conn).await.expect("XADD")
}

/// Group `g` on `stream`, from the start, creating the stream.
pub async fn create_group(conn: &mut redis::aio::MultiplexedConnection, stream: &str) {
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await
        .expect("XGROUP");
}

pub async fn xadd_many(conn: &mut redis::aio::MultiplexedConnection, stream: &str, n: usize) {
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("payload")
            .arg(format!("body-{i}"))
            .arg("message_id")
            .arg(format!("m-{i}"))
            .ignore();
    }
    let () = pipe.query_async(conn).await.expect("XADD batch");
}

pub async fn range(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<(String, Fields)> {
    redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE")
}

pub async fn xlen(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .expect("XLEN")
}
