//! The `openssl` command-line tool: `s_client -dtls1_2` runs bounded in time and killed by PID,
//! and a line reader for any child process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `openssl` binary; the tests fail (they do not skip) without it.
pub fn openssl_cli() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("openssl"))
            .find(|p| p.is_file())
    });
    found.expect(
        "the `openssl` command-line tool is required for these tests: \
         install it (apt-get install openssl) or let .ci/run install it",
    )
}

/// The lines a child process prints, read on background threads.
pub struct Lines {
    rx: mpsc::Receiver<String>,
    /// Every line read so far.
    pub output: Vec<String>,
}

impl Lines {
    /// Reads `pipes` (stdout, stderr, ...) line by line, interleaved as they arrive.
    pub fn read<R: Read + Send + 'static>(pipes: impl IntoIterator<Item = R>) -> Self {
        let (tx, rx) = mpsc::channel();
        for pipe in pipes {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            rx,
            output: Vec::new(),
        }
    }

    /// Waits (at most `limit`) for a new line satisfying `pred`.
    pub fn wait_line(&mut self, limit: Duration, mut pred: impl FnMut(&str) -> bool) -> bool {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    let hit = pred(&line);
                    self.output.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Reads what is left until no line arrives for `quiet`; returns all output.
    pub fn drain(&mut self, quiet: Duration) -> Vec<String> {
        while let Ok(line) = self.rx.recv_timeout(quiet) {
            self.output.push(line);
        }
        std::mem::take(&mut self.output)
    }
}

/// A running `openssl s_client`, killed by PID when dropped.
pub struct SClient {
    child: Child,
    pub lines: Lines,
}

impl SClient {
    /// `openssl s_client -dtls1_2 -connect addr <extra>` with piped stdin/stdout.
    pub fn spawn(addr: SocketAddr, extra: &[&str]) -> Self {
        let mut child = Command::new(openssl_cli())
            .args(["s_client", "-dtls1_2", "-connect", &addr.to_string()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn openssl s_client");
        let lines = Lines::read(child.stdout.take());
        Self { child, lines }
    }

    /// Waits (at most `limit`) for a line satisfying `pred`.
    pub fn wait_line(&mut self, limit: Duration, pred: impl FnMut(&str) -> bool) -> bool {
        self.lines.wait_line(limit, pred)
    }

    /// Writes `line` and its newline with one `write` (s_client sends what one read of its
    /// stdin returns as one record; `writeln!` may write the newline separately).
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits at most `limit` for s_client to exit by itself (stdin left open); whether it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Closes stdin (s_client then sends close_notify) and waits at most `limit` for the exit;
    /// returns all output.
    pub fn finish(mut self, limit: Duration) -> Vec<String> {
        drop(self.child.stdin.take());
        self.wait_exit(limit);
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lines.drain(Duration::from_millis(100))
    }

    /// Kills s_client (SIGKILL, by PID): it vanishes without close_notify.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one s_client connection that sends `line` and waits for `reply`, bounded in time;
/// returns its output.
pub fn s_client_exchange(addr: SocketAddr, extra: &[&str], line: &str, reply: &str) -> Vec<String> {
    let mut c = SClient::spawn(addr, extra);
    c.send_line(line);
    let answered = c.wait_line(Duration::from_secs(5), |l| l == reply);
    let out = c.finish(Duration::from_secs(5));
    assert!(
        answered,
        "no {reply:?} for {line:?}; s_client printed:\n{}",
        out.join("\n")
    );
    out
}

/// Runs one s_client connection that echoes `line`, bounded in time; returns its output.
pub fn s_client_echo(addr: SocketAddr, extra: &[&str], line: &str) -> Vec<String> {
    s_client_exchange(addr, extra, line, line)
}

/// Like [`s_client_echo`], but kills s_client by PID once the echo arrived instead of waiting
/// for its close_notify exchange (s_client spends about 0.5 s on that); the server's peer is
/// left to its idle sweep.
pub fn s_client_echo_fast(addr: SocketAddr, extra: &[&str], line: &str) -> Vec<String> {
    let mut c = SClient::spawn(addr, extra);
    c.send_line(line);
    let echoed = c.wait_line(Duration::from_secs(5), |l| l == line);
    let out = std::mem::take(&mut c.lines.output);
    c.kill();
    assert!(
        echoed,
        "no echo of {line:?}; s_client printed:\n{}",
        out.join("\n")
    );
    out
}

pub fn count(out: &[String], prefix: &str) -> usize {
    out.iter().filter(|l| l.starts_with(prefix)).count()
}
