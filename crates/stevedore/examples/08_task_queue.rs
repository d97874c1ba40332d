//! The article's background task queue ("queued tasks that run sequentially"): a producer enqueues
//! typed work items; a bounded queue runs them one at a time, each in its own scope; enqueueing waits
//! when the queue is full. On Ctrl-C the queue drains what can finish within the shutdown budget and
//! hands the rest back: the program prints how many were left, none are lost.
//!
//! `cargo run -p stevedore --example 08_task_queue`, then Ctrl-C.

use std::time::Duration;

use stevedore::queue::TaskQueue;
use stevedore::{BoxError, Host};

struct Thumbnail {
    image_id: u64,
}

async fn make_thumbnail(job: Thumbnail) -> Result<(), BoxError> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    if job.image_id.is_multiple_of(7) {
        return Err(format!("image {} is corrupt", job.image_id).into());
    }
    tracing::info!(image_id = job.image_id, "thumbnail made");
    Ok(())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let (queue, service) =
        TaskQueue::builder("thumbnails", make_thumbnail).capacity(10).timeout(Duration::from_secs(2)).build();
    let producer = queue.clone();
    tokio::spawn(async move {
        for image_id in 1.. {
            // Waits while 10 are queued: backpressure instead of unbounded memory.
            if producer.enqueue(Thumbnail { image_id }).await.is_err() {
                break; // the queue has stopped
            }
        }
    });
    let host = Host::builder().add(service).build().expect("a valid host");
    let report = host.run().await;
    let left = queue.take_unprocessed();
    let counts = queue.counts();
    println!(
        "made {}, failed {}, handed back {} (first: {:?})",
        counts.succeeded,
        counts.failed,
        left.len(),
        left.first().map(|t| t.image_id)
    );
    report.exit();
}
