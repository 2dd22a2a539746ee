//! Crashes and stops through the real binary (CPU, fixed seed): a run killed with SIGKILL at
//! random points (inside steps and inside checkpoint writes), over and over, and resumed each time ends with exactly the weights of an
//! uninterrupted run (resuming from epoch ends and from checkpoints within epochs); SIGINT and
//! SIGTERM finish the step, write a checkpoint and exit 130.

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn args(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = ["run", "recipes/mae-fmnist.ron", "--output"]
        .map(String::from)
        .to_vec();
    v.push(out.to_str().unwrap().into());
    for s in [
        "data.format=Synthetic",
        "data.synthetic_size=256",
        "data.eval_limit=Some(32)",
        "train.batch_size=32",
        "train.epochs=16",
        // Checkpoints within epochs too, so that kills resume mid-epoch as well.
        "train.checkpoint_steps=3",
        "train.log_every=1",
        "encoder.params.depth=Some(1)",
        "encoder.params.dim=Some(32)",
        "eval=(online_probe: true, erank_samples: 0, linear: None, knn: None)",
    ] {
        v.extend(["--set".to_string(), s.to_string()]);
    }
    v
}

fn spawn(args: &[String]) -> Child {
    umae()
        .args(args)
        .current_dir(repo())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn resume_args(dir: &Path) -> Vec<String> {
    vec![
        "run".into(),
        "--resume".into(),
        dir.to_str().unwrap().into(),
    ]
}

fn signal(child: &Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// The last optimizer step with a row in `metrics.jsonl` (0 before any).
fn last_step(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "step")
        .filter_map(|r| r["step"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Whether a checkpoint (or the `latest` pointer) is being written right now.
fn writing(ckpts: &Path) -> bool {
    std::fs::read_dir(ckpts).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
    })
}

/// Small deterministic generator for the kill times (the test is reproducible).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn sigkill_at_random_points_then_resume_gives_the_uninterrupted_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let o = run(&args(&straight)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(o.status.success(), "{}", text(&o));

    let dir = tmp.path().join("killed");
    let ckpts = dir.join("checkpoints");
    let mut rng = Lcg(0x5EED);
    let (mut kills, mut in_write, mut attempts, mut mid_epoch) = (0, 0, 0, 0);
    let t0 = Instant::now();
    loop {
        attempts += 1;
        assert!(attempts < 200, "the run makes no progress under kills");
        let first = !dir.join("recipe.ron").exists();
        mid_epoch += usize::from(
            std::fs::read_to_string(ckpts.join("latest")).is_ok_and(|l| l.contains("-step-")),
        );
        let mut child = spawn(&if first { args(&dir) } else { resume_args(&dir) });
        if kills < 24 {
            // Kill once the run has trained 1 to 4 more steps (metrics.jsonl has a row per
            // step), at a random moment inside the following step; every third kill instead
            // waits for a checkpoint being written (its `.tmp` entry) and kills then. Each
            // start gains at most a few steps, so all 24 kills land before the run's 128
            // steps are done, however fast the machine.
            let aim_at_write = kills % 3 == 2;
            let target = last_step(&dir) + 1 + rng.below(4);
            let delay = Duration::from_micros(rng.below(30_000));
            let (mut reached, mut hit_write) = (None::<Instant>, false);
            let started = Instant::now();
            while child.try_wait().unwrap().is_none() {
                if aim_at_write {
                    if writing(&ckpts) {
                        hit_write = true;
                        break;
                    }
                } else if reached.is_none() && last_step(&dir) >= target {
                    reached = Some(Instant::now());
                }
                if reached.is_some_and(|t| t.elapsed() >= delay) {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "no progress in 2 minutes"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                in_write += usize::from(hit_write);
                continue;
            }
        }
        let out = child.wait_with_output().unwrap();
        let status = out.status;
        assert!(
            status.success(),
            "attempt {attempts}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if dir.join("checkpoints/epoch-0016").exists() {
            break;
        }
    }
    eprintln!(
        "{kills} kills ({in_write} during a checkpoint write), {attempts} starts ({mid_epoch} from a mid-epoch checkpoint), {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert!(kills >= 20, "only {kills} kills");
    assert!(mid_epoch > 0, "no resume started within an epoch");
    let (a, b) = (
        outcome(&straight, "epoch-0016"),
        outcome(&dir, "epoch-0016"),
    );
    assert_eq!(a.1, b.1, "epoch metrics differ");
    assert!(a.0 == b.0, "final weights differ after {kills} kills");
}

#[test]
fn sigint_and_sigterm_stop_cleanly_with_a_checkpoint_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let o = run(&args(&straight)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(o.status.success(), "{}", text(&o));
    for sig in ["-INT", "-TERM"] {
        let dir = tmp.path().join(sig);
        let child = spawn(&args(&dir));
        // Stop once training has logged a step of the second epoch.
        let t0 = Instant::now();
        while !std::fs::read_to_string(dir.join("metrics.jsonl"))
            .is_ok_and(|m| m.contains("\"epoch\":2,"))
        {
            assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(130), "{sig}: {log}");
        assert!(
            log.contains("checkpoint epoch-0001-step-") && log.contains("umae run --resume"),
            "{sig}: {log}"
        );
        let o = run(&resume_args(&dir)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>());
        assert!(o.status.success(), "{sig}: {}", text(&o));
        assert!(text(&o).contains("from epoch-0001-step-"), "{}", text(&o));
        let (a, b) = (
            outcome(&straight, "epoch-0016"),
            outcome(&dir, "epoch-0016"),
        );
        assert_eq!(a.1, b.1, "{sig}: epoch metrics differ");
        assert!(a.0 == b.0, "{sig}: final weights differ");
    }
}
