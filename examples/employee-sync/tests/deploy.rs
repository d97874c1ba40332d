//! The deployment files parse and hold their promises: every Kubernetes manifest is valid YAML;
//! each Deployment probes /health/live and /health/ready, requests resources, runs as non-root, and
//! gives the kubelet a grace period above its shutdown delay plus its shutdown budget; the
//! Dockerfile is multi-stage and ends as a non-root user. (No container engine runs here, so the
//! image itself is not built by the tests.)

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn manifests() -> Vec<(String, Value)> {
    let dir = deploy_dir().join("k8s");
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for path in files.into_iter().filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml")) {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()));
            let kind = value["kind"].as_str().unwrap_or_else(|| panic!("{}: a document without kind", path.display()));
            docs.push((format!("{} {kind}", path.display()), value));
        }
    }
    docs
}

fn env_of<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"].as_sequence()?.iter().find(|e| e["name"].as_str() == Some(name))?["value"].as_str()
}

#[test]
fn every_manifest_parses_and_names_its_kind() {
    let docs = manifests();
    let kinds: Vec<&str> = docs.iter().map(|(_, v)| v["kind"].as_str().unwrap()).collect();
    for expected in ["ConfigMap", "Secret", "Job", "Deployment", "Service"] {
        assert!(kinds.contains(&expected), "a {expected} is provided: {kinds:?}");
    }
    assert_eq!(kinds.iter().filter(|k| **k == "Deployment").count(), 2, "web and worker");
}

#[test]
fn deployments_probe_health_request_resources_and_outlast_their_shutdown() {
    let mut roles = Vec::new();
    for (name, doc) in manifests().into_iter().filter(|(_, v)| v["kind"] == "Deployment") {
        let spec = &doc["spec"]["template"]["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"].as_bool(), Some(true), "{name}: non-root");
        let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or_else(|| panic!("{name}: grace period"));
        let containers = spec["containers"].as_sequence().unwrap();
        assert_eq!(containers.len(), 1, "{name}");
        let c = &containers[0];
        let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        roles.push(args[1].to_string());
        assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/health/ready"), "{name}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/health/live"), "{name}");
        assert!(c["resources"]["requests"]["cpu"].as_str().is_some(), "{name}: a CPU request");
        assert!(c["resources"]["requests"]["memory"].as_str().is_some(), "{name}: a memory request");
        let duration = |var: &str| {
            let text = env_of(c, var).unwrap_or_else(|| panic!("{name}: sets {var}"));
            humantime::parse_duration(text).unwrap_or_else(|e| panic!("{name}: {var}={text}: {e}"))
        };
        let (delay, budget) = (duration("STEVEDORE_SHUTDOWN_DELAY"), duration("STEVEDORE_SHUTDOWN_TIMEOUT"));
        assert!(
            Duration::from_secs(grace) > delay + budget,
            "{name}: terminationGracePeriodSeconds {grace} must exceed delay {delay:?} + budget {budget:?}"
        );
    }
    roles.sort();
    assert_eq!(roles, ["web", "worker"]);
}

#[test]
fn the_image_is_multi_stage_and_non_root() {
    let text = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "a build stage and a runtime stage");
    let user = text.lines().rfind(|l| l.starts_with("USER ")).expect("a USER line");
    assert!(!user.contains("root") && !user.trim_end().ends_with(" 0"), "the final user is not root: {user}");
    assert!(text.contains("--locked"), "the build uses Cargo.lock as committed");
}
