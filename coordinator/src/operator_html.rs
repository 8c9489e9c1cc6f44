//! The operator page's HTML, rendered on the server from what `operator_page` gathered: one
//! self-contained document (inline style, no scripts), every value from the deployment
//! escaped, long lists cut at `MAX_ROWS` with a count of what was left out.

use crate::audit::{AuditRound, AuditRun};
use crate::config::ReplicaConfig;
use crate::driver::Info;
use crate::ops::{AgentHealth, InDoubt, OpsError, ReplicaHealth, TxnView};
use crate::recent::{Row, BUCKET_SECS};
use std::fmt::Write;

/// Rows per table at most.
pub const MAX_ROWS: usize = 50;
/// The page reloads itself this often (seconds).
const REFRESH_SECS: u32 = 5;

/// Prepared branches in doubt, and the agents that could not be asked.
pub type InDoubtList = (Vec<InDoubt>, Vec<String>);

pub struct Gathered {
    pub info: Option<Info>,
    pub state: (&'static str, String),
    pub replicas: Vec<ReplicaHealth>,
    pub agents: Vec<AgentHealth>,
    /// None: no agents configured.
    pub in_doubt: Option<Result<InDoubtList, OpsError>>,
    /// The in-doubt transactions' full status (votes).
    pub votes: Vec<TxnView>,
    pub lookup: Option<(String, Result<TxnView, OpsError>)>,
    pub recent: Vec<Row>,
    pub audit: Option<AuditRun>,
}

/// HTML-escapes text from the deployment (txids, names, error messages).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{:.1} min", ms as f64 / 60_000.0),
        _ => format!("{:.1} h", ms as f64 / 3_600_000.0),
    }
}

fn bytes(n: u64) -> String {
    match n {
        0..=9_999 => format!("{n} B"),
        10_000..=9_999_999 => format!("{:.1} kB", n as f64 / 1e3),
        _ => format!("{:.1} MB", n as f64 / 1e6),
    }
}

fn down(error: Option<&str>) -> String {
    state_badge("down") + &format!(" <span class=\"note\">{}</span>", esc(error.unwrap_or("")))
}

fn txid_age(txid: &str, ms: u64) -> String {
    format!("<span class=\"txid\">{}</span> {}", esc(txid), age(ms))
}

fn badge(class: &str, text: &str) -> String {
    format!("<span class=\"badge {class}\">{}</span>", esc(text))
}

fn state_badge(state: &str) -> String {
    let class = match state {
        "committed" | "serving" | "up" | "clean" => "ok",
        "aborted" | "down" | "diverged" | "failed" | "unreachable" => "bad",
        _ => "warn",
    };
    badge(class, state)
}

/// A table: header cells, rows of already-escaped HTML cells, and a note when rows were cut.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>], total: usize) {
    out.push_str("<table><thead><tr>");
    for h in header {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows.iter().take(MAX_ROWS) {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    if total > MAX_ROWS {
        let _ = write!(
            out,
            "<p class=\"note\">{} more not shown (txctl lists all).</p>",
            total - MAX_ROWS
        );
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f24;background:#fafbfc}\
h1{font-size:20px;margin:0 0 .2em}h2{font-size:16px;margin:1.6em 0 .4em;border-bottom:1px solid #d0d7de}\
table{border-collapse:collapse;background:#fff}th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}\
th{background:#eef1f4}code,.txid{font-family:ui-monospace,monospace}.note{color:#57606a}\
.badge{padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600}.ok{background:#dafbe1;color:#116329}\
.bad{background:#ffebe9;color:#a40e26}.warn{background:#fff8c5;color:#7d4e00}\
.bars{display:flex;align-items:flex-end;gap:2px;height:60px}.bars div{background:#54aeff;width:10px}";

pub fn refused(why: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>paxos-commit: \
         refused</title><style>{STYLE}</style></head><body><h1>paxos-commit operator page</h1>\
         <p>{}</p></body></html>",
        esc(why)
    )
}

fn votes_cell(view: &TxnView) -> String {
    let mut cell = String::new();
    for p in &view.participants {
        let votes: Vec<String> = p
            .votes
            .iter()
            .map(|v| format!("{} at r{} (ballot {})", esc(&v.vote), v.acceptor, v.ballot))
            .collect();
        let _ = write!(
            cell,
            "<div><b>{}</b>: {}{}</div>",
            esc(&p.id),
            if votes.is_empty() {
                "no vote recorded".to_string()
            } else {
                votes.join(", ")
            },
            if p.applied { " · applied" } else { "" }
        );
    }
    cell
}

pub fn render(cfg: &ReplicaConfig, operator: Option<&str>, g: &Gathered) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>paxos-commit {} · replica {}</title><style>{STYLE}</style></head><body>",
        esc(&cfg.group),
        cfg.id
    );
    let _ = write!(
        out,
        "<h1>paxos-commit · group <code>{}</code> · replica {} {}</h1><p class=\"note\">{}{} · \
         refreshes every {REFRESH_SECS} s · read-only</p>",
        esc(&cfg.group),
        cfg.id,
        state_badge(g.state.0),
        match operator {
            Some(name) => format!("signed in as operator <b>{}</b>", esc(name)),
            None => "<b>insecure deployment: anyone who reaches this port can read it</b>".into(),
        },
        if g.state.1.is_empty() {
            String::new()
        } else {
            format!(" · {}", esc(&g.state.1))
        }
    );

    // Health.
    out.push_str("<h2>Replicas</h2>");
    let rows: Vec<Vec<String>> = g
        .replicas
        .iter()
        .map(|r| {
            vec![
                format!("r{}", r.replica),
                esc(&r.address),
                if r.up {
                    state_badge(if r.state.is_empty() { "up" } else { &r.state })
                        + if r.rejoined { " rejoined" } else { "" }
                } else {
                    down(r.error.as_deref())
                },
                r.leading.to_string(),
                r.undecided.to_string(),
                r.oldest_undecided
                    .as_ref()
                    .map(|(t, ms)| txid_age(t, *ms))
                    .unwrap_or_default(),
                bytes(r.log_bytes),
                r.decided_retained.to_string(),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "replica",
            "address",
            "state",
            "leading",
            "undecided",
            "oldest undecided",
            "acceptor log",
            "decided, held in full",
        ],
        &rows,
        rows.len(),
    );

    out.push_str("<h2>Agents</h2>");
    if cfg.agents.is_empty() {
        out.push_str(
            "<p class=\"note\">No agents configured on this replica ([agents] in its \
             configuration): agents, in-doubt transactions and the audit are not shown.</p>",
        );
    } else {
        let rows: Vec<Vec<String>> = g
            .agents
            .iter()
            .map(|a| {
                vec![
                    esc(&a.participant),
                    esc(&a.address),
                    if a.up {
                        state_badge("up")
                    } else {
                        down(a.error.as_deref())
                    },
                    a.prepared.to_string(),
                    a.open_branches.to_string(),
                    a.oldest_prepared
                        .as_ref()
                        .map(|(t, ms)| txid_age(t, *ms))
                        .unwrap_or_default(),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "participant",
                "address",
                "state",
                "prepared",
                "open branches",
                "oldest prepared",
            ],
            &rows,
            rows.len(),
        );
    }

    // In doubt.
    out.push_str("<h2>In doubt</h2>");
    match &g.in_doubt {
        None => out.push_str("<p class=\"note\">Needs the agents' addresses.</p>"),
        Some(Err(e)) => {
            let _ = write!(
                out,
                "<p>{} {}</p>",
                state_badge("unreachable"),
                esc(&e.to_string())
            );
        }
        Some(Ok((list, unreachable))) => {
            if list.is_empty() {
                out.push_str("<p>Nothing prepared is waiting for a decision.</p>");
            } else {
                let _ = write!(
                    out,
                    "<p>{} prepared branch(es) wait for a decision; their rows stay locked \
                     meanwhile. <code>txctl resolve TXID</code> settles one through the group.</p>",
                    list.len()
                );
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|x| {
                        let votes = g
                            .votes
                            .iter()
                            .find(|v| v.txid == x.txid)
                            .map(votes_cell)
                            .unwrap_or_default();
                        vec![
                            format!(
                                "<a class=\"txid\" href=\"/?txid={0}\">{0}</a>",
                                esc(&x.txid)
                            ),
                            esc(&x.participant),
                            age(x.age_ms),
                            esc(&x.participants.join(", ")),
                            state_badge(&x.group_state),
                            votes,
                        ]
                    })
                    .collect();
                table(
                    &mut out,
                    &[
                        "txid",
                        "prepared on",
                        "prepared for",
                        "participants",
                        "group says",
                        "votes, as each acceptor recorded them",
                    ],
                    &rows,
                    list.len(),
                );
            }
            for a in unreachable {
                let _ = write!(
                    out,
                    "<p>{} agent {}</p>",
                    state_badge("unreachable"),
                    esc(a)
                );
            }
        }
    }

    // Lookup.
    out.push_str(
        "<h2>Look up a transaction</h2><form method=\"get\" action=\"/\">\
         <input name=\"txid\" size=\"20\" maxlength=\"64\" placeholder=\"txid, 16 hex digits\"> \
         <button type=\"submit\">Look up</button></form>",
    );
    if let Some((txid, found)) = &g.lookup {
        match found {
            Ok(v) => {
                let _ = write!(
                    out,
                    "<p><span class=\"txid\">{}</span>: {} · led by r{}{}</p>",
                    esc(&v.txid),
                    state_badge(&v.state),
                    v.leader,
                    if v.expired {
                        " · its full state has expired"
                    } else {
                        ""
                    }
                );
                if !v.participants.is_empty() {
                    out.push_str(&votes_cell(v));
                }
            }
            Err(e) => {
                let _ = write!(
                    out,
                    "<p><span class=\"txid\">{}</span>: {}</p>",
                    esc(txid),
                    esc(&e.to_string())
                );
            }
        }
    }

    // Throughput and latency.
    let _ = write!(
        out,
        "<h2>Last minutes</h2><p class=\"note\">Commits this replica led, per {BUCKET_SECS} s; \
         latency is the class bound (≤) of the commit call's median and 99th percentile.</p>"
    );
    if g.recent.is_empty() {
        out.push_str("<p>No commit in the last five minutes.</p>");
    } else {
        let peak = g
            .recent
            .iter()
            .map(|r| r.committed)
            .max()
            .unwrap_or(0)
            .max(1);
        out.push_str("<div class=\"bars\" title=\"committed per bucket\">");
        for r in &g.recent {
            let _ = write!(
                out,
                "<div style=\"height:{}%\"></div>",
                (r.committed * 100 / peak).max(1)
            );
        }
        out.push_str("</div>");
        let ms = |v: Option<f64>| v.map(|v| format!("≤ {v} ms")).unwrap_or_default();
        let rows: Vec<Vec<String>> = g
            .recent
            .iter()
            .rev()
            .map(|r| {
                vec![
                    format!("{} s ago", now_s().saturating_sub(r.start_s)),
                    format!("{:.1}", r.committed as f64 / BUCKET_SECS as f64),
                    r.aborted.to_string(),
                    r.failed.to_string(),
                    ms(r.p50_ms),
                    ms(r.p99_ms),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "bucket from",
                "committed/s",
                "aborted",
                "no outcome",
                "p50",
                "p99",
            ],
            &rows,
            rows.len(),
        );
    }

    // Audit.
    out.push_str("<h2>Audit</h2>");
    match &g.audit {
        None if cfg.agents.is_empty() || cfg.audit_interval.is_zero() => out.push_str(
            "<p class=\"note\">This replica does not audit (no agents configured, or \
             audit_interval_ms = 0); <code>txctl audit</code> does.</p>",
        ),
        None => out.push_str("<p class=\"note\">No audit has finished yet.</p>"),
        Some(run) => {
            let ago = now_s().saturating_sub(run.finished_at);
            match &run.result {
                AuditRound::LeftTo(other) => {
                    let _ = write!(
                        out,
                        "<p class=\"note\">Replica {other} audits (the lowest-numbered replica \
                         that is serving): its page shows the results.</p>"
                    );
                }
                AuditRound::Ran(Err(e)) => {
                    let _ = write!(
                        out,
                        "<p>{} {} s ago: {}</p>",
                        state_badge("failed"),
                        ago,
                        esc(e)
                    );
                }
                AuditRound::Ran(Ok(r)) => {
                    let verdict = if !r.divergences.is_empty() {
                        "diverged"
                    } else if !r.complete() {
                        "incomplete"
                    } else {
                        "clean"
                    };
                    let _ = write!(
                        out,
                        "<p>{} {} s ago: {} divergence(s) in {} transaction(s), {} proofs, {} in \
                         flight, {} not judged, in {} ms.</p>",
                        state_badge(verdict),
                        ago,
                        r.divergences.len(),
                        r.transactions,
                        r.proofs,
                        r.in_flight,
                        r.not_judged,
                        r.duration_ms
                    );
                    for a in &r.unreachable_agents {
                        let _ = write!(out, "<p>agent {} could not be read</p>", esc(a));
                    }
                    if !r.divergences.is_empty() {
                        let rows: Vec<Vec<String>> = r
                            .divergences
                            .iter()
                            .map(|d| {
                                vec![
                                    format!(
                                        "<a class=\"txid\" href=\"/?txid={0}\">{0}</a>",
                                        esc(&d.txid)
                                    ),
                                    esc(&d.participant),
                                    badge("bad", d.kind.describe()),
                                    esc(&d.committed_at.join(", ")),
                                    esc(&d.participants.join(", ")),
                                    age(d.age_ms),
                                ]
                            })
                            .collect();
                        table(
                            &mut out,
                            &[
                                "txid",
                                "database",
                                "divergence",
                                "committed at",
                                "participants",
                                "age",
                            ],
                            &rows,
                            rows.len(),
                        );
                    }
                }
            }
        }
    }
    if let Some(info) = &g.info {
        let _ = write!(
            out,
            "<p class=\"note\">This replica: {} acceptor-log fsyncs, {} records since start.</p>",
            info.counters.fsyncs, info.counters.records
        );
    }
    out.push_str("</body></html>");
    out
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_the_deployment_cannot_make_markup() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        let page = refused("<img src=x>");
        assert!(page.contains("&lt;img src=x&gt;"));
        assert!(!page.contains("<img"));
    }

    #[test]
    fn long_tables_are_cut_and_say_so() {
        let rows: Vec<Vec<String>> = (0..120).map(|i| vec![i.to_string()]).collect();
        let mut out = String::new();
        table(&mut out, &["n"], &rows, rows.len());
        assert_eq!(out.matches("<tr>").count(), MAX_ROWS + 1);
        assert!(out.contains("70 more not shown"));
    }
}
