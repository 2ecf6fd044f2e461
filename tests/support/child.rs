//! Tests whose body runs in a child process: this test binary, run again on that one test alone
//! (a crash or an abort shows up as a failed test instead of killing the run; a process-wide
//! count or a scan of the process's memory sees that test only).
//!
//! The name the child is asked to run comes from the test function's own identifier
//! ([`isolated_test!`](crate::isolated_test)), never from a string that a rename could leave
//! behind; the child must report exactly one test passed, or the parent fails (a filter that
//! matched nothing runs zero tests and exits 0). The child has a time limit and is killed by PID
//! past it.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The environment variable that tells a child which test it runs.
const CHILD_OF: &str = "OSC_ISOLATED_TEST";

/// How long a child may run before it is killed and the test fails.
pub const CHILD_LIMIT: Duration = Duration::from_secs(60);

/// Defines a `#[test]` whose body runs alone in a child process (see the module docs).
///
/// ```ignore
/// isolated_test! {
///     /// Docs.
///     fn name() { body }
/// }
/// ```
///
/// With `parent: f;` first, the parent process runs `f(name)` instead of the default (run the
/// child and require it passed): `f` runs the child itself ([`run_child`], e.g. under strace)
/// and checks what it needs.
#[macro_export]
macro_rules! isolated_test {
    (parent: $parent:expr; $(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            let name = $crate::support::child::test_name(module_path!(), stringify!($name));
            if $crate::support::child::is_child_for(&name) {
                $body
            } else {
                let parent: fn(&str) = $parent;
                parent(&name);
            }
        }
    };
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            $crate::support::child::isolated(
                module_path!(),
                stringify!($name),
                &[],
                || $body,
            );
        }
    };
}

/// The name libtest gives the test `function` of the module `module_path` (the crate's name
/// is not part of it).
pub fn test_name(module_path: &str, function: &str) -> String {
    match module_path.split_once("::") {
        Some((_, module)) => format!("{module}::{function}"),
        None => function.to_owned(),
    }
}

/// Whether this process is the child running `name`.
pub fn is_child_for(name: &str) -> bool {
    std::env::var(CHILD_OF).is_ok_and(|v| v == name)
}

/// What a child printed and how it ended.
#[derive(Debug)]
pub struct ChildRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `body` when this process is the child for the test; otherwise runs the test in a child
/// (with `wrapper` before the binary, e.g. `["strace", ...]`) and fails unless it passed as the
/// only test run.
pub fn isolated(module_path: &str, function: &str, wrapper: &[&str], body: impl FnOnce()) {
    let name = test_name(module_path, function);
    if is_child_for(&name) {
        body();
        return;
    }
    let run = run_child(&name, wrapper, CHILD_LIMIT);
    assert_ran_one(&name, &run);
}

/// Fails unless `run` is a child that ran exactly the one test `name` and it passed.
pub fn assert_ran_one(name: &str, run: &ChildRun) {
    assert!(
        run.status.success(),
        "test {name} failed in its child process ({}):\n--- stdout\n{}\n--- stderr\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout.contains("running 1 test\n")
            && run.stdout.contains(&format!("test {name} ... "))
            && run.stdout.contains("test result: ok. 1 passed;"),
        "the child process did not run exactly the test {name}:\n{}",
        run.stdout
    );
}

/// Runs this test binary on the test `name` alone (`--exact`), as its child (`CHILD_OF` set),
/// behind `wrapper` if any; kills it past `limit` and fails then.
pub fn run_child(name: &str, wrapper: &[&str], limit: Duration) -> ChildRun {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let mut child = cmd
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_OF, name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {wrapper:?} {}: {e}", exe.display()));
    let stdout = reader(child.stdout.take());
    let stderr = reader(child.stderr.take());
    let status = wait_or_kill(&mut child, limit);
    // Bounded too: a grandchild that kept the pipes open must not hang the test.
    let stdout = stdout
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    let stderr = stderr
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    match status {
        Some(status) => ChildRun {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "test {name} did not finish within {limit:?} in its child process (killed):\n\
             --- stdout\n{stdout}\n--- stderr\n{stderr}"
        ),
    }
}

/// Reads `pipe` to its end on a thread of its own; the text arrives on the receiver.
fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut out);
        }
        let _ = tx.send(String::from_utf8_lossy(&out).into_owned());
    });
    rx
}

/// Waits at most `limit` for `child`; kills it (by PID) and returns `None` past it.
pub fn wait_or_kill(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return Some(status);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
