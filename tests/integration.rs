mod config_errors;
mod http_proxy;
mod listeners;
mod operations;
mod sse;
mod support;
mod tls_sni;
mod websocket;
