//! Tier 3: `docker build` (the classic builder) and its cache with the stock docker CLI
//! against a real berthd, on the offline busybox image; the result is checked by running it
//! and by reading `docker save`'s archive with skopeo and umoci.

use std::path::Path;
use std::process::Command;

use berth_tests::{daemon_or_skip, skip, text};

const DOCKERFILE: &str = r#"# A two-stage build: the first stage makes a file, the second copies it.
FROM busybox AS builder
ARG GREETING=hello
ENV OUT=/out
WORKDIR /work
COPY msg.txt ./
RUN mkdir -p $OUT \
 && cat msg.txt > $OUT/result \
 && echo "$GREETING" >> $OUT/result \
 && rm msg.txt

FROM busybox
LABEL org.example.stage=final
COPY --from=builder /out/result /result
COPY --chown=nobody app /app/
ENTRYPOINT ["sh", "-c"]
CMD ["cat /result; sh /app/run.sh"]
HEALTHCHECK --interval=5s --retries=2 CMD test -f /result
"#;

fn write_context(dir: &Path) {
    std::fs::create_dir_all(dir.join("app")).expect("context");
    std::fs::write(dir.join("Dockerfile"), DOCKERFILE).expect("Dockerfile");
    std::fs::write(dir.join("msg.txt"), "from the context\n").expect("msg.txt");
    std::fs::write(dir.join("app/run.sh"), "echo app-v1\n").expect("run.sh");
    std::fs::write(dir.join(".dockerignore"), "secret.txt\n").expect(".dockerignore");
    std::fs::write(dir.join("secret.txt"), "never sent\n").expect("secret");
}

/// Step numbers whose output says `Using cache`.
fn cached_steps(output: &str) -> Vec<usize> {
    let mut step = 0;
    let mut cached = Vec::new();
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("Step ") {
            step = rest
                .split('/')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if line.contains("Using cache") {
            cached.push(step);
        }
    }
    cached
}

#[test]
fn docker_build_multi_stage_runs_caches_and_saves_standard_layers() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let context = daemon.dir.path().join("context");
    write_context(&context);
    let ctx = context.to_str().expect("utf-8 path");

    let first = daemon.docker_ok(&["build", "-t", "built:1", ctx]);
    let run = daemon.docker_ok(&["run", "--rm", "built:1"]);
    let again = daemon.docker_ok(&["build", "-t", "built:1", ctx]);
    std::fs::write(context.join("app/run.sh"), "echo app-v2\n").expect("edit");
    let edited = daemon.docker_ok(&["build", "-t", "built:2", ctx]);
    let run_edited = daemon.docker_ok(&["run", "--rm", "built:2"]);
    let secret = daemon.docker(&["run", "--rm", "--entrypoint", "ls", "built:1", "/work"]);
    let history = daemon.docker_ok(&["history", "--format", "{{.CreatedBy}}", "built:2"]);
    let owner = daemon.docker_ok(&[
        "run",
        "--rm",
        "--entrypoint",
        "stat",
        "built:2",
        "-c",
        "%u:%g",
        "/app/run.sh",
    ]);
    let labels = daemon.docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{index .Config.Labels \"org.example.stage\"}}",
        "built:2",
    ]);
    let health = daemon.docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Healthcheck}}",
        "built:2",
    ]);
    let archive = daemon.dir.path().join("built.tar");
    daemon.docker_ok(&["save", "-o", archive.to_str().unwrap(), "built:2"]);

    assert!(first.contains("Successfully tagged built:1"), "{first}");
    assert_eq!(run, "from the context\nhello\napp-v1\n");
    // Steps 2..=6 of the first stage and 8..=13 of the second: all from cache.
    assert_eq!(
        cached_steps(&again),
        vec![2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13],
        "{again}"
    );
    // Only the COPY of the edited file and what follows it run again.
    assert_eq!(cached_steps(&edited), vec![2, 3, 4, 5, 6, 8, 9], "{edited}");
    assert_eq!(run_edited, "from the context\nhello\napp-v2\n");
    assert!(
        !text(&secret.stdout).contains("secret"),
        "{}",
        text(&secret.stdout)
    );
    assert!(history.contains("COPY app /app/ in /app/"), "{history}");
    assert_eq!(labels, "final\n");
    // `--chown=nobody`: the name looked up in the image's /etc/passwd.
    assert_eq!(owner, "65534:65534\n");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&health).expect("healthcheck JSON"),
        serde_json::json!({
            "Test": ["CMD-SHELL", "test -f /result"],
            "Interval": 5_000_000_000u64,
            "Retries": 2,
        })
    );
    if Command::new("skopeo").arg("--version").output().is_err() {
        return skip("skopeo is missing (apt-get install skopeo umoci)");
    }
    let inspect = Command::new("skopeo")
        .args(["inspect", &format!("docker-archive:{}", archive.display())])
        .output()
        .expect("skopeo runs");
    assert!(inspect.status.success(), "{}", text(&inspect.stderr));
    let layout = daemon.dir.path().join("oci");
    let copied = Command::new("skopeo")
        .args([
            "copy",
            "-q",
            &format!("docker-archive:{}", archive.display()),
            &format!("oci:{}:built", layout.display()),
        ])
        .output()
        .expect("skopeo runs");
    assert!(copied.status.success(), "{}", text(&copied.stderr));
    let bundle = daemon.dir.path().join("bundle");
    let unpacked = Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:built", layout.display())])
        .arg(&bundle)
        .output()
        .expect("umoci runs");
    assert!(unpacked.status.success(), "{}", text(&unpacked.stderr));
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/result")).expect("result in the bundle"),
        "from the context\nhello\n"
    );
}

#[test]
fn docker_build_errors_name_the_step_and_tag_nothing() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let context = daemon.dir.path().join("context");
    std::fs::create_dir_all(&context).expect("context");
    let ctx = context.to_str().expect("utf-8 path");
    let cases = [
        (
            "FROM busybox\nRUN echo before; exit 3\n",
            "returned a non-zero code: 3",
        ),
        (
            "FROM busybox\nCOPY ../outside /x\n",
            "outside the build context",
        ),
        ("FROM busybox\nFROBNICATE x\n", "unknown instruction"),
        (
            "FROM busybox\nCOPY missing.txt /x\n",
            "file not found in build context",
        ),
    ];

    for (dockerfile, expected) in cases {
        std::fs::write(context.join("Dockerfile"), dockerfile).expect("Dockerfile");
        let output = daemon.docker(&["build", "-t", "broken:1", ctx]);

        assert_eq!(output.status.code(), Some(1), "{dockerfile}");
        let shown = format!("{}{}", text(&output.stdout), text(&output.stderr));
        assert!(shown.contains(expected), "{dockerfile}: {shown}");
    }
    let images = daemon.docker_ok(&["images", "--format", "{{.Repository}}"]);
    assert!(!images.contains("broken"), "{images}");
}
