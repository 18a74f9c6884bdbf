//! The harness's command line: subcommands exist and bad options are
//! refused before anything is measured. (Being an integration test of this
//! package, it also makes `cargo test --workspace` build the
//! `splicegate-bench` binary the splicegate package's probe tests run.)

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_splicegate-bench"))
}

#[test]
fn help_lists_every_subcommand() {
    let out = bench().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["suite", "terminate", "idle", "agent", "probe"] {
        assert!(text.contains(cmd), "{cmd} missing from:\n{text}");
    }
}

#[test]
fn probe_refuses_options_that_do_not_fit_the_mode() {
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "bulk",
                "--addr",
                "127.0.0.1:9",
                "--insecure",
                "--rate",
                "10",
            ],
            "--rate applies to rtt and rtt-concurrent",
        ),
        (
            &["rtt", "--addr", "127.0.0.1:9", "--insecure", "--rate", "0"],
            "--rate: 1 to 1,000,000",
        ),
        (
            &[
                "idle",
                "--addr",
                "127.0.0.1:9",
                "--insecure",
                "--connections",
                "0",
            ],
            "--connections: 1 to 100,000",
        ),
        (
            &[
                "rtt",
                "--addr",
                "127.0.0.1:9",
                "--insecure",
                "--duration",
                "7200",
            ],
            "--duration: 0 to 3600",
        ),
    ];
    for (args, message) in cases {
        let out = bench().arg("probe").args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{args:?}: {err}");
    }
    // Neither --ca nor --insecure: clap's usage error.
    let out = bench()
        .args(["probe", "rtt", "--addr", "127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn agent_refuses_a_missing_certificate_file() {
    let out = bench()
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert /nonexistent/cert.pem"));
}
