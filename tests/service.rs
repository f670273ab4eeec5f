//! `tools/sbmon.service` is a unit systemd accepts: `systemd-analyze verify` (installed by
//! tools/setup) finds nothing to say about it, with its ExecStart pointed at the sbmon this
//! build made. The system manager checks it: a user manager needs a login session, which CI
//! does not have; the directives and their values are checked the same way.

use std::process::Command;

const UNIT: &str = include_str!("../tools/sbmon.service");

fn verify(unit: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sbmon.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed by tools/setup (Debian's systemd package)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_systemd_unit_verifies_cleanly() {
    let unit = UNIT.replace("%h/.cargo/bin/sbmon", env!("CARGO_BIN_EXE_sbmon"));
    assert!(unit.contains(env!("CARGO_BIN_EXE_sbmon")));
    let (ok, said) = verify(&unit);
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
    for hardening in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
    ] {
        assert!(UNIT.contains(hardening), "{hardening}");
    }

    // The check is real: a misspelt directive is reported.
    let (_, said) = verify(&unit.replace("NoNewPrivileges=", "NoNewPrivilege="));
    assert!(said.contains("NoNewPrivilege"), "{said}");
}
