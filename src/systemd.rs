//! systemd service notification (`Type=notify-reload`), as a supervisor [`Lifecycle`].
//!
//! What systemd is told, and when:
//! - `READY=1` with a `STATUS=` line once every component has been started (each may still be
//!   connecting or retrying; `/readyz` says which);
//! - `RELOADING=1` and `MONOTONIC_USEC=` in one datagram when a reload begins (systemd 253+
//!   refuses a `RELOADING=1` without a timestamp), then `READY=1` when it ends, whether it
//!   applied or left the running configuration in place;
//! - `STOPPING=1` when the drain begins;
//! - `WATCHDOG=1` from the supervisor loop's tick, only when `WatchdogSec=` is set. The tick
//!   only happens while the loop turns, so a stalled loop stops the keep-alives and systemd
//!   restarts the service.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call is a no-op.
//!
//! Messages are formatted with the `sd-notify` crate but sent from here, to a socket path
//! captured once at start: this supports abstract socket addresses (`@name`) and lets the
//! behaviour be tested without touching the process environment.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::supervisor::Lifecycle;

/// Sends the service manager the supervisor's milestones.
pub struct SystemdNotify {
    /// `NOTIFY_SOCKET`; `None` makes every call a no-op.
    socket: Option<PathBuf>,
    /// Keep-alive deadline from `WATCHDOG_USEC`; `None` when the watchdog is off.
    watchdog: Option<Duration>,
    last_keepalive: Option<Instant>,
    stopping: bool,
    /// A send failure is logged at warn once, then at debug, so an unreachable socket does
    /// not flood the log once per tick.
    warned: bool,
}

impl SystemdNotify {
    /// From the environment systemd sets: `NOTIFY_SOCKET`, `WATCHDOG_USEC` (and
    /// `WATCHDOG_PID`, which must be this process when set).
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        let watchdog = socket
            .as_ref()
            .and_then(|_| sd_notify::watchdog_enabled())
            .filter(|d| !d.is_zero());
        Self::new(socket, watchdog)
    }

    /// An explicit socket and watchdog timeout.
    pub fn new(socket: Option<PathBuf>, watchdog: Option<Duration>) -> Self {
        if let Some(path) = &socket {
            tracing::debug!(socket = %path.display(), watchdog_ms = watchdog.map(|w| w.as_millis() as u64), "systemd notification enabled");
        }
        Self {
            socket,
            watchdog,
            last_keepalive: None,
            stopping: false,
            warned: false,
        }
    }

    /// True when a service manager listens.
    #[cfg(test)]
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// How often keep-alives go out: a quarter of the timeout, so a late tick or two never
    /// lets it expire.
    fn keepalive_every(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 4)
    }

    fn send(&mut self, states: &[NotifyState<'_>]) {
        let Some(path) = &self.socket else {
            return;
        };
        let message = format_message(states);
        if let Err(e) = send_datagram(path, message.as_bytes()) {
            if self.warned {
                tracing::debug!(socket = %path.display(), error = %e, "cannot notify systemd");
            } else {
                self.warned = true;
                tracing::warn!(socket = %path.display(), error = %e, "cannot notify systemd; the service manager may consider bosun unresponsive");
            }
        }
    }
}

impl Lifecycle for SystemdNotify {
    fn started(&mut self) {
        self.send(&[
            NotifyState::Ready,
            NotifyState::Status("Running: every component started (see /readyz for readiness)"),
        ]);
    }

    fn reloading(&mut self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[
                NotifyState::Reloading,
                now,
                NotifyState::Status("Reloading the configuration"),
            ]),
            // Cannot happen on Linux; without the timestamp systemd 253+ fails the reload,
            // which is still better than not announcing it.
            Err(e) => {
                tracing::warn!(error = %e, "cannot read CLOCK_MONOTONIC for the reload notification");
                self.send(&[
                    NotifyState::Reloading,
                    NotifyState::Status("Reloading the configuration"),
                ]);
            }
        }
    }

    fn reloaded(&mut self, ok: bool) {
        let status = if ok {
            "Running: configuration reloaded"
        } else {
            "Running: the reload failed and the previous configuration stays (see the log)"
        };
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    fn stopping(&mut self) {
        self.stopping = true;
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("Stopping: draining in-flight work"),
        ]);
    }

    fn tick(&mut self) {
        let Some(every) = self.keepalive_every() else {
            return;
        };
        // systemd stops watching once the service is stopping; the stop timeout governs.
        if self.socket.is_none() || self.stopping {
            return;
        }
        let due = self
            .last_keepalive
            .is_none_or(|last| last.elapsed() >= every);
        if due {
            self.last_keepalive = Some(Instant::now());
            self.send(&[NotifyState::Watchdog]);
        }
    }
}

/// One datagram: `KEY=value` lines, newline-terminated, as `sd_notify(3)` expects.
fn format_message(states: &[NotifyState<'_>]) -> String {
    let mut message = String::new();
    for state in states {
        // A newline inside a STATUS text would start a new assignment.
        let line = state.to_string().replace('\n', " ");
        message.push_str(&line);
        message.push('\n');
    }
    message
}

fn send_datagram(path: &std::path::Path, message: &[u8]) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let sent = match abstract_name(path) {
        Some(name) => send_abstract(&socket, name, message)?,
        None => socket.send_to(message, path)?,
    };
    if sent != message.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the notification was cut short",
        ));
    }
    Ok(())
}

/// `@name` is the abstract socket `\0name`.
fn abstract_name(path: &std::path::Path) -> Option<&[u8]> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().strip_prefix(b"@")
}

#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &[u8], message: &[u8]) -> io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(message, &addr)
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_socket: &UnixDatagram, _name: &[u8], _message: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract notification sockets exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Listener {
        _dir: tempfile::TempDir,
        path: PathBuf,
        socket: UnixDatagram,
    }

    fn listener() -> Listener {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind");
        socket.set_nonblocking(true).expect("nonblocking");
        Listener {
            _dir: dir,
            path,
            socket,
        }
    }

    fn drain(socket: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn lifecycle_messages() {
        let l = listener();
        let mut notify = SystemdNotify::new(Some(l.path.clone()), None);
        notify.started();
        notify.reloading();
        notify.reloaded(false);
        notify.stopping();
        notify.tick();
        let got = drain(&l.socket);
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got[0].starts_with("READY=1\nSTATUS=Running"), "{got:?}");
        let reload: Vec<&str> = got[1].lines().collect();
        assert_eq!(reload[0], "RELOADING=1");
        let usec: u64 = reload[1]
            .strip_prefix("MONOTONIC_USEC=")
            .and_then(|v| v.parse().ok())
            .expect("timestamp");
        assert!(usec > 0);
        assert!(got[2].starts_with("READY=1\nSTATUS="), "{got:?}");
        assert!(got[3].starts_with("STOPPING=1\n"), "{got:?}");
    }

    #[test]
    fn watchdog_keepalives_are_paced_to_a_quarter_of_the_timeout() {
        let l = listener();
        let mut notify = SystemdNotify::new(Some(l.path.clone()), Some(Duration::from_secs(40)));
        notify.started();
        drain(&l.socket);
        // The first tick sends at once (systemd's timer runs from the start of the process);
        // the next ones wait for a quarter of the timeout.
        notify.tick();
        notify.tick();
        assert_eq!(drain(&l.socket), vec!["WATCHDOG=1\n".to_owned()]);
        notify.last_keepalive = Instant::now().checked_sub(Duration::from_secs(11));
        notify.tick();
        notify.tick();
        assert_eq!(drain(&l.socket), vec!["WATCHDOG=1\n".to_owned()]);
        notify.stopping();
        drain(&l.socket);
        notify.last_keepalive = Instant::now().checked_sub(Duration::from_secs(11));
        notify.tick();
        assert!(drain(&l.socket).is_empty(), "no keep-alives while stopping");
    }

    #[test]
    fn without_a_socket_nothing_is_sent_and_nothing_fails() {
        let mut notify = SystemdNotify::new(None, Some(Duration::from_millis(1)));
        assert!(!notify.enabled());
        notify.started();
        notify.tick();
        notify.stopping();
    }

    #[test]
    fn an_unreachable_socket_is_logged_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut notify = SystemdNotify::new(Some(dir.path().join("absent.sock")), None);
        notify.started();
        notify.started();
        assert!(notify.warned);
    }

    #[test]
    fn status_text_cannot_inject_assignments() {
        let message = format_message(&[NotifyState::Status("a\nREADY=1")]);
        assert_eq!(message, "STATUS=a READY=1\n");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_sockets() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("bosun-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        let mut notify = SystemdNotify::new(Some(PathBuf::from(format!("@{name}"))), None);
        notify.stopping();
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("recv");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("STOPPING=1\n"));
    }
}
