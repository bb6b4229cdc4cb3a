//! A minimal CRI client, for `ci/demo-containerd` and the realistic
//! benchmark: it calls containerd as kubelet does (Debian has no crictl).
//! Not part of the product; built with `cargo build --example cri`.
//!
//!     cri --address SOCK --logs DIR pull IMAGE
//!     cri --address SOCK --logs DIR run IMAGE [--name N] [--pull] [-- CMD...]
//!     cri --address SOCK --logs DIR rmi IMAGE
//!     cri --address SOCK --logs DIR clean
//!
//! `run` starts a host-network pod and one container in it, waits for the
//! container's first line of output and prints one JSON line with the
//! elapsed seconds at each step (`pull`, `sandbox`, `create_start`,
//! `first_output`, cumulative from the start) and the line itself.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[allow(dead_code)]
#[path = "../tests/util/cri.rs"]
mod cri;

#[derive(Parser)]
struct Cli {
    /// containerd's socket.
    #[arg(long)]
    address: PathBuf,
    /// Where pod logs go.
    #[arg(long)]
    logs: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Pull {
        image: String,
    },
    Run {
        image: String,
        #[arg(long, default_value = "app")]
        name: String,
        /// PullImage first (timed as part of the run).
        #[arg(long)]
        pull: bool,
        /// Seconds to wait for the first line.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Command (default: the image's).
        #[arg(last = true)]
        command: Vec<String>,
    },
    Rmi {
        image: String,
    },
    Clean,
}

fn main() {
    let cli = Cli::parse();
    let mut c = cri::Cri::connect(&cli.address, &cli.logs);
    match cli.cmd {
        Cmd::Pull { image } => match c.pull(&image) {
            Ok(r) => println!("{r}"),
            Err(e) => {
                eprintln!("cri: PullImage {image}: {e}");
                std::process::exit(1);
            }
        },
        Cmd::Run {
            image,
            name,
            pull,
            timeout,
            command,
        } => {
            let t = Instant::now();
            let mut pull_s = 0.0;
            if pull {
                if let Err(e) = c.pull(&image) {
                    eprintln!("cri: PullImage {image}: {e}");
                    std::process::exit(1);
                }
                pull_s = t.elapsed().as_secs_f64();
            }
            let pod = c.run_pod(&name);
            let sandbox_s = t.elapsed().as_secs_f64();
            let cmd: Vec<&str> = command.iter().map(String::as_str).collect();
            let id = match c.start(&pod, &name, &image, &cmd) {
                Ok(id) => id,
                Err(e) => {
                    eprintln!("cri: {e}");
                    std::process::exit(1);
                }
            };
            let started_s = t.elapsed().as_secs_f64();
            let line = c.first_output(&pod, &name, &id, Duration::from_secs(timeout));
            let first_s = t.elapsed().as_secs_f64();
            let Some(line) = line else {
                eprintln!("cri: container {name} wrote nothing within {timeout} s");
                std::process::exit(1);
            };
            println!(
                "{}",
                serde_json::json!({
                    "pull": pull_s,
                    "sandbox": sandbox_s,
                    "create_start": started_s,
                    "first_output": first_s,
                    "output": line,
                    "pod": pod.id,
                    "container": id,
                })
            );
        }
        Cmd::Rmi { image } => c.remove_image(&image),
        Cmd::Clean => c.remove_all_pods(),
    }
}
