//! `ambit check --what-if FILE`: the file is read and checked here (so that a mistake is named
//! before any agent is asked), then each agent replays its own flow history against it.

use std::{io::Read as _, path::Path, time::Duration};

use super::{CheckArgs, CliError, Output, client, human, table::Table};
use crate::check::what_if::{Shift, WhatIfReport, WhatIfRequest};

/// Replaying ten thousand entries takes milliseconds; the rest is the agent being busy.
const TIMEOUT: Duration = Duration::from_secs(30);

/// What every agent asked says, as `-o json` prints it.
#[derive(serde::Serialize)]
struct Answer<'a> {
    /// Whether some connection allowed today would be refused or denied (exit code 1).
    breaks_traffic: bool,
    /// One report per agent.
    nodes: &'a [WhatIfReport],
}

pub(super) async fn run(args: &CheckArgs, file: &Path) -> Result<String, CliError> {
    let (name, text) = read(file)?;
    // The agents check again (and know which namespaces exist); this names a typo at once.
    crate::discovery::local::parse_policies(Path::new(&name), &text)
        .map_err(|e| CliError::Input(e.to_string()))?;
    let request = WhatIfRequest {
        file: name,
        text,
        delete: args.delete.clone(),
        since_secs: args.since.map(|s| s.as_secs()),
    };
    let body = bytes::Bytes::from(serde_json::to_vec(&request).map_err(|e| CliError::Input(e.to_string()))?);
    let mut reports = Vec::new();
    for addr in std::iter::once(args.operator.admin).chain(args.agent.iter().copied()) {
        let answer = client::post(addr, "/what-if", body.clone(), TIMEOUT).await.map_err(|e| match e {
            // The agent's word on the file: bad input, not a failure to talk.
            client::ClientError::Status { status, body, .. } if status.is_client_error() => {
                CliError::Input(body)
            }
            e => CliError::Client(e),
        })?;
        let report: WhatIfReport = serde_json::from_slice(&answer).map_err(|source| CliError::Decode {
            addr,
            path: "/what-if",
            source,
        })?;
        reports.push(report);
    }
    let breaks = reports.iter().any(WhatIfReport::breaks_traffic);
    let out = match args.operator.output {
        Output::Json => {
            let answer = Answer { breaks_traffic: breaks, nodes: &reports };
            serde_json::to_string_pretty(&answer).map_err(|e| CliError::Input(e.to_string()))? + "\n"
        }
        Output::Table => reports.iter().map(render).collect::<Vec<_>>().join("\n"),
    };
    if breaks { Err(CliError::Breaks(out)) } else { Ok(out) }
}

/// FILE's name and text; `-` is stdin.
fn read(file: &Path) -> Result<(String, String), CliError> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| CliError::Input(format!("reading the policies from stdin: {e}")))?;
        return Ok(("<stdin>".into(), text));
    }
    let text =
        std::fs::read_to_string(file).map_err(|e| CliError::Input(format!("{}: {e}", file.display())))?;
    Ok((file.display().to_string(), text))
}

fn render(report: &WhatIfReport) -> String {
    let mut out = String::new();
    let window =
        report.since_secs.map_or("all the history kept".to_owned(), |s| format!("the last {}", human(s)));
    out += &format!(
        "what-if {} on {}: {} kinds of connection replayed ({} connections, {window})\n",
        report.file, report.node, report.replayed, report.connections
    );
    if report.history_off {
        out += "  this agent keeps no flow history (--flow-history 0): nothing to replay\n";
    }
    for change in &report.changes {
        out += &format!("  {change}\n");
    }
    let now = crate::sys::unix_now();
    let section = |out: &mut String, title: &str, shifts: &[Shift]| {
        if shifts.is_empty() {
            *out += &format!("\n{title}: none\n");
            return;
        }
        *out += &format!("\n{title}:\n");
        let mut t = Table::new([
            "SOURCE",
            "DESTINATION",
            "CONNECTIONS",
            "LAST SEEN",
            "TODAY",
            "WOULD BE",
            "DECIDED BY",
        ]);
        for s in shifts {
            t.row([
                &source(s),
                &format!("{}:{}", s.destination, s.port),
                &s.connections.to_string(),
                &format!("{} ago", human(now.saturating_sub(s.last_seen))),
                s.today.as_str(),
                &s.would.as_str().to_uppercase(),
                s.decided_by.as_deref().unwrap_or("-"),
            ]);
        }
        *out += &t.render();
        for s in shifts {
            *out += &format!("  {} -> {}:{}: {}\n", source(s), s.destination, s.port, s.reason);
            for hint in &s.hints {
                *out += &format!("    hint: {hint}\n");
            }
        }
    };
    section(&mut out, "WOULD BREAK (allowed today, refused or denied with the file)", &report.breaks);
    section(&mut out, "WOULD NEWLY ALLOW", &report.opens);
    if !report.audited.is_empty() {
        section(&mut out, "WOULD BE AUDITED (outcome unchanged)", &report.audited);
    }
    out += &format!("\nunchanged: {} kinds of connection", report.unchanged);
    if report.destination_gone > 0 {
        out += &format!("; {} not replayed (their destination pod is gone)", report.destination_gone);
    }
    out += "\n";
    out
}

/// `shop/frontend (shop/sa/frontend-sa)`, `legacy/outsider (plaintext)`, `10.0.0.5 (plaintext)`.
fn source(s: &Shift) -> String {
    let who = s
        .source
        .pod
        .clone()
        .unwrap_or_else(|| s.source.ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(","));
    let how = match &s.source.identity {
        Some(id) => id
            .trim_start_matches("spiffe://")
            .split_once("/ns/")
            .map_or(id.clone(), |(_, rest)| rest.to_owned()),
        None => "plaintext".to_owned(),
    };
    format!("{who} ({how})")
}
