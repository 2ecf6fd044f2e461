//! Latency of the Redis session store's operations: tier hit, tier miss (a round trip and a
//! decryption), put, take, and what an operation costs while Redis is down or hung.
//!
//! Starts its own `redis-server` on a free loopback port (killed on exit):
//!
//! ```text
//! cargo run --release --features redis --example redis_store_latency [-- ITERATIONS]
//! ```

#[cfg(not(feature = "redis"))]
fn main() {
    eprintln!("this example needs the `redis` feature: cargo run --features redis --example redis_store_latency");
}

#[cfg(feature = "redis")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench::run()
}

#[cfg(feature = "redis")]
mod bench {
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant, SystemTime};

    use openssl_session_cache::{
        KeyRing, MemoryStore, RedisStore, SessionId, SessionStore, StoredSession,
    };

    struct Server(Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-CONT", &self.0.id().to_string()])
                .status();
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn start_redis() -> Result<(Server, u16), Box<dyn std::error::Error>> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start redis-server ({e}): apt-get install redis-server")
            })?;
        let server = Server(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("redis-server did not start".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok((server, port))
    }

    fn id(i: usize) -> SessionId {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&(i as u64).to_be_bytes());
        SessionId::new(&b).expect("32 bytes")
    }

    fn session() -> StoredSession {
        // About the size of a TLS 1.2 session DER without a client certificate.
        StoredSession::new(
            vec![0x5a; 1200],
            SystemTime::now() + Duration::from_secs(300),
        )
    }

    fn measure(name: &str, n: usize, mut op: impl FnMut(usize)) {
        let mut samples = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            op(i);
            samples.push(t.elapsed());
        }
        samples.sort_unstable();
        let mean = samples.iter().sum::<Duration>() / n as u32;
        let p = |q: f64| samples[((n as f64 * q) as usize).min(n - 1)];
        println!(
            "{name:<44} n={n:<6} mean {:>9.1?}  p50 {:>9.1?}  p99 {:>9.1?}  max {:>9.1?}",
            mean,
            p(0.50),
            p(0.99),
            samples[n - 1]
        );
    }

    pub(crate) fn run() -> Result<(), Box<dyn std::error::Error>> {
        let n: usize = std::env::args()
            .nth(1)
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(5_000);
        let (server, port) = start_redis()?;
        let url = format!("redis://127.0.0.1:{port}");
        let ring = KeyRing::generate()?;
        let timeout = Duration::from_millis(50);
        let build = |tier: usize| {
            RedisStore::builder(url.clone())
                .key_ring(ring.clone())
                .tier_entries(tier)
                .connect_timeout(timeout)
                .command_timeout(timeout)
                .breaker(3, Duration::from_secs(60))
                .build()
        };

        let memory = MemoryStore::builder().build()?;
        let tiered = build(2 * n)?;
        let untiered = build(0)?;
        for i in 0..n {
            memory.put(id(i), session())?;
        }
        println!("1200-byte sessions, redis-server on loopback, {timeout:?} timeouts\n");
        measure("memory store get (baseline)", n, |i| {
            memory.get(&id(i)).unwrap().unwrap();
        });
        measure("redis put (seal + SET PX)", n, |i| {
            tiered.put(id(i), session()).unwrap()
        });
        measure("redis get, tier hit", n, |i| {
            tiered.get(&id(i)).unwrap().unwrap();
        });
        measure("redis get, tier miss (GET + open)", n, |i| {
            untiered.get(&id(i)).unwrap().unwrap();
        });
        measure("redis get, absent id (GET nil)", n, |i| {
            assert!(untiered.get(&id(n + i)).unwrap().is_none());
        });
        measure("redis take (GETDEL + open)", n, |i| {
            untiered.take(&id(i)).unwrap().unwrap();
        });

        // Redis hung (SIGSTOP): each op waits out the timeout until the breaker opens.
        let hung = build(0)?;
        hung.put(id(0), session())?;
        let pid = server.0.id().to_string();
        Command::new("kill").args(["-STOP", &pid]).status()?;
        measure("redis hung: first failures (timeout)", 3, |i| {
            assert!(hung.get(&id(i)).is_err());
        });
        measure("redis hung: breaker open (skipped)", n, |i| {
            assert!(hung.get(&id(i)).is_err());
        });
        Command::new("kill").args(["-CONT", &pid]).status()?;

        // Redis killed: connection refused, then the breaker.
        let down = build(0)?;
        down.put(id(0), session())?;
        drop(server);
        measure("redis down: first failures (refused)", 3, |i| {
            assert!(down.get(&id(i)).is_err());
        });
        measure("redis down: breaker open (skipped)", n, |i| {
            assert!(down.get(&id(i)).is_err());
        });
        measure("redis down: tier hit still served", n.min(1000), |i| {
            tiered.get(&id(i)).unwrap().unwrap();
        });
        println!("\nstats (down store): {:?}", down.stats());
        Ok(())
    }
}
