//! `streamgate health` asks the running gateway on its control socket and never reads the
//! config file: a file broken after the start does not make a running gateway unhealthy, and a
//! gateway that is gone is reported as such.

use std::path::Path;
use std::process::Output;

use crate::support::process::{GatewayFiles, GatewayProcess};
use crate::support::{within, Backend, PATIENCE};

/// Runs `streamgate health` with `args` (and no STREAMGATE_CONTROL_SOCKET unless `env` gives one).
async fn health(args: &[&str], env: Option<&Path>) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env = env.map(Path::to_path_buf);
    within(
        "streamgate health",
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_streamgate"));
            cmd.arg("health").args(&args);
            cmd.env_remove("STREAMGATE_CONTROL_SOCKET");
            if let Some(socket) = env {
                cmd.env("STREAMGATE_CONTROL_SOCKET", socket);
            }
            cmd.output().expect("run streamgate health")
        }),
    )
    .await
    .expect("no panic")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_asks_the_running_gateway_not_its_config_file() {
    let a = Backend::echo("A").await;
    let body = format!("[[route]]\npath = \"/\"\nbackends = [\"{}\"]\n", a.url());
    let mut gw = GatewayProcess::start(GatewayFiles::new(), &body).await;
    let socket = gw.files.control_socket();
    let socket_arg = socket.to_str().expect("a UTF-8 temp path").to_string();

    // The file is broken after the start: the gateway refuses the reload and keeps serving.
    std::fs::write(gw.files.config(), "[listen]\nhttps = garbage ][").expect("break the file");
    gw.signal("HUP");
    gw.log_event("config reload refused").await;
    // `health` has no --config at all: nothing it does could read the broken file.
    let up = health(&["--socket", &socket_arg], None).await;
    assert!(up.status.success(), "healthy: {}", stderr(&up));
    // The socket found through the environment, as the image's HEALTHCHECK would.
    let up = health(&[], Some(&socket)).await;
    assert!(up.status.success(), "healthy: {}", stderr(&up));

    // A drained gateway removes its socket on the way out.
    gw.signal("TERM");
    let status = gw.exit_within(PATIENCE).await.expect("the gateway exits");
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the control socket is removed at exit");
    let down = health(&["--socket", &socket_arg], None).await;
    assert_eq!(down.status.code(), Some(1), "{}", stderr(&down));
    assert!(
        stderr(&down).contains("no gateway answers on the control socket"),
        "and says why: {}",
        stderr(&down)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fails_for_a_killed_gateway_and_its_stale_socket() {
    let a = Backend::echo("A").await;
    let body = format!("[[route]]\npath = \"/\"\nbackends = [\"{}\"]\n", a.url());
    let mut gw = GatewayProcess::start(GatewayFiles::new(), &body).await;
    let socket = gw.files.control_socket();
    assert!(health(&[], Some(&socket)).await.status.success());
    gw.stop();
    assert!(socket.exists(), "SIGKILL leaves the socket file behind");
    let down = health(&[], Some(&socket)).await;
    assert_eq!(down.status.code(), Some(1), "{}", stderr(&down));
    assert!(stderr(&down).contains("unhealthy"), "{}", stderr(&down));
}
