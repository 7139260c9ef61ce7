//! Where log lines go: the main log to stderr (level from `RUST_LOG`), the access log
//! (`[log] access`, tracing target [`ACCESS_TARGET`]) to its own writer: stderr, stdout, or a
//! file that SIGUSR1 opens again at its path, for logrotate.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::Subscriber;
use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::{AccessTarget, LogConfig, LogFormat};

/// The target of every access line.
pub const ACCESS_TARGET: &str = "streamgate::access";

/// A layer of the global subscriber.
pub type BoxedLayer<S> = Box<dyn Layer<S> + Send + Sync + 'static>;

/// The access log's layer (None when it is off) and its file (when it is one).
pub type AccessLayer<S> = (Option<BoxedLayer<S>>, Option<Arc<AccessFile>>);

/// Installs the global subscriber. The main log's format is `main_format` (`--log-format`),
/// else `log.format`, else pretty on a terminal and JSON otherwise; the access log's is
/// `log.format`, else `--log-format`, else the same rule for its own destination. Returns the
/// access log file, for [`reopen_on_sigusr1`].
pub fn init(
    main_format: Option<LogFormat>,
    config: &LogConfig,
) -> io::Result<Option<Arc<AccessFile>>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (access, file) = access_layer(config, main_format)?;
    tracing_subscriber::registry()
        .with(main_layer(main_format.or(config.format)))
        .with(access)
        .init();
    Ok(file)
}

/// The main log on stderr: everything `RUST_LOG` lets through (default `info`) except the
/// access lines, which have a writer of their own.
pub fn main_layer<S>(format: Option<LogFormat>) -> BoxedLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Static target filters, not closures: they decide per callsite, once, so spans and
    // events no layer wants cost nothing per request (a closure is asked on every span,
    // and the registry then keeps span data for all of them).
    let not_access = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target(ACCESS_TARGET, LevelFilter::OFF);
    let filter = env.and(not_access);
    let terminal = io::stderr().is_terminal();
    match format.unwrap_or(auto(terminal)) {
        LogFormat::Pretty => fmt::layer()
            .with_writer(io::stderr)
            .with_ansi(terminal)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_current_span(false)
            .with_writer(io::stderr)
            .with_filter(filter)
            .boxed(),
    }
}

/// The access log's layer (None when `log.access = "off"`), and its file when it has one.
/// Access lines do not depend on `RUST_LOG`. JSON lines carry the fields at the top level.
pub fn access_layer<S>(
    config: &LogConfig,
    fallback: Option<LogFormat>,
) -> io::Result<AccessLayer<S>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let (writer, terminal, file) = match &config.access {
        AccessTarget::Off => return Ok((None, None)),
        AccessTarget::Stderr => (
            BoxMakeWriter::new(io::stderr),
            io::stderr().is_terminal(),
            None,
        ),
        AccessTarget::Stdout => (
            BoxMakeWriter::new(io::stdout),
            io::stdout().is_terminal(),
            None,
        ),
        AccessTarget::File(path) => {
            let file = AccessFile::open(path)?;
            (
                BoxMakeWriter::new(AccessWriter(file.clone())),
                false,
                Some(file),
            )
        }
    };
    let only_access = Targets::new().with_target(ACCESS_TARGET, LevelFilter::TRACE);
    let layer = match config.format.or(fallback).unwrap_or(auto(terminal)) {
        LogFormat::Pretty => fmt::layer()
            .with_writer(writer)
            .with_ansi(terminal)
            .with_filter(only_access)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(only_access)
            .boxed(),
    };
    Ok((Some(layer), file))
}

fn auto(terminal: bool) -> LogFormat {
    if terminal {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    }
}

/// The access log file, appended to. [`AccessFile::reopen`] opens the path again, so after
/// logrotate renames the file the next lines go to a new one at the path.
pub struct AccessFile {
    path: PathBuf,
    file: ArcSwap<File>,
}

impl AccessFile {
    pub fn open(path: &Path) -> io::Result<Arc<AccessFile>> {
        let file = append(path)?;
        Ok(Arc::new(AccessFile {
            path: path.to_path_buf(),
            file: ArcSwap::from_pointee(file),
        }))
    }

    /// Lines being written finish in the old file; the next ones go to the new one.
    pub fn reopen(&self) -> io::Result<()> {
        self.file.store(Arc::new(append(&self.path)?));
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("log.access: {}: {e}", path.display())))
}

/// Hands the current file to each line (one `write` of a whole line, to a file in append mode).
#[derive(Clone)]
struct AccessWriter(Arc<AccessFile>);

impl<'a> MakeWriter<'a> for AccessWriter {
    type Writer = FileWriter;

    fn make_writer(&'a self) -> FileWriter {
        FileWriter(self.0.file.load_full())
    }
}

pub struct FileWriter(Arc<File>);

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
    }
}

/// Listens for SIGUSR1 from now on (call it before the gateway reports ready) and returns the
/// task that opens the access log file again on each one.
pub fn reopen_on_sigusr1(
    file: Option<Arc<AccessFile>>,
) -> io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1())?;
    Ok(async move {
        while usr1.recv().await.is_some() {
            let Some(file) = &file else {
                tracing::info!("SIGUSR1 received; the access log is not a file, nothing to reopen");
                continue;
            };
            match file.reopen() {
                Ok(()) => {
                    tracing::info!(path = %file.path().display(), "SIGUSR1 received, access log reopened")
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "SIGUSR1 received, but the access log cannot be reopened; lines go to the old file"
                ),
            }
        }
    })
}
