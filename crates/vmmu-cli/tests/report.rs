//! `vmmu report` as a person sees it: the page is built from real runs, holds
//! the plots it promises, refuses bad input in one line, and renders in a
//! headless browser to a screenshot that is not blank and shows the plots.
//!
//! The browser part needs Chromium (`apt-get install chromium`; `.ci/run`
//! installs it). Without it the test says so and checks everything else; with
//! `VMMU_REQUIRE_BROWSER=1` (set by CI) a missing browser is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

fn vmmu(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(args)
        .output()
        .expect("run vmmu");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmmu-report-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_to(dir: &Path, file: &str, args: &[&str]) -> String {
    let (code, out, err) = vmmu(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    let p = dir.join(file);
    std::fs::write(&p, out).unwrap();
    p.display().to_string()
}

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// Pixels of the screenshot: (all, not white, close to the first plot colour).
fn pixels(png_path: &Path) -> (u64, u64, u64) {
    let decoder = png::Decoder::new(std::fs::File::open(png_path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let bpp = match info.color_type {
        png::ColorType::Rgba => 4,
        png::ColorType::Rgb => 3,
        other => panic!("unexpected screenshot format {other:?}"),
    };
    let data = &buf[..info.buffer_size()];
    let (mut all, mut ink, mut blue) = (0, 0, 0);
    for p in data.chunks(bpp) {
        all += 1;
        if p[0] < 245 || p[1] < 245 || p[2] < 245 {
            ink += 1;
        }
        // The first series colour, rgb(31, 119, 180).
        if (p[0] as i32 - 31).abs() < 20
            && (p[1] as i32 - 119).abs() < 20
            && (p[2] as i32 - 180).abs() < 20
        {
            blue += 1;
        }
    }
    (all, ink, blue)
}

#[test]
fn test_report_holds_every_plot_and_renders_in_a_browser() {
    let dir = tmpdir("page");
    let trace = dir.join("trace.json").display().to_string();
    let a = run_to(
        &dir,
        "a.json",
        &[
            "run",
            "demand-paging",
            "-b",
            "8M",
            "-v",
            "2",
            "--json",
            "--trace",
            &trace,
        ],
    );
    let b = run_to(
        &dir,
        "b.json",
        &["run", "memslot-churn", "-b", "8M", "-i", "3", "--json"],
    );
    let c = run_to(
        &dir,
        "c.json",
        &["bench", "dirty-log", "-b", "8M", "--json"],
    );
    let html = dir.join("r.html").display().to_string();
    let (code, _, err) = vmmu(&["report", &a, &b, &c, "--trace", &trace, "-o", &html]);
    assert_eq!(code, 0, "{err}");
    let page = std::fs::read_to_string(&html).unwrap();
    for want in [
        "<h1>vmmu report</h1>",
        "run demand-paging",
        "run memslot-churn",
        "bench dirty-log",
        "fault latency by outcome",
        "retries by cause",
        "phases",
        "fault latency over time",
        "Comparison",
        "fixed-fault latency, run by run",
    ] {
        assert!(page.contains(want), "the page has no {want:?}");
    }
    // One latency plot per scenario run, the retries of the churn, phases of
    // each, the timeline and two comparison plots.
    let svgs = page.matches("<svg").count();
    assert!(svgs >= 8, "{svgs} plots");
    // The memslot churn's faults include more than the fixed ones.
    assert!(page.contains(">emulate<") || page.contains("emulate"));

    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("VMMU_REQUIRE_BROWSER").is_none(),
            "VMMU_REQUIRE_BROWSER is set but no Chromium was found"
        );
        eprintln!(
            "SKIPPED the browser check: no chromium here (apt-get install chromium; CI installs it)"
        );
        return;
    };
    let shot = dir.join("shot.png");
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,3000",
            &format!("--screenshot={}", shot.display()),
            &format!("file://{html}"),
        ])
        .output()
        .expect("run chromium");
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (all, ink, blue) = pixels(&shot);
    assert_eq!(all, 1200 * 3000);
    assert!(
        ink * 20 > all,
        "the page looks blank: {ink} of {all} pixels drawn"
    );
    assert!(
        blue > 2000,
        "no plot drawn in the screenshot ({blue} pixels of the first series colour)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_report_refuses_bad_input_in_one_line() {
    let dir = tmpdir("bad");
    let out = dir.join("r.html").display().to_string();
    let (code, _, err) = vmmu(&["report", "/nonexistent/run.json", "-o", &out]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("/nonexistent/run.json") && err.contains("cannot read"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let junk = dir.join("junk.json");
    std::fs::write(&junk, "{\"hello\": 1}").unwrap();
    let (code, _, err) = vmmu(&["report", junk.to_str().unwrap(), "-o", &out]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("scenario"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let (code, _, err) = vmmu(&["report"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("RUN.json"), "{err}");
    assert!(
        !Path::new(&out).exists(),
        "nothing written for refused input"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
