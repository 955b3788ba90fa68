//! The `pagedkv` binary end to end: the published Mooncake table, the
//! default workload's JSON summary, plots, and errors.
#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pagedkv"))
}

fn traces() -> PathBuf {
    let dir = std::env::var_os("PAGEDKV_TRACES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces"));
    assert!(
        dir.join("mooncake_conversation.jsonl").exists(),
        "the traces are read from {} (set PAGEDKV_TRACES to their folder)",
        dir.display()
    );
    dir
}

fn json(args: &[&str]) -> Value {
    let out = bin().args(args).arg("--json").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn run_ratio(v: &Value, policy: &str) -> f64 {
    v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["policy"] == policy)
        .unwrap()["block_hit_ratio"]
        .as_f64()
        .unwrap()
}

#[test]
fn mooncake_sequential_reproduces_the_published_table() {
    let trace = traces().join("mooncake_conversation.jsonl");
    let trace = trace.to_str().unwrap();
    // ../shared/traces/README.md: LRU (vLLM order) and Belady at 1, 5, 10, 25%.
    let table = [
        (0.01, 0.052, 0.240),
        (0.05, 0.196, 0.366),
        (0.10, 0.279, 0.366),
        (0.25, 0.353, 0.366),
    ];
    for (fraction, lru, opt) in table {
        let f = fraction.to_string();
        let v = json(&[
            "simulate",
            "--trace",
            trace,
            "--sequential",
            "--capacity-fraction",
            &f,
            "--policy",
            "lru,belady",
        ]);
        assert_eq!(v["block_refs"], 288_500);
        assert_eq!(v["unique_blocks"], 182_790);
        assert!((v["ideal"]["block_hit_ratio"].as_f64().unwrap() - 0.366).abs() <= 0.005);
        let (l, b) = (run_ratio(&v, "lru"), run_ratio(&v, "belady"));
        assert!((l - lru).abs() <= 0.005, "LRU at {fraction}: {l} vs {lru}");
        assert!(
            (b - opt).abs() <= 0.005,
            "Belady at {fraction}: {b} vs {opt}"
        );
    }
}

#[test]
fn default_workload_summary_is_consistent() {
    let v = json(&["simulate"]);
    let ideal_b = v["ideal"]["block_hit_ratio"].as_f64().unwrap();
    let ideal_t = v["ideal"]["token_hit_ratio"].as_f64().unwrap();
    assert!(
        v["requests"].as_u64().unwrap() >= 2000,
        "a few thousand requests"
    );
    assert_eq!(v["mode"], "timed");
    let runs = v["runs"].as_array().unwrap();
    assert!(!runs.is_empty());
    for r in runs {
        let b = r["block_hit_ratio"].as_f64().unwrap();
        let t = r["token_hit_ratio"].as_f64().unwrap();
        assert!(
            b > 0.0 && b <= ideal_b + 1e-9,
            "block hit ratio {b} outside (0, {ideal_b}]"
        );
        assert!(
            t > 0.0 && t <= ideal_t + 1e-9,
            "token hit ratio {t} outside (0, {ideal_t}]"
        );
        assert_eq!(r["leaked_sequences"], 0, "a sequence leaked");
        assert_eq!(r["blocks_in_use_at_end"], 0, "blocks still held");
        assert_eq!(
            r["blocks_free_at_end"], r["blocks_total"],
            "blocks not conserved"
        );
        assert_eq!(r["blocks_total"], v["device_blocks"]);
        assert!(r["peak_utilization"].as_f64().unwrap() <= 1.0);
        assert!(
            r["queueing_delay_p99_s"].as_f64().unwrap()
                >= r["queueing_delay_p50_s"].as_f64().unwrap()
        );
    }
}

#[test]
fn plots_render_as_png_and_svg() {
    let dir = std::env::temp_dir().join(format!("pagedkv-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for ext in ["png", "svg"] {
        let path = dir.join(format!("run.{ext}"));
        let out = bin()
            .args([
                "simulate",
                "--conversations",
                "200",
                "--preempt",
                "lru,cost",
                "--plot",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&path).unwrap();
        if ext == "png" {
            let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
                .unwrap()
                .to_rgb8();
            assert_eq!(img.dimensions(), (1000, 700));
            let inked = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
            let mut colors: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
            colors.sort_unstable();
            colors.dedup();
            assert!(inked > 10_000, "only {inked} non-white pixels");
            assert!(
                colors.len() > 20,
                "only {} colors: no anti-aliased text or lines",
                colors.len()
            );
            // Both series colors are present.
            for c in [[31u8, 119, 180], [255, 127, 14]] {
                assert!(img.pixels().any(|p| p.0 == c), "series color {c:?} missing");
            }
        } else {
            let text = String::from_utf8(bytes).unwrap();
            assert!(text.contains("<svg"), "not an SVG");
            assert!(
                text.matches("<polyline").count() >= 4,
                "expected a line per run and panel"
            );
            assert!(text.contains("device utilization") && text.contains("lru / cost"));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn fails_with(args: &[&str], needle: &str) {
    let out = bin().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "{args:?}: `{needle}` not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_is_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("pagedkv-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [1, 2]}\n\
         {\"timestamp\": 1, \"input_length\": \"many\", \"output_length\": 5, \"hash_ids\": [1]}\n",
    )
    .unwrap();
    fails_with(
        &["simulate", "--trace", bad.to_str().unwrap(), "--sequential"],
        "bad.jsonl:2: field `input_length`",
    );
    let csv = dir.join("bad.csv");
    std::fs::write(&csv, "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:47.00,x,1\n").unwrap();
    fails_with(
        &["simulate", "--trace", csv.to_str().unwrap()],
        "bad.csv:3: field `ContextTokens`",
    );
    fails_with(&["simulate", "--model", "gpt-9"], "invalid value 'gpt-9'");
    fails_with(&["simulate", "--capacity-blocks", "0"], "capacity is zero");
    fails_with(
        &["simulate", "--capacity-fraction", "0"],
        "--capacity-fraction must be positive",
    );
    fails_with(
        &["simulate", "--policy", "random"],
        "unknown block eviction policy",
    );
    fails_with(
        &["simulate", "--preempt", "oldest"],
        "unknown sequence eviction policy",
    );
    fails_with(
        &["simulate", "--trace", "/nonexistent/x.jsonl"],
        "reading /nonexistent/x.jsonl",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
