//! The gateway's log lines, captured in the test: a `tracing` subscriber set as the default of
//! the test's thread. `#[tokio::test]` runs on one thread, so the gateway's tasks log into it.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tracing::subscriber::DefaultGuard;

use super::within;

/// Captured log text; capturing stops when this is dropped.
pub struct Logs {
    text: Arc<Mutex<Vec<u8>>>,
    _guard: DefaultGuard,
}

#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures everything at `debug` and above (no colours) from here on, on this thread.
    pub fn capture() -> Logs {
        let text = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink(text.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        Logs {
            text,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().expect("not poisoned")).into_owned()
    }

    /// The lines so far that hold every one of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
            .collect()
    }

    /// Waits for a line that holds every one of `needles`, and returns it.
    pub async fn line(&self, needles: &[&str]) -> String {
        within(&format!("a log line with {needles:?}"), async {
            loop {
                if let Some(line) = self.lines_with(needles).pop() {
                    return line;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Forgets what was captured so far.
    pub fn clear(&self) {
        self.text.lock().expect("not poisoned").clear();
    }
}
