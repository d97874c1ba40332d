//! The dashboard in a real headless Chromium (driven through chromedriver): the services are
//! listed, "Run now" with the admin token runs the service, and the page shows the new run count.
//! With feature `jobs`, a dead job's attempt errors open on demand, and "Retry" takes it off the
//! dead list. Screenshots are saved under `target/stevedore-web/` (`dashboard.png`, and
//! `dashboard-dead-job.png` with the job's errors open).

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use axum::Router;
use common::{eventually, queue, triggered};
use fantoccini::{ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use stevedore::Host;
use stevedore_web::{WebHostExt, WebServer};

const TOKEN: &str = "browser-test-token";

fn artifact_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("stevedore-web")
}

/// The text of the element `css` selects, read in one script call.
async fn text_of(browser: &fantoccini::Client, css: &str) -> Result<String, fantoccini::error::CmdError> {
    let value = browser
        .execute("var e = document.querySelector(arguments[0]); return e ? e.textContent : null;", vec![css.into()])
        .await?;
    Ok(value.as_str().unwrap_or("<missing>").to_string())
}

fn is_stale(e: &fantoccini::error::CmdError) -> bool {
    matches!(e, fantoccini::error::CmdError::Standard(w) if w.error == fantoccini::error::ErrorStatus::StaleElementReference)
}

/// Saves a screenshot of the window under `target/stevedore-web/`.
async fn save_screenshot(browser: &fantoccini::Client, name: &str) -> Result<(), fantoccini::error::CmdError> {
    let png = browser.screenshot().await?;
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
    let dir = artifact_dir();
    std::fs::create_dir_all(&dir).expect("target dir");
    std::fs::write(dir.join(name), &png).expect("screenshot saved");
    Ok(())
}

/// Clicks the element `css` selects, again if the live refresh replaced it in between.
async fn click(browser: &fantoccini::Client, css: &str) -> Result<(), fantoccini::error::CmdError> {
    let mut attempts = 0;
    loop {
        match browser.find(Locator::Css(css)).await?.click().await {
            Ok(()) => return Ok(()),
            Err(e) if attempts < 5 && is_stale(&e) => attempts += 1,
            Err(e) => return Err(e),
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("bound").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_runs_a_service_now_in_a_real_browser() {
    if !common::require_tool("/usr/bin/chromium", "chromium")
        || !common::require_tool("/usr/bin/chromedriver", "chromium-driver")
    {
        return;
    }
    let web = WebServer::new(Router::new()).bind("127.0.0.1:0").name("b-web").admin_token(Some(TOKEN)).metrics(false);
    #[cfg(feature = "jobs")]
    let (store, place) = common::jobs::sqlite().await;
    #[cfg(feature = "jobs")]
    let (web, dead) = {
        let dead = common::jobs::make_dead(&store, "b-reports", "printer on fire").await;
        (web.jobs(store.clone()), dead)
    };
    let mut local = web.local_addr();
    let host = Host::builder()
        .handle_signals(false)
        .read_env(false)
        .add(triggered("b-report"))
        .add(queue("b-emails"))
        .build_web(web)
        .expect("valid host");
    let status = host.status();
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    let addr = local.wait().await.expect("bound");
    assert!(lifetime.started().await);

    let port = free_port();
    let _driver = tokio::process::Command::new("/usr/bin/chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    let driver_url = format!("http://127.0.0.1:{port}");
    let driver_addr = format!("127.0.0.1:{port}").parse().expect("an address");
    eventually(Duration::from_secs(20), "chromedriver answers", || async move {
        common::send("GET", driver_addr, "/status", None).await.is_ok_and(|r| r.status == 200)
    })
    .await;

    let profile = std::env::temp_dir().join(format!("stevedore-web-chromium-{}-{port}", std::process::id()));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_string(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,720",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    let browser = ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&driver_url)
        .await
        .expect("a Chromium session");

    let outcome = async {
        browser.goto(&format!("http://{addr}/stevedore")).await?;
        for name in ["b-report", "b-emails", "b-web"] {
            browser.find(Locator::Css(&format!(r#"tr[data-service="{name}"]"#))).await?;
        }
        // The live section is re-rendered every two seconds, so cells are read in one script call
        // (an element found earlier may have been replaced), and the click is retried if the
        // button was replaced between finding and clicking it.
        let runs = || text_of(&browser, r#"tr[data-service="b-report"] td.runs"#);
        assert_eq!(runs().await?, "0");
        browser.find(Locator::Id("token")).await?.send_keys(TOKEN).await?;
        let button = r#"button[data-action="trigger"][data-name="b-report"]"#;
        click(&browser, button).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = runs().await?;
            if text == "1" {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the run count stayed at {text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let message = text_of(&browser, "#message").await?;
        assert_eq!(message, "trigger b-report: done");

        #[cfg(feature = "jobs")]
        {
            // The dead job's attempt errors are fetched when its row is opened.
            let summary = format!(r#"details[data-errors="{dead}"] summary"#);
            click(&browser, &summary).await?;
            let first_error = format!(r#"details[data-errors="{dead}"] li"#);
            let mut text = String::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !text.contains("printer on fire") {
                assert!(tokio::time::Instant::now() < deadline, "the attempt errors never showed: {text}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                text = text_of(&browser, &first_error).await?;
            }
            assert!(text.starts_with("attempt 1 at "), "{text}");
            // It stays open, its errors shown, across the next live refresh (which replaces the
            // section: the marker set here disappears with the old element).
            let mark = "document.getElementById('jobs').setAttribute('data-old', '1'); return true;";
            browser.execute(mark, vec![]).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while text_of(&browser, "#jobs[data-old]").await? != "<missing>" {
                assert!(tokio::time::Instant::now() < deadline, "the live section was never refreshed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(text_of(&browser, &first_error).await?.contains("printer on fire"), "closed by the refresh");
            let scroll = "document.getElementById('jobs').scrollIntoView(); return true;";
            browser.execute(scroll, vec![]).await?;
            save_screenshot(&browser, "dashboard-dead-job.png").await?;
            // "Retry" takes it off the dead list.
            click(&browser, &format!(r#"button[data-post="stevedore/api/jobs/{dead}/retry"]"#)).await?;
            let row = format!(r#"#dead-jobs tr[data-job="{dead}"]"#);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while text_of(&browser, &row).await? != "<missing>" {
                assert!(tokio::time::Instant::now() < deadline, "the retried job stayed on the dead list");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(text_of(&browser, "#message").await?, format!("retry job {dead}: done"));
            assert_eq!(text_of(&browser, "#no-dead-jobs").await?, "No dead jobs.");
        }
        save_screenshot(&browser, "dashboard.png").await?;
        Ok::<_, fantoccini::error::CmdError>(())
    }
    .await;
    let _ = browser.close().await;
    let _ = std::fs::remove_dir_all(&profile);
    outcome.expect("the browser session");

    assert_eq!(status.service("b-report").expect("registered").runs.succeeded, 1);
    lifetime.request_stop();
    assert!(run.await.expect("joined").start_error.is_none());
    #[cfg(feature = "jobs")]
    {
        use stevedore_jobs::{JobState, JobStore};
        let job = store.get(dead).await.expect("read the job").expect("the job exists");
        assert_eq!(job.state, JobState::Available, "the click retried the job");
        drop(store);
        place.remove().await;
    }
}
