//! A hosted consumer stopped with SIGTERM finishes the message in flight, takes nothing more,
//! and leaves the rest with the broker. The consumer runs as a child process (the `consumer`
//! example, a Stevedore host).

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use stevedore_bus::amqp::{AmqpConfig, AmqpPublisher};
use stevedore_bus::consumer::{Consumer, ConsumerOptions};
use stevedore_bus::nats::{JetStreamPublisher, JetStreamSource, NatsConfig};
use stevedore_bus::{Message, Publisher};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn consumer_binary() -> PathBuf {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "stevedore-bus", "--example", "consumer"])
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the consumer example failed");
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples").join("consumer")
}

/// Runs the consumer, sends SIGTERM while the first handler runs, and returns its output lines.
async fn run_and_terminate(args: &[String]) -> Vec<String> {
    let mut child = Command::new(consumer_binary())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the consumer");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the consumer took a message")
        .unwrap()
        .unwrap();
    assert!(first.starts_with("started "), "{first}");
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut out = vec![first];
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap() {
        out.push(line);
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "the host stopped cleanly: {status:?}");
    out
}

fn assert_drained(lines: &[String]) {
    assert_eq!(lines.len(), 2, "one message started and finished, nothing else taken: {lines:?}");
    let id = lines[0].trim_start_matches("started ");
    assert_eq!(lines[1], format!("handled {id}"));
}

#[tokio::test]
async fn rabbitmq_consumer_drains_on_sigterm() {
    if !stevedore_testkit::require(stevedore_testkit::RABBITMQ) {
        return;
    }
    let exchange = unique("stv_x");
    let queue = unique("stv_q");
    let publisher =
        AmqpPublisher::new(AmqpConfig::new(stevedore_testkit::amqp_url(), &exchange)).with_queue(&queue, &["#"]);
    let batch: Vec<_> = (0..5).map(|i| Message::new("jobs.run", format!("{i}"), "x")).collect();
    assert_eq!(publisher.publish_batch(&batch).await.confirmed, 5);
    let args =
        ["amqp".to_string(), stevedore_testkit::amqp_url(), exchange.clone(), queue.clone(), "#".into(), "1500".into()];
    let lines = run_and_terminate(&args).await;
    assert_drained(&lines);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while amqp_count(&queue).await != 4 {
        assert!(tokio::time::Instant::now() < deadline, "the four others are back in the queue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    amqp_cleanup(&exchange, &[&queue]).await;
}

#[tokio::test]
async fn jetstream_consumer_drains_on_sigterm() {
    if !stevedore_testkit::require(stevedore_testkit::NATS) {
        return;
    }
    let stream = unique("STV");
    let prefix = unique("stv");
    let subjects = format!("{prefix}.>");
    let config = NatsConfig::new(stevedore_testkit::nats_url(), &stream, &[&subjects]);
    let publisher = JetStreamPublisher::new(config.clone());
    let batch: Vec<_> = (0..5).map(|i| Message::new(format!("{prefix}.jobs"), format!("{i}"), "x")).collect();
    assert_eq!(publisher.publish_batch(&batch).await.confirmed, 5);
    let args = [
        "nats".to_string(),
        stevedore_testkit::nats_url(),
        stream.clone(),
        "worker".into(),
        subjects.clone(),
        "1500".into(),
    ];
    let lines = run_and_terminate(&args).await;
    assert_drained(&lines);
    // The four not started were given back (negatively acknowledged), so the next consumer of
    // the durable gets exactly them at once, not after the 30 s ack wait.
    let handled: uuid::Uuid = lines[0].trim_start_matches("started ").parse().unwrap();
    let seen = Seen::default();
    let next = std::sync::Arc::new(Consumer::new(
        JetStreamSource::new(config, "worker", &subjects),
        seen.handler(),
        ConsumerOptions::default(),
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let (c, s) = (next.clone(), stop.clone());
        async move { c.run(s).await }
    });
    assert!(seen.wait_for(4, Duration::from_secs(5)).await, "got {} of 4 back", seen.distinct());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    run.await.unwrap().unwrap();
    let others: Vec<_> = batch.iter().map(|m| m.id).filter(|id| *id != handled).collect();
    assert_eq!(others.len(), 4);
    assert!(seen.contains_all(&others).is_empty());
    assert_eq!(seen.distinct(), 4, "the handled message was not redelivered");
    nats_cleanup(&stream).await;
}
