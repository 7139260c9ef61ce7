//! The results file: the table (absolute figures, ratios, the issue's goals), the fairness
//! section (versions, machine, pinning, load generator CPU) and the configs that were run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::proxies::Kind;
use crate::scenarios::{Better, Goal, Log, Row};

/// Facts about the run, gathered by main.
pub struct Meta {
    pub started_utc: String,
    pub minutes: f64,
    pub quick: bool,
    pub command: String,
    pub versions: Vec<(String, String)>,
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub nofile: u64,
    pub idle_n: usize,
    pub tls: Vec<(Kind, String)>,
    pub configs: Vec<(String, String)>,
}

/// Formats with about three significant figures; thousands separated.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{:.0}", a);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if v < 0.0 {
            format!("-{out}")
        } else {
            out
        }
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(v: Option<f64>) -> String {
    v.map(num).unwrap_or_else(|| "n/a".to_string())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => {
            format!("{:.2}×", a / b)
        }
        _ => "–".to_string(),
    }
}

/// The goal's text and whether streamgate meets it.
fn judge(row: &Row) -> Option<(String, Option<bool>, String)> {
    let g = row.goal?;
    let sg = row.values[Kind::Streamgate.index()];
    let others: Vec<f64> = [Kind::Nginx, Kind::Haproxy]
        .iter()
        .filter_map(|k| row.values[k.index()])
        .collect();
    let (text, best) = match g {
        Goal::AtLeast(k) => (
            format!("≥ {k}× best"),
            others
                .iter()
                .cloned()
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v)))),
        ),
        Goal::AtMost(k) => (
            format!("≤ {k}× best"),
            others
                .iter()
                .cloned()
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v)))),
        ),
    };
    let (met, detail) = match (sg, best) {
        (Some(sg), Some(best)) => {
            let met = match g {
                Goal::AtLeast(k) => sg >= k * best,
                Goal::AtMost(k) => sg <= k * best,
            };
            let r = if best != 0.0 {
                format!("{:.2}× best", sg / best)
            } else {
                "best is 0".to_string()
            };
            (Some(met), r)
        }
        _ => (None, "no data".to_string()),
    };
    Some((text, met, detail))
}

pub fn render(meta: &Meta, log: &Log) -> String {
    let mut s = String::new();
    let kind = if meta.quick {
        " (--quick: shortened, not for comparison)"
    } else {
        ""
    };
    let _ = writeln!(s, "# streamgate benchmark, {}{kind}\n", meta.started_utc);
    let _ = writeln!(
        s,
        "Command: `{}`; the run took {:.1} minutes. Every scenario ran against each target in \
         turn (streamgate, nginx, HAProxy, then the backend directly) within one run.\n",
        meta.command, meta.minutes
    );
    let _ = writeln!(
        s,
        "Better: ↑ higher is better, ↓ lower is better, · context. Ratios are streamgate divided \
         by the other target. Goals (issue 6) compare streamgate with the better of nginx and \
         HAProxy.\n"
    );
    let _ = writeln!(
        s,
        "| scenario | metric | better | streamgate | nginx | HAProxy | direct | sg/nginx | sg/HAProxy | sg/direct | goal | met |"
    );
    let _ = writeln!(s, "|---|---|:-:|--:|--:|--:|--:|--:|--:|--:|---|---|");
    let mut last = String::new();
    for r in &log.rows {
        let scen = if r.scenario == last {
            String::new()
        } else {
            r.scenario.clone()
        };
        last = r.scenario.clone();
        let v = r.values;
        let better = match r.better {
            Better::Higher => "↑",
            Better::Lower => "↓",
            Better::Info => "·",
        };
        let (goal, met) = match judge(r) {
            Some((text, Some(true), d)) => (text, format!("yes ({d})")),
            Some((text, Some(false), d)) => (text, format!("**no** ({d})")),
            Some((text, None, d)) => (text, d),
            None => (String::new(), String::new()),
        };
        let sg = v[Kind::Streamgate.index()];
        let _ = writeln!(
            s,
            "| {scen} | {} | {better} | {} | {} | {} | {} | {} | {} | {} | {goal} | {met} |",
            r.metric,
            cell(sg),
            cell(v[Kind::Nginx.index()]),
            cell(v[Kind::Haproxy.index()]),
            cell(v[Kind::Direct.index()]),
            ratio(sg, v[Kind::Nginx.index()]),
            ratio(sg, v[Kind::Haproxy.index()]),
            ratio(sg, v[Kind::Direct.index()]),
        );
    }

    let _ = writeln!(s, "\n## Goals\n");
    for r in &log.rows {
        if let Some((text, met, d)) = judge(r) {
            let verdict = match met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            };
            let _ = writeln!(s, "- {verdict}: {} — {} {text} ({d})", r.scenario, r.metric);
        }
    }

    let _ = writeln!(s, "\n## Fairness\n");
    let _ = writeln!(
        s,
        "- Machine: {} ({} cores), Linux {}. Not an isolated machine: other processes may share \
         both cores.",
        meta.cpu_model, meta.cores, meta.kernel
    );
    for (name, v) in &meta.versions {
        let _ = writeln!(s, "- {name}: {v}");
    }
    let _ = writeln!(
        s,
        "- Certificate: one ECDSA P-256 certificate (SAN localhost), made by the bench at run \
         time with rcgen; nginx and streamgate read cert and key files, HAProxy one PEM with both."
    );
    let _ = writeln!(
        s,
        "- TLS 1.3 only: nginx `ssl_protocols TLSv1.3`, HAProxy `ssl-min-ver TLSv1.3`; streamgate \
         has no setting to turn TLS 1.2 off, so TLS 1.3 is forced by the clients (the bench's \
         rustls client offers only 1.3; wrk and h2load offer 1.3 first and every server \
         accepts it). No session resumption in the bench's client. What the bench's client \
         negotiated:"
    );
    for (k, d) in &meta.tls {
        let _ = writeln!(s, "  - {}: {d}", k.name());
    }
    let _ = writeln!(
        s,
        "- One worker each: streamgate `[runtime] worker_threads = 1`, nginx `worker_processes 1`, \
         HAProxy `nbthread 1`. No access logs: streamgate `RUST_LOG=warn`, nginx `access_log off`, \
         HAProxy no `log` line."
    );
    let _ = writeln!(
        s,
        "- Same backend for all: one `streamgate-bench backend` process (current-thread tokio, \
         hyper, TCP_NODELAY), the `direct` column's target. Proxies keep connections to it \
         alive (nginx `keepalive` with `proxy_set_header Connection \"\"`, HAProxy \
         `http-reuse always`, streamgate's pool). The fleet scenario (1c) starts three more \
         such processes and a second instance of each proxy, configured for them (`fleet-*` \
         below)."
    );
    let _ = writeln!(
        s,
        "- Core pinning: the proxy on core 0 (`taskset -c 0`); the bench process (load \
         generator), the backend, wrk and h2load on core 1 (`taskset -c 1`)."
    );
    let _ = writeln!(
        s,
        "- Open files: soft limit raised to the hard limit ({}) for every process; nginx \
         `worker_rlimit_nofile {}`, HAProxy `maxconn {}`, streamgate `max_connections = \
         100000`. Idle scenario: N = {} connections per target.",
        meta.nofile,
        meta.nofile,
        crate::proxies::haproxy_maxconn(meta.nofile),
        meta.idle_n
    );

    let _ = writeln!(s, "\n### CPU per scenario and target\n");
    let _ = writeln!(
        s,
        "Load generator = the bench process plus the wrk/h2load it ran. Core 1 holds the load \
         generator and the backend. \"Other\" is the rest of each core's busy time in \
         /proc/stat (other processes on the machine, steal, interrupt work not charged to a \
         process). Flags: *client-bound* when core 1 was at 90 % or more while the proxy's \
         core 0 was not (the figure measures the client side, not the proxy); *both cores \
         busy* when both were (the proxy's figure may be somewhat understated); *contended* \
         when other load took 15 % or more of either core (the figure is disturbed). Direct \
         rows are bound by core 1 by design. Percentages are left out for runs under 1 s (CPU \
         time is counted in 10 ms ticks).\n"
    );
    let _ = writeln!(
        s,
        "| scenario | target | wall s | proxy CPU s | core 0 busy | load gen CPU s | backend CPU s | core 1 busy | other core 0 / 1 | flag |"
    );
    let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|--:|---|");
    let mut flagged = Vec::new();
    for c in &log.cpu {
        let u = c.usage;
        let busy0 = u.proxy / u.wall * 100.0;
        let busy1 = (u.loadgen + u.backend) / u.wall * 100.0;
        let (o0, o1) = (u.other0 / u.wall * 100.0, u.other1 / u.wall * 100.0);
        let proxy = c.kind != Kind::Direct;
        let timed = u.wall >= 1.0;
        let mut flags = Vec::new();
        if timed && proxy && busy1 >= 90.0 {
            flags.push(if busy0 < 90.0 {
                "client-bound"
            } else {
                "both cores busy"
            });
        }
        if timed && (o0 >= 15.0 || o1 >= 15.0) {
            flags.push("contended");
        }
        let flag = flags.join(", ");
        if !flag.is_empty() {
            flagged.push(format!("{} / {} ({flag})", c.scenario, c.kind.name()));
        }
        let pct = |v: f64| {
            if timed {
                format!("{v:.0} %")
            } else {
                "–".to_string()
            }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {} | {} | {:.2} | {:.2} | {} | {} | {flag} |",
            c.scenario,
            c.kind.name(),
            u.wall,
            if proxy {
                format!("{:.2}", u.proxy)
            } else {
                "–".into()
            },
            if proxy { pct(busy0) } else { "–".into() },
            u.loadgen,
            u.backend,
            pct(busy1),
            if timed {
                format!("{o0:.0} / {o1:.0} %")
            } else {
                "–".into()
            },
        );
    }
    if !flagged.is_empty() {
        let _ = writeln!(s, "\nFlagged: {}.", flagged.join("; "));
    }

    let _ = writeln!(s, "\n## Caveats\n");
    for c in [
        "Two cores: the proxy has core 0; the load generator and the backend share core 1. A \
         proxied WebSocket round trip crosses cores four times (client, proxy, backend, proxy, \
         client) while a direct one stays on core 1, so \"added over direct\" includes \
         cross-core wake-ups (virtual-CPU wake-ups on a VM), the same for every proxy.",
        "One run per target and scenario, no repetitions: expect a few per cent of run-to-run \
         variation, more where the \"other\" column shows load from other processes.",
        "wrk and h2load latencies include queueing in the client at 64 connections (and 4 \
         streams each for h2load); h2load's percentiles come from its per-request log.",
        "The bulk transfers are single 1 GiB transfers of about a second each.",
    ] {
        let _ = writeln!(s, "- {c}");
    }

    if !log.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in &log.notes {
            let _ = writeln!(s, "- {n}");
        }
    }

    let _ = writeln!(s, "\n## Configs\n");
    for (name, text) in &meta.configs {
        let _ = writeln!(
            s,
            "<details><summary>{name}</summary>\n\n```\n{}\n```\n</details>\n",
            text.trim_end()
        );
    }
    s
}

/// The table's rows as tab-separated values: scenario, metric, better (higher, lower or
/// info), then streamgate, nginx, HAProxy and direct at full precision (empty where there is
/// no figure).
pub fn tsv(log: &Log) -> String {
    let mut s = String::new();
    for r in &log.rows {
        let better = match r.better {
            Better::Higher => "higher",
            Better::Lower => "lower",
            Better::Info => "info",
        };
        let v: Vec<String> = r
            .values
            .iter()
            .map(|v| v.map(|v| v.to_string()).unwrap_or_default())
            .collect();
        let _ = writeln!(
            s,
            "{}\t{}\t{better}\t{}",
            r.scenario,
            r.metric,
            v.join("\t")
        );
    }
    s
}

/// Writes `<dir>/<stamp>.md` and, for a full run, `<dir>/latest.md`.
pub fn write(dir: &Path, stamp: &str, quick: bool, text: &str) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let name = if quick {
        format!("{stamp}-quick.md")
    } else {
        format!("{stamp}.md")
    };
    let file = dir.join(name);
    std::fs::write(&file, text)?;
    let mut out = vec![file];
    if !quick {
        let latest = dir.join("latest.md");
        std::fs::write(&latest, text)?;
        out.push(latest);
    }
    Ok(out)
}

/// (file-name stamp "2025-01-31T12-00-00Z", display "2025-01-31 12:00:00 UTC") from the clock.
pub fn utc_now() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    (
        format!("{y:04}-{m:02}-{d:02}T{hh:02}-{mm:02}-{ss:02}Z"),
        format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02} UTC"),
    )
}
