//! The participant-agent binary.

use clap::Parser;
use paxos_commit_agent::config::AgentArgs;

/// A paxos-commit participant agent: run one beside each PostgreSQL database.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    args: AgentArgs,
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    paxos_commit_proto::run_server(
        "participant-agent",
        cli.args.resolve(),
        |c| format!("paxos-commit-agent-{}", c.participant),
        paxos_commit_agent::serve,
    )
}
