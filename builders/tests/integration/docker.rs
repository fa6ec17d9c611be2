//! `DockerEngine` against the real dockerd and a real registry.

use std::io::Read;
use std::time::{Duration, Instant};

use dockyard_builders::{BuildSpec, Engine, Error, LogSink, PushTarget, Secret};
use tokio_util::sync::CancellationToken;

use crate::harness::{Registry, TokenGate, engine, push_busybox_base, untag, write};

#[tokio::test]
async fn negotiates_an_api_version_dockerd_accepts() {
    let e = engine().await;
    let v: Vec<u32> = e
        .api_version()
        .split('.')
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(v[0], 1);
    assert!(v[1] >= 41, "API {}", e.api_version());
    let platforms = e.platforms().await.unwrap();
    assert_eq!(platforms[0].os, "linux");
}

/// The files of the last layer of a pushed image.
async fn last_layer_file(reg: &Registry, repo: &str, digest: &str, path: &str) -> Option<String> {
    let m = reg
        .get_json(
            &format!("{repo}/manifests/{digest}"),
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .await;
    let layer = m["layers"].as_array().unwrap().last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = reg.get_blob(repo, &layer).await;
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_string_lossy().trim_start_matches("./") == path {
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            return Some(s);
        }
    }
    None
}

#[tokio::test]
async fn multi_stage_build_with_args_and_target_is_pushed() {
    let e = engine().await;
    let reg = Registry::start().await;
    let base = push_busybox_base(&e, &reg, "base/busybox", "1").await;

    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        "docker/app.Dockerfile",
        &format!(
            "ARG BASE={host}/base/busybox:1\n\
             FROM ${{BASE}} AS build\n\
             ARG MSG=default\n\
             RUN echo \"built with $MSG\" > /msg\n\
             FROM ${{BASE}} AS final\n\
             COPY --from=build /msg /msg\n\
             COPY app.txt /app.txt\n\
             FROM final AS broken\n\
             RUN echo never built && exit 1\n",
            host = reg.host
        ),
    );
    write(ctx.path(), "app.txt", "app\n");
    write(ctx.path(), "secret.key", "ignored\n");
    write(ctx.path(), ".dockerignore", "*.key\n");
    let mut spec = BuildSpec::new(ctx.path());
    spec.dockerfile = "docker/app.Dockerfile".into();
    spec.build_args.insert("MSG".into(), "hello".into());
    spec.target = Some("final".into());
    spec.registry_auth
        .insert(reg.host.clone(), Secret::new("a-registry-token"));
    let (logs, mut rx) = LogSink::channel();
    let cancel = CancellationToken::new();
    let built = e.build(&spec, &logs, &cancel).await.unwrap();
    let text = rx.drain_text();
    assert!(text.contains("Step 1/"), "{text}");
    assert!(
        text.contains("built with") || text.contains("RUN echo"),
        "{text}"
    );
    assert!(!text.contains("never built"), "{text}");
    assert!(built.id.starts_with("sha256:"));

    let target = PushTarget {
        registry: reg.host.clone(),
        repository: "team/app".into(),
        tag: "job-1".into(),
        token: Some(Secret::new("a-registry-token")),
    };
    let pushed = e.push(&built, &target, &logs, &cancel).await.unwrap();
    assert_eq!(pushed.reference, format!("{}/team/app:job-1", reg.host));
    assert_eq!(
        reg.digest("team/app", "job-1").await.as_deref(),
        Some(pushed.manifest_digest.as_str())
    );
    assert_eq!(pushed.config_digest, built.id);
    let config = reg.config("team/app", &pushed.manifest_digest).await;
    assert_eq!(config["architecture"], "amd64");
    // The image has the final stage's files, built with the build arg.
    let m = reg
        .get_json(
            &format!("team/app/manifests/{}", pushed.manifest_digest),
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .await;
    assert_eq!(m["layers"].as_array().unwrap().len(), 3);
    assert_eq!(
        last_layer_file(&reg, "team/app", &pushed.manifest_digest, "app.txt")
            .await
            .as_deref(),
        Some("app\n")
    );
    let layers = m["layers"].as_array().unwrap();
    let msg_layer = layers[1]["digest"].as_str().unwrap();
    let blob = reg.get_blob("team/app", msg_layer).await;
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
    let mut msg = String::new();
    a.entries()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .read_to_string(&mut msg)
        .unwrap();
    assert_eq!(msg, "built with hello\n");
    assert_ne!(base.manifest_digest, pushed.manifest_digest);

    e.remove(&built, Some(&target)).await.unwrap();
    untag(&e, &format!("{}/base/busybox:1", reg.host)).await;
}

#[tokio::test]
async fn a_failing_run_is_a_build_failure_with_the_engine_message() {
    let e = engine().await;
    let reg = Registry::start().await;
    push_busybox_base(&e, &reg, "base/busybox", "1").await;
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        &format!(
            "FROM {}/base/busybox:1\nRUN echo about to fail && exit 3\n",
            reg.host
        ),
    );
    let (logs, mut rx) = LogSink::channel();
    let r = e
        .build(
            &BuildSpec::new(ctx.path()),
            &logs,
            &CancellationToken::new(),
        )
        .await;
    match r {
        Err(Error::BuildFailed(msg)) => {
            assert!(msg.contains("non-zero code: 3"), "{msg}")
        }
        other => panic!("expected a build failure, got {other:?}"),
    }
    let text = rx.drain_text();
    assert!(text.contains("about to fail"), "{text}");
    assert!(text.contains("non-zero code: 3"), "{text}");

    // A base that does not exist fails the build too.
    write(
        ctx.path(),
        "Dockerfile",
        &format!("FROM {}/nope:1\n", reg.host),
    );
    let r = e
        .build(
            &BuildSpec::new(ctx.path()),
            &LogSink::discard(),
            &CancellationToken::new(),
        )
        .await;
    assert!(matches!(r, Err(Error::BuildFailed(_))), "{r:?}");
    untag(&e, &format!("{}/base/busybox:1", reg.host)).await;
}

#[tokio::test]
async fn cancelling_stops_a_build_quickly() {
    let e = engine().await;
    let reg = Registry::start().await;
    push_busybox_base(&e, &reg, "base/busybox", "1").await;
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        &format!(
            "FROM {}/base/busybox:1\nRUN echo started && sleep 60\n",
            reg.host
        ),
    );
    let (logs, mut rx) = LogSink::channel();
    let cancel = CancellationToken::new();
    let spec = BuildSpec::new(ctx.path());
    let build = e.build(&spec, &logs, &cancel);
    let canceller = async {
        // Cancel once the RUN has started.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = String::new();
        while !seen.contains("started") && Instant::now() < deadline {
            if let Some(dockyard_builders::LogEvent::Text(t)) = rx.recv().await {
                seen.push_str(&t);
            }
        }
        cancel.cancel();
        Instant::now()
    };
    let (r, cancelled_at) = tokio::join!(build, canceller);
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert!(cancelled_at.elapsed() < Duration::from_secs(3));
    untag(&e, &format!("{}/base/busybox:1", reg.host)).await;
}

#[tokio::test]
async fn arm64_builds_from_a_multi_platform_base() {
    let e = engine().await;
    let reg = Registry::start().await;
    reg.push_multi_platform("base/multi", "1").await;
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        &format!("FROM {}/base/multi:1\nCOPY f.txt /f.txt\n", reg.host),
    );
    write(ctx.path(), "f.txt", "x\n");
    let cancel = CancellationToken::new();
    for arch in ["arm64", "amd64"] {
        let mut spec = BuildSpec::new(ctx.path());
        spec.platform = Some(format!("linux/{arch}").parse().unwrap());
        spec.registry_auth
            .insert(reg.host.clone(), Secret::new("t"));
        let built = e.build(&spec, &LogSink::discard(), &cancel).await.unwrap();
        let target = PushTarget {
            registry: reg.host.clone(),
            repository: "team/multi".into(),
            tag: format!("job-{arch}"),
            token: Some(Secret::new("t")),
        };
        let pushed = e
            .push(&built, &target, &LogSink::discard(), &cancel)
            .await
            .unwrap();
        let config = reg.config("team/multi", &pushed.manifest_digest).await;
        assert_eq!(config["architecture"], arch, "{config}");
        assert_eq!(config["os"], "linux");
        let m = reg
            .get_json(
                &format!("team/multi/manifests/{}", pushed.manifest_digest),
                "application/vnd.docker.distribution.manifest.v2+json",
            )
            .await;
        // The base layer of that platform, then the COPY.
        let first = m["layers"][0]["digest"].as_str().unwrap();
        let blob = reg.get_blob("team/multi", first).await;
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
        let mut hello = String::new();
        a.entries()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .read_to_string(&mut hello)
            .unwrap();
        assert_eq!(hello, format!("hello from {arch}\n"));
        e.remove(&built, Some(&target)).await.unwrap();
        untag(&e, &format!("{}/base/multi:1", reg.host)).await;
    }
}

#[tokio::test]
async fn registry_tokens_are_used_to_pull_bases_and_to_push() {
    let e = engine().await;
    let reg = Registry::start().await;
    push_busybox_base(&e, &reg, "base/busybox", "1").await;
    // Characters that the standard base64 alphabet turns into '+' or '/',
    // which dockerd would not decode.
    let token = "job-token.?>~.?>~.?>~";
    let gate = TokenGate::start(&reg, token).await;

    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        &format!("FROM {}/base/busybox:1\nRUN echo ok > /ok\n", gate.host),
    );
    let cancel = CancellationToken::new();

    // Without the right token the base cannot be pulled.
    let mut spec = BuildSpec::new(ctx.path());
    spec.registry_auth
        .insert(gate.host.clone(), Secret::new("wrong"));
    let r = e.build(&spec, &LogSink::discard(), &cancel).await;
    assert!(matches!(r, Err(Error::BuildFailed(_))), "{r:?}");

    spec.registry_auth
        .insert(gate.host.clone(), Secret::new(token));
    let built = e.build(&spec, &LogSink::discard(), &cancel).await.unwrap();
    let pulled_with_token = gate.seen.lock().unwrap().iter().any(|(m, p, ok)| {
        *ok && (m == "GET" || m == "HEAD") && p.contains("/base/busybox/manifests/")
    });
    assert!(pulled_with_token, "{:?}", gate.seen.lock().unwrap());

    let target = PushTarget {
        registry: gate.host.clone(),
        repository: "team/gated".into(),
        tag: "job-1".into(),
        token: Some(Secret::new(token)),
    };
    let pushed = e
        .push(&built, &target, &LogSink::discard(), &cancel)
        .await
        .unwrap();
    assert_eq!(
        reg.digest("team/gated", "job-1").await.as_deref(),
        Some(pushed.manifest_digest.as_str())
    );
    let seen = gate.seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|(m, p, ok)| *ok && m == "PUT" && p == "/v2/team/gated/manifests/job-1"),
        "{seen:?}"
    );
    // The token service is never asked: the token is used as it is.
    assert!(!seen.iter().any(|(_, p, _)| p == "/token"), "{seen:?}");

    // A push with a wrong token fails.
    let mut wrong = target.clone();
    wrong.tag = "job-2".into();
    wrong.token = Some(Secret::new("wrong"));
    let r = e.push(&built, &wrong, &LogSink::discard(), &cancel).await;
    assert!(matches!(r, Err(Error::PushFailed(_))), "{r:?}");

    e.remove(&built, Some(&target)).await.unwrap();
    untag(&e, &wrong.reference()).await;
    untag(&e, &format!("{}/base/busybox:1", gate.host)).await;
}
