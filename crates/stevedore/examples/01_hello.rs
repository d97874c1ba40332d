//! The smallest host: one closure that works until SIGTERM or Ctrl-C.
//!
//! `cargo run -p stevedore --example 01_hello`, then press Ctrl-C.

use stevedore::{Host, ServiceSpec};

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let host = Host::builder()
        .add(ServiceSpec::from_fn("greeter", |ctx| async move {
            tracing::info!("hello from {}; press Ctrl-C to stop", ctx.name());
            ctx.cancelled().await;
            tracing::info!("goodbye");
            Ok::<_, std::convert::Infallible>(())
        }))
        .build()
        .expect("a valid host");
    host.run().await.exit();
}
