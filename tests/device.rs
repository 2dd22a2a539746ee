//! `umae device-check` through the real binary: on the CPU the "device" is the CPU itself, so
//! the f32 losses agree exactly and the bf16 one closely; a device this build cannot use is a
//! clear input error.

mod common;
use common::*;

/// The number after `label` on its line.
fn value(out: &str, label: &str) -> f64 {
    let rest = out
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .unwrap_or_else(|| panic!("no `{label}` line in\n{out}"));
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn the_cpu_agrees_with_itself_and_bf16_is_close() {
    let o = run(&[
        "device-check",
        "recipes/u-mae-vitt-cifar10.ron",
        "--device",
        "cpu",
        "--batch",
        "4",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    let cpu = value(&t, "reference: cpu f32");
    let (f32_, bf16) = (value(&t, "cpu f32:"), value(&t, "cpu bf16:"));
    assert_eq!(cpu, f32_);
    assert!(bf16 != cpu && (bf16 - cpu).abs() < 5e-2 * cpu.abs(), "{t}");
    assert!(t.contains("cpu agrees with the CPU"), "{t}");
}

#[test]
fn devices_this_build_cannot_use_are_refused() {
    let o = run(&[
        "device-check",
        "recipes/u-mae-vitt-cifar10.ron",
        "--device",
        "cuda",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("--features cuda") || t.contains("--device cpu"),
        "{t}"
    );
}
