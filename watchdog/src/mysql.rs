//! `kill_query`: cancels the one MySQL/MariaDB statement a request is, with `KILL QUERY`, the only
//! per-query cancel these servers have (a signal to the server process shuts it down).
//!
//! The daemon connects with the policy's account, finds the connection whose
//! `information_schema.PROCESSLIST.HOST` is the request's peer as the server sees it
//! (`ip:port`: the server's peer is the client), and kills that connection's statement, never
//! another: no row, more than one, or a connection that runs no statement any more, and nothing
//! is killed. Just before the `KILL`, the kernel's record of the connection is read again: the
//! request must still be the one in flight (same generation). What is left is the time of one
//! `KILL` round trip on the same host, in which the statement could end and the client's next
//! one start.
//!
//! Why the blocking `mysql` crate on a thread of its own rather than `mysql_async` on the event
//! loop: the loop carries out whole batches of due steps synchronously (`daemon/step.rs`) and must
//! never wait on a server; `MAX_IN_FLIGHT` worker threads with socket timeouts of `IO_TIMEOUT`
//! are bounded, keep the loop free, and need no async driver beside the one the daemon has. The
//! record is written when the thread is done.

use std::{net::IpAddr, time::Duration};

use mysql::{prelude::Queryable, Conn, OptsBuilder};

use crate::{
    actions::Outcome,
    config::{read_password, MysqlAccount, MysqlServer},
};

/// Connecting, and every read or write after: the longest one socket operation may wait. A
/// `kill_query` step takes a handful of them (handshake, lookup, kill), about 10 ms when the
/// server answers.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// `kill_query` steps running at once (threads); more wait in a short queue (`daemon/step.rs`).
pub const MAX_IN_FLIGHT: usize = 4;

/// How the server writes a client's `HOST` in its process list (`host_or_ip:port`, IPv6 without
/// brackets), for the peer `ip`:`port`: the address itself; for a loopback client also
/// `localhost`, which the server shows unless it runs with `skip_name_resolve`. Other names a
/// reverse lookup would give are not guessed (no DNS from the daemon): such servers need
/// `skip_name_resolve`, and the record says so.
pub fn host_candidates(ip: IpAddr, port: u16) -> Vec<String> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let mut out = vec![format!("{ip}:{port}")];
    if let IpAddr::V4(v4) = ip {
        out.push(format!("::ffff:{v4}:{port}"));
    }
    if ip.is_loopback() {
        out.push(format!("localhost:{port}"));
    }
    out
}

/// One row of the process list, as far as matching needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub id: u64,
    pub host: String,
    pub command: String,
    /// The statement the connection runs (`INFO`), as the server has it.
    pub info: Option<String>,
}

/// What a `kill_query` step did, and the statement it was about (from the process list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    pub statement: Option<String>,
}

impl From<Outcome> for Report {
    fn from(outcome: Outcome) -> Self {
        Report {
            outcome,
            statement: None,
        }
    }
}

/// What to do, given the rows whose `HOST` ends in the peer's port: the row to kill, or the
/// outcome that says why nothing is killed. Pure.
pub fn choose<'a>(rows: &'a [Row], candidates: &[String]) -> Result<&'a Row, Outcome> {
    let matching: Vec<&Row> = rows
        .iter()
        .filter(|r| candidates.contains(&r.host))
        .collect();
    match matching.as_slice() {
        [] => {
            let others: Vec<&str> = rows.iter().map(|r| r.host.as_str()).collect();
            Err(Outcome::NoSuchQuery(if others.is_empty() {
                format!(
                    "no connection in the server's process list has HOST {}",
                    candidates[0]
                )
            } else {
                format!(
                    "no connection has HOST {}; with that port: {} (a name, not an address? run the server with skip_name_resolve)",
                    candidates[0],
                    others.join(", ")
                )
            }))
        }
        [one] if one.command == "Query" || one.command == "Killed" => Ok(one),
        [one] => Err(Outcome::NoSuchQuery(format!(
            "connection {} ({}) runs no statement (command {:?}): its query ended",
            one.id, one.host, one.command
        ))),
        many => Err(Outcome::Ambiguous(format!(
            "{} connections have HOST {}: ids {}",
            many.len(),
            candidates[0],
            many.iter()
                .map(|r| r.id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Server error codes that mean the account may not do this.
const ACCESS_DENIED: [u16; 5] = [
    1044, // ER_DBACCESS_DENIED_ERROR
    1045, // ER_ACCESS_DENIED_ERROR: wrong user or password
    1095, // ER_KILL_DENIED_ERROR: not the owner, no CONNECTION ADMIN / SUPER
    1227, // ER_SPECIFIC_ACCESS_DENIED_ERROR
    1698, // ER_ACCESS_DENIED_NO_PASSWORD_ERROR
];
/// ER_NO_SUCH_THREAD: the connection closed between the lookup and the kill.
const NO_SUCH_THREAD: u16 = 1094;

/// The outcome a client error comes to.
fn outcome_of(e: mysql::Error, what: &str) -> Outcome {
    let text = format!("{what}: {e}");
    match &e {
        mysql::Error::MySqlError(m) if ACCESS_DENIED.contains(&m.code) => {
            Outcome::AccessDenied(text)
        }
        mysql::Error::MySqlError(m) if m.code == NO_SUCH_THREAD => Outcome::NoSuchQuery(text),
        mysql::Error::IoError(_) | mysql::Error::DriverError(_) | mysql::Error::CodecError(_) => {
            Outcome::Unreachable(text)
        }
        _ => Outcome::Failed(text),
    }
}

/// Connects with `account` and cancels the statement of the connection whose client is
/// `peer`, if that is one connection running a statement and `still_in_flight` holds just
/// before the kill. Blocks for at most a few `IO_TIMEOUT`s: run it on a thread of its own.
pub fn kill_query(
    account: &MysqlAccount,
    peer: (IpAddr, u16),
    still_in_flight: &dyn Fn() -> bool,
) -> Report {
    let password = match read_password(&account.password_file) {
        Ok(p) => p,
        Err(e) => {
            return Outcome::Failed(format!(
                "password file {}: {e}",
                account.password_file.display()
            ))
            .into()
        }
    };
    let opts = OptsBuilder::new()
        .user(Some(&account.user))
        .pass(Some(password))
        .tcp_connect_timeout(Some(IO_TIMEOUT))
        .read_timeout(Some(IO_TIMEOUT))
        .write_timeout(Some(IO_TIMEOUT))
        // Over TCP the crate would otherwise ask for the server's socket and reconnect there.
        .prefer_socket(false)
        .stmt_cache_size(0);
    let (opts, server) = match &account.server {
        MysqlServer::Socket(p) => (
            opts.socket(Some(p.display().to_string())),
            p.display().to_string(),
        ),
        MysqlServer::Address(a) => (
            opts.ip_or_hostname(Some(a.ip().to_string()))
                .tcp_port(a.port()),
            a.to_string(),
        ),
    };
    let mut conn = match Conn::new(opts) {
        Ok(c) => c,
        Err(e) => {
            return outcome_of(e, &format!("connecting to {server} as {}", account.user)).into()
        }
    };
    let (ip, port) = peer;
    let candidates = host_candidates(ip, port);
    // Rows whose HOST ends in the peer's port; `choose` keeps the exact matches.
    type Fields = (u64, String, String, Option<String>);
    let rows: Vec<Fields> = match conn.exec(
        "SELECT ID, HOST, COMMAND, INFO FROM information_schema.PROCESSLIST WHERE HOST LIKE ?",
        (format!("%:{port}"),),
    ) {
        Ok(r) => r,
        Err(e) => return outcome_of(e, "reading information_schema.PROCESSLIST").into(),
    };
    let rows: Vec<Row> = rows
        .into_iter()
        .map(|(id, host, command, info)| Row {
            id,
            host,
            command,
            info,
        })
        .collect();
    let row = match choose(&rows, &candidates) {
        Ok(r) => r,
        Err(o) => return o.into(),
    };
    let report = |outcome| Report {
        outcome,
        statement: row.info.clone(),
    };
    if !still_in_flight() {
        return report(Outcome::Ended);
    }
    // `id` is the server's own number for the connection: nothing of the request's text is
    // ever part of this statement.
    let id = row.id;
    report(match conn.query_drop(format!("KILL QUERY {id}")) {
        Ok(()) => Outcome::Killed(format!("KILL QUERY {id} (HOST {})", row.host)),
        Err(e) => outcome_of(e, &format!("KILL QUERY {id}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64, host: &str, command: &str) -> Row {
        Row {
            id,
            host: host.into(),
            command: command.into(),
            info: None,
        }
    }

    #[test]
    fn hosts_as_the_server_writes_them() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            host_candidates(v4, 4000),
            ["10.1.2.3:4000", "::ffff:10.1.2.3:4000"]
        );
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            host_candidates(mapped, 5),
            ["127.0.0.1:5", "::ffff:127.0.0.1:5", "localhost:5"]
        );
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(host_candidates(v6, 7), ["::1:7", "localhost:7"]);
    }

    #[test]
    fn exactly_one_running_statement_of_the_peer_is_chosen() {
        let c = host_candidates("127.0.0.1".parse().unwrap(), 4000);
        let ours = row(7, "localhost:4000", "Query");
        assert_eq!(choose(std::slice::from_ref(&ours), &c).map(|r| r.id), Ok(7));
        // Another host with the same port is never taken.
        let other = row(8, "10.9.9.9:4000", "Query");
        assert_eq!(
            choose(&[other.clone(), ours.clone()], &c).map(|r| r.id),
            Ok(7)
        );
        assert!(matches!(
            choose(std::slice::from_ref(&other), &c),
            Err(Outcome::NoSuchQuery(t)) if t.contains("skip_name_resolve")
        ));
        assert!(matches!(choose(&[], &c), Err(Outcome::NoSuchQuery(_))));
        assert!(matches!(
            choose(&[row(7, "127.0.0.1:4000", "Sleep")], &c),
            Err(Outcome::NoSuchQuery(t)) if t.contains("Sleep")
        ));
        assert!(matches!(
            choose(&[ours, row(9, "127.0.0.1:4000", "Query")], &c),
            Err(Outcome::Ambiguous(_))
        ));
    }

    #[test]
    fn passwords_lose_one_line_end_only() {
        let dir = std::env::temp_dir().join(format!("wd-pass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p");
        for (text, want) in [
            ("s3cret\n", Some("s3cret")),
            ("a b\r\n", Some("a b")),
            ("x", Some("x")),
            ("\n", None),
        ] {
            std::fs::write(&f, text).unwrap();
            assert_eq!(read_password(&f).ok().as_deref(), want, "{text:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
