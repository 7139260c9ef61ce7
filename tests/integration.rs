mod config_errors;
mod http_proxy;
mod listeners;
mod support;
mod tls_sni;
