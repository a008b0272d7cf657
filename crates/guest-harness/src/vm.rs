//! Starting a VM under a runner (outboard-vmm or QEMU) and watching its serial console.
//!
//! ```text
//! GuestCommand ──spawn──► GuestVm (child running; reader threads collect stdout = serial, stderr)
//!                            │ wait_for_line / wait_for_ready / wait_for_run_done
//!                            │ wait_exit ──► exited          kill / drop ──► killed and reaped
//! ```
//! Every wait takes a timeout, and dropping a `GuestVm` kills and reaps the child, so a failing
//! test never leaves a VM behind or hangs.

use crate::marker::{self, ReadyMarker, RunDone};
use crate::output::{Lines, Wait};
use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How many output lines an error message quotes.
const TAIL_LINES: usize = 30;
const QEMU: &str = "qemu-system-x86_64";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{runner} has no option for {what}")]
    Unsupported {
        runner: &'static str,
        what: &'static str,
    },
    #[error("Timed out after {timeout:?} waiting for {pattern:?} on the serial console; last lines:\n{tail}")]
    Timeout {
        pattern: String,
        timeout: Duration,
        tail: String,
    },
    #[error("The VM ended ({status}) before printing {pattern:?}; last lines:\n{tail}\nstderr:\n{stderr}")]
    Ended {
        pattern: String,
        status: String,
        tail: String,
        stderr: String,
    },
    #[error("The VM did not exit within {timeout:?}")]
    ExitTimeout { timeout: Duration },
    #[error("Cannot wait for the VM process")]
    Wait(#[source] io::Error),
    #[error("Cannot write to the serial console")]
    Send(#[source] io::Error),
    #[error("Bad marker line from the guest")]
    Marker(#[source] marker::Error),
}

/// What runs the guest.
#[derive(Debug, Clone)]
pub enum Runner {
    /// Our VMM, by path (integration tests pass `env!("CARGO_BIN_EXE_outboard-vmm")`).
    OutboardVmm(PathBuf),
    /// `qemu-system-x86_64 -accel tcg -M q35`: runs stock Linux guests on any host.
    QemuTcg,
    /// `qemu-system-x86_64 -accel kvm -M q35`.
    QemuKvm,
    /// Any program, given only the [`GuestCommand::arg`]s and envs: for ad-hoc runners and for
    /// testing the harness itself.
    Command(PathBuf),
}

/// A VM to start: a builder, like `std::process::Command`.
#[derive(Debug, Clone)]
pub struct GuestCommand {
    runner: Runner,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Vec<String>,
    cpus: Option<u32>,
    memory_mib: Option<u64>,
    api_socket: Option<PathBuf>,
    shared_memory: bool,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
}

impl GuestCommand {
    pub fn new(runner: Runner) -> Self {
        Self {
            runner,
            kernel: None,
            initrd: None,
            cmdline: Vec::new(),
            cpus: None,
            memory_mib: None,
            api_socket: None,
            shared_memory: false,
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// The Debian Linux guest (`target/guest/vmlinuz` + `initramfs.img`) with `console=ttyS0`
    /// and 512 MiB (the image needs about 256 MiB). Panics if the image was not built.
    pub fn linux(runner: Runner) -> Self {
        let (kernel, initrd) = (crate::linux_kernel_path(), crate::linux_initrd_path());
        crate::require_guest_image(&kernel);
        crate::require_guest_image(&initrd);
        Self::new(runner)
            .kernel(kernel)
            .initrd(initrd)
            .cmdline("console=ttyS0")
            .memory_mib(512)
    }

    /// The test guest (`target/guest/testguest`), 128 MiB. Panics if it was not built.
    pub fn testguest(runner: Runner) -> Self {
        let kernel = crate::testguest_path();
        crate::require_guest_image(&kernel);
        Self::new(runner).kernel(kernel).memory_mib(128)
    }

    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// Appends words to the kernel command line.
    pub fn cmdline(mut self, words: &str) -> Self {
        self.cmdline
            .extend(words.split_whitespace().map(str::to_string));
        self
    }

    /// Appends `outboard.run=<name>`: the guest runs that command or script, prints
    /// `OUTBOARD_RUN_DONE name=<name> status=<n>` and powers off.
    pub fn run_command(self, name: &str) -> Self {
        self.cmdline(&format!("outboard.run={name}"))
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = Some(cpus);
        self
    }

    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = Some(mib);
        self
    }

    /// outboard-vmm's `--api-sock`; the socket file is removed when the `GuestVm` drops.
    pub fn api_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.api_socket = Some(path.into());
        self
    }

    /// Guest memory in a shared memfd, as vhost-user backends need. outboard-vmm always does
    /// this; QEMU gets a `memory-backend-memfd` with `share=on`.
    pub fn shared_memory(mut self) -> Self {
        self.shared_memory = true;
        self
    }

    /// An extra argument for the runner (after the ones the builder makes).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// The program and arguments this command runs.
    pub fn command_line(&self) -> Result<(PathBuf, Vec<OsString>), Error> {
        let cmdline = self.cmdline.join(" ");
        let mut a: Vec<OsString> = Vec::new();
        let program = match &self.runner {
            Runner::OutboardVmm(vmm) => {
                if let Some(kernel) = &self.kernel {
                    a.extend(["--kernel".into(), kernel.into()]);
                }
                if let Some(initrd) = &self.initrd {
                    a.extend(["--initrd".into(), initrd.into()]);
                }
                if !cmdline.is_empty() {
                    a.extend(["--cmdline".into(), cmdline.into()]);
                }
                // The CLI needs both with --kernel; an API-configured VM may have neither.
                let kernel = self.kernel.is_some();
                if let Some(cpus) = self.cpus.or(kernel.then_some(1)) {
                    a.extend(["--cpus".into(), cpus.to_string().into()]);
                }
                if let Some(mib) = self.memory_mib.or(kernel.then_some(512)) {
                    a.extend(["--memory".into(), format!("{mib}M").into()]);
                }
                a.extend(["--serial".into(), "stdout".into()]);
                if let Some(socket) = &self.api_socket {
                    a.extend(["--api-sock".into(), socket.into()]);
                }
                vmm.clone()
            }
            Runner::QemuTcg | Runner::QemuKvm => {
                if self.api_socket.is_some() {
                    return Err(Error::Unsupported {
                        runner: QEMU,
                        what: "an outboard API socket",
                    });
                }
                let accel = if matches!(self.runner, Runner::QemuKvm) {
                    "kvm"
                } else {
                    "tcg"
                };
                let mib = self.memory_mib.unwrap_or(512);
                let machine = if self.shared_memory {
                    "q35,memory-backend=mem"
                } else {
                    "q35"
                };
                a.extend(["-accel", accel, "-M", machine].map(OsString::from));
                a.extend(["-smp".into(), self.cpus.unwrap_or(1).to_string().into()]);
                a.extend(["-m".into(), format!("{mib}M").into()]);
                if self.shared_memory {
                    let backend = format!("memory-backend-memfd,id=mem,size={mib}M,share=on");
                    a.extend(["-object".into(), backend.into()]);
                }
                if let Some(kernel) = &self.kernel {
                    a.extend(["-kernel".into(), kernel.into()]);
                }
                if let Some(initrd) = &self.initrd {
                    a.extend(["-initrd".into(), initrd.into()]);
                }
                if !cmdline.is_empty() {
                    a.extend(["-append".into(), cmdline.into()]);
                }
                let console = [
                    "-serial",
                    "stdio",
                    "-display",
                    "none",
                    "-monitor",
                    "none",
                    "-nodefaults",
                    "-no-reboot",
                ];
                a.extend(console.map(OsString::from));
                PathBuf::from(QEMU)
            }
            Runner::Command(program) => program.clone(),
        };
        a.extend(self.args.iter().cloned());
        Ok((program, a))
    }

    pub fn spawn(self) -> Result<GuestVm, Error> {
        let (program, args) = self.command_line()?;
        let description = std::iter::once(program.as_os_str())
            .chain(args.iter().map(OsString::as_os_str))
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = Command::new(&program)
            .args(&args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Spawn {
                program: program.display().to_string(),
                source,
            })?;
        let serial = Lines::collect(child.stdout.take().expect("stdout is piped"));
        let stderr = Lines::collect(child.stderr.take().expect("stderr is piped"));
        let stdin = child.stdin.take();
        Ok(GuestVm {
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
            serial,
            stderr,
            api_socket: self.api_socket,
            description,
        })
    }
}

/// A running VM. Dropping it kills the runner and removes its API socket.
#[derive(Debug)]
pub struct GuestVm {
    child: Mutex<Child>,
    stdin: Mutex<Option<ChildStdin>>,
    serial: Arc<Lines>,
    stderr: Arc<Lines>,
    api_socket: Option<PathBuf>,
    description: String,
}

impl GuestVm {
    fn child(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first serial line containing `pattern` that no earlier call returned. Fails when
    /// the timeout passes or the runner closes its output first.
    pub fn wait_for_line(&self, pattern: &str, timeout: Duration) -> Result<String, Error> {
        match self.serial.wait_for(pattern, Instant::now() + timeout) {
            Wait::Found(line) => Ok(line),
            Wait::Timeout => Err(Error::Timeout {
                pattern: pattern.to_string(),
                timeout,
                tail: self.serial.tail(TAIL_LINES),
            }),
            Wait::Eof => {
                // The pipe closes as the process exits: give it a moment to be reaped.
                let status = self
                    .wait_exit(Duration::from_secs(2))
                    .map(|s| s.to_string())
                    .unwrap_or_else(|_| "output closed, process still running".to_string());
                Err(Error::Ended {
                    pattern: pattern.to_string(),
                    status,
                    tail: self.serial.tail(TAIL_LINES),
                    stderr: self.stderr.tail(TAIL_LINES),
                })
            }
        }
    }

    /// Waits for `OUTBOARD_GUEST_READY` and parses it.
    pub fn wait_for_ready(&self, timeout: Duration) -> Result<ReadyMarker, Error> {
        let line = self.wait_for_line(marker::READY, timeout)?;
        ReadyMarker::parse(&line).map_err(Error::Marker)
    }

    /// Waits for the line carrying `marker_name` and returns its `key=value` fields. A test
    /// helper: when the line doesn't come within `timeout` or doesn't parse, it panics with the
    /// guest's whole serial output and the runner's stderr, so the failure shows what happened.
    pub fn expect_fields(
        &self,
        marker_name: &str,
        timeout: Duration,
    ) -> std::collections::BTreeMap<String, String> {
        let line = self
            .wait_for_line(marker_name, timeout)
            .unwrap_or_else(|e| {
                panic!(
                    "{e}; serial:\n{}\nstderr:\n{}",
                    self.lines().join("\n"),
                    self.stderr()
                )
            });
        marker::fields(&line, marker_name).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Waits for `OUTBOARD_RUN_DONE` and parses it.
    pub fn wait_for_run_done(&self, timeout: Duration) -> Result<RunDone, Error> {
        let line = self.wait_for_line(marker::RUN_DONE, timeout)?;
        RunDone::parse(&line).map_err(Error::Marker)
    }

    /// Writes `text` to the serial console (the runner's stdin).
    pub fn send(&self, text: &str) -> Result<(), Error> {
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let pipe = stdin
            .as_mut()
            .ok_or_else(|| Error::Send(io::ErrorKind::BrokenPipe.into()))?;
        pipe.write_all(text.as_bytes())
            .and_then(|()| pipe.flush())
            .map_err(Error::Send)
    }

    /// Every serial line so far.
    pub fn lines(&self) -> Vec<String> {
        self.serial.all()
    }

    /// The runner's stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.all().join("\n")
    }

    /// Waits for the runner to exit, then briefly for its last output to be collected.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child().try_wait().map_err(Error::Wait)? {
                let drain = Instant::now() + Duration::from_secs(1);
                self.serial.wait_eof(drain);
                self.stderr.wait_eof(drain);
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(Error::ExitTimeout { timeout });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the runner (SIGKILL) and reaps it.
    pub fn kill(&self) {
        let mut child = self.child();
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    /// The command line the VM was started with, for messages.
    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn api_socket(&self) -> Option<&Path> {
        self.api_socket.as_deref()
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        self.kill();
        if let Some(socket) = &self.api_socket {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// A helper process a test needs next to its VM (a vhost-user backend such as
/// qemu-storage-daemon): its output goes to the test's stderr, and dropping it kills and reaps it.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
}

impl Daemon {
    pub fn spawn(command: &mut Command) -> Result<Self, Error> {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn {
                program: command.get_program().to_string_lossy().into_owned(),
                source,
            })?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running (false once it exited, whatever the status).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills it (SIGKILL) and reaps it, as a crash would end it.
    pub fn kill(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `path` exists (a socket a daemon creates once it listens); false on timeout.
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> GuestCommand {
        GuestCommand::new(Runner::Command("/bin/sh".into())).args(["-c", script])
    }

    const SHORT: Duration = Duration::from_millis(300);
    const LONG: Duration = Duration::from_secs(20);

    #[test]
    fn waits_for_lines_and_markers_from_a_fake_runner() {
        let vm = sh(
            "echo booting; echo 'OUTBOARD_GUEST_READY uptime=0.5 cpus=2 mem_kib=1024'; \
                     echo 'OUTBOARD_RUN_DONE name=hello status=0'; echo err >&2; exit 3",
        )
        .spawn()
        .unwrap();
        let ready = vm.wait_for_ready(LONG).unwrap();
        assert_eq!((ready.cpus, ready.mem_kib), (2, 1024));
        assert_eq!(
            vm.wait_for_run_done(LONG).unwrap(),
            RunDone {
                name: "hello".into(),
                status: 0
            }
        );
        assert_eq!(vm.wait_for_line("booting", LONG).unwrap(), "booting");
        assert_eq!(vm.wait_exit(LONG).unwrap().code(), Some(3));
        assert_eq!(vm.lines().len(), 3);
        assert_eq!(vm.stderr(), "err");
    }

    #[test]
    fn a_line_never_printed_times_out_with_the_output_tail() {
        let vm = sh("echo only-line; exec sleep 30").spawn().unwrap();
        let started = Instant::now();
        let err = vm.wait_for_line("never", SHORT).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("only-line"), "{err}");
        assert!(matches!(
            vm.wait_exit(SHORT),
            Err(Error::ExitTimeout { .. })
        ));
    }

    #[test]
    fn a_runner_that_exits_first_ends_the_wait_with_its_status() {
        let vm = sh("echo 'panic: no init' ; echo oops >&2; exit 7")
            .spawn()
            .unwrap();
        let err = vm.wait_for_line("OUTBOARD_GUEST_READY", LONG).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Ended { .. }), "{text}");
        assert!(
            text.contains("exit status: 7")
                && text.contains("panic: no init")
                && text.contains("oops"),
            "{text}"
        );
    }

    #[test]
    fn a_bad_marker_is_an_error_not_a_panic() {
        let vm = sh("echo 'OUTBOARD_GUEST_READY uptime=x cpus=1 mem_kib=1'")
            .spawn()
            .unwrap();
        assert!(matches!(vm.wait_for_ready(LONG), Err(Error::Marker(_))));
    }

    #[test]
    fn send_reaches_the_runner_stdin() {
        let vm = sh("read line; echo \"got $line\"").spawn().unwrap();
        vm.send("ping\n").unwrap();
        assert_eq!(vm.wait_for_line("got", LONG).unwrap(), "got ping");
    }

    #[test]
    fn drop_kills_and_reaps_the_runner() {
        let vm = sh("exec sleep 60").spawn().unwrap();
        let proc_dir = PathBuf::from(format!("/proc/{}", vm.pid()));
        assert!(proc_dir.exists());
        drop(vm);
        assert!(!proc_dir.exists(), "the runner survived the drop");
    }

    #[test]
    fn a_daemon_is_killed_on_drop_and_paths_are_awaited() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("ready");
        let script = format!("touch {}; exec sleep 60", flag.display());
        let mut daemon = Daemon::spawn(Command::new("/bin/sh").args(["-c", &script])).unwrap();
        assert!(wait_for_path(&flag, LONG));
        assert!(daemon.is_running());
        let proc_dir = PathBuf::from(format!("/proc/{}", daemon.pid()));
        drop(daemon);
        assert!(!proc_dir.exists(), "the daemon survived the drop");
        assert!(!wait_for_path(&dir.path().join("never"), SHORT));
    }

    #[test]
    fn a_missing_runner_is_a_spawn_error() {
        let err = GuestCommand::new(Runner::Command("/nonexistent/vmm".into()))
            .spawn()
            .unwrap_err();
        assert!(matches!(err, Error::Spawn { .. }), "{err}");
    }

    #[test]
    fn builds_runner_command_lines() {
        let strings = |cmd: &GuestCommand| {
            let (program, args) = cmd.command_line().unwrap();
            let args: Vec<String> = args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            (program.display().to_string(), args.join(" "))
        };
        let base = |runner| {
            GuestCommand::new(runner)
                .kernel("/k")
                .initrd("/i")
                .cmdline("console=ttyS0")
                .run_command("hello")
                .cpus(2)
        };
        let vmm = base(Runner::OutboardVmm("/bin/vmm".into()))
            .memory_mib(1024)
            .api_socket("/tmp/a.sock");
        assert_eq!(
            strings(&vmm),
            (
                "/bin/vmm".into(),
                "--kernel /k --initrd /i --cmdline console=ttyS0 outboard.run=hello --cpus 2 --memory 1024M \
                 --serial stdout --api-sock /tmp/a.sock"
                    .into()
            )
        );
        let api_only = GuestCommand::new(Runner::OutboardVmm("/bin/vmm".into())).api_socket("/s");
        assert_eq!(strings(&api_only).1, "--serial stdout --api-sock /s");
        let qemu = base(Runner::QemuTcg)
            .shared_memory()
            .arg("-drive")
            .arg("file=/d,if=virtio,format=raw");
        assert_eq!(
            strings(&qemu),
            (
                QEMU.into(),
                "-accel tcg -M q35,memory-backend=mem -smp 2 -m 512M \
                 -object memory-backend-memfd,id=mem,size=512M,share=on -kernel /k -initrd /i \
                 -append console=ttyS0 outboard.run=hello -serial stdio -display none -monitor none \
                 -nodefaults -no-reboot -drive file=/d,if=virtio,format=raw"
                    .into()
            )
        );
        assert!(strings(&base(Runner::QemuKvm))
            .1
            .starts_with("-accel kvm -M q35 -smp 2"));
        assert!(matches!(
            base(Runner::QemuTcg).api_socket("/s").command_line(),
            Err(Error::Unsupported { .. })
        ));
    }
}
