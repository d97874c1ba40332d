//! Continuous processing: a stream or a channel consumed until the host stops.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use stevedore::stream::StreamService;
use stevedore::{BoxError, CancellationToken, Host, HostBuilder, ServiceContext, ServiceState};

fn builder() -> HostBuilder {
    Host::builder().handle_signals(false).read_env(false)
}

#[tokio::test(start_paused = true)]
async fn consumes_a_channel_until_stopped_and_leaves_the_rest_readable() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let handler = move |n: u32| {
        let sink = sink.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if n == 1 {
                return Err::<(), BoxError>("item 1 is malformed".into());
            }
            sink.lock().unwrap().push(n);
            Ok(())
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(100);
    let service = StreamService::from_receiver("indexer", rx, handler);
    let leftovers = service.receiver_handle().unwrap();
    let host = builder().add(service.into_spec()).build().unwrap();
    let status = host.status();
    let lifetime = host.lifetime();
    for n in 0..10 {
        tx.send(n).await.unwrap();
    }
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(3500)).await;
        lifetime.request_stop();
    });
    let report = host.run().await;
    stopper.await.unwrap();
    assert!(report.is_clean(), "{}", report.summary());
    // Items 0..3 taken (3 was in hand at the stop and finished); 1 failed without stopping the service.
    assert_eq!(*seen.lock().unwrap(), [0, 2, 3]);
    let s = status.service("indexer").unwrap();
    assert_eq!((s.kind, s.runs.started, s.runs.succeeded, s.runs.failed), ("stream", 4, 3, 1));
    assert_eq!(leftovers.take_unprocessed(), (4..10).collect::<Vec<_>>());
    assert!(tx.send(10).await.is_err(), "closed once read back");
}

#[tokio::test(start_paused = true)]
async fn a_finite_stream_completes_the_service() {
    let total = Arc::new(Mutex::new(0u64));
    let sum = total.clone();
    let handler = move |n: u64, _ctx: ServiceContext| {
        let sum = sum.clone();
        async move {
            *sum.lock().unwrap() += n;
            Ok::<_, BoxError>(())
        }
    };
    let service =
        StreamService::new("numbers", |_ctx: &ServiceContext| futures_util::stream::iter(1..=100u64), handler);
    let host = builder().add(service.into_spec()).build().unwrap();
    let status = host.status();
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(*total.lock().unwrap(), 5050);
    assert_eq!(status.service("numbers").unwrap().state, ServiceState::Completed);
    lifetime.request_stop();
    assert!(run.await.unwrap().is_clean());
}

#[tokio::test(start_paused = true)]
async fn the_item_in_hand_sees_the_stop() {
    let stopped_early = Arc::new(Mutex::new(false));
    let flag = stopped_early.clone();
    let handler = move |_: (), stop: CancellationToken| {
        let flag = flag.clone();
        async move {
            tokio::select! {
                _ = stop.cancelled() => *flag.lock().unwrap() = true,
                _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            }
            Ok::<_, BoxError>(())
        }
    };
    let service = StreamService::new("slow", |_ctx: &ServiceContext| futures_util::stream::repeat(()), handler);
    let host = builder().add(service.into_spec()).build().unwrap();
    let lifetime = host.lifetime();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        lifetime.request_stop();
    });
    let report = host.run().await;
    assert!(report.is_clean(), "{}", report.summary());
    assert!(*stopped_early.lock().unwrap());
    assert!(report.stop_duration < Duration::from_secs(1));
}
