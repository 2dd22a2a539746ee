//! Several machines training together: each node's place in the run, the orchestrator they
//! meet through, and the collective set-up that joins them.
//!
//! Multi-node training is refused by [`check_available`] until burn-collective's global
//! all-reduce works (see [`MULTI_NODE_BLOCKED`]).

use umae_api::burn::collective::{AllReduceStrategy, CollectiveConfig};

/// This process's place in a multi-node run (`umae run --nodes N --node-rank R ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    /// How many nodes (processes, usually machines) train together.
    pub count: usize,
    /// This node's index, 0..count. Every node runs the same devices per node.
    pub rank: usize,
    /// The orchestrator's address (`umae orchestrator --port P` runs it): `HOST:P`.
    pub orchestrator: String,
    /// Where the other nodes reach this one: `HOST:PORT`; this node serves its tensors on PORT.
    pub address: String,
}

impl Nodes {
    /// Check the fields; the addresses must be `HOST:PORT` (an optional `ws://` in front).
    pub fn new(
        count: usize,
        rank: usize,
        orchestrator: &str,
        address: &str,
    ) -> Result<Nodes, String> {
        if count < 2 {
            return Err(format!(
                "--nodes {count}: a multi-node run needs at least 2 nodes (leave --nodes out for one machine)"
            ));
        }
        if rank >= count {
            return Err(format!(
                "--node-rank {rank} is out of range for --nodes {count}: ranks are 0..{}",
                count - 1
            ));
        }
        let nodes = Nodes {
            count,
            rank,
            orchestrator: orchestrator.to_string(),
            address: address.to_string(),
        };
        port_of(orchestrator, "--orchestrator")?;
        nodes.port()?;
        Ok(nodes)
    }

    /// The port this node serves its tensors on (the port of `address`).
    pub fn port(&self) -> Result<u16, String> {
        port_of(&self.address, "--node-address")
    }
}

fn port_of(address: &str, flag: &str) -> Result<u16, String> {
    let rest = address.strip_prefix("ws://").unwrap_or(address);
    let port = rest
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()));
    match port {
        Some((host, Ok(port))) if !host.is_empty() && port > 0 => Ok(port),
        _ => Err(format!(
            "{flag} `{address}` is not HOST:PORT (for example 10.0.0.1:3000)"
        )),
    }
}

/// Why `--nodes` is refused: burn-collective 0.21's global all-reduce (every strategy) reuses
/// the same transfer ids in every call, so the second call between nodes waits forever
/// (reproduced with two processes on one machine; upstream: tracel-ai/burn#4549). The
/// wiring is complete and tested up to that point; `UMAE_EXPERIMENTAL_MULTI_NODE=1` lifts
/// the refusal to check a fixed burn.
pub const MULTI_NODE_BLOCKED: &str = "multi-node training is not available yet: burn-collective 0.21's global all-reduce hangs on its second call between nodes (tracel-ai/burn#4549). Train on one machine, with several devices if it has them (--device cuda:0,cuda:1,...)";

/// Run burn-collective's orchestrator for multi-node training on `port` until the process is
/// interrupted (Ctrl-C or SIGTERM). Every node of a run connects to it.
pub fn orchestrator(port: u16) -> Result<(), String> {
    if let Err(e) = std::net::TcpListener::bind(("0.0.0.0", port)) {
        return Err(format!("cannot listen on port {port}: {e}"));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the orchestrator's runtime: {e}"))?;
    runtime.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

/// The collective set-up for `local` devices on this machine, joined to the other nodes'
/// through the orchestrator when there are several.
pub(crate) fn config(local: usize, nodes: Option<&Nodes>) -> CollectiveConfig {
    let config = CollectiveConfig::default()
        .with_num_devices(local)
        .with_local_all_reduce_strategy(AllReduceStrategy::Centralized);
    match nodes {
        None => config,
        Some(n) => config
            .with_num_nodes(n.count as u32)
            .with_global_address(ws_url(&n.orchestrator).parse().expect("infallible"))
            .with_node_address(ws_url(&n.address).parse().expect("infallible"))
            .with_data_service_port(n.port().expect("checked by Nodes::new")),
    }
}

/// `ws://HOST:PORT` for an address given as `HOST:PORT` or `ws://HOST:PORT`.
fn ws_url(s: &str) -> String {
    if s.starts_with("ws://") {
        s.to_string()
    } else {
        format!("ws://{s}")
    }
}

/// The environment variable that lifts the refusal, to check a fixed burn-collective.
pub const EXPERIMENTAL: &str = "UMAE_EXPERIMENTAL_MULTI_NODE";

/// Refuse a multi-node run (with the reason) unless `UMAE_EXPERIMENTAL_MULTI_NODE` is set.
pub fn check_available(nodes: Option<&Nodes>) -> crate::Result<()> {
    match nodes {
        Some(_) if std::env::var_os(EXPERIMENTAL).is_none() => {
            Err(crate::Error::command_line(MULTI_NODE_BLOCKED))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_node_runs_are_refused_in_the_runtime_itself() {
        let nodes = Nodes::new(2, 0, "10.0.0.1:3000", "10.0.0.2:3001").unwrap();
        assert_eq!(check_available(None), Ok(()));
        if std::env::var_os(EXPERIMENTAL).is_none() {
            let e = check_available(Some(&nodes)).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains("tracel-ai/burn#4549"), "{e}");
        }
    }

    #[test]
    fn addresses_must_be_host_and_port() {
        assert!(Nodes::new(2, 0, "10.0.0.1", "10.0.0.2:3001").is_err());
        assert!(Nodes::new(2, 2, "a:1", "b:2").is_err());
        assert!(Nodes::new(1, 0, "a:1", "b:2").is_err());
        assert_eq!(Nodes::new(2, 1, "ws://a:1", "b:2").unwrap().port(), Ok(2));
    }
}
