//! The volume table survives `kill -9` of the card at random moments: after every kill the
//! store opens, and the table is exactly the one before the interrupted command or the one
//! after it, never anything else.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outboard_card_storage::table::{VolumeStore, VolumeTable};

const CARD: &str = env!("CARGO_BIN_EXE_outboard-card");

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn names(t: &VolumeTable) -> Vec<String> {
    t.volumes.iter().map(|v| v.name.clone()).collect()
}

#[test]
fn table_survives_kill_9_at_random_moments() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("outboard-card-kill-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let store = dir.0.join("store");
    std::fs::File::create(&store)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    VolumeStore::format(&store).unwrap();

    // Calibrate: how long one command takes, so kills land inside its lifetime.
    let t = Instant::now();
    let status = Command::new(CARD)
        .args([
            "volume",
            "--backing",
            store.to_str().unwrap(),
            "create",
            "probe",
            "1M",
        ])
        .output()
        .unwrap()
        .status;
    assert!(status.success());
    let span = t.elapsed().as_micros().max(200) as u64;

    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut killed = 0;
    for i in 0..150 {
        let before = VolumeStore::open(&store).unwrap().table().clone();
        let (verb, name) = if i % 3 == 2 && !before.volumes.is_empty() {
            let pick = &before.volumes[rand(before.volumes.len() as u64) as usize];
            ("delete", pick.name.clone())
        } else {
            ("create", format!("v{i}"))
        };
        let mut args = vec!["volume", "--backing", store.to_str().unwrap(), verb, &name];
        if verb == "create" {
            args.push("1M");
        }
        let mut child = Command::new(CARD)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rand(span)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();

        let after = VolumeStore::open(&store)
            .unwrap_or_else(|e| panic!("round {i}: store does not open after kill: {e:?}"))
            .table()
            .clone();
        let mut expected = before.clone();
        match verb {
            "create" => expected.volumes.extend(after.volume(&name).cloned()),
            _ => expected.volumes.retain(|v| v.name != name),
        }
        let unchanged = after == before;
        let applied =
            after.generation == before.generation + 1 && names(&after) == names(&expected);
        assert!(
            unchanged || applied,
            "round {i}: {verb} {name}: table is neither before nor after"
        );
    }
    eprintln!("killed {killed} of 150 commands mid-run");
    assert!(
        killed >= 10,
        "only {killed} kills landed while a command ran"
    );
}
