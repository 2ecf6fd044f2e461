//! A TCP proxy that adds a fixed delay each way: a Redis "1 ms away" on one machine, for the
//! farm benchmarks (`scripts/farm_bench.sh`). The same event-driven proxy the tests use.
//!
//! ```text
//! cargo run --release --example delay_proxy -- --target 127.0.0.1:6379 --each-way-us 500
//! ```
//! It prints `listening on ADDR` and runs until killed (or for at most 10 minutes).

#[path = "../tests/support/delay_proxy.rs"]
mod delay_proxy;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// Forwards TCP connections to a target with a delay each way.
#[derive(Debug, Parser)]
struct Args {
    /// Where to forward to.
    #[arg(long)]
    target: SocketAddr,
    /// Delay added in each direction, in microseconds.
    #[arg(long, default_value_t = 500)]
    each_way_us: u64,
}

fn main() {
    let args = Args::parse();
    let proxy = delay_proxy::DelayProxy::start(args.target);
    proxy.set_delay(Duration::from_micros(args.each_way_us));
    println!("listening on {}", proxy.addr());
    std::thread::sleep(delay_proxy::MAX_LIFETIME);
}
