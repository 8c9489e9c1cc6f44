//! The coordinator replica binary.

use clap::Parser;
use paxos_commit_coordinator::config::ConfigArgs;

/// A paxos-commit coordinator replica: a Paxos acceptor for every transaction and the leader
/// of those begun on it. Run 2F+1 of them with the same --replicas list.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    paxos_commit_proto::run_server(
        "coordinator",
        cli.config.resolve(),
        |c| format!("paxos-commit-coordinator-{}", c.id),
        paxos_commit_coordinator::serve,
    )
}
