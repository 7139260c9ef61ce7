//! The results file: the table (absolute figures, ratios, the issue's goals), the fairness
//! section (versions, machine, pinning, load generator CPU) and the configs that were run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::proxies::Kind;
use crate::scenarios::{Better, Goal, Log, Row, Usage};

/// Facts about the run, gathered by main.
pub struct Meta {
    pub started_utc: String,
    pub minutes: f64,
    /// Minutes since bench/run.sh started (install check and builds included), when run by it.
    pub script_minutes: Option<f64>,
    pub rounds: usize,
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
    if a == 0.0 {
        "0".to_string()
    } else if a >= 1000.0 {
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

/// A figure with its spread over the rounds: `50,571 ±8.1%` (spread = (max - min) / median),
/// or the range, `-6.2 (-40.1 to 95.3)`, where the spread would exceed 100 % (figures near
/// zero); `(2 of 3)` when some rounds gave no figure.
fn cell(row: &Row, k: Kind, rounds: usize) -> String {
    let Some(st) = row.stats(k) else {
        return "n/a".to_string();
    };
    let mut out = num(st.median);
    match st.spread() {
        // Near zero a relative spread says nothing: the range instead.
        Some(sp) if sp > 1.0 => {
            let _ = write!(out, " ({} to {})", num(st.min), num(st.max));
        }
        Some(sp) if sp < 0.1 => {
            let _ = write!(out, " ±{:.1}%", sp * 100.0);
        }
        Some(sp) => {
            let _ = write!(out, " ±{:.0}%", sp * 100.0);
        }
        None if st.n > 1 && st.min != st.max => {
            let _ = write!(out, " ({} to {})", num(st.min), num(st.max));
        }
        None => {}
    }
    if st.n < rounds {
        let _ = write!(out, " ({} of {rounds})", st.n);
    }
    out
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => {
            format!("{:.2}×", a / b)
        }
        _ => "–".to_string(),
    }
}

/// The goal's text and whether streamgate's median meets it.
fn judge(row: &Row) -> Option<(String, Option<bool>, String)> {
    let g = row.goal?;
    let sg = row.median(Kind::Streamgate);
    let others: Vec<f64> = [Kind::Nginx, Kind::Haproxy]
        .iter()
        .filter_map(|k| row.median(*k))
        .collect();
    let max = others.iter().cloned().reduce(f64::max);
    let min = others.iter().cloned().reduce(f64::min);
    let (text, met, detail) = match g {
        Goal::AtLeast(k) => {
            let (met, d) = relative(sg, max, |sg, best| sg >= k * best);
            (format!("≥ {k}× best"), met, d)
        }
        Goal::AtMost(k) => {
            let (met, d) = relative(sg, min, |sg, best| sg <= k * best);
            (format!("≤ {k}× best"), met, d)
        }
        Goal::Below(v) => (
            format!("≤ {} (absolute)", num(v)),
            sg.map(|sg| sg <= v),
            sg.map(num).unwrap_or_else(|| "no data".to_string()),
        ),
    };
    Some((text, met, detail))
}

fn relative(
    sg: Option<f64>,
    best: Option<f64>,
    ok: impl Fn(f64, f64) -> bool,
) -> (Option<bool>, String) {
    match (sg, best) {
        (Some(sg), Some(best)) => {
            let r = if best != 0.0 {
                format!("{:.2}× best", sg / best)
            } else {
                "best is 0".to_string()
            };
            (Some(ok(sg, best)), r)
        }
        _ => (None, "no data".to_string()),
    }
}

/// CPU of one scenario and target, summed over its rounds.
struct CpuSum {
    scenario: String,
    kind: Kind,
    runs: usize,
    total: Usage,
    /// The highest share of a core the load generator took in one run (runs of 1 s or more).
    loadgen_max: Option<f64>,
    /// Runs in which core 1 was at 90 % or more while core 0 was not / while it was too.
    client_bound: usize,
    both_busy: usize,
    loadgen_over: usize,
    contended: usize,
}

const LOADGEN_LIMIT: f64 = 80.0;
const CORE_BUSY: f64 = 90.0;
const SAME_FIGURE: f64 = 0.05;

fn cpu_sums(log: &Log) -> Vec<CpuSum> {
    let mut out: Vec<CpuSum> = Vec::new();
    for c in &log.cpu {
        let i = match out
            .iter()
            .position(|s| s.scenario == c.scenario && s.kind == c.kind)
        {
            Some(i) => i,
            None => {
                out.push(CpuSum {
                    scenario: c.scenario.clone(),
                    kind: c.kind,
                    runs: 0,
                    total: Usage::default(),
                    loadgen_max: None,
                    client_bound: 0,
                    both_busy: 0,
                    loadgen_over: 0,
                    contended: 0,
                });
                out.len() - 1
            }
        };
        let s = &mut out[i];
        let u = c.usage;
        s.runs += 1;
        s.total.wall += u.wall;
        s.total.proxy += u.proxy;
        s.total.loadgen += u.loadgen;
        s.total.backend += u.backend;
        s.total.other0 += u.other0;
        s.total.other1 += u.other1;
        if u.wall < 1.0 {
            continue;
        }
        let lg = u.loadgen / u.wall * 100.0;
        s.loadgen_max = Some(s.loadgen_max.map_or(lg, |m: f64| m.max(lg)));
        let busy0 = u.proxy / u.wall * 100.0;
        let busy1 = (u.loadgen + u.backend) / u.wall * 100.0;
        if c.kind != Kind::Direct {
            if busy1 >= CORE_BUSY {
                if busy0 < CORE_BUSY {
                    s.client_bound += 1;
                } else {
                    s.both_busy += 1;
                }
            }
            if lg > LOADGEN_LIMIT {
                s.loadgen_over += 1;
            }
        }
        if u.other0 / u.wall >= 0.15 || u.other1 / u.wall >= 0.15 {
            s.contended += 1;
        }
    }
    out
}

/// Headline rows on which every target, direct included, landed within 5 % of the others.
fn same_figure(log: &Log) -> Vec<(String, String, f64)> {
    log.rows
        .iter()
        .filter(|r| r.headline && r.median(Kind::Direct).is_some())
        .filter_map(|r| {
            let v: Vec<f64> = [Kind::Streamgate, Kind::Nginx, Kind::Haproxy, Kind::Direct]
                .iter()
                .filter_map(|k| r.median(*k))
                .collect();
            let hi = v.iter().cloned().reduce(f64::max)?;
            let lo = v.iter().cloned().reduce(f64::min)?;
            let spread = (hi - lo) / hi;
            (v.len() >= 3 && hi > 0.0 && spread <= SAME_FIGURE)
                .then(|| (r.scenario.clone(), r.metric.clone(), spread * 100.0))
        })
        .collect()
}

pub fn render(meta: &Meta, log: &Log) -> String {
    let mut s = String::new();
    let kind = if meta.quick {
        " (--quick: shortened, not for comparison)"
    } else {
        ""
    };
    let _ = writeln!(s, "# streamgate benchmark, {}{kind}\n", meta.started_utc);
    let total = match meta.script_minutes {
        Some(m) => format!(
            "the bench took {:.1} minutes ({:.1} minutes for all of bench/run.sh, with the \
             install check and the release builds)",
            meta.minutes, m
        ),
        None => format!("the bench took {:.1} minutes", meta.minutes),
    };
    let _ = writeln!(
        s,
        "Command: `{}`; {total}. Machine: {} ({} cores), Linux {}.\n",
        meta.command, meta.cpu_model, meta.cores, meta.kernel
    );
    if meta.rounds > 1 {
        let _ = writeln!(
            s,
            "Every scenario ran {} rounds against each target: in each round streamgate, \
             nginx, HAProxy, then the backend directly, one after the other; then the next \
             round. Each figure is the median over the rounds, followed by its spread ±S % = \
             (max - min) / median over the rounds, or by its range (min to max) where that \
             spread would be over 100 % (figures near zero); a figure with fewer runs says so: \
             \"(2 of {})\". Ratios and goals use the medians.\n",
            meta.rounds, meta.rounds
        );
    } else {
        let _ = writeln!(
            s,
            "One round: every scenario ran once against each target, in turn (streamgate, \
             nginx, HAProxy, then the backend directly); no spread.\n"
        );
    }
    let _ = writeln!(
        s,
        "Better: ↑ higher is better, ↓ lower is better, · context. Ratios are streamgate divided \
         by the other target. Goals (issue 10) compare streamgate with the better of nginx and \
         HAProxy, except where marked absolute.\n"
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
        let sg = r.median(Kind::Streamgate);
        let _ = writeln!(
            s,
            "| {scen} | {} | {better} | {} | {} | {} | {} | {} | {} | {} | {goal} | {met} |",
            r.metric,
            cell(r, Kind::Streamgate, meta.rounds),
            cell(r, Kind::Nginx, meta.rounds),
            cell(r, Kind::Haproxy, meta.rounds),
            cell(r, Kind::Direct, meta.rounds),
            ratio(sg, r.median(Kind::Nginx)),
            ratio(sg, r.median(Kind::Haproxy)),
            ratio(sg, r.median(Kind::Direct)),
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

    let sums = cpu_sums(log);
    let _ = writeln!(s, "\n## Load generator check\n");
    let _ = writeln!(
        s,
        "A proxy's figure means something only if the client side kept up. Per scenario, over \
         the proxies' runs (direct runs are bound by core 1 by design and left out): the \
         highest share of its core the load generator (the bench process plus the wrk/h2load \
         it ran) took in one run, and the highest share of core 1 (load generator plus \
         backend) in one run. A scenario is flagged when the load generator went over \
         {LOADGEN_LIMIT:.0} % of its core, when core 1 was at {CORE_BUSY:.0} % or more while \
         the proxy's core was not (*client-bound*), or when its headline figure landed within \
         {:.0} % for every target, direct included (then it measures the client). *Both cores \
         busy* (core 1 saturated while the proxy's core was too) is reported but not flagged: \
         the proxy was the limit as much as the client. Runs under 1 s (the bulk transfers, \
         direct WebSocket echo) have no percentages: CPU time is counted in 10 ms ticks.\n",
        SAME_FIGURE * 100.0
    );
    let _ = writeln!(
        s,
        "| scenario | load gen, max of a run (% of a core) | core 1, max of a run | client-bound runs | both cores busy runs | check |"
    );
    let _ = writeln!(s, "|---|--:|--:|--:|--:|---|");
    let same = same_figure(log);
    let mut scen_order: Vec<&str> = Vec::new();
    for c in &sums {
        if !scen_order.contains(&c.scenario.as_str()) {
            scen_order.push(&c.scenario);
        }
    }
    let mut flagged_scen = Vec::new();
    for scen in scen_order {
        let proxies: Vec<&CpuSum> = sums
            .iter()
            .filter(|c| c.scenario == scen && c.kind != Kind::Direct)
            .collect();
        let lg = proxies
            .iter()
            .filter_map(|c| c.loadgen_max)
            .reduce(f64::max);
        let core1 = log
            .cpu
            .iter()
            .filter(|c| c.scenario == scen && c.kind != Kind::Direct && c.usage.wall >= 1.0)
            .map(|c| (c.usage.loadgen + c.usage.backend) / c.usage.wall * 100.0)
            .reduce(f64::max);
        let runs: usize = proxies.iter().map(|c| c.runs).sum();
        let cb: usize = proxies.iter().map(|c| c.client_bound).sum();
        let bb: usize = proxies.iter().map(|c| c.both_busy).sum();
        let over: usize = proxies.iter().map(|c| c.loadgen_over).sum();
        let mut why = Vec::new();
        if over > 0 {
            why.push(format!(
                "load generator over {LOADGEN_LIMIT:.0} % in {over} of {runs} runs"
            ));
        }
        if cb > 0 {
            let who: Vec<&str> = proxies
                .iter()
                .filter(|c| c.client_bound > 0)
                .map(|c| c.kind.name())
                .collect();
            why.push(format!(
                "client-bound in {cb} of {runs} runs ({})",
                who.join(", ")
            ));
        }
        for (_, metric, sp) in same.iter().filter(|(sc, _, _)| sc == scen) {
            why.push(format!(
                "{metric}: every target within {sp:.1} % (measures the client)"
            ));
        }
        let check = if why.is_empty() {
            "ok".to_string()
        } else {
            flagged_scen.push(format!("{scen} ({})", why.join("; ")));
            format!("**flagged**: {}", why.join("; "))
        };
        let pct = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.0} %"));
        let _ = writeln!(
            s,
            "| {scen} | {} | {} | {cb} of {runs} | {bb} of {runs} | {check} |",
            pct(lg),
            pct(core1)
        );
    }
    if flagged_scen.is_empty() {
        let _ = writeln!(s, "\nNo scenario flagged.");
    } else {
        let _ = writeln!(s, "\nFlagged: {}.", flagged_scen.join("; "));
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
         accepts it). Session resumption: nginx `ssl_session_cache shared:SSL:10m` and \
         `ssl_session_tickets on`, HAProxy its defaults (session cache, tickets on), streamgate \
         its own; the bench's client resumes only in scenario 2b (every other connection is a \
         full handshake). What the bench's client negotiated:"
    );
    for (k, d) in &meta.tls {
        let _ = writeln!(s, "  - {}: {d}", k.name());
    }
    let _ = writeln!(
        s,
        "- One worker each: streamgate `[runtime] worker_threads = 1`, nginx `worker_processes 1`, \
         HAProxy `nbthread 1`. No access logs: streamgate `[log] access = \"off\"` (and \
         `RUST_LOG=warn`), nginx `access_log off`, HAProxy no `log` line."
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
        "Summed over the rounds. Load generator = the bench process plus the wrk/h2load it ran. \
         Core 1 holds the load generator and the backend. \"Other\" is the rest of each core's \
         busy time in /proc/stat (other processes on the machine, steal, interrupt work not \
         charged to a process). Flags, with the number of runs: *load gen > {LOADGEN_LIMIT:.0} \
         %*; *client-bound* when core 1 was at {CORE_BUSY:.0} % or more while the proxy's core \
         0 was not; *both cores busy* when both were; *contended* when other load took 15 % or \
         more of either core (the figure is disturbed). Direct rows are bound by core 1 by \
         design. Percentages are left out for runs under 1 s.\n"
    );
    let _ = writeln!(
        s,
        "| scenario | target | runs | wall s | proxy CPU s | core 0 busy | load gen CPU s | load gen max | backend CPU s | core 1 busy | other core 0 / 1 | flags |"
    );
    let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    for c in &sums {
        let u = c.total;
        let proxy = c.kind != Kind::Direct;
        let timed = u.wall >= 1.0 * c.runs as f64;
        let pct = |v: f64| {
            if timed {
                format!("{:.0} %", v / u.wall * 100.0)
            } else {
                "–".to_string()
            }
        };
        let mut flags = Vec::new();
        for (n, name) in [
            (c.loadgen_over, format!("load gen > {LOADGEN_LIMIT:.0} %")),
            (c.client_bound, "client-bound".to_string()),
            (c.both_busy, "both cores busy".to_string()),
            (c.contended, "contended".to_string()),
        ] {
            if n > 0 {
                flags.push(format!("{name} ({n})"));
            }
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {} | {} | {:.2} | {} | {:.2} | {} | {} | {} |",
            c.scenario,
            c.kind.name(),
            c.runs,
            u.wall,
            if proxy {
                format!("{:.2}", u.proxy)
            } else {
                "–".into()
            },
            if proxy { pct(u.proxy) } else { "–".into() },
            u.loadgen,
            c.loadgen_max
                .map_or("–".to_string(), |v| format!("{v:.0} %")),
            u.backend,
            pct(u.loadgen + u.backend),
            if timed {
                format!(
                    "{:.0} / {:.0} %",
                    u.other0 / u.wall * 100.0,
                    u.other1 / u.wall * 100.0
                )
            } else {
                "–".into()
            },
            flags.join(", "),
        );
    }

    let _ = writeln!(s, "\n## Caveats\n");
    for c in [
        "Two cores: the proxy has core 0; the load generator and the backend share core 1. A \
         proxied WebSocket round trip crosses cores four times (client, proxy, backend, proxy, \
         client) while a direct one stays on core 1, so \"added over direct\" includes \
         cross-core wake-ups (virtual-CPU wake-ups on a VM), the same for every proxy.",
        "Short runs (4 s of load per target and round, 3 s for SSE) keep the whole run under \
         15 minutes on 2 cores; the rounds and their spread show how much a figure moves from \
         run to run. Expect more where the \"other\" column shows load from other processes \
         (the *contended* flag).",
        "wrk and h2load latencies include queueing in the client at 64 connections (and 4 \
         streams each for h2load); h2load's percentiles come from its per-request log.",
        "The bulk transfers are single 100 MB transfers of about a tenth of a second each: \
         their CPU-per-GiB figures rest on a few 10 ms ticks.",
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
/// info), then the medians over the rounds of streamgate, nginx, HAProxy and direct at full
/// precision (empty where there is no figure).
pub fn tsv(log: &Log) -> String {
    let mut s = String::new();
    for r in &log.rows {
        let better = match r.better {
            Better::Higher => "higher",
            Better::Lower => "lower",
            Better::Info => "info",
        };
        let v: Vec<String> = [Kind::Streamgate, Kind::Nginx, Kind::Haproxy, Kind::Direct]
            .iter()
            .map(|k| r.median(*k).map(|v| v.to_string()).unwrap_or_default())
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

/// Writes `<dir>/<stamp>.md` (`<stamp>-quick.md` for --quick) and, for a full run of every
/// scenario, `<dir>/latest.md`.
pub fn write(
    dir: &Path,
    stamp: &str,
    quick: bool,
    latest: bool,
    text: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let name = if quick {
        format!("{stamp}-quick.md")
    } else {
        format!("{stamp}.md")
    };
    let file = dir.join(name);
    std::fs::write(&file, text)?;
    let mut out = vec![file];
    if latest && !quick {
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
